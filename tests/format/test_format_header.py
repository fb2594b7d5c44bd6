"""Header: context encoding, key slots, and crash-safe rewrap."""

from __future__ import annotations

import os

import pytest
from format_testkit import OTHER_KEY_ARN, TEST_KEY_ARN, FakeKeyProvider
from hypothesis import given
from hypothesis import strategies as st

from kmsfs.errors import CorruptHeader, InvalidCiphertextException
from kmsfs.format.file import EncryptedFile
from kmsfs.format.header import (
    KEY_ARN_CAPACITY,
    SLOT_OFFSETS,
    SLOT_SIZE,
    WRAPPED_KEY_CAPACITY,
    Header,
    SlotState,
    decode_context,
    encode_context,
    plan_rewrap,
    read_header,
    rewrap,
    unlock_header,
)
from kmsfs.format.keys import FILE_ID_CONTEXT_KEY
from kmsfs.format.offsets import HEADER_SIZE
from kmsfs.format.tools import inspect, verify

CONTEXT = {"kmsfs:fs-id": "fs-42", "purpose": "tests"}


class TwoKeyProvider:
    """Routes unwrapping by blob tag to one of two fake CMKs ("old" and "new")."""

    def __init__(self) -> None:
        self.old = FakeKeyProvider(tag=b"\x01", key_arn=TEST_KEY_ARN)
        self.new = FakeKeyProvider(os.urandom(32), tag=b"\x02", key_arn=OTHER_KEY_ARN)

    def generate_data_key(self, key_id, encryption_context):
        return self.old.generate_data_key(key_id, encryption_context)

    def decrypt_data_key(self, wrapped_blob, encryption_context):
        target = self.new if wrapped_blob[4:5] == b"\x02" else self.old
        return target.decrypt_data_key(wrapped_blob, encryption_context)


def make(fd: int, provider, data: bytes = b"content " * 40) -> bytes:
    with EncryptedFile.open(
        fd, key_provider=provider, key_id="alias/test", encryption_context=CONTEXT, chunk_size=64
    ) as engine:
        engine.write(0, data)
    return data


def content(fd: int, provider) -> bytes:
    engine = EncryptedFile.open(fd, key_provider=provider, writable=False)
    return engine.read(0, engine.size)


def new_blob_for(fd: int, providers: TwoKeyProvider) -> bytes:
    """What KMS ReEncrypt would return: the same data key, wrapped by the new CMK."""
    header = read_header(fd)
    data_key = providers.old.decrypt_data_key(header.active_slot.wrapped_key, header.full_context)
    return providers.new.wrap(data_key, header.full_context)


# --------------------------------------------------------------------- context
@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=30), max_size=6))
def test_context_encoding_round_trips_canonically(context: dict[str, str]) -> None:
    context.pop(FILE_ID_CONTEXT_KEY, None)
    try:
        encoded = encode_context(context)
    except ValueError:
        assert len(repr(context).encode()) > 100  # only too-large contexts are refused
        return
    assert decode_context(encoded) == context
    assert encode_context(dict(reversed(list(context.items())))) == encoded


def test_context_rules() -> None:
    with pytest.raises(ValueError):
        encode_context({FILE_ID_CONTEXT_KEY: "x"})
    with pytest.raises(ValueError):
        encode_context({"": "x"})
    with pytest.raises(ValueError):
        encode_context({"k": "v" * 600})
    good = encode_context({"b": "2", "a": "1"})
    with pytest.raises(CorruptHeader):
        decode_context(good + b"\0")
    swapped = encode_context({"a": "1"})[:2] + good[9:] + good[2:9]  # entries out of order
    with pytest.raises(CorruptHeader):
        decode_context(swapped)


# ------------------------------------------------------------------------ slots
def test_new_header_layout(open_fd, provider: FakeKeyProvider) -> None:
    fd = open_fd()
    make(fd, provider)
    header = read_header(fd)
    assert header.version == 2 and header.chunk_size == 64
    assert header.context == CONTEXT
    assert header.full_context == {**CONTEXT, FILE_ID_CONTEXT_KEY: header.file_id.hex()}
    assert header.active == 0 and header.active_slot.generation == 1
    assert header.slot_states == (SlotState.VALID, SlotState.EMPTY)
    assert header.active_slot.key_arn == TEST_KEY_ARN
    assert len(header.raw) == HEADER_SIZE


def test_wrapped_key_and_arn_must_fit(open_fd) -> None:
    for blob_size, arn in ((WRAPPED_KEY_CAPACITY + 1, "arn"), (100, "a" * (KEY_ARN_CAPACITY + 1))):

        class Oversized(FakeKeyProvider):
            def generate_data_key(self, key_id, encryption_context):
                return os.urandom(32), os.urandom(blob_size), arn  # noqa: B023

        engine = EncryptedFile.open(
            open_fd(f"big{blob_size}"), key_provider=Oversized(), key_id="k"
        )
        with pytest.raises(ValueError):
            engine.write(0, b"x")

    # an AWS-sized blob (184 bytes) and a long ARN fit
    class AwsSized(FakeKeyProvider):
        def wrap(self, data_key, encryption_context):
            return super().wrap(data_key, encryption_context) + bytes(184 - 5 - 12 - 48)

        def decrypt_data_key(self, wrapped_blob, encryption_context):
            return super().decrypt_data_key(wrapped_blob[: 5 + 12 + 48], encryption_context)

    provider = AwsSized(key_arn="arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/mrk-" + "a" * 32)
    fd = open_fd("aws")
    data = make(fd, provider)
    assert len(read_header(fd).active_slot.wrapped_key) == 184
    assert content(fd, provider) == data


def test_two_valid_slots_with_one_generation_are_corrupt(open_fd, provider) -> None:
    fd = open_fd()
    make(fd, provider)
    slot = os.pread(fd, SLOT_SIZE, SLOT_OFFSETS[0])
    os.pwrite(fd, slot, SLOT_OFFSETS[1])
    with pytest.raises(CorruptHeader, match="generation"):
        read_header(fd)


def test_a_valid_older_slot_must_authenticate_too(open_fd, provider) -> None:
    """Both slots valid (crash between the rewrap steps): the older one is MAC-checked."""
    fd = open_fd()
    make(fd, provider)
    header = read_header(fd)
    keys = unlock_header(header, provider)
    # forge an "older" slot under another key: valid checksum, wrong MAC
    from kmsfs.format.header import build_slot

    older = build_slot(os.urandom(32), header.fixed, 1, b"blob", "arn")
    newer = build_slot(keys.header_key, header.fixed, 2, header.active_slot.wrapped_key, "arn")
    os.pwrite(fd, older, SLOT_OFFSETS[0])
    os.pwrite(fd, newer, SLOT_OFFSETS[1])
    with pytest.raises(CorruptHeader, match="slot"):
        EncryptedFile.open(fd, key_provider=provider)


# ----------------------------------------------------------------------- rewrap
def test_rewrap_replaces_the_wrapping_in_place(open_fd) -> None:
    providers = TwoKeyProvider()
    fd = open_fd()
    data = make(fd, providers)
    before = os.pread(fd, 1 << 20, 0)
    header = rewrap(fd, new_blob_for(fd, providers), OTHER_KEY_ARN, key_provider=providers)
    assert header is not None
    after = os.pread(fd, 1 << 20, 0)
    assert after[HEADER_SIZE:] == before[HEADER_SIZE:]  # no chunk touched
    assert after[: SLOT_OFFSETS[0]] == before[: SLOT_OFFSETS[0]]  # nor the fixed part
    assert header.active == 1 and header.active_slot.generation == 2
    assert header.slot_states == (SlotState.EMPTY, SlotState.VALID)
    info = inspect(fd)
    assert (info.key_arn, info.key_generation, info.inactive_slot) == (OTHER_KEY_ARN, 2, "empty")
    assert content(fd, providers.new) == data  # the new CMK alone opens it
    with pytest.raises(CorruptHeader):
        content(fd, providers.old)
    # and again: back into slot 0, generation 3
    header = rewrap(fd, new_blob_for_new(fd, providers), OTHER_KEY_ARN, key_provider=providers)
    assert header is not None and header.active == 0 and header.active_slot.generation == 3
    assert content(fd, providers) == data


def new_blob_for_new(fd: int, providers: TwoKeyProvider) -> bytes:
    header = read_header(fd)
    data_key = providers.new.decrypt_data_key(header.active_slot.wrapped_key, header.full_context)
    return providers.new.wrap(data_key, header.full_context)


def test_rewrap_refuses_a_blob_of_another_data_key(open_fd) -> None:
    providers = TwoKeyProvider()
    fd = open_fd()
    make(fd, providers)
    before = os.pread(fd, HEADER_SIZE, 0)
    header = read_header(fd)
    wrong = providers.new.wrap(os.urandom(32), header.full_context)
    with pytest.raises(ValueError, match="data key"):
        rewrap(fd, wrong, OTHER_KEY_ARN, key_provider=providers)
    wrong_context = providers.new.wrap(bytes(32), {"other": "context"})
    with pytest.raises(CorruptHeader):
        rewrap(fd, wrong_context, OTHER_KEY_ARN, key_provider=providers)
    assert os.pread(fd, HEADER_SIZE, 0) == before


def test_rewrap_of_an_empty_file_is_a_no_op(open_fd, provider) -> None:
    assert rewrap(open_fd(), b"blob", "arn", key_provider=provider) is None


def test_a_crash_at_any_byte_of_either_rewrap_step_leaves_a_readable_file(open_fd) -> None:
    providers = TwoKeyProvider()
    fd = open_fd()
    data = make(fd, providers)
    original = os.pread(fd, HEADER_SIZE, 0)
    header = Header.parse(original)
    keys = unlock_header(header, providers)
    writes = plan_rewrap(header, keys, new_blob_for(fd, providers), OTHER_KEY_ARN)
    assert [offset for offset, _ in writes] == [SLOT_OFFSETS[1], SLOT_OFFSETS[0]]
    state = bytearray(original)
    seen_generations = set()
    for step, (offset, payload) in enumerate(writes):
        for torn in range(len(payload) + 1):
            crashed = bytearray(state)
            crashed[offset : offset + torn] = payload[:torn]
            os.pwrite(fd, crashed, 0)
            opened = Header.parse(bytes(crashed))
            seen_generations.add(opened.active_slot.generation)
            assert content(fd, providers) == data, (step, torn)
            if step == 0 and torn < len(payload):
                assert opened.active_slot.generation == 1  # old wrapping
            else:
                assert opened.active_slot.generation == 2  # new wrapping
            report = verify(fd, key_provider=providers)
            assert report.ok
            # a torn or leftover inactive slot is reported, an empty one is not
            assert bool(report.warnings) == (opened.inactive_state is not SlotState.EMPTY)
        state[offset : offset + len(payload)] = payload
    assert seen_generations == {1, 2}
    # once both steps are done, a flipped bit in the active slot cannot fall back
    final = bytearray(state)
    final[SLOT_OFFSETS[1] + 40] ^= 1
    os.pwrite(fd, final, 0)
    with pytest.raises(CorruptHeader):
        content(fd, providers)


def test_verify_warns_about_an_unfinished_rewrap(open_fd) -> None:
    providers = TwoKeyProvider()
    fd = open_fd()
    make(fd, providers)
    header = read_header(fd)
    keys = unlock_header(header, providers)
    (offset, payload), _ = plan_rewrap(header, keys, new_blob_for(fd, providers), OTHER_KEY_ARN)
    os.pwrite(fd, payload, offset)  # step 1 done, step 2 never ran
    report = verify(fd, key_provider=providers)
    assert report.ok and "older wrapping" in report.warnings[0]
    assert inspect(fd).inactive_slot == "valid"
    # finishing it is just rewrapping again
    rewrap(fd, new_blob_for_new(fd, providers), OTHER_KEY_ARN, key_provider=providers)
    assert verify(fd, key_provider=providers).warnings == []


def test_header_moved_onto_another_file_id_cannot_be_unwrapped(open_fd, provider) -> None:
    """The key service binds the file id: change it (and nothing else) and Decrypt fails."""
    fd = open_fd()
    make(fd, provider)
    raw = bytearray(os.pread(fd, HEADER_SIZE, 0))
    raw[16:32] = os.urandom(16)
    header = Header.parse(bytes(raw))  # structurally fine
    with pytest.raises(InvalidCiphertextException):
        provider.decrypt_data_key(header.active_slot.wrapped_key, header.full_context)
    with pytest.raises(CorruptHeader):
        unlock_header(header, provider)
