"""Test helpers for the ``aws`` key service: moto's KMS on loopback and a fault proxy.

- :class:`MotoKMS`: moto's server mode (``ThreadedMotoServer``) on 127.0.0.1, an AWS KMS
  implementation no one here wrote. It does not refuse a disabled key (moto 5.x: Decrypt
  and GenerateDataKey still answer), so refusals are made by the proxy.
- :class:`FaultProxy`: an HTTP proxy in front of an endpoint that can throttle the next
  N Decrypt/GenerateDataKey calls (``ThrottlingException``, as AWS KMS answers past its
  request quota), refuse them (``AccessDeniedException``), or be stopped (connection
  refused) and started again on the same port.

Both run in the test process's threads; :meth:`close` stops them.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ACCESS_KEY = "AKIAKMSFSTESTKEY0001"
SECRET_KEY = "kmsfs-test-secret-never-stored"
REGION = "us-east-1"
KEY_OPERATIONS = ("TrentService.Decrypt", "TrentService.GenerateDataKey")


def aws_environment(monkeypatch) -> None:
    """Credentials in the environment (botocore's chain), nothing else of a user's AWS set-up."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/kmsfs-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/kmsfs-test-aws-credentials")


class MotoKMS:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def client(self):
        import boto3

        return boto3.client(
            "kms",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def create_key(self) -> str:
        return self.client().create_key()["KeyMetadata"]["Arn"]

    def close(self) -> None:
        self._server.stop()


class FaultProxy:
    """Forwards POSTs to ``upstream``; ``throttle``/``deny`` the key operations on demand."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.throttle_next = 0
        self.deny = False
        self.throttled = 0
        self.forwarded: list[str] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set = set()
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._connections.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                target = self.headers.get("X-Amz-Target", "")
                fault = proxy._fault(target)
                if fault is not None:
                    self._answer(400, json.dumps({"__type": fault, "message": fault}).encode())
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    connection.request("POST", self.path, body, headers)
                    response = connection.getresponse()
                    self._answer(response.status, response.read())
                finally:
                    connection.close()
                with proxy._lock:
                    proxy.forwarded.append(target)

            def _answer(self, status: int, payload: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _fault(self, target: str) -> str | None:
        if target not in KEY_OPERATIONS:
            return None
        with self._lock:
            if self.deny:
                return "AccessDeniedException"
            if self.throttle_next > 0:
                self.throttle_next -= 1
                self.throttled += 1
                return "ThrottlingException"
        return None

    def stop(self) -> None:
        """Stop listening and cut the kept-alive connections: connections are refused
        until :meth:`start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    close = stop


@contextmanager
def moto_behind_proxy() -> Iterator[tuple[MotoKMS, FaultProxy]]:
    moto = MotoKMS()
    try:
        proxy = FaultProxy(moto.url)
        try:
            yield moto, proxy
        finally:
            proxy.close()
    finally:
        moto.close()
