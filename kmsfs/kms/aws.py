"""The ``aws`` key service: AWS KMS, or any KMS-compatible endpoint, through botocore.

:class:`AwsKMSClient` (blocking) and :class:`AsyncAwsKMSClient` (trio) offer the same
methods as keyd's clients (:class:`kmsfs.kms.client.KMSOperations`: ``generate_data_key``,
``decrypt``, ``describe_key``...) with the same results (``Plaintext`` and
``CiphertextBlob`` as bytes) and the same failures, so the mount and the offline tools
use either without knowing which:

- an error answer (``ClientError``) raises the :class:`kmsfs.errors.KMSError` subclass
  named by AWS's error code (``AccessDeniedException``, ``DisabledException``...);
- no answer (connection refused, DNS, TLS, timeouts, a connection lost) and no usable
  credentials raise :class:`kmsfs.errors.KeydUnavailable` with one line naming the
  endpoint and the cause (never a credential).

Credentials come from botocore's chain (environment, the profile's files, SSO, container
and instance metadata); kmsfs never stores one. Retries and timeouts are botocore's:
the ``standard`` retry mode (exponential backoff with jitter on throttling, 5xx and
connection errors) with :data:`MAX_ATTEMPTS` attempts, and the connect and read timeouts
below. On top of that, the asynchronous client keeps backing off on
``ThrottlingException`` (AWS's answer to a request rate over the account's quota, see
"Requests quotas" in the AWS KMS Developer Guide: "retry with exponential backoff")
until its caller's deadline: a read waiting for its data key is slowed, not failed.
"""

from __future__ import annotations

import base64
import ipaddress
import random
import urllib.parse
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import botocore.config
import botocore.exceptions
import botocore.session
import trio
from botocore import xform_name

from kmsfs.errors import KeydUnavailable, KMSError, UsageError, kms_error_from_type
from kmsfs.kms.client import KMSOperations
from kmsfs.kms.protocol import KMSRequest

__all__ = ["AsyncAwsKMSClient", "AwsEndpoint", "AwsKMSClient", "check_endpoint_url"]

#: attempts per call in botocore's standard retry mode (its default is 3)
MAX_ATTEMPTS = 4
#: the mount's: it retries throttling itself (below) within its own deadline, and says
#: EIO soon when the service cannot be reached, as with keyd
MOUNT_MAX_ATTEMPTS = 2
CONNECT_TIMEOUT = 5.0
#: the AWS error codes that mean "too many requests": back off and try again
THROTTLING_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
)
#: the asynchronous client's own backoff after botocore's retries: first, cap (seconds)
THROTTLE_BACKOFF_FIRST = 0.05
THROTTLE_BACKOFF_CAP = 2.0


@dataclass(frozen=True)
class AwsEndpoint:
    """Where and as whom to call: a region, an optional endpoint URL and profile name."""

    region: str
    endpoint_url: str | None = None
    profile: str | None = None

    def describe(self) -> str:
        where = f"AWS KMS in {self.region}"
        if self.endpoint_url:
            where = f"KMS endpoint {self.endpoint_url} (region {self.region})"
        return where + (f", profile {self.profile}" if self.profile else "")


def check_endpoint_url(url: str) -> str:
    """``url`` if it is an https URL, or http to a loopback address; else UsageError.

    GenerateDataKey and Decrypt answers carry plaintext data keys: plain HTTP is allowed
    only where nothing but this host can see it (as keyd's own TCP listener does).
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"endpoint URL {url!r} is not an http(s) URL")
    if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
        raise UsageError(
            f"endpoint URL {url} is plain HTTP to a host that is not this one: data keys would "
            "cross the network unencrypted; use https"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AwsKMSClient(KMSOperations[dict[str, Any]]):
    """Blocking KMS client over botocore (thread-safe, as botocore's clients are)."""

    def __init__(
        self, endpoint: AwsEndpoint, *, timeout: float = 10.0, max_attempts: int = MAX_ATTEMPTS
    ) -> None:
        if endpoint.endpoint_url is not None:
            check_endpoint_url(endpoint.endpoint_url)
        self.endpoint = endpoint
        self.timeout = timeout
        try:
            session = botocore.session.Session(profile=endpoint.profile)
            self._client = session.create_client(
                "kms",
                region_name=endpoint.region,
                endpoint_url=endpoint.endpoint_url,
                config=botocore.config.Config(
                    connect_timeout=min(CONNECT_TIMEOUT, timeout),
                    read_timeout=timeout,
                    retries={"mode": "standard", "max_attempts": max_attempts},
                    user_agent_extra="kmsfs",
                ),
            )
            # the endpoint botocore chose ($AWS_ENDPOINT_URL_KMS, a profile's setting) too
            check_endpoint_url(self._client.meta.endpoint_url)
        except botocore.exceptions.ProfileNotFound:
            raise UsageError(f"AWS profile {endpoint.profile!r} is not configured") from None
        except botocore.exceptions.BotoCoreError as error:
            raise UsageError(f"cannot set up {endpoint.describe()}: {error}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _execute(self, request: KMSRequest, on_behalf_of: object = None) -> dict[str, Any]:
        _no_forwarding(on_behalf_of)
        return request.decode_result(self.call(request.operation, request.params))

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Call ``operation`` (AWS's name, e.g. ``GenerateDataKey``) with ``params`` (binary
        values as bytes); the result as keyd's clients' ``call`` gives it: JSON types, binary
        fields as base64 strings (the convenience methods decode them to bytes)."""
        method = getattr(self._client, xform_name(operation))
        try:
            result = method(**params)
        except botocore.exceptions.ClientError as error:
            raise _kms_error(error) from None
        except botocore.exceptions.NoCredentialsError:
            raise KeydUnavailable(
                f"{self.endpoint.describe()}: no AWS credentials found (botocore's chain: "
                "environment, profile, container or instance metadata)"
            ) from None
        except (
            botocore.exceptions.ConnectionError,  # refused, DNS, TLS, connect timeout
            botocore.exceptions.HTTPClientError,  # read timeout, connection lost
            botocore.exceptions.CredentialRetrievalError,
            botocore.exceptions.MetadataRetrievalError,
            botocore.exceptions.TokenRetrievalError,
        ) as error:
            raise KeydUnavailable(f"{self.endpoint.describe()}: {_one_line(error)}") from None
        except botocore.exceptions.ParamValidationError as error:
            raise UsageError(f"{operation}: {_one_line(error)}") from None
        result.pop("ResponseMetadata", None)
        for name, value in result.items():
            if isinstance(value, bytes | bytearray):
                result[name] = base64.b64encode(value).decode("ascii")
        return result


def _no_forwarding(on_behalf_of: object) -> None:
    """AWS KMS has no forwarded identity (keyd's X-Kmsfs-Forwarded-Caller): a call made
    for another user is refused here rather than made with the mount's own credentials."""
    if on_behalf_of is not None:
        raise UsageError("AWS KMS cannot take a forwarded caller; only keyd can")


def _kms_error(error: botocore.exceptions.ClientError) -> KMSError:
    details = error.response.get("Error", {})
    code = details.get("Code") or "UnknownError"
    return kms_error_from_type(code, _one_line(details.get("Message") or ""))


def _one_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class AsyncAwsKMSClient(KMSOperations[Awaitable[dict[str, Any]]]):
    """The blocking client's calls in worker threads, for trio code (the mount).

    A call cancelled by its caller's deadline is abandoned: its thread ends by itself
    within botocore's timeouts, and its answer is dropped. Throttling is retried with
    exponential backoff and full jitter for as long as the caller waits.
    """

    def __init__(self, endpoint: AwsEndpoint, *, timeout: float = 10.0) -> None:
        self._client = AwsKMSClient(endpoint, timeout=timeout, max_attempts=MOUNT_MAX_ATTEMPTS)
        self.endpoint = endpoint

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._client.close()
        await trio.lowlevel.checkpoint()

    async def _execute(self, request: KMSRequest, on_behalf_of: object = None) -> dict[str, Any]:
        _no_forwarding(on_behalf_of)
        return request.decode_result(await self.call(request.operation, request.params))

    async def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        backoff = THROTTLE_BACKOFF_FIRST
        while True:
            try:
                return await trio.to_thread.run_sync(
                    self._client.call, operation, params, abandon_on_cancel=True
                )
            except KMSError as error:
                if error.aws_type not in THROTTLING_CODES:
                    raise
            await trio.sleep(random.uniform(0, backoff))
            backoff = min(THROTTLE_BACKOFF_CAP, backoff * 2)
