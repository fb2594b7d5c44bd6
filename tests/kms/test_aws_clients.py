"""AWS's own clients, unchanged, against a real keyd over loopback TCP with SigV4.

boto3 runs every operation keyd implements (checked against
``KeyService.operation_names()``: an operation added to keyd without a boto3 call here
fails ``test_boto3_covers_every_operation``), botocore maps keyd's errors to its modeled
exception classes, paginators page; the aws CLI v1 (in-process and as ``python -m
awscli``) with ``AWS_ENDPOINT_URL_KMS``; the AWS Encryption SDK for Python with
``StrictAwsKmsMasterKeyProvider`` on a botocore session pointed at keyd; TLS with the
self-signed certificate through ``AWS_CA_BUNDLE``.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from kmsfs.kms.service import KeyService
from tests.conftest import Keyd
from tests.kms.tcp_keyd import TcpKeyd, start_tcp_keyd


@pytest.fixture
def tcp_keyd(keyd_factory: Callable[..., Keyd]) -> TcpKeyd:
    return start_tcp_keyd(keyd_factory)


class _Recorder:
    """The operations a botocore client called successfully."""

    def __init__(self, client: Any) -> None:
        self.called: set[str] = set()
        client.meta.events.register("after-call.kms", self._after_call)

    def _after_call(self, http_response: Any, model: Any, **_: Any) -> None:
        if http_response.status_code == 200:
            self.called.add(model.name)


def _exercise_every_operation(client: Any) -> set[str]:
    """Call every operation keyd implements through boto3, checking the answers."""
    recorder = _Recorder(client)
    implemented = set(KeyService.operation_names())
    key = client.create_key(Description="boto3", Tags=[{"TagKey": "team", "TagValue": "a"}])
    key_id = key["KeyMetadata"]["KeyId"]
    key_arn = key["KeyMetadata"]["Arn"]
    other = client.create_key()["KeyMetadata"]["KeyId"]
    assert client.describe_key(KeyId=key_arn)["KeyMetadata"]["KeyId"] == key_id
    client.create_alias(AliasName="alias/boto3", TargetKeyId=key_id)
    context = {"purpose": "test"}
    data_key = client.generate_data_key(
        KeyId="alias/boto3", KeySpec="AES_256", EncryptionContext=context
    )
    assert len(data_key["Plaintext"]) == 32
    opened = client.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=context)
    assert opened["Plaintext"] == data_key["Plaintext"] and opened["KeyId"] == key_arn
    blob_only = client.generate_data_key_without_plaintext(
        KeyId=key_id, NumberOfBytes=16, EncryptionContext=context
    )
    assert "Plaintext" not in blob_only
    sealed = client.encrypt(KeyId=key_id, Plaintext=b"hello", EncryptionContext=context)
    moved = client.re_encrypt(
        CiphertextBlob=sealed["CiphertextBlob"],
        SourceEncryptionContext=context,
        DestinationKeyId=other,
        DestinationEncryptionContext={"x": "y"},
    )
    assert client.decrypt(
        CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"x": "y"}, KeyId=other
    )["Plaintext"] == (b"hello")
    assert len(client.generate_random(NumberOfBytes=100)["Plaintext"]) == 100
    client.update_alias(AliasName="alias/boto3", TargetKeyId=other)
    assert client.list_aliases(KeyId=other)["Aliases"][0]["AliasName"] == "alias/boto3"
    client.delete_alias(AliasName="alias/boto3")
    client.tag_resource(KeyId=key_id, Tags=[{"TagKey": "env", "TagValue": "t"}])
    client.untag_resource(KeyId=key_id, TagKeys=["team"])
    assert client.list_resource_tags(KeyId=key_id)["Tags"] == [{"TagKey": "env", "TagValue": "t"}]
    policy = client.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
    client.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy)
    assert client.list_key_policies(KeyId=key_id)["PolicyNames"] == ["default"]
    client.enable_key_rotation(KeyId=key_id, RotationPeriodInDays=90)
    assert client.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is True
    client.rotate_key_on_demand(KeyId=key_id)
    assert client.list_key_rotations(KeyId=key_id)["Rotations"]
    client.disable_key_rotation(KeyId=key_id)
    client.disable_key(KeyId=key_id)
    client.enable_key(KeyId=key_id)
    client.schedule_key_deletion(KeyId=other, PendingWindowInDays=7)
    client.cancel_key_deletion(KeyId=other)
    assert {k["KeyId"] for k in client.list_keys()["Keys"]} >= {key_id, other}

    # Operations other branches add (grants, asymmetric keys, HMAC): exercised when
    # this keyd implements them, with AWS's parameters.
    if "CreateGrant" in implemented:
        account = key["KeyMetadata"]["AWSAccountId"]
        grant = client.create_grant(
            KeyId=key_id,
            GranteePrincipal=f"arn:aws:iam::{account}:user/grantee",
            RetiringPrincipal=_own_arn(client),
            Operations=["Decrypt"],
        )
        assert client.list_grants(KeyId=key_id)["Grants"]
        if "ListRetirableGrants" in implemented:
            client.list_retirable_grants(RetiringPrincipal=_own_arn(client))
        client.retire_grant(KeyId=key_arn, GrantId=grant["GrantId"])
        second = client.create_grant(
            KeyId=key_id, GranteePrincipal=_own_arn(client), Operations=["Encrypt"]
        )
        client.revoke_grant(KeyId=key_id, GrantId=second["GrantId"])
    if "Sign" in implemented:
        signing = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")
        signing_id = signing["KeyMetadata"]["KeyId"]
        assert client.get_public_key(KeyId=signing_id)["PublicKey"]
        signature = client.sign(KeyId=signing_id, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")[
            "Signature"
        ]
        assert client.verify(
            KeyId=signing_id, Message=b"m", Signature=signature, SigningAlgorithm="ECDSA_SHA_256"
        )["SignatureValid"]
    if "GenerateMac" in implemented:
        mac_key = client.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
        mac_id = mac_key["KeyMetadata"]["KeyId"]
        mac = client.generate_mac(KeyId=mac_id, Message=b"m", MacAlgorithm="HMAC_SHA_256")["Mac"]
        assert client.verify_mac(KeyId=mac_id, Message=b"m", Mac=mac, MacAlgorithm="HMAC_SHA_256")[
            "MacValid"
        ]
    if "GenerateDataKeyPair" in implemented:
        pair = client.generate_data_key_pair(KeyId=key_id, KeyPairSpec="ECC_NIST_P256")
        assert pair["PrivateKeyPlaintext"] and pair["PublicKey"]
        client.generate_data_key_pair_without_plaintext(KeyId=key_id, KeyPairSpec="ECC_NIST_P256")
    if "DeriveSharedSecret" in implemented:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        agreement = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="KEY_AGREEMENT")
        peer = ec.generate_private_key(ec.SECP256R1()).public_key()
        der = peer.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert client.derive_shared_secret(
            KeyId=agreement["KeyMetadata"]["KeyId"],
            KeyAgreementAlgorithm="ECDH",
            PublicKey=der,
        )["SharedSecret"]
    return recorder.called


def _own_arn(client: Any) -> str:
    arn = client.describe_key(KeyId=client.list_keys()["Keys"][0]["KeyId"])["KeyMetadata"]["Arn"]
    account = arn.split(":")[4]
    return f"arn:aws:iam::{account}:user/alice"


def test_boto3_runs_every_operation(tcp_keyd: TcpKeyd) -> None:
    called = _exercise_every_operation(tcp_keyd.client())
    assert called  # every call above returned 200 (an error would have raised)


def test_boto3_covers_every_operation(tcp_keyd: TcpKeyd) -> None:
    client = tcp_keyd.client()
    called = _exercise_every_operation(client)
    # kmsfs's own operations (GetCallerIdentity, ...) are not in AWS's model: botocore
    # has no method for them
    in_aws_model = set(client.meta.service_model.operation_names)
    missing = (set(KeyService.operation_names()) & in_aws_model) - called
    assert not missing, f"operations keyd implements that no boto3 call exercised: {missing}"


def test_botocore_maps_errors_to_modeled_exceptions(tcp_keyd: TcpKeyd) -> None:
    client = tcp_keyd.client()
    errors = client.exceptions
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    blob = client.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    other = client.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(errors.NotFoundException):
        client.describe_key(KeyId="alias/missing")
    with pytest.raises(errors.NotFoundException):
        client.describe_key(KeyId="11111111-2222-3333-4444-555555555555")
    client.create_alias(AliasName="alias/once", TargetKeyId=key_id)
    with pytest.raises(errors.AlreadyExistsException):
        client.create_alias(AliasName="alias/once", TargetKeyId=key_id)
    with pytest.raises(errors.InvalidAliasNameException):
        client.create_alias(AliasName="alias/aws/reserved", TargetKeyId=key_id)
    with pytest.raises(errors.IncorrectKeyException):
        client.decrypt(CiphertextBlob=blob, KeyId=other)
    with pytest.raises(errors.InvalidCiphertextException):
        client.decrypt(CiphertextBlob=blob, EncryptionContext={"not": "it"})
    with pytest.raises(errors.InvalidMarkerException):
        client.list_keys(Marker="not-a-marker")
    with pytest.raises(errors.MalformedPolicyDocumentException):
        client.put_key_policy(KeyId=key_id, PolicyName="default", Policy="{not json")
    with pytest.raises(errors.DryRunOperationException):
        client.encrypt(KeyId=key_id, Plaintext=b"x", DryRun=True)
    client.disable_key(KeyId=key_id)
    with pytest.raises(errors.DisabledException):
        client.decrypt(CiphertextBlob=blob)
    client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(errors.KMSInvalidStateException):
        client.decrypt(CiphertextBlob=blob)


def test_paginators_page_through_keys_aliases_and_rotations(tcp_keyd: TcpKeyd) -> None:
    client = tcp_keyd.client()
    key_ids = {client.create_key()["KeyMetadata"]["KeyId"] for _ in range(5)}
    for index, key_id in enumerate(sorted(key_ids)):
        client.create_alias(AliasName=f"alias/p{index}", TargetKeyId=key_id)
    rotated = sorted(key_ids)[0]
    for _ in range(3):
        client.rotate_key_on_demand(KeyId=rotated)

    def pages(name: str, **params: Any) -> list[dict]:
        paginator = client.get_paginator(name)
        return list(paginator.paginate(PaginationConfig={"PageSize": 2}, **params))

    key_pages = pages("list_keys")
    assert len(key_pages) >= 3
    assert {k["KeyId"] for page in key_pages for k in page["Keys"]} == key_ids
    alias_pages = pages("list_aliases")
    assert len(alias_pages) >= 3
    assert {f"alias/p{i}" for i in range(5)} <= {
        a["AliasName"] for page in alias_pages for a in page["Aliases"]
    }
    rotation_pages = pages("list_key_rotations", KeyId=rotated)
    assert len(rotation_pages) == 2
    assert sum(len(page["Rotations"]) for page in rotation_pages) == 3
    if "ListGrants" in KeyService.operation_names():
        for _ in range(3):
            client.create_grant(
                KeyId=rotated, GranteePrincipal=_own_arn(client), Operations=["Decrypt"]
            )
        grant_pages = pages("list_grants", KeyId=rotated)
        assert sum(len(page["Grants"]) for page in grant_pages) == 3 and len(grant_pages) == 2


# ------------------------------------------------------------------------- aws CLI v1
def _aws(
    tcp_keyd: TcpKeyd, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int, Any, str]:
    """Run the aws CLI (v1, awscli's own driver, in this process) with keyd's endpoint
    and access key in the environment; returns (exit status, parsed JSON output, stderr)."""
    from awscli.clidriver import create_clidriver

    for name, value in tcp_keyd.aws_env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    capsys.readouterr()
    status = create_clidriver().main(["--output", "json", *args])
    captured = capsys.readouterr()
    output = json.loads(captured.out) if captured.out.strip() else None
    return status, output, captured.err


def test_aws_cli_runs_kms_commands(
    tcp_keyd: TcpKeyd, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path
) -> None:
    def aws(*args: str) -> Any:
        status, output, err = _aws(tcp_keyd, monkeypatch, capsys, *args)
        assert status == 0, err
        return output

    key_id = aws("kms", "create-key", "--description", "cli")["KeyMetadata"]["KeyId"]
    aws("kms", "create-alias", "--alias-name", "alias/cli", "--target-key-id", key_id)
    assert aws("kms", "describe-key", "--key-id", "alias/cli")["KeyMetadata"]["KeyId"] == key_id
    (tmp_path / "plain").write_bytes(b"secret text")
    sealed = aws(
        "kms",
        "encrypt",
        "--key-id",
        "alias/cli",
        "--plaintext",
        f"fileb://{tmp_path / 'plain'}",
        "--encryption-context",
        "app=cli",
    )
    (tmp_path / "blob").write_bytes(base64.b64decode(sealed["CiphertextBlob"]))
    opened = aws(
        "kms",
        "decrypt",
        "--ciphertext-blob",
        f"fileb://{tmp_path / 'blob'}",
        "--encryption-context",
        "app=cli",
    )
    assert base64.b64decode(opened["Plaintext"]) == b"secret text"
    data_key = aws("kms", "generate-data-key", "--key-id", key_id, "--key-spec", "AES_256")
    assert len(base64.b64decode(data_key["Plaintext"])) == 32
    for _ in range(3):
        aws("kms", "create-key")
    # the CLI follows NextMarker itself: page size 1, every key listed
    listed = aws("kms", "list-keys", "--page-size", "1")["Keys"]
    assert len(listed) == 4
    aws("kms", "enable-key-rotation", "--key-id", key_id)
    assert aws("kms", "get-key-rotation-status", "--key-id", key_id)["KeyRotationEnabled"]
    aws("kms", "schedule-key-deletion", "--key-id", key_id, "--pending-window-in-days", "7")
    status, _output, err = _aws(
        tcp_keyd, monkeypatch, capsys, "kms", "describe-key", "--key-id", "alias/none"
    )
    assert status == 255 and "(NotFoundException)" in err  # aws CLI v1: 255 on a service error


def test_aws_cli_as_a_command_with_tls(keyd_factory: Callable[..., Keyd]) -> None:
    """``python -m awscli`` (the aws command of awscli v1) over HTTPS, trusting keyd's
    self-signed certificate through AWS_CA_BUNDLE; and refusing it without."""
    tcp = start_tcp_keyd(keyd_factory, tls=True)
    env = tcp.aws_env()
    result = subprocess.run(
        [sys.executable, "-m", "awscli", "kms", "create-key", "--output", "json"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["KeyMetadata"]["KeyState"] == "Enabled"
    del env["AWS_CA_BUNDLE"]
    result = subprocess.run(
        [sys.executable, "-m", "awscli", "kms", "list-keys"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert b"SSL" in result.stderr or b"certificate" in result.stderr


# ------------------------------------------------------------- AWS Encryption SDK
def _sdk_session(tcp_keyd: TcpKeyd, monkeypatch: pytest.MonkeyPatch):
    import botocore.session

    for name, value in tcp_keyd.aws_env().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return botocore.session.Session()


def test_encryption_sdk_encrypts_and_decrypts_through_keyd(
    tcp_keyd: TcpKeyd, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import CommitmentPolicy

    client = tcp_keyd.client()
    key_arn = client.create_key()["KeyMetadata"]["Arn"]
    session = _sdk_session(tcp_keyd, monkeypatch)
    sdk = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[key_arn], botocore_session=session
    )
    message = b"a message for the encryption sdk " * 100
    context = {"tenant": "a", "purpose": "test"}
    ciphertext, header = sdk.encrypt(
        source=message, key_provider=provider, encryption_context=context
    )
    assert message not in ciphertext
    assert header.encryption_context["tenant"] == "a"
    plaintext, decrypted_header = sdk.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == message
    assert decrypted_header.encryption_context["purpose"] == "test"
    # keyd saw the SDK's context with the data key (audit record of GenerateDataKey)
    events = [
        json.loads(line)
        for line in tcp_keyd.keyd.kmsfs("keyd", "audit", "tail", "-n", "20", "--json")
        .stdout.decode()
        .splitlines()
    ]
    generated = [e for e in events if e["eventName"] == "GenerateDataKey"]
    assert generated[-1]["requestParameters"]["encryptionContext"]["tenant"] == "a"


def test_encryption_sdk_with_the_wrong_key_fails_as_the_sdk_reports(
    tcp_keyd: TcpKeyd, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aws_encryption_sdk
    from aws_encryption_sdk.exceptions import DecryptKeyError
    from aws_encryption_sdk.identifiers import CommitmentPolicy

    client = tcp_keyd.client()
    right = client.create_key()["KeyMetadata"]["Arn"]
    wrong = client.create_key()["KeyMetadata"]["Arn"]
    session = _sdk_session(tcp_keyd, monkeypatch)
    sdk = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    ciphertext, _ = sdk.encrypt(
        source=b"secret",
        key_provider=aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
            key_ids=[right], botocore_session=session
        ),
        encryption_context={"a": "b"},
    )
    with pytest.raises(DecryptKeyError, match="Unable to decrypt any data key"):
        sdk.decrypt(
            source=ciphertext,
            key_provider=aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
                key_ids=[wrong], botocore_session=session
            ),
        )


def test_encryption_sdk_keyring_api_through_keyd(
    tcp_keyd: TcpKeyd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keyring API (AWS Cryptographic Material Providers Library). Not a test extra:
    its primitives package pins cryptography below 51, older than kmsfs's; the test
    runs where it is installed (pip install aws-cryptographic-material-providers)."""
    pytest.importorskip("aws_cryptographic_material_providers")
    import aws_encryption_sdk
    from aws_cryptographic_material_providers.mpl import AwsCryptographicMaterialProviders
    from aws_cryptographic_material_providers.mpl.config import MaterialProvidersConfig
    from aws_cryptographic_material_providers.mpl.models import CreateAwsKmsKeyringInput
    from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError
    from aws_encryption_sdk.identifiers import CommitmentPolicy

    kms = tcp_keyd.client()
    right = kms.create_key()["KeyMetadata"]["Arn"]
    wrong = kms.create_key()["KeyMetadata"]["Arn"]
    providers = AwsCryptographicMaterialProviders(config=MaterialProvidersConfig())

    def keyring(arn: str):
        return providers.create_aws_kms_keyring(
            input=CreateAwsKmsKeyringInput(kms_key_id=arn, kms_client=kms)
        )

    sdk = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    context = {"tenant": "k"}
    ciphertext, _ = sdk.encrypt(
        source=b"through a keyring", keyring=keyring(right), encryption_context=context
    )
    plaintext, _ = sdk.decrypt(
        source=ciphertext, keyring=keyring(right), encryption_context=context
    )
    assert plaintext == b"through a keyring"
    with pytest.raises(AWSEncryptionSDKClientError, match="Unable to decrypt data key"):
        sdk.decrypt(source=ciphertext, keyring=keyring(wrong), encryption_context=context)
