"""AWS Signature Version 4 verification of requests keyd receives.

Requests over TCP must be signed as AWS's SDKs sign KMS requests
(``Authorization: AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/kms/aws4_request,
SignedHeaders=..., Signature=...``). keyd recomputes the signature with **botocore's own
canonicaliser** (:class:`botocore.auth.SigV4Auth`: canonical request, string to sign,
signing key), restricted to the headers the client says it signed, and compares with
:func:`hmac.compare_digest`. Nothing here canonicalises by hand.

What is refused, with AWS's error types (all HTTP 400, as AWS answers them):

- no ``Authorization`` header, or one that is not ``AWS4-HMAC-SHA256`` with
  ``Credential``, ``SignedHeaders`` and ``Signature``; no ``X-Amz-Date``; ``host`` or
  ``x-amz-date`` not signed: ``IncompleteSignature``;
- a signature that does not match, a credential scope for another service than ``kms``,
  a region keyd does not serve, a scope date other than the request's, an
  ``X-Amz-Date`` more than 5 minutes from keyd's clock (AWS's window), an
  ``X-Amz-Content-SHA256`` that is not the body's hash: ``InvalidSignatureException``;
- an access key id keyd does not know or one that is Inactive, and any
  ``X-Amz-Security-Token`` (keyd issues no temporary credentials):
  ``UnrecognizedClientException`` with AWS's words ("The security token included in the
  request is invalid.").

Like AWS, a valid request may be replayed within the 5-minute window; plain HTTP is
therefore allowed only on loopback (see :mod:`kmsfs.kms.server`).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.auth import SigV4Auth
from botocore.credentials import Credentials

from kmsfs.errors import (
    IncompleteSignature,
    InvalidSignatureException,
    KMSError,
    UnrecognizedClientException,
)

SERVICE = "kms"
ALGORITHM = "AWS4-HMAC-SHA256"
#: AWS's window for X-Amz-Date (either side of the server's clock)
MAX_SKEW_SECONDS = 5 * 60
_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_INVALID_TOKEN = "The security token included in the request is invalid."
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service "
    "documentation for details."
)

#: access key id -> (IAM user name, secret access key), None if unknown or Inactive
CredentialLookup = Callable[[str], "tuple[str, str] | None"]


@dataclass(frozen=True, slots=True)
class SignedIdentity:
    """Who a verified request was signed by."""

    user_name: str
    access_key_id: str


class _Headers:
    """Received header fields, case-insensitive, several values per name: what
    botocore's canonicaliser reads of ``request.headers`` and of ``headers_to_sign``
    (``in``, ``[]``, iteration over names, ``get_all``), without ``email.message``'s
    cost (botocore's HTTPHeaders is one)."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, list[str]]) -> None:
        self._fields = fields

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()][0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def get_all(self, name: str) -> list[str]:
        return self._fields.get(name.lower(), [])


@dataclass
class _ReceivedRequest:
    """The parts of :class:`botocore.awsrequest.AWSRequest` that SigV4Auth's canonical
    request and string to sign read, for a request keyd received."""

    method: str
    url: str
    headers: _Headers
    body: bytes
    context: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)


class _ReceivedRequestSigner(SigV4Auth):
    """botocore's SigV4 signer, told which headers the received request signed.

    botocore's own ``headers_to_sign`` picks the headers of a request it is about to
    send; for a received one the set is the client's ``SignedHeaders``. The payload
    hash is the body's (``payload`` would rebuild the request to find it: botocore's
    answer for a bytes body is this). Canonical request and string to sign are
    botocore's code; the signing key is derived by botocore's ``_sign`` chain and kept
    per (access key, secret, date, region) by :class:`SigV4Verifier`.
    """

    def __init__(
        self,
        credentials: Credentials,
        region: str,
        signed: _Headers,
        payload_hash: str,
    ) -> None:
        super().__init__(credentials, SERVICE, region)
        self._signed = signed
        self._payload_hash = payload_hash

    def headers_to_sign(self, request: Any) -> _Headers:  # type: ignore[override]
        return self._signed

    def payload(self, request: Any) -> str:
        return self._payload_hash

    def signing_key(self, date: str) -> bytes:
        """botocore's key derivation (SigV4Auth.signature's first four steps)."""
        secret = self.credentials.secret_key
        k_date = self._sign(f"AWS4{secret}".encode(), date)
        k_region = self._sign(k_date, self._region_name)
        k_service = self._sign(k_region, self._service_name)
        return self._sign(k_service, "aws4_request")


def _refuse(cls: type[KMSError], message: str, access_key_id: str | None) -> KMSError:
    error = cls(message)
    #: the access key id the request claimed, for the audit record of the refusal
    error.claimed_access_key_id = access_key_id  # type: ignore[attr-defined]
    return error


def claimed_access_key_id(error: KMSError) -> str | None:
    return getattr(error, "claimed_access_key_id", None)


def _parse_authorization(value: str) -> tuple[str, list[str], list[str], str]:
    """(access key id, scope [date, region, service, terminator], signed headers,
    signature) of an ``Authorization`` header; IncompleteSignature if garbled."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise _refuse(
            IncompleteSignature,
            f"Unsupported Authorization Type; keyd accepts only {ALGORITHM}",
            None,
        )
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, equals, field_value = part.strip().partition("=")
        if equals:
            fields[name] = field_value
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if name not in fields]
    if missing:
        raise _refuse(
            IncompleteSignature,
            " ".join(f"Authorization header requires '{name}' parameter." for name in missing),
            None,
        )
    credential = fields["Credential"].split("/")
    if len(credential) != 5 or not credential[0]:
        raise _refuse(
            IncompleteSignature,
            "Authorization header's Credential is not ACCESS_KEY_ID/DATE/REGION/SERVICE/"
            "aws4_request",
            None,
        )
    signed_headers = fields["SignedHeaders"].split(";")
    if any(not name or name != name.lower().strip() for name in signed_headers):
        raise _refuse(
            IncompleteSignature, "SignedHeaders must be lower-case names separated by ';'", None
        )
    return credential[0], credential[1:], signed_headers, fields["Signature"]


class SigV4Verifier:
    """Verifies the SigV4 signature of received requests against keyd's access keys."""

    def __init__(
        self,
        credentials: CredentialLookup,
        regions: Iterable[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credentials = credentials
        self.regions = frozenset(regions)
        self.clock = clock
        #: (access key id, secret, date, region) -> signing key; a day's keys are few
        self._signing_keys: dict[tuple[str, str, str, str], bytes] = {}

    def verify(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> SignedIdentity:
        """The identity of a correctly signed request; raises the AWS error otherwise.

        *headers* are the received header fields (h11's lower-case names and raw values).
        """
        all_values: dict[str, list[str]] = {}
        try:
            for raw_name, raw_value in headers:
                all_values.setdefault(raw_name.decode("ascii").lower(), []).append(
                    raw_value.decode("utf-8")
                )
        except UnicodeDecodeError:
            raise _refuse(IncompleteSignature, "header fields must be UTF-8", None) from None
        by_name = {name: values[0] for name, values in all_values.items()}
        authorization = by_name.get("authorization")
        if authorization is None:
            raise _refuse(
                IncompleteSignature,
                "Request is missing Authentication Token: keyd over TCP needs requests "
                "signed with AWS Signature Version 4",
                None,
            )
        access_key_id, scope, signed_headers, signature = _parse_authorization(authorization)
        if "x-amz-security-token" in by_name:
            # keyd issues no session tokens, so none can be valid
            raise _refuse(UnrecognizedClientException, _INVALID_TOKEN, access_key_id)
        amz_date = by_name.get("x-amz-date", "")
        if not _AMZ_DATE.fullmatch(amz_date):
            raise _refuse(
                IncompleteSignature,
                "Authorization header requires existence of either a 'X-Amz-Date' or a "
                "'Date' header (keyd: X-Amz-Date, as YYYYMMDDTHHMMSSZ).",
                access_key_id,
            )
        signed_at = _parse_amz_date(amz_date, access_key_id)
        for required in ("host", "x-amz-date"):
            if required not in signed_headers:
                raise _refuse(
                    IncompleteSignature,
                    f"'{required}' must be a 'SignedHeader' in the AWS Authorization.",
                    access_key_id,
                )
        scope_date, region, service, terminator = scope
        if terminator != "aws4_request":
            raise _refuse(
                IncompleteSignature,
                "Credential should be scoped with a valid terminator: 'aws4_request'",
                access_key_id,
            )
        if service != SERVICE:
            raise _refuse(
                InvalidSignatureException,
                f"Credential should be scoped to correct service: '{SERVICE}'.",
                access_key_id,
            )
        if region not in self.regions:
            raise _refuse(
                InvalidSignatureException,
                "Credential should be scoped to a valid region (keyd serves "
                f"{', '.join(sorted(self.regions))}).",
                access_key_id,
            )
        if scope_date != amz_date[:8]:
            raise _refuse(
                InvalidSignatureException,
                f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                f"date from HTTP: '{scope_date}' != '{amz_date[:8]}', from '{amz_date}'.",
                access_key_id,
            )
        self._check_time(amz_date, signed_at, access_key_id)
        found = self.credentials(access_key_id)
        if found is None:
            raise _refuse(UnrecognizedClientException, _INVALID_TOKEN, access_key_id)
        user_name, secret = found
        payload_hash = hashlib.sha256(body).hexdigest()
        content_sha256 = by_name.get("x-amz-content-sha256")
        if content_sha256 is not None and not hmac.compare_digest(
            content_sha256.encode(), payload_hash.encode()
        ):
            raise _refuse(
                InvalidSignatureException,
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
                access_key_id,
            )
        if not _SIGNATURE.fullmatch(signature):
            raise _refuse(InvalidSignatureException, _MISMATCH, access_key_id)
        signed: dict[str, list[str]] = {}
        for name in signed_headers:
            if name not in all_values:
                raise _refuse(InvalidSignatureException, _MISMATCH, access_key_id)
            signed[name] = all_values[name]
        request = _ReceivedRequest(
            method=method,
            url="http://keyd" + target,
            headers=_Headers(all_values),
            body=body,
            context={"timestamp": amz_date},
        )
        signer = _ReceivedRequestSigner(
            Credentials(access_key_id, secret), region, _Headers(signed), payload_hash
        )
        canonical_request = signer.canonical_request(request)
        string_to_sign = signer.string_to_sign(request, canonical_request)
        cache_key = (access_key_id, secret, scope_date, region)
        signing_key = self._signing_keys.get(cache_key)
        if signing_key is None:
            if len(self._signing_keys) >= 1024:
                self._signing_keys.clear()
            signing_key = self._signing_keys[cache_key] = signer.signing_key(scope_date)
        expected = signer._sign(signing_key, string_to_sign, hex=True)
        if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
            raise _refuse(InvalidSignatureException, _MISMATCH, access_key_id)
        return SignedIdentity(user_name, access_key_id)

    def _check_time(self, amz_date: str, signed_at: int, access_key_id: str) -> None:
        now = self.clock()
        if abs(now - signed_at) > MAX_SKEW_SECONDS:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
            bound = time.strftime(
                "%Y%m%dT%H%M%SZ",
                time.gmtime(now - MAX_SKEW_SECONDS if signed_at < now else now + MAX_SKEW_SECONDS),
            )
            if signed_at < now:
                message = f"Signature expired: {amz_date} is now earlier than {bound} "
                message += f"({stamp} - 5 min.)"
            else:
                message = f"Signature not yet current: {amz_date} is still later than {bound} "
                message += f"({stamp} + 5 min.)"
            raise _refuse(InvalidSignatureException, message, access_key_id)


def _parse_amz_date(amz_date: str, access_key_id: str) -> int:
    """Seconds since the epoch of an X-Amz-Date already shaped YYYYMMDDTHHMMSSZ;
    IncompleteSignature if it names no real time."""
    try:
        # time.strptime costs ~40 us; the format is fixed (checked by _AMZ_DATE)
        fields = (amz_date[0:4], amz_date[4:6], amz_date[6:8])
        clock = (amz_date[9:11], amz_date[11:13], amz_date[13:15])
        year, month, day = (int(part) for part in fields)
        hour, minute, second = (int(part) for part in clock)
        if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60):
            raise ValueError(amz_date)
        if second > 60:
            raise ValueError(amz_date)
        signed_at = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except ValueError:
        raise _refuse(
            IncompleteSignature, f"X-Amz-Date {amz_date!r} is not a date", access_key_id
        ) from None
    return signed_at
