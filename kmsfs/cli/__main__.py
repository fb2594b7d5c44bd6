"""``python -m kmsfs.cli`` (how a detached keyd or mount is started)."""

import sys

from kmsfs.cli import main

sys.exit(main())
