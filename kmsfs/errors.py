"""Typed exceptions for every layer of kmsfs.

Library code raises these; exactly one place per frontend translates them:
``kmsfs/fs`` maps them to errno, ``kmsfs/kms/server`` to AWS error types and HTTP
status codes, ``kmsfs/cli`` to a one-line message and an exit code.

Messages never contain key material, plaintext or passphrases.
"""

from __future__ import annotations


class KmsfsError(Exception):
    """Base of every error kmsfs raises on purpose."""

    #: process exit code the CLI uses for this kind of error
    exit_code: int = 1


class UsageError(KmsfsError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class InvalidSignature(KmsfsError):
    """``kmsfs verify`` / ``verify-mac``: the signature or MAC does not verify (exit 1,
    as ``openssl dgst -verify``)."""

    exit_code = 1


# --------------------------------------------------------------------------- KMS
class KMSError(KmsfsError):
    """An error of the AWS KMS API, carrying AWS's error type name.

    ``aws_type`` is the ``__type`` of the JSON error body, ``status`` the HTTP
    status code AWS uses for it. Subclasses exist for the types kmsfs raises;
    the client builds the matching subclass from a response by name
    (:func:`kms_error_from_type`).
    """

    aws_type: str = "KMSInternalException"
    status: int = 400
    exit_code = 3

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.aws_type}: {self.message}" if self.message else self.aws_type


class NotFoundException(KMSError):
    """The key, alias or other resource does not exist."""

    aws_type = "NotFoundException"


class DisabledException(KMSError):
    """The key is disabled."""

    aws_type = "DisabledException"


class KMSInvalidStateException(KMSError):
    """The key's state does not allow the operation (e.g. pending deletion)."""

    aws_type = "KMSInvalidStateException"


class InvalidCiphertextException(KMSError):
    """The ciphertext blob or its encryption context failed authentication."""

    aws_type = "InvalidCiphertextException"


class IncorrectKeyException(KMSError):
    """The ciphertext was not encrypted under the KeyId the caller named."""

    aws_type = "IncorrectKeyException"


class ValidationException(KMSError):
    """A parameter is missing, malformed or out of range."""

    aws_type = "ValidationException"


class AlreadyExistsException(KMSError):
    """The resource (e.g. an alias) already exists."""

    aws_type = "AlreadyExistsException"


class InvalidAliasNameException(KMSError):
    """The alias name is malformed or reserved."""

    aws_type = "InvalidAliasNameException"


class UnsupportedOperationException(KMSError):
    """The operation is not supported for this key or this service."""

    aws_type = "UnsupportedOperationException"


class InvalidKeyUsageException(KMSError):
    """The key's KeyUsage or KeySpec does not allow the operation."""

    aws_type = "InvalidKeyUsageException"


class KMSInvalidSignatureException(KMSError):
    """Verify: the signature does not verify with the key, algorithm and message."""

    aws_type = "KMSInvalidSignatureException"


class KMSInvalidMacException(KMSError):
    """VerifyMac: the MAC does not verify with the key, algorithm and message."""

    aws_type = "KMSInvalidMacException"


class InvalidArnException(KMSError):
    """The ARN is malformed."""

    aws_type = "InvalidArnException"


class InvalidMarkerException(KMSError):
    """The pagination marker is not one this service issued."""

    aws_type = "InvalidMarkerException"


class TagException(KMSError):
    """A tag key or value is malformed."""

    aws_type = "TagException"


class LimitExceededException(KMSError):
    """A quota was exceeded."""

    aws_type = "LimitExceededException"


class InvalidGrantTokenException(KMSError):
    """A grant token is not one keyd issued, or names a grant of another key."""

    aws_type = "InvalidGrantTokenException"


class InvalidGrantIdException(KMSError):
    """A grant id is malformed (AWS: 64 hexadecimal characters)."""

    aws_type = "InvalidGrantIdException"


class AccessDeniedException(KMSError):
    """The caller may not perform this operation on this resource."""

    aws_type = "AccessDeniedException"
    #: the ARN of the key the refusal concerns (keyd puts it in the audit record)
    resource_arn: str | None = None


class MalformedPolicyDocumentException(KMSError):
    """A key policy is not valid JSON, breaks the policy grammar, or is too large."""

    aws_type = "MalformedPolicyDocumentException"


class UnknownOperationException(KMSError):
    """The X-Amz-Target names no operation of this service."""

    aws_type = "UnknownOperationException"


class SerializationException(KMSError):
    """The request body is not the JSON the operation expects."""

    aws_type = "SerializationException"


class DryRunOperationException(KMSError):
    """The request would have succeeded had DryRun not been set."""

    aws_type = "DryRunOperationException"
    status = 412


class InvalidImportTokenException(KMSError):
    """An import token that is not valid for this key (ImportKeyMaterial)."""

    aws_type = "InvalidImportTokenException"


class ExpiredImportTokenException(KMSError):
    """An import token past its ParametersValidTo (ImportKeyMaterial)."""

    aws_type = "ExpiredImportTokenException"


class IncorrectKeyMaterialException(KMSError):
    """Reimported key material that is not the key's original material."""

    aws_type = "IncorrectKeyMaterialException"


class KMSInternalException(KMSError):
    """An unexpected failure inside the key service."""

    aws_type = "KMSInternalException"
    status = 500


class StorageUnavailableException(KMSInternalException):
    """keyd cannot write the audit record an operation needs, or commit its change to
    the keystore (a full disk, an I/O error), so it refused the operation.

    AWS's type (``KMSInternalException``: "an internal exception occurred; the request
    can be retried") with HTTP 503: nothing was changed or done, and the condition
    (a full disk, an I/O error) is expected to pass, so clients retry instead of
    treating it as a bug.
    """

    status = 503


class DependencyTimeoutException(KMSError):
    """The key service did not answer in time."""

    aws_type = "DependencyTimeoutException"
    status = 503


class IncompleteSignature(KMSError):
    """A request over TCP without a complete AWS Signature V4 (no or garbled
    ``Authorization`` header, a required header not signed)."""

    aws_type = "IncompleteSignature"


class InvalidSignatureException(KMSError):
    """A SigV4 signature that does not match, is stale, or is scoped to another
    region or service."""

    aws_type = "InvalidSignatureException"


class UnrecognizedClientException(KMSError):
    """An access key id keyd does not know, one that is disabled, or a security token
    keyd did not issue."""

    aws_type = "UnrecognizedClientException"


_KMS_ERRORS: dict[str, type[KMSError]] = {
    cls.aws_type: cls
    for cls in (
        InvalidImportTokenException,
        ExpiredImportTokenException,
        IncorrectKeyMaterialException,
        NotFoundException,
        DisabledException,
        KMSInvalidStateException,
        InvalidCiphertextException,
        IncorrectKeyException,
        ValidationException,
        AlreadyExistsException,
        InvalidAliasNameException,
        UnsupportedOperationException,
        InvalidKeyUsageException,
        KMSInvalidSignatureException,
        KMSInvalidMacException,
        InvalidArnException,
        InvalidMarkerException,
        TagException,
        LimitExceededException,
        InvalidGrantTokenException,
        InvalidGrantIdException,
        AccessDeniedException,
        MalformedPolicyDocumentException,
        UnknownOperationException,
        SerializationException,
        DryRunOperationException,
        KMSInternalException,
        DependencyTimeoutException,
        IncompleteSignature,
        InvalidSignatureException,
        UnrecognizedClientException,
    )
}


def kms_error_from_type(aws_type: str, message: str = "") -> KMSError:
    """Build the exception for an AWS error type name (``__type`` of an error body).

    AWS sometimes prefixes the name with a namespace (``com.amazonaws...#Name``);
    only the part after ``#`` counts. Unknown names give a plain :class:`KMSError`
    that still carries the name.
    """
    name = aws_type.rsplit("#", 1)[-1]
    cls = _KMS_ERRORS.get(name)
    if cls is not None:
        return cls(message)
    error = KMSError(message)
    error.aws_type = name
    return error


class InUse(KmsfsError):
    """What the command needs is held by another process: a socket another keyd serves,
    a keystore another keyd has open, a cipher directory mounted elsewhere."""

    exit_code = 10


class KeydAlreadyRunning(InUse):
    """Another keyd is already serving on the socket path."""


class KeydUnavailable(KmsfsError):
    """keyd could not be reached (no socket, refused, timed out, connection lost)."""

    exit_code = 4


class KeydUntrusted(KeydUnavailable):
    """The socket's path or the process answering on it belongs to an unexpected user."""


# ---------------------------------------------------------------------- keystore
class KeystoreError(KmsfsError):
    """The keystore cannot be created, opened or unsealed."""

    exit_code = 5


class KeystoreNotFound(KeystoreError):
    """No keystore exists at the given path."""


class KeystoreExists(KeystoreError):
    """A keystore already exists where a new one was to be created."""


class KeystoreInsecure(KeystoreError):
    """The keystore's permissions let other users change it."""


class WrongRootKey(KeystoreError):
    """The passphrase or root key file does not unseal this keystore."""


# ------------------------------------------------------------------------- audit
class AuditError(KmsfsError):
    """The audit log cannot be written or read."""

    exit_code = 6


class AuditLogInUse(AuditError, InUse):
    """Another process (another keyd on the same keystore) holds the audit log's lock."""

    exit_code = InUse.exit_code


class AuditTampered(AuditError):
    """`audit verify` found a line that was edited, removed, inserted or reordered."""

    def __init__(self, message: str, line_number: int) -> None:
        super().__init__(message)
        self.line_number = line_number


# ------------------------------------------------------------------------ format
class FormatError(KmsfsError):
    """Base of the on-disk format errors: the data cannot be trusted or read."""

    exit_code = 7


class CorruptHeader(FormatError):
    """The file header failed authentication or is malformed."""


class CorruptChunk(FormatError):
    """A content chunk failed authentication."""

    def __init__(self, chunk_index: int, message: str = "") -> None:
        super().__init__(message or f"chunk {chunk_index} failed authentication")
        self.chunk_index = chunk_index


class UnsupportedFormat(FormatError):
    """The file uses a format version this kmsfs does not know."""

    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported format version {version}")
        self.version = version


class FileTooLarge(KmsfsError):
    """A write or truncate would take the file past the format's maximum size (EFBIG)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a file of {size} bytes is larger than the maximum of {limit}")
        self.size = size
        self.limit = limit


class Truncated(FormatError):
    """The file ends before its final chunk: its tail was cut off."""
