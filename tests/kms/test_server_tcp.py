"""The server's TCP path in-process (serve() in a thread, a fake service): what runs
before a request is authenticated."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

from kmsfs.errors import IncompleteSignature
from kmsfs.kms.caller import Caller
from kmsfs.kms.server import TcpEndpoint
from tests.kms.conftest import FakeService, RunningKeyd
from tests.kms.tcp_keyd import free_port


class _SlowService(FakeService):
    """CreateKey has slow work (as an RSA key pair's generation has in keyd)."""

    slow_operations = frozenset({"CreateKey"})

    def __init__(self) -> None:
        super().__init__()
        self.slow_work_runs = 0

    def slow_work(self, operation: str, params: dict[str, Any]):
        def work() -> str:
            self.slow_work_runs += 1
            return "key pair"

        return "pair", work

    def handle(
        self,
        operation: str,
        params: dict[str, Any],
        caller: Caller,
        request_id: str,
        prepared: Any = None,
    ) -> dict[str, Any]:
        return {"KeyMetadata": {"KeyId": "k", "Prepared": prepared is not None}}


class _RefusingVerifier:
    def verify(self, method: str, target: str, headers: Any, body: bytes) -> Any:
        raise IncompleteSignature("no signature")


def test_no_slow_work_runs_for_an_unauthenticated_tcp_request(
    start_keyd: Callable[..., RunningKeyd],
) -> None:
    """An unsigned client on the network must not make keyd generate key pairs (CPU
    for nothing): authentication comes before the slow part of a request."""
    service = _SlowService()
    port = free_port()
    start_keyd(service, tcp=[TcpEndpoint("127.0.0.1", port)], verifier=_RefusingVerifier())
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST",
            "/",
            body=json.dumps({"KeySpec": "RSA_4096", "KeyUsage": "SIGN_VERIFY"}),
            headers={"X-Amz-Target": "TrentService.CreateKey"},
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert (response.status, answer["__type"]) == (400, "IncompleteSignature")
    assert service.slow_work_runs == 0


class _AcceptingVerifier:
    def verify(self, method: str, target: str, headers: Any, body: bytes) -> Any:
        from kmsfs.kms.sigv4 import SignedIdentity

        return SignedIdentity("alice", "AKIAEXAMPLEEXAMPLE00")


def test_slow_work_runs_for_an_authenticated_tcp_request(
    start_keyd: Callable[..., RunningKeyd],
) -> None:
    service = _SlowService()
    port = free_port()
    start_keyd(service, tcp=[TcpEndpoint("127.0.0.1", port)], verifier=_AcceptingVerifier())
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST", "/", body="{}", headers={"X-Amz-Target": "TrentService.CreateKey"}
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 200 and answer["KeyMetadata"]["Prepared"] is True
    assert service.slow_work_runs == 1
