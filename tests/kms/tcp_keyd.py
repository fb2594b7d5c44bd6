"""A real keyd serving TCP (``--listen``) with an access key, for the SigV4 tests and
the tests of AWS's own clients (boto3, aws CLI, AWS Encryption SDK) against keyd."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import Keyd

REGION = "local"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class TcpKeyd:
    keyd: Keyd
    port: int
    access_key_id: str
    secret: str
    cert: Path | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.cert else 'http'}://127.0.0.1:{self.port}"

    def aws_env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """Environment for AWS's clients: this keyd's endpoint and access key, and no
        other AWS configuration of the machine."""
        import os

        env = {
            k: v
            for k, v in (base if base is not None else os.environ).items()
            if not k.startswith("AWS_")
        }
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key_id,
            AWS_SECRET_ACCESS_KEY=self.secret,
            AWS_DEFAULT_REGION=REGION,
            AWS_ENDPOINT_URL_KMS=self.url,
            AWS_CONFIG_FILE="/dev/null",
            AWS_SHARED_CREDENTIALS_FILE="/dev/null",
            AWS_EC2_METADATA_DISABLED="true",
        )
        if self.cert is not None:
            env["AWS_CA_BUNDLE"] = str(self.cert)
        env.update(extra)
        return env

    def client(self, access_key_id: str | None = None, secret: str | None = None, **config):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "kms",
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id=access_key_id or self.access_key_id,
            aws_secret_access_key=secret or self.secret,
            verify=str(self.cert) if self.cert else None,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, **config),
        )

    def credentials(self, *args: str, check: bool = True):
        return self.keyd.kmsfs(
            "keyd",
            "credentials",
            *args,
            "--keystore",
            str(self.keyd.keystore),
            "--root-key-file",
            str(self.keyd.root_key),
            check=check,
        )

    def create_credentials(self, user: str) -> tuple[str, str]:
        created = json.loads(self.credentials("create", "--user", user, "--json").stdout)
        return created["AccessKey"]["AccessKeyId"], created["AccessKey"]["SecretAccessKey"]


def start_tcp_keyd(
    keyd_factory: Callable[..., Keyd], *, tls: bool = False, user: str = "alice", name: str = "k"
) -> TcpKeyd:
    keyd = keyd_factory(name)
    keyd.init()
    cert = None
    extra: list[str] = []
    if tls:
        keyd.kmsfs("keyd", "tls-cert", "--keystore", str(keyd.keystore))
        cert = keyd.keystore / "tls-cert.pem"
        extra = ["--tls-cert", str(cert), "--tls-key", str(keyd.keystore / "tls-key.pem")]
    port = free_port()
    instance = TcpKeyd(keyd, port, "", "", cert)
    instance.access_key_id, instance.secret = instance.create_credentials(user)
    keyd.start("--listen", f"127.0.0.1:{port}", *extra)
    return instance
