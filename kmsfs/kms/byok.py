"""Imported key material (BYOK): GetParametersForImport, ImportKeyMaterial,
DeleteImportedKeyMaterial, for keys created with ``Origin=EXTERNAL``.

As AWS KMS documents it ("Importing key material", AWS KMS Developer Guide):

1. ``CreateKey`` with ``Origin=EXTERNAL`` makes a key without material, in state
   ``PendingImport``.
2. ``GetParametersForImport`` (``WrappingAlgorithm``, ``WrappingKeySpec``) returns an RSA
   wrapping public key (DER SubjectPublicKeyInfo) and an import token, valid together for
   24 hours (``ParametersValidTo``).
3. The user wraps 256 bits of material with that public key: ``RSAES_OAEP_SHA_1`` /
   ``RSAES_OAEP_SHA_256`` encrypt the material directly with RSA-OAEP;
   ``RSA_AES_KEY_WRAP_SHA_1`` / ``RSA_AES_KEY_WRAP_SHA_256`` wrap it with a fresh AES-256
   key using AES key wrap with padding (RFC 5649) and encrypt that AES key with RSA-OAEP,
   sending the RSA ciphertext followed by the wrapped material.
4. ``ImportKeyMaterial`` (``ImportToken``, ``EncryptedKeyMaterial``, ``ExpirationModel``
   ``KEY_MATERIAL_EXPIRES`` with ``ValidTo``, or ``KEY_MATERIAL_DOES_NOT_EXPIRE``) makes the
   key Enabled. Once ``ValidTo`` passes the material is deleted and the key goes back to
   ``PendingImport`` (CloudTrail event ``DeleteExpiredKeyMaterial``);
   ``DeleteImportedKeyMaterial`` does so at once. Only the same material can be imported
   again (``IncorrectKeyMaterialException``).

kmsfs differences: the wrapping private key travels inside the import token, sealed
under the keystore's root key (so keyd keeps no state between the two calls, and a root
key rotation voids outstanding tokens); ``RSAES_PKCS1_V1_5`` (deprecated by AWS) and
``SM2PKE`` (China Regions) are refused; only symmetric (``SYMMETRIC_DEFAULT``) material is
imported so far. And, to make an escrow copy useful after the keystore is lost,
``CreateKey`` with ``Origin=EXTERNAL`` accepts a ``KeyId`` (kmsfs's own member; AWS
clients never send it): a fresh keystore can recreate the key under its old id and
re-import the escrowed material, and every ciphertext made under it decrypts again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from kmsfs.errors import (
    ExpiredImportTokenException,
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    InvalidImportTokenException,
    KeystoreError,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsfs.kms.caller import Caller
from kmsfs.kms.keystore import KeyRecord, Keystore

DAY = 86400.0
#: "Each wrapping public key and import token set is valid for 24 hours."
PARAMETERS_LIFETIME = DAY
#: ValidTo must lie in the future, at most 365 days ahead (AWS KMS API reference,
#: ImportKeyMaterial: "between 15 minutes and 365 days from the time of the request").
MIN_VALID_SECONDS = 15 * 60
MAX_VALID_DAYS = 365
WRAPPING_ALGORITHMS = {
    "RSAES_OAEP_SHA_1": hashes.SHA1,
    "RSAES_OAEP_SHA_256": hashes.SHA256,
    "RSA_AES_KEY_WRAP_SHA_1": hashes.SHA1,
    "RSA_AES_KEY_WRAP_SHA_256": hashes.SHA256,
}
REFUSED_WRAPPING_ALGORITHMS = {"RSAES_PKCS1_V1_5", "SM2PKE"}
WRAPPING_KEY_SPECS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
EXPIRATION_MODELS = ("KEY_MATERIAL_EXPIRES", "KEY_MATERIAL_DOES_NOT_EXPIRE")
SYMMETRIC_MATERIAL_BYTES = 32

BYOK_REQUEST_MEMBERS: dict[str, dict[str, str]] = {
    "GetParametersForImport": {
        "KeyId": "string",
        "WrappingAlgorithm": "string",
        "WrappingKeySpec": "string",
    },
    "ImportKeyMaterial": {
        "KeyId": "string",
        "ImportToken": "blob",
        "EncryptedKeyMaterial": "blob",
        "ValidTo": "number",
        "ExpirationModel": "string",
        "ImportType": "string",
        "KeyMaterialDescription": "string",
        "KeyMaterialId": "string",
    },
    "DeleteImportedKeyMaterial": {"KeyId": "string", "KeyMaterialId": "string"},
}
BYOK_STATE_CHANGING = frozenset({"ImportKeyMaterial", "DeleteImportedKeyMaterial"})


def material_check(key_id: str, material: bytes) -> bytes:
    return hashlib.sha256(
        b"kmsfs-imported-material-v1|" + key_id.encode() + b"|" + material
    ).digest()


def unwrap_material(private_key: rsa.RSAPrivateKey, algorithm: str, encrypted: bytes) -> bytes:
    """The material a client wrapped for *algorithm* (see the module doc); raises
    InvalidCiphertextException when it does not unwrap."""
    digest = WRAPPING_ALGORITHMS[algorithm]
    oaep = padding.OAEP(mgf=padding.MGF1(digest()), algorithm=digest(), label=None)
    size = private_key.key_size // 8
    try:
        if algorithm.startswith("RSAES_OAEP"):
            return private_key.decrypt(encrypted, oaep)
        if len(encrypted) <= size:
            raise ValueError("too short")
        aes_key = private_key.decrypt(encrypted[:size], oaep)
        if len(aes_key) != 32:
            raise ValueError("the ephemeral AES key must be 256 bits")
        return aes_key_unwrap_with_padding(aes_key, encrypted[size:])
    except (ValueError, InvalidUnwrap):
        raise InvalidCiphertextException(
            "The EncryptedKeyMaterial could not be decrypted with the import parameters: "
            f"wrap 256 bits of material for {algorithm} with the PublicKey from the same "
            "GetParametersForImport response"
        ) from None


class ImportedMaterial:
    """The BYOK operations, mixed into KeyService."""

    keystore: Keystore
    clock: Any

    # provided by KeyService
    def _resolve(
        self, params: dict[str, Any], name: str = "KeyId", *, allow_alias: bool = True
    ) -> KeyRecord: ...  # noqa: E501  # pragma: no cover
    def _authorize(
        self, caller: Caller, operation: str, key: KeyRecord, *a: Any, **k: Any
    ) -> None: ...  # noqa: E501  # pragma: no cover
    def arn(self, key_id: str) -> str: ...  # pragma: no cover
    def _forget_ciphers(self, key_id: str) -> None: ...  # pragma: no cover
    def _after_commit(self, action: Any, *, on_abort: Any = None) -> None: ...  # pragma: no cover

    # ---------------------------------------------------------------- helpers
    def _external_key(self, params: dict[str, Any], caller: Caller, operation: str) -> KeyRecord:
        key = self._resolve(params, allow_alias=False)
        self._authorize(caller, operation, key)
        if key.origin != "EXTERNAL":
            raise UnsupportedOperationException(
                f"{self.arn(key.key_id)} has Origin {key.origin}; {operation} needs a key "
                "created with Origin EXTERNAL"
            )
        if key.key_state == "PendingDeletion":
            raise KMSInvalidStateException(f"{self.arn(key.key_id)} is pending deletion.")
        return key

    def import_state(self, key_id: str) -> dict[str, Any] | None:
        row = self.keystore._db.execute(
            "SELECT expiration_model, valid_to, material_check FROM imported_key_material "
            "WHERE key_id = ?",
            (key_id,),
        ).fetchone()
        return dict(row) if row is not None else None

    def material_expired(self, key: KeyRecord, now: float) -> bool:
        if key.origin != "EXTERNAL":
            return False
        state = self.import_state(key.key_id)
        return bool(
            state
            and state["expiration_model"] == "KEY_MATERIAL_EXPIRES"
            and state["valid_to"] is not None
            and state["valid_to"] <= now
        )

    def import_metadata(self, key: KeyRecord) -> dict[str, Any]:
        """DescribeKey's ExpirationModel and ValidTo for an EXTERNAL key."""
        state = self.import_state(key.key_id)
        if key.origin != "EXTERNAL" or not state or state["expiration_model"] is None:
            return {}
        if key.key_state == "PendingImport":
            return {}
        metadata: dict[str, Any] = {"ExpirationModel": state["expiration_model"]}
        if state["valid_to"] is not None:
            metadata["ValidTo"] = state["valid_to"]
        return metadata

    def delete_material(self, db: Any, key: KeyRecord) -> None:
        """Remove the key's material (the check value stays: only the same material may
        come back). A key not pending deletion goes back to PendingImport."""
        db.execute("DELETE FROM key_versions WHERE key_id = ?", (key.key_id,))
        db.execute(
            "UPDATE imported_key_material SET expiration_model = NULL, valid_to = NULL "
            "WHERE key_id = ?",
            (key.key_id,),
        )
        if key.key_state != "PendingDeletion":
            self.keystore.update_key(db, key.key_id, key_state="PendingImport")
        self.keystore.scrub_pending = True  # push the deleted pages out of the WAL soon

    # ------------------------------------------------------------- operations
    def _op_GetParametersForImport(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        algorithm = params.get("WrappingAlgorithm")
        spec = params.get("WrappingKeySpec")
        if algorithm in REFUSED_WRAPPING_ALGORITHMS:
            raise UnsupportedOperationException(
                f"WrappingAlgorithm {algorithm} is not supported; use one of "
                + ", ".join(sorted(WRAPPING_ALGORITHMS))
            )
        if algorithm not in WRAPPING_ALGORITHMS:
            raise ValidationException(
                f"1 validation error detected: Value {algorithm!r} at 'wrappingAlgorithm' "
                "failed to satisfy constraint: Member must satisfy enum value set: "
                f"[{', '.join(sorted({*WRAPPING_ALGORITHMS, *REFUSED_WRAPPING_ALGORITHMS}))}]"
            )
        if spec not in WRAPPING_KEY_SPECS:
            raise ValidationException(
                f"1 validation error detected: Value {spec!r} at 'wrappingKeySpec' failed to "
                f"satisfy constraint: Member must satisfy enum value set: "
                f"[{', '.join(sorted(WRAPPING_KEY_SPECS))}]"
            )
        key = self._external_key(params, caller, "GetParametersForImport")
        private_key = rsa.generate_private_key(65537, WRAPPING_KEY_SPECS[spec])
        valid_to = self.clock() + PARAMETERS_LIFETIME
        payload = json.dumps(
            {
                "key_id": key.key_id,
                "algorithm": algorithm,
                "valid_to": valid_to,
                "private_key": base64.b64encode(
                    private_key.private_bytes(
                        serialization.Encoding.DER,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                ).decode(),
            }
        ).encode()
        token = self.keystore.seal_secret(f"import-token:{key.key_id}", payload)
        public = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {
            "KeyId": self.arn(key.key_id),
            "ImportToken": base64.b64encode(token).decode(),
            "PublicKey": base64.b64encode(public).decode(),
            "ParametersValidTo": valid_to,
        }

    def _op_ImportKeyMaterial(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        model = params.get("ExpirationModel") or "KEY_MATERIAL_EXPIRES"
        if model not in EXPIRATION_MODELS:
            raise ValidationException(
                f"ExpirationModel must be one of {', '.join(EXPIRATION_MODELS)}, not {model!r}"
            )
        valid_to = params.get("ValidTo")
        now = self.clock()
        if model == "KEY_MATERIAL_EXPIRES":
            if valid_to is None:
                raise ValidationException(
                    "ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES"
                )
            if isinstance(valid_to, bool) or not isinstance(valid_to, int | float):
                raise ValidationException("ValidTo must be a timestamp (seconds since the epoch)")
            if not now + MIN_VALID_SECONDS <= valid_to <= now + MAX_VALID_DAYS * DAY:
                raise ValidationException(
                    "ValidTo must be between 15 minutes and 365 days from now"
                )
        elif valid_to is not None:
            raise ValidationException(
                "ValidTo must be omitted when ExpirationModel is KEY_MATERIAL_DOES_NOT_EXPIRE"
            )
        if params.get("ImportType") not in (None, "EXISTING_KEY_MATERIAL"):
            raise UnsupportedOperationException(
                "only the key's one material can be imported (no new key material versions)"
            )
        try:
            token = base64.b64decode(params.get("ImportToken") or "", validate=True)
            encrypted = base64.b64decode(params.get("EncryptedKeyMaterial") or "", validate=True)
        except ValueError:
            raise ValidationException("ImportToken and EncryptedKeyMaterial are base64") from None
        if not token or not encrypted:
            raise ValidationException("ImportToken and EncryptedKeyMaterial are required")
        key = self._external_key(params, caller, "ImportKeyMaterial")
        if key.key_spec != "SYMMETRIC_DEFAULT":
            raise UnsupportedOperationException(
                "kmsfs imports symmetric key material only (KeySpec SYMMETRIC_DEFAULT)"
            )
        try:
            opened = self.keystore.unseal_secret(f"import-token:{key.key_id}", token)
        except KeystoreError:
            opened = None
        if opened is None or len(token) < 28:
            raise InvalidImportTokenException(
                f"The import token is not valid for {self.arn(key.key_id)}: use the ImportToken "
                "from the GetParametersForImport response for this key"
            )
        details = json.loads(opened)
        if not hmac.compare_digest(details["key_id"], key.key_id):  # pragma: no cover
            raise InvalidImportTokenException("The import token is for another key")
        if details["valid_to"] <= now:
            raise ExpiredImportTokenException(
                "The import token and public key expired (they are valid for 24 hours); "
                "call GetParametersForImport again"
            )
        private_key = serialization.load_der_private_key(
            base64.b64decode(details["private_key"]), password=None
        )
        assert isinstance(private_key, rsa.RSAPrivateKey)
        material = unwrap_material(private_key, details["algorithm"], encrypted)
        if len(material) != SYMMETRIC_MATERIAL_BYTES:
            raise IncorrectKeyMaterialException(
                f"Symmetric key material must be 256 bits (32 bytes), not {len(material)} bytes"
            )
        check = material_check(key.key_id, material)
        state = self.import_state(key.key_id)
        if state is not None and not hmac.compare_digest(bytes(state["material_check"]), check):
            raise IncorrectKeyMaterialException(
                "The key material is not the material this key had: a key can take only "
                "its original material again"
            )
        stored_valid_to = float(valid_to) if model == "KEY_MATERIAL_EXPIRES" else None
        with self.keystore.transaction() as db:
            db.execute("DELETE FROM key_versions WHERE key_id = ?", (key.key_id,))
            self.keystore.insert_version(db, key.key_id, 1, material, now, None)
            db.execute(
                "INSERT OR REPLACE INTO imported_key_material "
                "(key_id, expiration_model, valid_to, material_check) VALUES (?, ?, ?, ?)",
                (key.key_id, model, stored_valid_to, check),
            )
            if key.key_state == "PendingImport":
                self.keystore.update_key(db, key.key_id, key_state="Enabled", current_version=1)
        self._after_commit(lambda: self._forget_ciphers(key.key_id))
        return {}

    def _op_DeleteImportedKeyMaterial(
        self, params: dict[str, Any], caller: Caller
    ) -> dict[str, Any]:
        key = self._external_key(params, caller, "DeleteImportedKeyMaterial")
        if key.key_state == "PendingImport":
            raise KMSInvalidStateException(f"{self.arn(key.key_id)} has no key material.")
        with self.keystore.transaction() as db:
            self.delete_material(db, key)
        self._after_commit(lambda: self._forget_ciphers(key.key_id))
        return {}
