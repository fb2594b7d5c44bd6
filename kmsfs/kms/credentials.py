"""Access keys for callers that sign their requests with AWS Signature V4.

``kmsfs keyd credentials create --user NAME`` makes an access key for the IAM user
``arn:aws:iam::<account>:user/NAME``: an access key id (``AKIA`` + 16 base32
characters, IAM's shape) and a 40-character secret, shown once. The secret is stored
only sealed under the keystore's root key (:meth:`Keystore.seal_secret`, the access key
id as associated data, so a sealed secret copied onto another row fails to open).

The table lives in the keystore's SQLite database, so the commands work whether keyd
runs or not, and a running keyd sees a change at once: :meth:`CredentialStore.lookup`
reads the row on every request (one indexed SELECT, a few microseconds) and keeps only
the unsealed secret of a row it has already seen, keyed by the sealed bytes, so a
disabled or deleted key is refused from the next request on.

Statuses are IAM's: ``Active`` and ``Inactive``.
"""

from __future__ import annotations

import base64
import os
import re
import time
from dataclasses import dataclass

from kmsfs.errors import UsageError
from kmsfs.kms.keystore import Keystore
from kmsfs.kms.principal import ROOT_UID, login_name

ACTIVE = "Active"
INACTIVE = "Inactive"
#: IAM user names: 1-64 of letters, digits and ``+=,.@_-``
_USER_NAME = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)
#: IAM access key ids: 16-128 word characters; ours are AKIA + 16 base32 characters
ACCESS_KEY_ID_RE = re.compile(r"[A-Z0-9]{16,128}")
#: unsealed secrets kept in memory at most (one per access key in use)
_CACHE_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class AccessKey:
    access_key_id: str
    user_name: str
    status: str
    create_date: float

    def as_iam(self) -> dict[str, object]:
        """IAM's AccessKeyMetadata shape (ListAccessKeys)."""
        return {
            "UserName": self.user_name,
            "AccessKeyId": self.access_key_id,
            "Status": self.status,
            "CreateDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.create_date)),
        }


def check_user_name(name: str) -> str:
    if not _USER_NAME.fullmatch(name):
        raise UsageError(
            f"--user {name!r}: an IAM user name is 1-64 letters, digits and +=,.@_- characters"
        )
    root_login = login_name(ROOT_UID) or "root"
    if name in (root_login, "root"):
        # ...:user/<root's login> also names uid 0 in key policies (RequestContext.other_arns)
        raise UsageError(f"--user {name}: that name is the root user's; choose another")
    return name


def _new_access_key_id() -> str:
    return "AKIA" + base64.b32encode(os.urandom(10)).decode("ascii")


def _new_secret() -> str:
    # IAM's secrets are 40 characters of base64's alphabet: 30 random bytes
    return base64.b64encode(os.urandom(30)).decode("ascii")


def _label(access_key_id: str) -> str:
    return f"credential:{access_key_id}"


class CredentialStore:
    """The keystore's access keys."""

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore
        #: access key id -> (sealed secret, unsealed secret)
        self._secrets: dict[str, tuple[bytes, str]] = {}

    # ------------------------------------------------------------- management
    def create(self, user_name: str) -> tuple[AccessKey, str]:
        """A new Active access key for *user_name*, and its secret (shown once)."""
        check_user_name(user_name)
        access_key_id = _new_access_key_id()
        secret = _new_secret()
        sealed = self.keystore.seal_secret(_label(access_key_id), secret.encode("ascii"))
        now = time.time()
        with self.keystore.transaction() as db:
            db.execute(
                "INSERT INTO credentials (access_key_id, user_name, sealed_secret, status, "
                "create_date) VALUES (?, ?, ?, ?, ?)",
                (access_key_id, user_name, sealed, ACTIVE, now),
            )
        return AccessKey(access_key_id, user_name, ACTIVE, now), secret

    def list(self, user_name: str | None = None) -> list[AccessKey]:
        rows = self.keystore.query(
            "SELECT access_key_id, user_name, status, create_date FROM credentials "
            "ORDER BY user_name, create_date"
        )
        keys = [AccessKey(row[0], row[1], row[2], row[3]) for row in rows]
        return [key for key in keys if user_name is None or key.user_name == user_name]

    def set_status(self, access_key_id: str, status: str) -> AccessKey:
        with self.keystore.transaction() as db:
            changed = db.execute(
                "UPDATE credentials SET status = ? WHERE access_key_id = ?",
                (status, access_key_id),
            ).rowcount
        if not changed:
            raise UsageError(f"no access key {access_key_id} in this keystore")
        return next(key for key in self.list() if key.access_key_id == access_key_id)

    def delete(self, access_key_id: str) -> None:
        with self.keystore.transaction() as db:
            deleted = db.execute(
                "DELETE FROM credentials WHERE access_key_id = ?", (access_key_id,)
            ).rowcount
        if not deleted:
            raise UsageError(f"no access key {access_key_id} in this keystore")
        self._secrets.pop(access_key_id, None)

    # ------------------------------------------------------------- keyd's side
    def lookup(self, access_key_id: str) -> tuple[str, str] | None:
        """(user name, secret) of an Active access key; None if unknown or Inactive."""
        if not ACCESS_KEY_ID_RE.fullmatch(access_key_id):
            return None
        rows = self.keystore.query(
            "SELECT user_name, sealed_secret, status FROM credentials WHERE access_key_id = ?",
            (access_key_id,),
        )
        if not rows or rows[0][2] != ACTIVE:
            self._secrets.pop(access_key_id, None)
            return None
        user_name, sealed = rows[0][0], bytes(rows[0][1])
        cached = self._secrets.get(access_key_id)
        if cached is not None and cached[0] == sealed:
            return user_name, cached[1]
        secret = self.keystore.unseal_secret(_label(access_key_id), sealed).decode("ascii")
        if len(self._secrets) >= _CACHE_LIMIT:
            self._secrets.clear()
        self._secrets[access_key_id] = (sealed, secret)
        return user_name, secret
