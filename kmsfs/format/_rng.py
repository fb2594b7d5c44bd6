"""The format's only source of randomness (nonces and file ids).

Production code calls :func:`random_bytes`, which is ``os.urandom``. Tests that build golden
vectors replace ``kmsfs.format._rng.random_bytes`` with a deterministic generator
(``monkeypatch.setattr``); nothing in the public API accepts a nonce or a generator.
"""

from __future__ import annotations

import os

random_bytes = os.urandom
