"""Recipient slots (format version 3): files written with only a CMK's RSA public key, read
through the key service's RSA-OAEP Decrypt; authenticated as the key-service slot is."""

from __future__ import annotations

import hashlib
import io
import os
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from format_testkit import (
    TEST_RSA_KEY_ARN,
    FakeKeyProvider,
    RecipientReader,
    memfd,
    pattern,
)

import kmsfs.format as fmt
from kmsfs.errors import CorruptChunk, CorruptHeader, UnsupportedFormat, UsageError
from kmsfs.format.file import EncryptedFile
from kmsfs.format.header import (
    SLOT_OFFSETS,
    SLOT_SIZE,
    Header,
    SlotKind,
    build_header,
    read_header,
    recipient_payload,
    unlock_header,
)
from kmsfs.format.keys import FileKeys, full_context
from kmsfs.format.recipient import (
    RecipientKeyProvider,
    load_recipient_public_key,
    oaep_sha256,
    public_key_der,
)

CONTEXT = {"kmsfs:fs-id": "f" * 32}


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def writer(private_key: rsa.RSAPrivateKey) -> RecipientKeyProvider:
    return RecipientKeyProvider(private_key.public_key(), TEST_RSA_KEY_ARN)


def encrypt(private_key, plaintext: bytes, context=CONTEXT, chunk_size: int = 64) -> bytes:
    out = io.BytesIO()
    fmt.encrypt_stream(
        io.BytesIO(plaintext), out, key_provider=writer(private_key), key_id=TEST_RSA_KEY_ARN,
        encryption_context=context, chunk_size=chunk_size,
    )  # fmt: skip
    return out.getvalue()


def decrypt(ciphertext: bytes, provider, context=CONTEXT) -> bytes:
    out = io.BytesIO()
    fmt.decrypt_stream(
        io.BytesIO(ciphertext), out, key_provider=provider, encryption_context=context
    )
    return out.getvalue()


def with_checksum(slot_body: bytes) -> bytes:
    """A slot whose keyless checksum matches its (changed) body: what an attacker can write."""
    return slot_body[:704] + hashlib.sha256(slot_body[:704]).digest()


def replace_slot(ciphertext: bytes, slot: bytes, index: int = 0) -> bytes:
    offset = SLOT_OFFSETS[index]
    return ciphertext[:offset] + slot + ciphertext[offset + SLOT_SIZE :]


def test_written_with_the_public_key_read_through_rsa_decrypt(private_key) -> None:
    plaintext = pattern(1, 1000)
    ciphertext = encrypt(private_key, plaintext)
    header = Header.parse(ciphertext)
    assert header.version == 3
    assert header.active_slot.kind == SlotKind.RSAES_OAEP_SHA_256
    assert header.active_slot.key_arn == TEST_RSA_KEY_ARN
    assert len(header.active_slot.wrapped_key) == 256  # the raw RSA-OAEP output
    reader = RecipientReader(private_key)
    assert decrypt(ciphertext, reader) == plaintext
    assert reader.calls == [(TEST_RSA_KEY_ARN, "RSAES_OAEP_SHA_256")]
    # the writer cannot read what it wrote
    with pytest.raises(UsageError, match="only write"):
        decrypt(ciphertext, writer(private_key))


def test_random_access_engine_writes_and_reads_recipient_files(private_key) -> None:
    fd = memfd()
    try:
        engine = EncryptedFile.open(
            fd, key_provider=writer(private_key), key_id=TEST_RSA_KEY_ARN,
            encryption_context=CONTEXT, chunk_size=32,
        )  # fmt: skip
        engine.write(0, b"abc")
        engine.truncate(500)
        engine.write(300, b"xyz")
        engine.close()
        reader = RecipientReader(private_key)
        opened = EncryptedFile.open(fd, key_provider=reader, encryption_context=CONTEXT)
        assert opened.read(0, 600) == b"abc" + bytes(297) + b"xyz" + bytes(197)
        opened.write(1, b"B")  # a reader with the key service may change it as usual
        opened.close()
        assert read_header(fd).version == 3
        report = fmt.verify(fd, key_provider=reader, encryption_context=CONTEXT)
        assert report.ok, report.error
        assert fmt.inspect(fd).slot_kind == "RSAES_OAEP_SHA_256"
    finally:
        os.close(fd)


def test_key_service_files_keep_version_2_and_their_kind_byte_zero() -> None:
    out = io.BytesIO()
    fmt.encrypt_stream(io.BytesIO(b"x"), out, key_provider=FakeKeyProvider(), key_id="k")
    header = Header.parse(out.getvalue())
    assert header.version == 2 and header.active_slot.kind == SlotKind.KMS_BLOB
    assert out.getvalue()[SLOT_OFFSETS[0] + 12 : SLOT_OFFSETS[0] + 16] == bytes(4)


def test_a_recipient_slot_in_a_version_2_header_is_refused(private_key, monkeypatch) -> None:
    """Only version 3 knows slot kinds: a version-2 header whose kind byte is set (a
    version-3 file with its version field rewritten) is CorruptHeader, and a reader of
    versions 1-2 only (kmsfs before this change) sees UnsupportedFormat(3)."""
    original = encrypt(private_key, b"data")
    downgraded = bytearray(original)
    struct.pack_into(">H", downgraded, 8, 2)
    with pytest.raises(CorruptHeader, match="impossible fields"):
        Header.parse(bytes(downgraded))
    import kmsfs.format.header as header_module

    monkeypatch.setattr(header_module, "SUPPORTED_VERSIONS", (1, 2))
    with pytest.raises(UnsupportedFormat):
        Header.parse(original)


def test_a_slot_swapped_between_files_fails(private_key) -> None:
    first = encrypt(private_key, b"first file")
    second = encrypt(private_key, b"second file")
    swapped = replace_slot(second, first[SLOT_OFFSETS[0] : SLOT_OFFSETS[0] + SLOT_SIZE])
    with pytest.raises(CorruptHeader):
        decrypt(swapped, RecipientReader(private_key))
    # and the whole header of the first in front of the second's chunks
    with pytest.raises(CorruptChunk):  # the chunks are bound to the second's id and key
        decrypt(first[:2048] + second[2048:], RecipientReader(private_key))


def forged_header(private_key, payload_context: dict, header_file_id: bytes, context) -> bytes:
    """A header for ``header_file_id`` that is right in every respect (commitment and MAC
    under its data key) but whose RSA payload was made for ``payload_context``: the
    payload's own binding is then the only thing that can catch it."""
    data_key = bytes(range(32))
    keys = FileKeys.derive(data_key, header_file_id)
    wrapped = private_key.public_key().encrypt(
        recipient_payload(data_key, payload_context), oaep_sha256()
    )
    return build_header(
        keys, 64, context, wrapped, TEST_RSA_KEY_ARN, 3, SlotKind.RSAES_OAEP_SHA_256
    )


def test_the_payload_binds_the_file_id_and_the_context(private_key) -> None:
    file_id, other_id = bytes(16), b"\x01" * 16
    reader = RecipientReader(private_key)
    honest = forged_header(private_key, full_context(file_id, CONTEXT), file_id, CONTEXT)
    assert unlock_header(Header.parse(honest), reader).file_id == file_id  # the control
    moved = forged_header(private_key, full_context(other_id, CONTEXT), file_id, CONTEXT)
    with pytest.raises(CorruptHeader, match="another file id or context"):
        unlock_header(Header.parse(moved), reader)
    other_context = {"kmsfs:fs-id": "e" * 32}
    edited = forged_header(private_key, full_context(file_id, other_context), file_id, CONTEXT)
    with pytest.raises(CorruptHeader, match="another file id or context"):
        unlock_header(Header.parse(edited), reader)


def test_tampered_recipient_slots_fail(private_key) -> None:
    ciphertext = encrypt(private_key, b"payload")
    slot = ciphertext[SLOT_OFFSETS[0] : SLOT_OFFSETS[0] + SLOT_SIZE]
    reader = RecipientReader(private_key)
    # a flipped bit in the RSA ciphertext: OAEP fails in the key service
    flipped = bytearray(slot)
    flipped[16 + 100] ^= 1
    with pytest.raises(CorruptHeader, match="rejected"):
        decrypt(replace_slot(ciphertext, with_checksum(bytes(flipped))), reader)
    # the kind byte cleared: read as a key-service blob, which it is not
    cleared = bytearray(slot)
    cleared[12] = 0
    with pytest.raises(CorruptHeader):
        decrypt(replace_slot(ciphertext, with_checksum(bytes(cleared))), reader)
    # an unknown kind
    unknown = bytearray(slot)
    unknown[12] = 7
    with pytest.raises(CorruptHeader, match="impossible fields"):
        decrypt(replace_slot(ciphertext, with_checksum(bytes(unknown))), reader)
    # the fixed part (here the stored context) edited: the slot MAC fails
    edited = bytearray(ciphertext)
    context_offset = 64 + 4  # count (2) + key length (2), then the key's first byte
    edited[context_offset] ^= 0x20  # "kmsfs:fs-id" -> "Kmsfs:fs-id"
    with pytest.raises(CorruptHeader):
        decrypt(bytes(edited), reader, context=None)


def test_a_key_that_cannot_be_a_recipient_is_a_usage_error(private_key) -> None:
    ec_der = public_key_der_any(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(UsageError, match="not an RSA public key"):
        load_recipient_public_key(ec_der)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(UsageError, match="1024-bit"):
        load_recipient_public_key(public_key_der(small))
    with pytest.raises(UsageError, match="not a PEM or DER"):
        load_recipient_public_key(b"garbage")
    assert load_recipient_public_key(public_key_der(private_key.public_key())).key_size == 2048


def public_key_der_any(key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class ReaderWithBlobs(RecipientReader):
    """keyd holding both the recipient CMK and a symmetric CMK (FakeKeyProvider)."""

    def __init__(self, private_key) -> None:
        super().__init__(private_key)
        self.symmetric = FakeKeyProvider()

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        return self.symmetric.decrypt_data_key(wrapped_blob, encryption_context)


def test_rewrap_moves_an_ingested_file_onto_a_symmetric_cmk(private_key) -> None:
    fd = memfd()
    try:
        os.write(fd, encrypt(private_key, b"adopt me"))
        reader = ReaderWithBlobs(private_key)
        header = read_header(fd)
        file_keys = unlock_header(header, reader)
        raw_key = reader.decrypt_recipient_key(
            TEST_RSA_KEY_ARN, header.active_slot.wrapped_key, "RSAES_OAEP_SHA_256"
        )[8:40]
        assert FileKeys.derive(raw_key, header.file_id).commitment == file_keys.commitment
        blob = reader.symmetric.wrap(raw_key, header.full_context)
        new_header = fmt.rewrap(fd, blob, "arn:sym", key_provider=reader)
        assert new_header is not None and new_header.version == 3
        assert new_header.active_slot.kind == SlotKind.KMS_BLOB
        reader.calls.clear()
        assert decrypt(os.pread(fd, 1 << 16, 0), reader) == b"adopt me"
        assert reader.calls == []  # the RSA key is no longer needed
    finally:
        os.close(fd)
