"""Which key service a cipher directory's CMK lives in, and a client for it.

The filesystem side needs four operations of a key service -- GenerateDataKey, Decrypt,
DescribeKey (and the format's data-key provider built on the first two) -- and gets
them from one of two implementations with the same methods and the same errors:

- ``keyd``: :class:`kmsfs.kms.client.KMSClient` / ``AsyncKMSClient`` on keyd's Unix
  socket (kmsfs.conf without ``key_service``; the socket chosen by
  :func:`kmsfs.fs.config.keyd_endpoint`);
- ``aws``: :class:`kmsfs.kms.aws.AwsKMSClient` / ``AsyncAwsKMSClient`` through botocore
  (kmsfs.conf's ``key_service`` entry: region, endpoint URL, profile), with botocore's
  credential chain: whoever mounts uses their own credentials.

:func:`resolve` picks one from kmsfs.conf and the user's options; the result makes
clients (:meth:`KeyService.client`, :meth:`KeyService.async_client`) and data-key
providers (:meth:`KeyService.data_key_provider`).

Trust. kmsfs.conf is not authenticated before its metadata key is unwrapped, so what it
says about the key service is a hint. A keyd socket it names must pass the socket trust
checks (:mod:`kmsfs.kms.trust`). An endpoint URL it names is used only when it is one of
AWS's own (``https://...amazonaws.com``) or when the mounting user names the same URL
(``--aws-endpoint-url`` or ``$AWS_ENDPOINT_URL_KMS``): otherwise whoever can write the
cipher directory could send the mount to a server of theirs that hands out data keys
they know (the config's seal would hold: they made it).
"""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.parse
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsfs.errors import UsageError
from kmsfs.fs.config import AwsKeyService, FsConfig, key_arn_region, keyd_endpoint
from kmsfs.kms.datakeys import check_recipient_key

#: botocore's service-specific endpoint variable (the user's own choice, not the config's)
ENDPOINT_ENV = "AWS_ENDPOINT_URL_KMS"
KEYD = "keyd"
AWS = "aws"


@dataclass(frozen=True)
class KeyServiceOptions:
    """What the user said on the command line about the key service."""

    keyd_socket: str | None = None
    keyd_uid: str | None = None
    #: "keyd" or "aws" (None: from kmsfs.conf, or from the key for ``kmsfs init``)
    kind: str | None = None
    aws_endpoint_url: str | None = None
    aws_profile: str | None = None
    aws_region: str | None = None

    @property
    def wants_aws(self) -> bool:
        return self.kind == AWS or bool(
            self.aws_endpoint_url or self.aws_profile or self.aws_region
        )


@dataclass(frozen=True)
class KeyService:
    """A resolved key service: keyd at ``keyd_socket``, or AWS at ``aws``."""

    kind: str
    #: None: found when a client is made (kmsfs.kms.paths.find_keyd)
    keyd_socket: str | Path | None = None
    keyd_uid: str | None = None
    aws: Any = None  # kmsfs.kms.aws.AwsEndpoint (imported only when used: botocore)

    def describe(self, client: Any = None) -> str:
        """The service, for messages; with a connected keyd client, its socket."""
        if self.kind == AWS:
            return self.aws.describe()
        socket_path = getattr(client, "socket_path", None) or self.keyd_socket
        return f"keyd at {socket_path}" if socket_path else "keyd"

    def client(self, *, timeout: float = 10.0):
        """A blocking client (a context manager) with KMSClient's methods."""
        if self.kind == AWS:
            from kmsfs.kms.aws import AwsKMSClient

            return AwsKMSClient(self.aws, timeout=timeout)
        from kmsfs.kms.client import KMSClient

        return KMSClient(self.keyd_socket, keyd_uid=self.keyd_uid, timeout=timeout)

    def async_client(self, *, timeout: float = 10.0):
        """A trio client (an async context manager) with AsyncKMSClient's methods."""
        if self.kind == AWS:
            from kmsfs.kms.aws import AsyncAwsKMSClient

            return AsyncAwsKMSClient(self.aws, timeout=timeout)
        from kmsfs.kms.client import AsyncKMSClient

        return AsyncKMSClient(self.keyd_socket, keyd_uid=self.keyd_uid, timeout=timeout)

    def data_key_provider(
        self, *, recipient_keys: Collection[str] | None = None
    ) -> ServiceDataKeyProvider:
        return ServiceDataKeyProvider(self, recipient_keys=recipient_keys)


class ServiceDataKeyProvider:
    """The format's :class:`kmsfs.format.DataKeyProvider` over a key service (offline
    tools). One client for the provider's life: keyd's reconnects by itself, botocore's
    keeps its connection pool."""

    def __init__(
        self, service: KeyService, *, recipient_keys: Collection[str] | None = None
    ) -> None:
        self.service = service
        self._client: Any = None
        #: CMKs whose recipient slots are accepted (see kmsfs.kms.datakeys.KeydDataKeyProvider)
        self.recipient_keys = None if recipient_keys is None else frozenset(recipient_keys)

    def _get_client(self):
        if self._client is None:
            self._client = self.service.client()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        response = self._get_client().generate_data_key(
            key_id, encryption_context=encryption_context
        )
        return response["Plaintext"], response["CiphertextBlob"], response["KeyId"]

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        return self._get_client().decrypt(wrapped_blob, encryption_context=encryption_context)[
            "Plaintext"
        ]

    def decrypt_recipient_key(
        self, key_id: str, wrapped_key: bytes, encryption_algorithm: str
    ) -> bytes:
        """A recipient slot's data key (format version 3): Decrypt with KeyId and
        EncryptionAlgorithm, no encryption context, as AWS KMS takes asymmetric
        ciphertext; only for the CMKs this provider accepts."""
        check_recipient_key(key_id, self.recipient_keys)
        response = self._get_client().call(
            "Decrypt",
            {
                "KeyId": key_id,
                "CiphertextBlob": bytes(wrapped_key),  # bytes: both clients encode them
                "EncryptionAlgorithm": encryption_algorithm,
            },
        )
        return base64.b64decode(response["Plaintext"])


def _aws_endpoint(region: str, endpoint_url: str | None, profile: str | None):
    from kmsfs.kms.aws import AwsEndpoint, check_endpoint_url

    if endpoint_url is not None:
        check_endpoint_url(endpoint_url)
    return AwsEndpoint(region=region, endpoint_url=endpoint_url, profile=profile)


def is_aws_endpoint(url: str) -> bool:
    """An endpoint of AWS itself: https to a host under amazonaws.com(.cn)."""
    parsed = urllib.parse.urlsplit(url)
    host = (parsed.hostname or "").lower()
    return parsed.scheme == "https" and (
        host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")
    )


def _chosen_endpoint_url(stored: AwsKeyService, options: KeyServiceOptions) -> str | None:
    """The endpoint URL to call for a config's aws entry (see the module's Trust)."""
    if options.aws_endpoint_url:
        return options.aws_endpoint_url
    from_environment = os.environ.get(ENDPOINT_ENV) or None
    if stored.endpoint_url is None or is_aws_endpoint(stored.endpoint_url):
        # None: botocore's own choice (AWS's endpoint for the region, or the user's
        # $AWS_ENDPOINT_URL_KMS / $AWS_ENDPOINT_URL / profile setting)
        return stored.endpoint_url
    if from_environment == stored.endpoint_url:
        return stored.endpoint_url
    raise UsageError(
        f"kmsfs.conf names the key service endpoint {stored.endpoint_url}, which is not "
        "AWS's own: kmsfs uses it only if you name it too (--aws-endpoint-url "
        f"{stored.endpoint_url}, or ${ENDPOINT_ENV})"
    )


def resolve(config: FsConfig, options: KeyServiceOptions | None = None) -> KeyService:
    """The key service for a cipher directory: its kmsfs.conf's entry, the user's options
    overriding the endpoint URL and the profile (never the kind of service)."""
    options = options or KeyServiceOptions()
    stored = config.key_service
    if stored is None:
        socket = keyd_endpoint(options.keyd_socket, config, keyd_uid=options.keyd_uid)
        return KeyService(KEYD, keyd_socket=socket, keyd_uid=options.keyd_uid)
    endpoint = _aws_endpoint(
        options.aws_region or stored.region,
        _chosen_endpoint_url(stored, options),
        options.aws_profile or stored.profile,
    )
    return KeyService(AWS, aws=endpoint)


def resolve_for_key(key_arn: str | None, options: KeyServiceOptions) -> KeyService:
    """The key service for a single file (no cipher directory): AWS when the user asked
    for it with an ``--aws-*`` option (the region from the option, else the key's ARN,
    else botocore's default), else keyd."""
    if not options.wants_aws:
        return KeyService(KEYD, keyd_socket=options.keyd_socket, keyd_uid=options.keyd_uid)
    region = options.aws_region or (key_arn_region(key_arn) if key_arn else None)
    if region is None:
        region = _default_region(options.aws_profile)
    return KeyService(AWS, aws=_aws_endpoint(region, options.aws_endpoint_url, options.aws_profile))


def _default_region(profile: str | None) -> str:
    import botocore.session

    region = botocore.session.Session(profile=profile).get_config_variable("region")
    if not region:
        raise UsageError("no AWS region: give --aws-region, a key ARN, or set AWS_REGION")
    return region


@contextlib.contextmanager
def data_key_provider(
    service: KeyService, *, recipient_keys: Collection[str] | None = None
) -> Iterator[ServiceDataKeyProvider]:
    provider = service.data_key_provider(recipient_keys=recipient_keys)
    try:
        yield provider
    finally:
        provider.close()
