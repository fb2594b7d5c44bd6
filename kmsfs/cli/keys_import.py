"""``kmsfs keys import-parameters|import-material|delete-material`` and ``keys create
--origin EXTERNAL``: key material you bring (BYOK), as AWS KMS's import workflow.

    kmsfs keys create --origin EXTERNAL --alias alias/escrowed
    kmsfs keys import-parameters alias/escrowed --out-dir params/
    openssl rand -out material.bin 32          # keep a copy: your escrow
    openssl pkeyutl -encrypt -in material.bin -out params/EncryptedKeyMaterial.bin \\
        -inkey params/WrappingPublicKey.der -keyform DER -pubin \\
        -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256
    kmsfs keys import-material alias/escrowed --import-token params/ImportToken.bin \\
        --encrypted-material params/EncryptedKeyMaterial.bin --no-expiry
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
from pathlib import Path
from typing import Any

from kmsfs.cli.common import print_json, print_record, when
from kmsfs.errors import UsageError


def _client(args: argparse.Namespace):
    from kmsfs.kms.client import KMSClient

    return KMSClient(args.keyd_socket)


def _key_id(client, name: str) -> str:
    from kmsfs.cli.keys import _key_id as resolve

    return resolve(client, name)


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def cmd_import_parameters(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives import serialization

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _client(args) as client:
        response = client.call(
            "GetParametersForImport",
            {
                "KeyId": _key_id(client, args.key),
                "WrappingAlgorithm": args.algorithm,
                "WrappingKeySpec": args.wrapping_key_spec,
            },
        )
    public_der = base64.b64decode(response["PublicKey"])
    public = serialization.load_der_public_key(public_der)
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(out_dir / "WrappingPublicKey.der", public_der)
    _write(out_dir / "WrappingPublicKey.pem", pem)
    _write(out_dir / "ImportToken.bin", base64.b64decode(response["ImportToken"]))
    record = {
        "KeyId": response["KeyId"],
        "WrappingAlgorithm": args.algorithm,
        "WrappingPublicKey": str(out_dir / "WrappingPublicKey.der") + " (and .pem)",
        "ImportToken": str(out_dir / "ImportToken.bin"),
        "ValidTo": when(response["ParametersValidTo"]),
    }
    if args.json:
        print_json(record)
    else:
        print_record(record)


def _valid_to(text: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--valid-to {text!r}: give an ISO 8601 date, e.g. 2027-06-30") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def cmd_import_material(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {
        "ImportToken": base64.b64encode(Path(args.import_token).read_bytes()).decode(),
        "EncryptedKeyMaterial": base64.b64encode(
            Path(args.encrypted_material).read_bytes()
        ).decode(),
    }
    if args.no_expiry:
        params["ExpirationModel"] = "KEY_MATERIAL_DOES_NOT_EXPIRE"
    elif args.valid_to:
        params["ExpirationModel"] = "KEY_MATERIAL_EXPIRES"
        params["ValidTo"] = _valid_to(args.valid_to)
    else:
        raise UsageError("say how long the material lasts: --valid-to DATE or --no-expiry")
    with _client(args) as client:
        params["KeyId"] = _key_id(client, args.key)
        client.call("ImportKeyMaterial", params)
    print(f"{args.key}: key material imported; the key is usable")


def cmd_delete_material(args: argparse.Namespace) -> None:
    with _client(args) as client:
        client.call("DeleteImportedKeyMaterial", {"KeyId": _key_id(client, args.key)})
    print(f"{args.key}: imported key material deleted (PendingImport until re-imported)")


def add_create_options(create: argparse.ArgumentParser) -> None:
    create.add_argument(
        "--origin",
        choices=["AWS_KMS", "EXTERNAL"],
        help="EXTERNAL: a key for material you import (keys import-parameters/import-material)",
    )
    create.add_argument(
        "--key-id",
        help="with --origin EXTERNAL: recreate a key under its old id in a new keystore, to "
        "re-import its escrowed material (kmsfs's own CreateKey member)",
    )


def add_parsers(key_command) -> None:
    params = key_command(
        "import-parameters",
        "wrapping public key and import token for importing material (24 h)",
        cmd_import_parameters,
    )
    params.add_argument(
        "--algorithm",
        default="RSAES_OAEP_SHA_256",
        choices=[
            "RSAES_OAEP_SHA_1",
            "RSAES_OAEP_SHA_256",
            "RSA_AES_KEY_WRAP_SHA_1",
            "RSA_AES_KEY_WRAP_SHA_256",
        ],
        help="how you will wrap the material (default RSAES_OAEP_SHA_256)",
    )
    params.add_argument(
        "--wrapping-key-spec", default="RSA_4096", choices=["RSA_2048", "RSA_3072", "RSA_4096"]
    )
    params.add_argument("--out-dir", required=True, help="where to write the key and token")
    material = key_command(
        "import-material", "import wrapped key material into an EXTERNAL key", cmd_import_material
    )
    material.add_argument("--import-token", required=True, metavar="F")
    material.add_argument("--encrypted-material", required=True, metavar="F")
    expiry = material.add_mutually_exclusive_group()
    expiry.add_argument("--valid-to", metavar="DATE", help="the material expires then (ISO 8601)")
    expiry.add_argument("--no-expiry", action="store_true", help="the material never expires")
    key_command(
        "delete-material", "delete an EXTERNAL key's imported material", cmd_delete_material
    )
