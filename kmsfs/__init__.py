"""kmsfs: a transparently encrypting filesystem with its own AWS-KMS-compatible key daemon."""

__version__ = "0.1.0"
