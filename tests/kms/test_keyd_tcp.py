"""keyd over TCP with AWS Signature V4: a real keyd, requests signed by botocore.

The refusals (no or garbled signature, wrong secret, unknown or disabled access key,
stale date) get AWS's error types and an audit record; credentials changed with the
CLI while keyd runs count from the next request; a signed request on the Unix socket
is the signed user's; key policies apply to signed users (aws:SourceIp included).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.conftest import Keyd, run_kmsfs
from tests.kms.tcp_keyd import REGION, TcpKeyd, free_port, start_tcp_keyd


@pytest.fixture
def tcp_keyd(keyd_factory: Callable[..., Keyd]) -> TcpKeyd:
    return start_tcp_keyd(keyd_factory)


def _signed(
    operation: str,
    params: dict,
    access_key_id: str,
    secret: str,
    *,
    host: str = "127.0.0.1",
    when: dt.datetime | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a request signed by botocore's SigV4Auth (at *when*)."""
    body = json.dumps(params).encode()
    request = AWSRequest(
        method="POST",
        url=f"http://{host}/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
    )
    if when is not None:
        assert monkeypatch is not None
        monkeypatch.setattr("botocore.auth.get_current_datetime", lambda *a, **k: when)
    SigV4Auth(Credentials(access_key_id, secret), "kms", REGION).add_auth(request)
    headers = dict(request.headers.items())
    headers["Host"] = host
    return body, headers


def _post_tcp(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def _post_unix(path: Path, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    connection = _UnixHTTPConnection(path)
    try:
        connection.request("POST", "/", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def _audit(keyd: Keyd) -> list[dict]:
    lines = keyd.kmsfs("keyd", "audit", "tail", "-n", "50", "--json").stdout.splitlines()
    return [json.loads(line) for line in lines]


def _last_audit(keyd: Keyd, error_code: str) -> dict:
    matching = [event for event in _audit(keyd) if event.get("errorCode") == error_code]
    assert matching, f"no audit record with errorCode {error_code}"
    return matching[-1]


# ------------------------------------------------------------------------ happy path
def test_signed_request_over_tcp_is_the_signed_user(tcp_keyd: TcpKeyd) -> None:
    client = tcp_keyd.client()
    key_id = client.create_key(Description="over tcp")["KeyMetadata"]["KeyId"]
    data_key = client.generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert (
        client.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"]
        == (data_key["Plaintext"])
    )
    record = next(e for e in reversed(_audit(tcp_keyd.keyd)) if e["eventName"] == "Decrypt")
    identity = record["userIdentity"]
    assert identity["type"] == "IAMUser"
    assert identity["arn"].endswith(":user/alice")
    assert identity["accessKeyId"] == tcp_keyd.access_key_id
    assert identity["uid"] is None
    assert record["sourceIPAddress"] == "127.0.0.1"


# ------------------------------------------------------------------------ refusals
def test_unsigned_request_is_incomplete_signature_and_audited(tcp_keyd: TcpKeyd) -> None:
    status, body = _post_tcp(
        tcp_keyd.port,
        b"{}",
        {"X-Amz-Target": "TrentService.ListKeys", "Content-Type": "application/x-amz-json-1.1"},
    )
    assert (status, body["__type"]) == (400, "IncompleteSignature")
    record = _last_audit(tcp_keyd.keyd, "IncompleteSignature")
    assert record["eventName"] == "ListKeys"
    assert record["userIdentity"]["type"] == "Unknown"
    assert record["sourceIPAddress"] == "127.0.0.1"


def test_wrong_secret_is_invalid_signature_and_audited(tcp_keyd: TcpKeyd) -> None:
    client = tcp_keyd.client(secret="W" * 40)
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
    record = _last_audit(tcp_keyd.keyd, "InvalidSignatureException")
    assert record["userIdentity"]["accessKeyId"] == tcp_keyd.access_key_id
    assert record["eventName"] == "ListKeys"


def test_unknown_access_key_is_unrecognized_client_and_audited(tcp_keyd: TcpKeyd) -> None:
    client = tcp_keyd.client(access_key_id="AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    assert caught.value.response["Error"]["Code"] == "UnrecognizedClientException"
    record = _last_audit(tcp_keyd.keyd, "UnrecognizedClientException")
    assert record["userIdentity"]["accessKeyId"] == "AKIAUNKNOWNUNKNOWN00"


def test_stale_date_is_invalid_signature_and_audited(
    tcp_keyd: TcpKeyd, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=6)
    body, headers = _signed(
        "ListKeys",
        {},
        tcp_keyd.access_key_id,
        tcp_keyd.secret,
        when=stale,
        monkeypatch=monkeypatch,
    )
    status, answer = _post_tcp(tcp_keyd.port, body, headers)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    assert "Signature expired" in answer["message"]
    _last_audit(tcp_keyd.keyd, "InvalidSignatureException")


def test_security_token_is_refused(tcp_keyd: TcpKeyd) -> None:
    body, headers = _signed("ListKeys", {}, tcp_keyd.access_key_id, tcp_keyd.secret)
    headers["X-Amz-Security-Token"] = "FwoGZXIvYXdzEJr"
    status, answer = _post_tcp(tcp_keyd.port, body, headers)
    assert (status, answer["__type"]) == (400, "UnrecognizedClientException")


def test_disabled_credential_is_refused_at_once_and_enabled_again(tcp_keyd: TcpKeyd) -> None:
    client = tcp_keyd.client()
    client.list_keys()
    tcp_keyd.credentials("disable", tcp_keyd.access_key_id)
    with pytest.raises(ClientError) as caught:
        client.list_keys()
    assert caught.value.response["Error"]["Code"] == "UnrecognizedClientException"
    _last_audit(tcp_keyd.keyd, "UnrecognizedClientException")
    tcp_keyd.credentials("enable", tcp_keyd.access_key_id)
    client.list_keys()
    tcp_keyd.credentials("delete", tcp_keyd.access_key_id)
    with pytest.raises(ClientError):
        client.list_keys()


def test_credentials_made_while_keyd_runs_work_at_once(tcp_keyd: TcpKeyd) -> None:
    access_key_id, secret = tcp_keyd.create_credentials("bob")
    listed = json.loads(tcp_keyd.credentials("list", "--json").stdout)["AccessKeyMetadata"]
    assert {(k["UserName"], k["Status"]) for k in listed} == {
        ("alice", "Active"),
        ("bob", "Active"),
    }
    assert "SecretAccessKey" not in json.dumps(listed)
    assert secret not in (tcp_keyd.keyd.keystore / "keystore.db").read_bytes().decode("latin-1")
    tcp_keyd.client(access_key_id, secret).list_keys()


def test_credentials_refuse_bad_and_root_names(tcp_keyd: TcpKeyd) -> None:
    for name in ("root", "a/b", "x" * 65):
        result = tcp_keyd.credentials("create", "--user", name, check=False)
        assert result.returncode != 0
        assert len(result.stderr.decode().strip().splitlines()) == 1


# ------------------------------------------------------------------ the Unix socket
def test_signed_request_on_the_socket_is_verified_and_the_signed_user(tcp_keyd: TcpKeyd) -> None:
    keyd = tcp_keyd.keyd
    body, headers = _signed("GetCallerIdentity", {}, tcp_keyd.access_key_id, tcp_keyd.secret)
    status, answer = _post_unix(keyd.socket, body, headers)
    assert status == 200
    assert answer["Arn"].endswith(":user/alice")
    body, headers = _signed("GetCallerIdentity", {}, tcp_keyd.access_key_id, "W" * 40)
    status, answer = _post_unix(keyd.socket, body, headers)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    # unsigned on the socket: still the peer's uid
    with keyd.client() as client:
        assert not client.call("GetCallerIdentity", {})["Arn"].endswith(":user/alice")


# ------------------------------------------------------------------ key policies
def test_key_policy_applies_to_signed_users_with_source_ip(tcp_keyd: TcpKeyd) -> None:
    alice = tcp_keyd.client()
    bob_id, bob_secret = tcp_keyd.create_credentials("bob")
    bob = tcp_keyd.client(bob_id, bob_secret)
    key_id = alice.create_key()["KeyMetadata"]["KeyId"]
    blob = alice.encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError, match="AccessDeniedException"):  # default: the creator
        bob.decrypt(CiphertextBlob=blob)
    account = alice.describe_key(KeyId=key_id)["KeyMetadata"]["AWSAccountId"]

    def policy(source_ip: str) -> str:
        alice_arn = f"arn:aws:iam::{account}:user/alice"
        bob_arn = f"arn:aws:iam::{account}:user/bob"
        return json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": alice_arn},
                        "Action": "kms:*",
                        "Resource": "*",
                    },
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": bob_arn},
                        "Action": "kms:Decrypt",
                        "Resource": "*",
                        "Condition": {"IpAddress": {"aws:SourceIp": source_ip}},
                    },
                ],
            }
        )

    alice.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy("127.0.0.0/8"))
    assert bob.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"
    alice.put_key_policy(KeyId=key_id, PolicyName="default", Policy=policy("192.0.2.0/24"))
    with pytest.raises(ClientError, match="AccessDeniedException"):
        bob.decrypt(CiphertextBlob=blob)


# ------------------------------------------------------------------ listening
def test_non_loopback_without_tls_is_one_clear_line(keyd_factory: Callable[..., Keyd]) -> None:
    keyd = keyd_factory()
    keyd.init()
    result = run_kmsfs(*keyd.serve_args("--listen", "0.0.0.0:4599"), env=keyd.env, check=False)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "plain HTTP is allowed only on loopback" in lines[0]


def test_ipv6_loopback_and_tls_with_the_self_signed_cert(
    keyd_factory: Callable[..., Keyd],
) -> None:
    tcp = start_tcp_keyd(keyd_factory, tls=True)
    assert tcp.client().list_keys()["Keys"] == []
    # the same certificate on [::1]
    other = keyd_factory("v6")  # (the TLS keyd above is "k")
    other.init()
    port = free_port("::1")
    other.start("--listen", f"[::1]:{port}")
    access_key_id, secret = TcpKeyd(other, port, "", "").create_credentials("carol")
    import boto3

    client = boto3.session.Session().client(
        "kms",
        region_name=REGION,
        endpoint_url=f"http://[::1]:{port}",
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret,
    )
    assert client.list_keys()["Keys"] == []


def test_tls_cert_prints_its_fingerprint(keyd_factory: Callable[..., Keyd]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    keyd = keyd_factory()
    keyd.init()
    out = keyd.kmsfs("keyd", "tls-cert", "--keystore", str(keyd.keystore)).stdout.decode()
    cert = x509.load_pem_x509_certificate((keyd.keystore / "tls-cert.pem").read_bytes())
    expected = ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    assert f"SHA-256 fingerprint: {expected}" in out
    assert (keyd.keystore / "tls-key.pem").stat().st_mode & 0o077 == 0


def test_garbage_and_oversized_requests_over_tcp_leave_keyd_serving(
    keyd_factory: Callable[..., Keyd],
) -> None:
    plain = start_tcp_keyd(keyd_factory)
    with socket.create_connection(("127.0.0.1", plain.port), timeout=30) as raw:
        raw.sendall(b"\x00\xff garbage \r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 400")
    body, headers = _signed("ListKeys", {"Pad": "x" * 300_000}, plain.access_key_id, plain.secret)
    status, _ = _post_tcp(plain.port, body, headers)
    assert status == 413
    assert plain.client().list_keys()["Keys"] == []
    # TLS listener: plain HTTP and half a handshake are dropped, keyd serves on
    secure = start_tcp_keyd(keyd_factory, tls=True, name="tls")
    with socket.create_connection(("127.0.0.1", secure.port), timeout=30) as raw:
        raw.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"HTTP/")
    half = socket.create_connection(("127.0.0.1", secure.port), timeout=30)
    try:
        half.sendall(b"\x16\x03\x01\x00\x10")  # a ClientHello that never completes
        assert secure.client().list_keys()["Keys"] == []
    finally:
        half.close()


def test_signed_request_on_the_socket_is_verified_without_listen(live_keyd: Keyd) -> None:
    """keyd serving only its socket still verifies a signature it is sent: a wrong one
    is refused, not taken as the peer's own request."""
    tcp = TcpKeyd(live_keyd, 0, "", "")
    access_key_id, secret = tcp.create_credentials("dave")
    body, headers = _signed("GetCallerIdentity", {}, access_key_id, "W" * 40)
    status, answer = _post_unix(live_keyd.socket, body, headers)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    body, headers = _signed("GetCallerIdentity", {}, access_key_id, secret)
    status, answer = _post_unix(live_keyd.socket, body, headers)
    assert status == 200 and answer["Arn"].endswith(":user/dave")


def test_audit_tail_names_signed_callers_by_access_key_and_address(tcp_keyd: TcpKeyd) -> None:
    tcp_keyd.client().list_keys()
    lines = tcp_keyd.keyd.kmsfs("keyd", "audit", "tail", "-n", "5").stdout.decode().splitlines()
    listed = [line for line in lines if "ListKeys" in line]
    assert f"alice({tcp_keyd.access_key_id}@127.0.0.1)" in listed[-1]
    by_user = tcp_keyd.keyd.kmsfs("keyd", "audit", "tail", "--user", "alice", "--json")
    assert by_user.stdout.strip()
