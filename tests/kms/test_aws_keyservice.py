"""The ``aws`` key service without a mount: kmsfs.conf's entry, the endpoint rules, and
the botocore client's errors and throttling backoff (botocore's Stubber: no network)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio
from botocore.stub import Stubber

from kmsfs.errors import AccessDeniedException, KeydUnavailable, UsageError
from kmsfs.fs.config import AwsKeyService, ConfigTampered, FsConfig
from kmsfs.fs.keyservice import AWS, KeyServiceOptions, is_aws_endpoint, resolve
from kmsfs.kms.aws import AsyncAwsKMSClient, AwsEndpoint, AwsKMSClient, check_endpoint_url
from tests.aws_endpoint import aws_environment

ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
METADATA_KEY = bytes(range(32))


def _config(service: AwsKeyService | None) -> FsConfig:
    config = FsConfig(
        filesystem_id="0" * 32,
        key_arn=ARN,
        key_service=service,
        metadata_key_wrapped=b"wrapped",
        source=Path("/c/kmsfs.conf"),
    )
    config.seal(METADATA_KEY)
    return config


# ------------------------------------------------------------------ kmsfs.conf
def test_key_service_entry_round_trips_and_is_absent_for_keyd() -> None:
    service = AwsKeyService("eu-west-1", "https://kms.example.test", "ops")
    config = _config(service)
    document = json.loads(config.to_json())
    assert document["key_service"] == {
        "type": "aws",
        "region": "eu-west-1",
        "endpoint_url": "https://kms.example.test",
        "profile": "ops",
    }
    again = FsConfig.from_json(config.to_json(), Path("/c/kmsfs.conf"))
    assert again.key_service == service
    again.verify(METADATA_KEY)
    assert "key_service" not in json.loads(_config(None).to_json())


@pytest.mark.parametrize(
    ("field", "value"),
    [("region", "us-west-2"), ("endpoint_url", "https://elsewhere.test"), ("profile", "other")],
)
def test_key_service_entry_is_covered_by_the_mac(field: str, value: str) -> None:
    text = _config(AwsKeyService("eu-west-1", "https://kms.example.test", "ops")).to_json()
    document = json.loads(text)
    document["key_service"][field] = value
    changed = FsConfig.from_json(json.dumps(document), Path("/c/kmsfs.conf"))
    with pytest.raises(ConfigTampered):
        changed.verify(METADATA_KEY)


@pytest.mark.parametrize(
    "entry",
    [
        "aws",
        {"type": "keyd", "region": "eu-west-1"},
        {"type": "aws"},
        {"type": "aws", "region": "EU WEST"},
        {"type": "aws", "region": "eu-west-1", "endpoint_url": "ftp://x"},
        {"type": "aws", "region": "eu-west-1", "profile": ""},
        {"type": "aws", "region": "eu-west-1", "secret_access_key": "x"},
    ],
)
def test_malformed_key_service_entry_is_refused(entry: object) -> None:
    from kmsfs.fs.config import ConfigError

    document = json.loads(_config(None).to_json())
    document["key_service"] = entry
    with pytest.raises(ConfigError, match="key_service"):
        FsConfig.from_json(json.dumps(document), Path("/c/kmsfs.conf"))


# --------------------------------------------------------------------- endpoints
@pytest.mark.parametrize(
    "url",
    ["https://kms.example.test", "http://127.0.0.1:4599", "http://[::1]:1", "http://localhost"],
)
def test_endpoint_urls_allowed(url: str) -> None:
    assert check_endpoint_url(url) == url


@pytest.mark.parametrize("url", ["http://10.0.0.1:4599", "http://kms.example.test", "ftp://x/"])
def test_endpoint_urls_refused(url: str) -> None:
    with pytest.raises(UsageError):
        check_endpoint_url(url)


@pytest.mark.parametrize(
    ("url", "aws"),
    [
        ("https://kms.eu-west-1.amazonaws.com", True),
        ("https://kms-fips.us-gov-west-1.amazonaws.com", True),
        ("https://kms.cn-north-1.amazonaws.com.cn", True),
        ("http://kms.eu-west-1.amazonaws.com", False),
        ("https://kms.amazonaws.com.evil.test", False),
        ("https://evil.test/.amazonaws.com", False),
        ("https://127.0.0.1:4599", False),
    ],
)
def test_is_aws_endpoint(url: str, aws: bool) -> None:
    assert is_aws_endpoint(url) is aws


def test_endpoint_named_only_by_kmsfs_conf_needs_the_users_word(monkeypatch) -> None:
    aws_environment(monkeypatch)
    config = _config(AwsKeyService("eu-west-1", "https://kms.example.test", None))
    with pytest.raises(UsageError, match="not AWS's own"):
        resolve(config)
    named = resolve(config, KeyServiceOptions(aws_endpoint_url="https://kms.example.test"))
    assert named.kind == AWS and named.aws.endpoint_url == "https://kms.example.test"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "https://kms.example.test")
    assert resolve(config).aws.endpoint_url == "https://kms.example.test"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "https://other.example.test")
    with pytest.raises(UsageError):
        resolve(config)
    own = _config(AwsKeyService("eu-west-1", "https://kms.eu-west-1.amazonaws.com", "p"))
    resolved = resolve(own)
    assert resolved.aws == AwsEndpoint("eu-west-1", "https://kms.eu-west-1.amazonaws.com", "p")
    # the user's profile and endpoint override the config's
    overridden = resolve(own, KeyServiceOptions(aws_profile="mine"))
    assert overridden.aws.profile == "mine"


# ----------------------------------------------------------------- the client
@pytest.fixture
def endpoint(monkeypatch) -> AwsEndpoint:
    aws_environment(monkeypatch)
    return AwsEndpoint("eu-west-1", "https://kms.example.test")


def test_client_errors_become_kmsfs_errors(endpoint: AwsEndpoint) -> None:
    client = AwsKMSClient(endpoint)
    with Stubber(client._client) as stub:
        stub.add_client_error(
            "decrypt", service_error_code="AccessDeniedException", service_message="no"
        )
        stub.add_client_error("decrypt", service_error_code="DisabledException")
        with pytest.raises(AccessDeniedException):
            client.decrypt(b"blob", encryption_context={"a": "b"})
        with pytest.raises(Exception) as caught:
            client.decrypt(b"blob")
        assert getattr(caught.value, "aws_type", None) == "DisabledException"


def test_results_have_bytes_and_no_response_metadata(endpoint: AwsEndpoint) -> None:
    client = AwsKMSClient(endpoint)
    with Stubber(client._client) as stub:
        stub.add_response(
            "generate_data_key",
            {"Plaintext": b"p" * 32, "CiphertextBlob": b"c" * 100, "KeyId": ARN},
            {"KeyId": ARN, "KeySpec": "AES_256", "EncryptionContext": {"a": "b"}},
        )
        result = client.generate_data_key(ARN, encryption_context={"a": "b"})
    assert result == {"Plaintext": b"p" * 32, "CiphertextBlob": b"c" * 100, "KeyId": ARN}


def test_unreachable_endpoint_is_keyd_unavailable(monkeypatch) -> None:
    aws_environment(monkeypatch)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = AwsKMSClient(AwsEndpoint("eu-west-1", f"http://127.0.0.1:{port}"), max_attempts=1)
    with pytest.raises(KeydUnavailable, match=f"127.0.0.1:{port}") as caught:
        client.decrypt(b"blob")
    assert "kmsfs-test-secret" not in str(caught.value)


def test_no_credentials_is_keyd_unavailable(monkeypatch) -> None:
    aws_environment(monkeypatch)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    client = AwsKMSClient(AwsEndpoint("eu-west-1", "https://kms.example.test"))
    with pytest.raises(KeydUnavailable, match="no AWS credentials"):
        client.describe_key(ARN)


def test_unknown_profile_is_a_usage_error(endpoint: AwsEndpoint) -> None:
    with pytest.raises(UsageError, match="profile"):
        AwsKMSClient(AwsEndpoint("eu-west-1", None, "no-such-profile"))


def test_async_client_backs_off_on_throttling_then_answers(endpoint: AwsEndpoint) -> None:
    """Stubbed answers skip botocore's retry handler: every throttle reaches our loop."""
    client = AsyncAwsKMSClient(endpoint)
    with Stubber(client._client._client) as stub:
        for _ in range(5):
            stub.add_client_error("decrypt", service_error_code="ThrottlingException")
        stub.add_response("decrypt", {"Plaintext": b"k" * 32, "KeyId": ARN})
        result = trio.run(client.decrypt, b"blob")
        stub.assert_no_pending_responses()
    assert result["Plaintext"] == b"k" * 32


def test_async_client_raises_other_errors_at_once(endpoint: AwsEndpoint) -> None:
    client = AsyncAwsKMSClient(endpoint)
    with Stubber(client._client._client) as stub:
        stub.add_client_error("decrypt", service_error_code="ThrottlingException")
        stub.add_client_error("decrypt", service_error_code="AccessDeniedException")
        with pytest.raises(AccessDeniedException):
            trio.run(client.decrypt, b"blob")
        stub.assert_no_pending_responses()


def test_fstab_options_name_the_aws_service() -> None:
    from kmsfs.fs.fstab import apply_options, parse_options
    from kmsfs.fs.mount import MountOptions, service_options

    parsed = parse_options(
        ["rw,aws_endpoint_url=https://keyd.example.test:4599,aws_profile=ops,aws_region=local"]
    )
    options = apply_options(parsed, MountOptions())
    assert service_options(options) == KeyServiceOptions(
        aws_endpoint_url="https://keyd.example.test:4599", aws_profile="ops", aws_region="local"
    )


def test_plain_http_endpoint_from_the_environment_is_refused_too(monkeypatch) -> None:
    """Data keys never cross a network in plaintext, whoever named the endpoint."""
    aws_environment(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://10.1.2.3:4599")
    with pytest.raises(UsageError, match="plain HTTP"):
        AwsKMSClient(AwsEndpoint("eu-west-1"))
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:4599")
    assert AwsKMSClient(AwsEndpoint("eu-west-1"))._client.meta.endpoint_url.startswith(
        "http://127.0.0.1"
    )


def test_init_refuses_keyd_with_aws_options(tmp_path: Path) -> None:
    from kmsfs.fs.mount import init_cipherdir

    with pytest.raises(UsageError, match="exclude each other"):
        init_cipherdir(
            tmp_path / "c",
            ARN,
            key_service_options=KeyServiceOptions(kind="keyd", aws_profile="ops"),
        )
    assert not (tmp_path / "c").exists()


def test_call_gives_binary_fields_as_base64_like_keyds_client(endpoint: AwsEndpoint) -> None:
    """Code written against KMSClient.call (binary fields as base64 strings) works on both."""
    import base64

    client = AwsKMSClient(endpoint)
    with Stubber(client._client) as stub:
        stub.add_response("decrypt", {"Plaintext": b"k" * 32, "KeyId": ARN})
        result = client.call("Decrypt", {"CiphertextBlob": b"blob", "KeyId": ARN})
    assert result == {"Plaintext": base64.b64encode(b"k" * 32).decode(), "KeyId": ARN}
