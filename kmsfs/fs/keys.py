"""Data keys for the mount: unwrapped through keyd, cached briefly, pre-generated in a pool.

- **Open**: a file's wrapped data key is unwrapped by keyd (Decrypt, with the file's
  encryption context) and held by the open file while any handle is open.
- **After the last close** the plaintext data key stays in memory for
  ``cache_seconds`` (default 60 s), so reopening a file just closed costs no round
  trip (at most :data:`MAX_CACHED_KEYS` keys, the oldest evicted first). A CMK that
  is disabled, scheduled for deletion or deleted therefore refuses new opens (EACCES)
  at most ``cache_seconds`` later; files already open keep working until closed, as
  with any key held by an application.
- **Creation**: a file gets its data key with its first byte. A small pool of fresh
  data keys (GenerateDataKey, each bound to its own future file id) is kept ready by
  a background task so creating files does not wait on keyd. Pool entries also expire
  after ``cache_seconds`` and the pool is emptied as soon as keyd refuses the CMK.

Plaintext keys live only in this process's memory (Python cannot wipe them; the mount
process is hardened as keyd is: no core dumps, not dumpable, memory locked where allowed,
see :mod:`kmsfs.hardening`).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kmsfs.errors import (
    CorruptHeader,
    KeydUnavailable,
    KMSError,
)
from kmsfs.format.header import SLOT_KIND_ALGORITHMS, Header, SlotKind
from kmsfs.format.keys import FILE_ID_SIZE, full_context
from kmsfs.fs.config import FsConfig
from kmsfs.kms.datakeys import check_recipient_key

log = logging.getLogger("kmsfs.mount")

KEYD_TIMEOUT = 10.0
#: data keys of closed files kept at most (the oldest go first): the cache is for
#: reopening a file just closed, and a key of a deleted file is never asked for again
MAX_CACHED_KEYS = 4096


@dataclass(frozen=True, slots=True, repr=False)
class PreparedKey:
    """A data key made ahead of time for a file that does not exist yet."""

    file_id: bytes
    data_key: bytes
    wrapped_key: bytes
    key_arn: str
    expires: float

    def __repr__(self) -> str:
        return f"PreparedKey(file_id={self.file_id.hex()})"


class KeyManager:
    def __init__(
        self,
        client,
        config: FsConfig,
        *,
        cache_seconds: float = 60.0,
        pool_size: int = 8,
        max_cached_keys: int = MAX_CACHED_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._config = config
        self.cache_seconds = cache_seconds
        self.pool_size = pool_size
        self.max_cached_keys = max_cached_keys
        self._clock = clock
        self._cache: dict[tuple[bytes, bytes], tuple[bytes, float]] = {}
        self._pool: deque[PreparedKey] = deque()
        #: pools for the CMKs directories are bound to (kmsfs/fs/bindings.py), by ARN
        self._bound_pools: dict[str, deque[PreparedKey]] = {}
        self._pool_wanted = trio.Event()
        self._keyd_down = False

    # ------------------------------------------------------------ keyd status
    def _keyd_failed(self, error: Exception) -> None:
        if isinstance(error, KeydUnavailable):
            if not self._keyd_down:
                log.error(
                    "keyd unreachable, file operations needing a key fail with EIO: %s", error
                )
            self._keyd_down = True
        elif isinstance(error, KMSError):
            self._keyd_down = False
            if error.aws_type in (
                "DisabledException",
                "KMSInvalidStateException",
                "NotFoundException",
                "AccessDeniedException",
            ):
                self._pool.clear()
                for pool in self._bound_pools.values():
                    pool.clear()

    def _keyd_ok(self) -> None:
        if self._keyd_down:
            log.warning("keyd reachable again")
            self._keyd_down = False

    async def _call(self, coroutine_function, *args, **kwargs):
        try:
            with trio.fail_after(KEYD_TIMEOUT):
                result = await coroutine_function(*args, **kwargs)
        except trio.TooSlowError:
            error = KeydUnavailable(f"keyd did not answer within {KEYD_TIMEOUT:g} s")
            self._keyd_failed(error)
            raise error from None
        except (KeydUnavailable, KMSError) as error:
            self._keyd_failed(error)
            raise
        self._keyd_ok()
        return result

    # ---------------------------------------------------------------- unwrap
    async def unwrap(self, header: Header) -> bytes:
        """The plaintext data key of an existing file (from the cache or keyd).

        For a recipient slot (format version 3) it is what keyd's RSA Decrypt returns,
        the payload holding the data key, bound to the file id and context: the format
        checks it when the file is opened (``FileKeyProvider.decrypt_recipient_key``).
        Only the recipient CMK the sealed kmsfs.conf names is asked (else CorruptHeader).
        """
        slot = header.active_slot
        wrapped = slot.wrapped_key
        cache_key = (header.file_id, bytes(wrapped))
        cached = self._cache.get(cache_key)
        if cached is not None and cached[1] > self._clock():
            return cached[0]
        if slot.kind != SlotKind.KMS_BLOB:
            try:
                check_recipient_key(slot.key_arn, self._config.recipient_key_arns)
            except CorruptHeader as error:
                log.error("file id %s refused: %s", header.file_id.hex(), error)
                raise
            response = await self._call(
                self._client.call,
                "Decrypt",
                {
                    "KeyId": slot.key_arn,
                    "CiphertextBlob": bytes(wrapped),
                    "EncryptionAlgorithm": SLOT_KIND_ALGORITHMS[slot.kind],
                },
            )
            return base64.b64decode(response["Plaintext"])
        response = await self._call(
            self._client.decrypt, bytes(wrapped), encryption_context=header.full_context
        )
        return response["Plaintext"]

    def remember(self, header: Header, data_key: bytes) -> None:
        """Keep a key for ``cache_seconds`` after its file's last close."""
        if self.cache_seconds <= 0:
            return
        wrapped = bytes(header.active_slot.wrapped_key)
        cache_key = (header.file_id, wrapped)
        self._cache.pop(cache_key, None)  # re-inserted last: the oldest is evicted first
        self._cache[cache_key] = (data_key, self._clock() + self.cache_seconds)
        while len(self._cache) > self.max_cached_keys:
            del self._cache[next(iter(self._cache))]

    def forget_all(self) -> None:
        self._cache.clear()
        self._pool.clear()
        self._bound_pools.clear()

    # ----------------------------------------------------------------- create
    async def _generate(self, key_arn: str | None = None) -> PreparedKey:
        key_arn = key_arn or self._config.key_arn
        file_id = os.urandom(FILE_ID_SIZE)
        context = full_context(file_id, self._config.file_context)
        response = await self._call(
            self._client.generate_data_key, key_arn, encryption_context=context
        )
        return PreparedKey(
            file_id=file_id,
            data_key=response["Plaintext"],
            wrapped_key=response["CiphertextBlob"],
            key_arn=response.get("KeyId", key_arn),
            expires=self._clock() + (self.cache_seconds if self.cache_seconds > 0 else math.inf),
        )

    def _pool_of(self, key_arn: str | None) -> deque[PreparedKey]:
        if key_arn is None or key_arn == self._config.key_arn:
            return self._pool
        return self._bound_pools.setdefault(key_arn, deque())

    async def new_file_key(self, key_arn: str | None = None) -> PreparedKey:
        """A fresh data key for a new file under ``key_arn`` (None: kmsfs.conf's; another:
        the CMK of a bound directory, with a pool of its own): from the pool, else
        straight from keyd."""
        pool = self._pool_of(key_arn)
        now = self._clock()
        while pool:
            prepared = pool.popleft()
            if prepared.expires > now:
                self._pool_wanted.set()
                return prepared
        self._pool_wanted.set()
        return await self._generate(key_arn)

    # ------------------------------------------------------------ background
    async def run(self) -> None:
        """Keep the pool filled and drop expired cache entries; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fill_pool)
            nursery.start_soon(self._reap)

    async def _fill_pool(self) -> None:
        while True:
            for key_arn in [None, *self._bound_pools]:
                pool = self._pool_of(key_arn)
                while len(pool) < self.pool_size:
                    try:
                        pool.append(await self._generate(key_arn))
                    except (KeydUnavailable, KMSError):
                        if key_arn is not None:  # a bound CMK: refilled once asked for again
                            self._bound_pools.pop(key_arn, None)
                        await trio.sleep(1.0)  # keyd down or the key refused: try later
                        break
            self._pool_wanted = trio.Event()
            with trio.move_on_after(max(1.0, self.cache_seconds / 2)):
                await self._pool_wanted.wait()

    async def _reap(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = self._clock()
            for cache_key in [k for k, (_, expiry) in self._cache.items() if expiry <= now]:
                del self._cache[cache_key]
            for pool in [self._pool, *self._bound_pools.values()]:
                while pool and pool[0].expires <= now:
                    pool.popleft()


class FileKeyProvider:
    """The format's key provider for one open file, answering from keys fetched beforehand.

    The format's calls are synchronous; keyd's are not. So the mount fetches keys with
    awaits first (:meth:`KeyManager.unwrap`, :meth:`KeyManager.new_file_key`) and hands
    them over here: ``data_key`` for the file's existing header, ``prepared`` for the
    header an empty file gets with its first byte.
    """

    def __init__(self, data_key: bytes | None = None) -> None:
        #: the data key, or for a recipient slot (format version 3) keyd's RSA Decrypt
        #: output that holds it, which the format checks against the header
        self.data_key = data_key
        self.prepared: PreparedKey | None = None

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        if self.data_key is None:
            raise KeydUnavailable("the file's data key was not fetched")
        return self.data_key

    def decrypt_recipient_key(
        self, key_id: str, wrapped_key: bytes, encryption_algorithm: str
    ) -> bytes:
        """A recipient slot's payload, fetched beforehand (:meth:`KeyManager.unwrap`)."""
        return self.decrypt_data_key(wrapped_key, {})

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        raise KeydUnavailable("no data key was prepared for this new file")

    def take_prepared_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, bytes, str]:
        """``(file_id, data_key, wrapped_key, key_arn)`` made ahead for a new header."""
        prepared = self.prepared
        if prepared is None:
            raise KeydUnavailable("no data key was prepared for this new file")
        self.prepared = None
        self.data_key = prepared.data_key
        return prepared.file_id, prepared.data_key, prepared.wrapped_key, prepared.key_arn
