"""SigV4 verification (kmsfs.kms.sigv4) against requests signed by botocore itself."""

from __future__ import annotations

import json
import time

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kmsfs.errors import (
    IncompleteSignature,
    InvalidSignatureException,
    UnrecognizedClientException,
)
from kmsfs.kms.sigv4 import SigV4Verifier, claimed_access_key_id

ACCESS_KEY = "AKIAEXAMPLEEXAMPLE00"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY00"
REGION = "local"
BODY = json.dumps({"KeyId": "alias/x", "NumberOfBytes": 32}).encode()


def _lookup(access_key_id: str) -> tuple[str, str] | None:
    return ("alice", SECRET) if access_key_id == ACCESS_KEY else None


def _sign(
    *,
    secret: str = SECRET,
    access_key: str = ACCESS_KEY,
    region: str = REGION,
    service: str = "kms",
    body: bytes = BODY,
    extra: dict[str, str] | None = None,
    token: str | None = None,
) -> list[tuple[bytes, bytes]]:
    """Headers of a request as botocore's SigV4Auth signs it (at the current time)."""
    request = AWSRequest(
        method="POST",
        url="http://127.0.0.1:4599/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService.GenerateDataKey",
            "Host": "127.0.0.1:4599",
            **(extra or {}),
        },
    )
    SigV4Auth(Credentials(access_key, secret, token), service, region).add_auth(request)
    return [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]


def _verifier(clock=time.time) -> SigV4Verifier:
    return SigV4Verifier(_lookup, [REGION, "eu-west-1"], clock=clock)


def _replace(headers, name: bytes, value: bytes | None):
    out = [(k, v) for k, v in headers if k != name]
    if value is not None:
        out.append((name, value))
    return out


def test_botocore_signed_request_verifies() -> None:
    identity = _verifier().verify("POST", "/", _sign(), BODY)
    assert (identity.user_name, identity.access_key_id) == ("alice", ACCESS_KEY)


def test_any_configured_region_verifies() -> None:
    assert _verifier().verify("POST", "/", _sign(region="eu-west-1"), BODY).user_name == "alice"


def test_wrong_secret_is_invalid_signature() -> None:
    with pytest.raises(InvalidSignatureException, match="does not match") as caught:
        _verifier().verify("POST", "/", _sign(secret="x" * 40), BODY)
    assert claimed_access_key_id(caught.value) == ACCESS_KEY


def test_changed_body_is_invalid_signature() -> None:
    with pytest.raises(InvalidSignatureException):
        _verifier().verify("POST", "/", _sign(), BODY.replace(b"32", b"64"))


def test_changed_signed_header_is_invalid_signature() -> None:
    headers = _replace(_sign(), b"x-amz-target", b"TrentService.Decrypt")
    with pytest.raises(InvalidSignatureException):
        _verifier().verify("POST", "/", headers, BODY)


def test_content_sha256_must_be_the_bodys() -> None:
    forged = BODY.replace(b"32", b"64")
    headers = _sign(extra={"X-Amz-Content-SHA256": __import__("hashlib").sha256(BODY).hexdigest()})
    assert _verifier().verify("POST", "/", headers, BODY).user_name == "alice"
    with pytest.raises(InvalidSignatureException, match="x-amz-content-sha256"):
        _verifier().verify("POST", "/", headers, forged)


def test_unknown_access_key_is_unrecognized_client() -> None:
    with pytest.raises(UnrecognizedClientException, match="security token"):
        _verifier().verify("POST", "/", _sign(access_key="AKIAUNKNOWNUNKNOWN00"), BODY)


def test_security_token_is_refused() -> None:
    with pytest.raises(UnrecognizedClientException):
        _verifier().verify("POST", "/", _sign(token="FwoGZXIvYXdzE"), BODY)


def test_stale_and_future_dates_are_refused() -> None:
    headers = _sign()
    now = time.time()
    with pytest.raises(InvalidSignatureException, match="Signature expired"):
        _verifier(lambda: now + 301).verify("POST", "/", headers, BODY)
    with pytest.raises(InvalidSignatureException, match="not yet current"):
        _verifier(lambda: now - 301).verify("POST", "/", headers, BODY)
    assert _verifier(lambda: now + 290).verify("POST", "/", headers, BODY)


def test_other_service_or_region_is_refused() -> None:
    with pytest.raises(InvalidSignatureException, match="service"):
        _verifier().verify("POST", "/", _sign(service="s3"), BODY)
    with pytest.raises(InvalidSignatureException, match="region"):
        _verifier().verify("POST", "/", _sign(region="us-east-1"), BODY)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        b"Basic dXNlcjpwYXNz",
        b"AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEEXAMPLE00/20260101/local/kms/aws4_request",
        b"AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host;x-amz-date, Signature=00",
        b"AWS4-HMAC-SHA256 garbage",
    ],
)
def test_missing_or_garbled_authorization_is_incomplete(authorization: bytes | None) -> None:
    headers = _replace(_sign(), b"authorization", authorization)
    with pytest.raises(IncompleteSignature):
        _verifier().verify("POST", "/", headers, BODY)


def test_missing_date_is_incomplete() -> None:
    headers = _replace(_sign(), b"x-amz-date", None)
    with pytest.raises(IncompleteSignature, match="X-Amz-Date"):
        _verifier().verify("POST", "/", headers, BODY)


def test_a_header_signed_twice_is_canonicalised_as_botocore_does() -> None:
    headers = _sign(extra={"X-Amz-Meta": "a"})
    # the same header sent twice and signed so: botocore joins the values with ","
    from botocore.auth import SigV4Auth as Signer

    request = AWSRequest(
        method="POST",
        url="http://127.0.0.1:4599/",
        data=BODY,
        headers={"X-Amz-Target": "TrentService.ListKeys", "Host": "127.0.0.1:4599"},
    )
    request.headers.add_header("X-Amz-Meta", "one")
    request.headers.add_header("X-Amz-Meta", "two")
    Signer(Credentials(ACCESS_KEY, SECRET), "kms", REGION).add_auth(request)
    headers = [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]
    assert sum(1 for name, _ in headers if name == b"x-amz-meta") == 2
    assert _verifier().verify("POST", "/", headers, BODY).user_name == "alice"
    reordered = [h for h in headers if h[0] != b"x-amz-meta"] + [
        (b"x-amz-meta", b"two"),
        (b"x-amz-meta", b"one"),
    ]
    with pytest.raises(InvalidSignatureException):
        _verifier().verify("POST", "/", reordered, BODY)


@pytest.mark.parametrize("date", ["20261399T000000Z", "20260101T250000Z", "20260101T006100Z"])
def test_impossible_dates_are_refused(date: str) -> None:
    headers = _replace(_sign(), b"x-amz-date", date.encode())
    with pytest.raises(IncompleteSignature):
        _verifier().verify("POST", "/", headers, BODY)
