"""The file header: fixed part, two key slots, key commitment, and crash-safe rewrap.

Layout and rules are in README.md (*Header*, *Key schedule*, *Replacing the wrapped key*).
Parsing (:meth:`Header.parse`) needs no key; :func:`unlock_header` asks the key provider
to unwrap the active slot and then checks the commitment and the slot MACs.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from kmsfs.errors import CorruptHeader, InvalidCiphertextException, UnsupportedFormat, UsageError
from kmsfs.format import _rng
from kmsfs.format.keys import (
    DATA_KEY_SIZE,
    FILE_ID_CONTEXT_KEY,
    FILE_ID_SIZE,
    DataKeyProvider,
    FileKeys,
    full_context,
)
from kmsfs.format.offsets import HEADER_SIZE, check_chunk_size

MAGIC = b"\x8bKMSFS\r\n"
#: the version new files get: 2 stores holes as runs with one marker each (README.md)
FORMAT_VERSION = 2
#: version 3 is version 2 whose key slots may be of another kind than a key-service blob:
#: files written to a recipient's public key (RSA-OAEP, write-only ingestion) get it
RECIPIENT_FORMAT_VERSION = 3
#: versions this code reads and writes (a version-1 file keeps a marker per hole chunk)
SUPPORTED_VERSIONS = (1, 2, 3)

FIXED_SIZE = 576
CONTEXT_OFFSET = 64
CONTEXT_CAPACITY = 512
SLOT_SIZE = 736
SLOT_OFFSETS = (FIXED_SIZE, FIXED_SIZE + SLOT_SIZE)
WRAPPED_KEY_CAPACITY = 512
KEY_ARN_CAPACITY = 144

_FIXED = struct.Struct(">8sHHI16s32s")  # magic, version, context length, chunk size, id, commitment
# generation, wrapped key length, ARN length, slot kind (version 3; zero before), 3 reserved
_SLOT_HEAD = struct.Struct(">QHHB3s")
_SLOT_KEY_OFFSET = 16
_SLOT_ARN_OFFSET = _SLOT_KEY_OFFSET + WRAPPED_KEY_CAPACITY  # 528
_SLOT_MAC_OFFSET = _SLOT_ARN_OFFSET + KEY_ARN_CAPACITY  # 672
_SLOT_CHECK_OFFSET = _SLOT_MAC_OFFSET + 32  # 704
_EMPTY_SLOT = bytes(SLOT_SIZE)

assert _FIXED.size == CONTEXT_OFFSET
assert CONTEXT_OFFSET + CONTEXT_CAPACITY == FIXED_SIZE
assert _SLOT_CHECK_OFFSET + 32 == SLOT_SIZE
assert FIXED_SIZE + 2 * SLOT_SIZE == HEADER_SIZE


# ------------------------------------------------------------------ encryption context
def encode_context(context: Mapping[str, str]) -> bytes:
    """The canonical stored encoding of the caller's encryption context entries."""
    items = []
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("encryption context keys and values must be strings")
        if not key:
            raise ValueError("encryption context keys must not be empty")
        if key == FILE_ID_CONTEXT_KEY:
            raise ValueError(f"{FILE_ID_CONTEXT_KEY!r} is added by the format itself")
        items.append((key.encode("utf-8"), value.encode("utf-8")))
    items.sort()
    parts = [struct.pack(">H", len(items))]
    for key_bytes, value_bytes in items:
        parts += [struct.pack(">H", len(key_bytes)), key_bytes]
        parts += [struct.pack(">H", len(value_bytes)), value_bytes]
    encoded = b"".join(parts)
    if len(encoded) > CONTEXT_CAPACITY:
        raise ValueError(f"encryption context takes {len(encoded)} bytes, at most 512 fit")
    return encoded


def decode_context(encoded: bytes) -> dict[str, str]:
    """Inverse of :func:`encode_context`; anything but its exact output is CorruptHeader."""
    try:
        (count,) = struct.unpack_from(">H", encoded, 0)
        position = 2
        context: dict[str, str] = {}
        for _ in range(count):
            (key_length,) = struct.unpack_from(">H", encoded, position)
            key = encoded[position + 2 : position + 2 + key_length]
            position += 2 + key_length
            (value_length,) = struct.unpack_from(">H", encoded, position)
            value = encoded[position + 2 : position + 2 + value_length]
            position += 2 + value_length
            if len(key) != key_length or len(value) != value_length:
                raise ValueError("entry runs past the end")
            context[key.decode("utf-8")] = value.decode("utf-8")
        if position != len(encoded) or encode_context(context) != encoded:
            raise ValueError("not canonical")
    except (struct.error, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise CorruptHeader("malformed encryption context") from error
    return context


# --------------------------------------------------------------------------- key slots
class SlotKind(enum.IntEnum):
    """What a key slot's wrapped key is (byte 12 of the slot; version 3 files only)."""

    #: the key service's blob (GenerateDataKey's CiphertextBlob), unwrapped by Decrypt
    #: with the file's encryption context
    KMS_BLOB = 0
    #: RSAES-OAEP-SHA-256 to the public key of the asymmetric CMK the slot's key ARN
    #: names, of the recipient payload (:func:`recipient_payload`); unwrapped by Decrypt
    #: with that KeyId and EncryptionAlgorithm RSAES_OAEP_SHA_256
    RSAES_OAEP_SHA_256 = 1


#: the AWS KMS EncryptionAlgorithm of each asymmetric slot kind
SLOT_KIND_ALGORITHMS = {SlotKind.RSAES_OAEP_SHA_256: "RSAES_OAEP_SHA_256"}

#: first bytes of a recipient payload (README.md, *Recipient slots*)
RECIPIENT_PAYLOAD_MAGIC = b"kmsfsRK1"
RECIPIENT_PAYLOAD_SIZE = 8 + DATA_KEY_SIZE + FILE_ID_SIZE + 32


class SlotState(enum.Enum):
    EMPTY = "empty"
    VALID = "valid"
    DAMAGED = "damaged"  # checksum fails: a torn write (interrupted rewrap) or tampering


@dataclass(frozen=True, slots=True)
class KeySlot:
    """One parsed key slot (only valid slots are represented)."""

    generation: int
    wrapped_key: bytes
    key_arn: str
    mac: bytes
    raw: bytes = field(repr=False)
    kind: SlotKind = SlotKind.KMS_BLOB

    @property
    def mac_input(self) -> bytes:
        return self.raw[:_SLOT_MAC_OFFSET]


def _is_zero(data: bytes) -> bool:
    return data.count(0) == len(data)


def _slot_checksum(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def _slot_mac(header_key: bytes, fixed: bytes, slot_body: bytes) -> bytes:
    return hmac.digest(header_key, fixed + slot_body, "sha256")


def build_slot(
    header_key: bytes,
    fixed: bytes,
    generation: int,
    wrapped_key: bytes,
    key_arn: str,
    kind: SlotKind = SlotKind.KMS_BLOB,
) -> bytes:
    """The 736 bytes of a key slot (MAC and checksum included)."""
    arn_bytes = key_arn.encode("utf-8")
    if not 1 <= len(wrapped_key) <= WRAPPED_KEY_CAPACITY:
        raise ValueError(
            f"wrapped key is {len(wrapped_key)} bytes; a key slot holds 1..{WRAPPED_KEY_CAPACITY}"
        )
    if len(arn_bytes) > KEY_ARN_CAPACITY:
        raise ValueError(f"key ARN is {len(arn_bytes)} bytes; a key slot holds {KEY_ARN_CAPACITY}")
    if generation < 1:
        raise ValueError("slot generations start at 1")
    if kind != SlotKind.KMS_BLOB and (not arn_bytes or _version_of(fixed) < 3):
        raise ValueError("a recipient slot needs format version 3 and the recipient's key ARN")
    body = (
        _SLOT_HEAD.pack(generation, len(wrapped_key), len(arn_bytes), int(kind), bytes(3))
        + wrapped_key.ljust(WRAPPED_KEY_CAPACITY, b"\0")
        + arn_bytes.ljust(KEY_ARN_CAPACITY, b"\0")
    )
    body += _slot_mac(header_key, fixed, body)
    return body + _slot_checksum(body)


def _version_of(fixed: bytes) -> int:
    return struct.unpack_from(">H", fixed, 8)[0]


def parse_slot(raw: bytes, version: int) -> tuple[SlotState, KeySlot | None]:
    """Classify one slot; a slot whose checksum holds but whose fields do not is CorruptHeader.

    Before format version 3 the kind byte is reserved (zero) like the 3 bytes after it.
    """
    if raw == _EMPTY_SLOT:
        return SlotState.EMPTY, None
    if not hmac.compare_digest(_slot_checksum(raw[:_SLOT_CHECK_OFFSET]), raw[_SLOT_CHECK_OFFSET:]):
        return SlotState.DAMAGED, None
    generation, key_length, arn_length, kind_byte, reserved = _SLOT_HEAD.unpack_from(raw, 0)
    known_kinds = tuple(SlotKind) if version >= RECIPIENT_FORMAT_VERSION else (SlotKind.KMS_BLOB,)
    if (
        generation < 1
        or reserved != bytes(3)
        or kind_byte not in known_kinds
        or (kind_byte != SlotKind.KMS_BLOB and arn_length == 0)
        or not 1 <= key_length <= WRAPPED_KEY_CAPACITY
        or arn_length > KEY_ARN_CAPACITY
        or not _is_zero(raw[_SLOT_KEY_OFFSET + key_length : _SLOT_ARN_OFFSET])
        or not _is_zero(raw[_SLOT_ARN_OFFSET + arn_length : _SLOT_MAC_OFFSET])
    ):
        raise CorruptHeader("a key slot has impossible fields")
    try:
        key_arn = raw[_SLOT_ARN_OFFSET : _SLOT_ARN_OFFSET + arn_length].decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorruptHeader("a key slot's ARN is not UTF-8") from error
    slot = KeySlot(
        generation=generation,
        wrapped_key=raw[_SLOT_KEY_OFFSET : _SLOT_KEY_OFFSET + key_length],
        key_arn=key_arn,
        mac=raw[_SLOT_MAC_OFFSET:_SLOT_CHECK_OFFSET],
        raw=raw,
        kind=SlotKind(kind_byte),
    )
    return SlotState.VALID, slot


# ------------------------------------------------------------------------------ header
@dataclass(frozen=True, slots=True)
class Header:
    """A parsed (not yet authenticated) header. ``raw`` is its exact 2048 bytes."""

    version: int
    chunk_size: int
    file_id: bytes
    commitment: bytes
    context: dict[str, str]
    slot_states: tuple[SlotState, SlotState]
    slots: tuple[KeySlot | None, KeySlot | None]
    active: int
    raw: bytes = field(repr=False)

    @property
    def fixed(self) -> bytes:
        return self.raw[:FIXED_SIZE]

    @property
    def active_slot(self) -> KeySlot:
        slot = self.slots[self.active]
        assert slot is not None
        return slot

    @property
    def inactive_state(self) -> SlotState:
        return self.slot_states[1 - self.active]

    @property
    def full_context(self) -> dict[str, str]:
        return full_context(self.file_id, self.context)

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        """Parse and structurally check a header; raises CorruptHeader / UnsupportedFormat."""
        raw = bytes(raw)
        if len(raw) < 10 or raw[:8] != MAGIC:
            raise CorruptHeader("not a kmsfs file (bad magic)")
        (version,) = struct.unpack_from(">H", raw, 8)
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedFormat(version)
        if len(raw) < HEADER_SIZE:
            raise CorruptHeader("the file is shorter than its header")
        raw = raw[:HEADER_SIZE]
        _magic, _version, context_length, chunk_size, file_id, commitment = _FIXED.unpack_from(
            raw, 0
        )
        try:
            check_chunk_size(chunk_size)
        except ValueError as error:
            raise CorruptHeader("impossible chunk size") from error
        if context_length > CONTEXT_CAPACITY:
            raise CorruptHeader("impossible encryption context length")
        context_end = CONTEXT_OFFSET + context_length
        if not _is_zero(raw[context_end:FIXED_SIZE]):
            raise CorruptHeader("non-zero padding after the encryption context")
        context = decode_context(raw[CONTEXT_OFFSET:context_end])
        parsed = [parse_slot(raw[offset : offset + SLOT_SIZE], version) for offset in SLOT_OFFSETS]
        states = (parsed[0][0], parsed[1][0])
        slots = (parsed[0][1], parsed[1][1])
        valid = [index for index in (0, 1) if slots[index] is not None]
        if not valid:
            raise CorruptHeader("no intact key slot")
        if len(valid) == 2:
            first, second = slots[0], slots[1]
            assert first is not None and second is not None
            if first.generation == second.generation:
                raise CorruptHeader("two key slots with the same generation")
            active = 0 if first.generation > second.generation else 1
        else:
            active = valid[0]
        return cls(
            version=version,
            chunk_size=chunk_size,
            file_id=file_id,
            commitment=commitment,
            context=context,
            slot_states=states,
            slots=slots,
            active=active,
            raw=raw,
        )


def build_header(
    keys: FileKeys,
    chunk_size: int,
    context: Mapping[str, str],
    wrapped_key: bytes,
    key_arn: str,
    format_version: int = FORMAT_VERSION,
    slot_kind: SlotKind = SlotKind.KMS_BLOB,
) -> bytes:
    """The 2048 header bytes of a new file: slot 0 holds the key (generation 1), slot 1 empty."""
    check_chunk_size(chunk_size)
    if format_version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot write format version {format_version}")
    encoded = encode_context(context)
    fixed = _FIXED.pack(
        MAGIC, format_version, len(encoded), chunk_size, keys.file_id, keys.commitment
    ) + encoded.ljust(CONTEXT_CAPACITY, b"\0")
    slot = build_slot(keys.header_key, fixed, 1, wrapped_key, key_arn, slot_kind)
    return fixed + slot + _EMPTY_SLOT


def create_header(
    key_provider: DataKeyProvider,
    key_id: str,
    encryption_context: Mapping[str, str] | None,
    chunk_size: int,
    format_version: int = FORMAT_VERSION,
) -> tuple[Header, FileKeys]:
    """Make a new file id, ask the provider for a data key bound to it, build the header.

    ``format_version`` 1 exists for tests and golden vectors of version-1 files.
    A provider with a ``slot_kind`` other than KMS_BLOB (a recipient's public key,
    :class:`kmsfs.format.recipient.RecipientKeyProvider`) makes a version-3 file.
    """
    slot_kind = SlotKind(getattr(key_provider, "slot_kind", SlotKind.KMS_BLOB))
    if slot_kind != SlotKind.KMS_BLOB:
        format_version = RECIPIENT_FORMAT_VERSION
    check_chunk_size(chunk_size)
    stored = dict(encryption_context or {})
    encode_context(stored)  # reject a bad context before asking for a key
    take_prepared = getattr(key_provider, "take_prepared_key", None)
    if take_prepared is not None:
        # A provider may hand out a key made ahead of time for a file id it chose
        # (the mount's pool of data keys); it was bound to full_context(file_id, stored).
        file_id, data_key, wrapped_key, key_arn = take_prepared(key_id, stored)
    else:
        file_id = _rng.random_bytes(FILE_ID_SIZE)
        data_key, wrapped_key, key_arn = key_provider.generate_data_key(
            key_id, full_context(file_id, stored)
        )
    keys = FileKeys.derive(bytes(data_key), file_id)
    header = Header.parse(
        build_header(
            keys, chunk_size, stored, bytes(wrapped_key), key_arn, format_version, slot_kind
        )
    )
    return header, keys


def check_expected_context(header: Header, expected: Mapping[str, str] | None) -> None:
    """Every entry the caller expects must be stored in the header (else CorruptHeader)."""
    for key, value in (expected or {}).items():
        if key == FILE_ID_CONTEXT_KEY:
            raise ValueError(f"{FILE_ID_CONTEXT_KEY!r} is checked by the format itself")
        if header.context.get(key) != value:
            raise CorruptHeader(f"the file's encryption context does not match ({key!r})")


def unwrap_data_key(key_provider: DataKeyProvider, header: Header, wrapped_key: bytes) -> bytes:
    """Ask the provider to unwrap; a rejected blob or context is CorruptHeader."""
    try:
        return bytes(key_provider.decrypt_data_key(wrapped_key, header.full_context))
    except InvalidCiphertextException as error:
        raise CorruptHeader("the key service rejected the wrapped key or its context") from error


def unwrap_slot(key_provider: DataKeyProvider, header: Header, slot: KeySlot) -> bytes:
    """The data key of ``slot``, of whichever kind (not yet checked against the header's
    commitment and MACs: :func:`authenticate_header` does that)."""
    if slot.kind == SlotKind.KMS_BLOB:
        return unwrap_data_key(key_provider, header, slot.wrapped_key)
    decrypt_recipient_key = getattr(key_provider, "decrypt_recipient_key", None)
    if decrypt_recipient_key is None:
        raise UsageError(
            "this file's data key is wrapped to a recipient's public key (format version 3), "
            "which this key provider cannot unwrap"
        )
    try:
        payload = decrypt_recipient_key(
            slot.key_arn, slot.wrapped_key, SLOT_KIND_ALGORITHMS[slot.kind]
        )
    except InvalidCiphertextException as error:
        raise CorruptHeader("the key service rejected the recipient slot's wrapped key") from error
    return data_key_from_recipient_payload(header, bytes(payload))


# --------------------------------------------------------------- recipient payload
def _context_digest(full_context: Mapping[str, str]) -> bytes:
    """SHA-256 of the whole encryption context (file id entry included) in the canonical
    encoding of the header's context field."""
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in full_context.items())
    parts = [struct.pack(">H", len(items))]
    for key_bytes, value_bytes in items:
        parts += [struct.pack(">H", len(key_bytes)), key_bytes]
        parts += [struct.pack(">H", len(value_bytes)), value_bytes]
    return hashlib.sha256(b"".join(parts)).digest()


def recipient_payload(data_key: bytes, full_context: Mapping[str, str]) -> bytes:
    """What a recipient slot encrypts to the public key: the data key bound to the file id
    and the whole encryption context, as the key service binds a blob to its context.

    ``magic (8) ‖ data key (32) ‖ file id (16) ‖ SHA-256(canonical full context) (32)``
    """
    if len(data_key) != DATA_KEY_SIZE:
        raise ValueError("a data key is 32 bytes")
    file_id = bytes.fromhex(full_context[FILE_ID_CONTEXT_KEY])
    return RECIPIENT_PAYLOAD_MAGIC + data_key + file_id + _context_digest(full_context)


def data_key_from_recipient_payload(header: Header, payload: bytes) -> bytes:
    """The data key in ``payload`` if it was made for this header's file id and context,
    else CorruptHeader (a slot copied from another file, or a context edited)."""
    if len(payload) != RECIPIENT_PAYLOAD_SIZE or payload[:8] != RECIPIENT_PAYLOAD_MAGIC:
        raise CorruptHeader("the recipient slot does not hold a kmsfs recipient payload")
    data_key = payload[8 : 8 + DATA_KEY_SIZE]
    bound_file_id = payload[8 + DATA_KEY_SIZE : 8 + DATA_KEY_SIZE + FILE_ID_SIZE]
    bound_context = payload[8 + DATA_KEY_SIZE + FILE_ID_SIZE :]
    if not hmac.compare_digest(bound_file_id, header.file_id) or not hmac.compare_digest(
        bound_context, _context_digest(header.full_context)
    ):
        raise CorruptHeader("the recipient slot was made for another file id or context")
    return data_key


def unlock_header(
    header: Header,
    key_provider: DataKeyProvider,
    expected_context: Mapping[str, str] | None = None,
) -> FileKeys:
    """Unwrap the active slot's key, then check the key commitment and the slot MACs."""
    check_expected_context(header, expected_context)
    data_key = unwrap_slot(key_provider, header, header.active_slot)
    return authenticate_header(header, data_key)


def authenticate_header(header: Header, data_key: bytes) -> FileKeys:
    """Derive the file keys from ``data_key`` and check commitment and MACs (CorruptHeader)."""
    keys = FileKeys.derive(data_key, header.file_id)
    if not hmac.compare_digest(keys.commitment, header.commitment):
        raise CorruptHeader("the header does not commit to this data key")
    fixed = header.fixed
    for slot in header.slots:
        if slot is not None and not hmac.compare_digest(
            _slot_mac(keys.header_key, fixed, slot.mac_input), slot.mac
        ):
            raise CorruptHeader("a key slot failed authentication")
    return keys


def read_header(fd: int) -> Header:
    """Read and parse the header at the start of ``fd`` (which must be non-empty)."""
    return Header.parse(os.pread(fd, HEADER_SIZE, 0))


# ------------------------------------------------------------------------------ rewrap
def plan_rewrap(
    header: Header, keys: FileKeys, new_wrapped_key: bytes, new_key_arn: str
) -> list[tuple[int, bytes]]:
    """The writes of a rewrap, in order, each to be followed by fsync.

    1. the new slot (generation + 1) into the inactive slot's place;
    2. zeros over the old active slot.
    Pure, so tests can apply any prefix of any write and check the file still opens.
    """
    active = header.active
    new_slot = build_slot(
        keys.header_key,
        header.fixed,
        header.active_slot.generation + 1,
        new_wrapped_key,
        new_key_arn,
    )
    return [(SLOT_OFFSETS[1 - active], new_slot), (SLOT_OFFSETS[active], _EMPTY_SLOT)]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def rewrap(
    fd: int,
    new_wrapped_key: bytes,
    new_key_arn: str,
    *,
    key_provider: DataKeyProvider,
    encryption_context: Mapping[str, str] | None = None,
) -> Header | None:
    """Replace the file's wrapped data key in place, crash-safely (see the spec).

    ``new_wrapped_key`` must wrap the *same* data key (what KMS ReEncrypt returns) under
    the file's encryption context; this is checked before anything is written (ValueError
    otherwise). Returns the new header, or None for an empty file (no header, nothing to do).
    """
    if os.fstat(fd).st_size == 0:
        return None
    header = read_header(fd)
    keys = unlock_header(header, key_provider, encryption_context)
    new_data_key = unwrap_data_key(key_provider, header, bytes(new_wrapped_key))
    if not hmac.compare_digest(
        FileKeys.derive(new_data_key, header.file_id).commitment, header.commitment
    ):
        raise ValueError("the new wrapped key does not hold this file's data key")
    for offset, data in plan_rewrap(header, keys, bytes(new_wrapped_key), new_key_arn):
        _pwrite_all(fd, data, offset)
        os.fsync(fd)
    return read_header(fd)
