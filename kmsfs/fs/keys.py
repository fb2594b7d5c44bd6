"""Data keys for the mount: unwrapped through keyd, cached briefly, pre-generated in a pool.

- **Open**: a file's wrapped data key is unwrapped by keyd (Decrypt, with the file's
  encryption context) and held by the open file while any handle is open.
- **After the last close** the plaintext data key stays in memory for
  ``cache_seconds`` (default 60 s), so reopening a file just closed costs no round
  trip (at most :data:`MAX_CACHED_KEYS` keys, the oldest evicted first). A CMK that
  is disabled, scheduled for deletion or deleted therefore refuses new opens (EACCES)
  at most ``cache_seconds`` later; files already open keep working until closed, as
  with any key held by an application.
- **Creation**: a file gets its data key with its first byte. A small pool of fresh
  data keys (GenerateDataKey, each bound to its own future file id) is kept ready by
  a background task so creating files does not wait on keyd. Pool entries also expire
  after ``cache_seconds`` and the pool is emptied as soon as keyd refuses the CMK.

Per principal (issue 17): with forwarding, keys unwrapped and prepared for one user
serve that user only, and a forwarded answer expires ``cache_seconds`` after keyd gave
it (see :class:`KeyManager`).

Plaintext keys live only in this process's memory (Python cannot wipe them; the mount
process is hardened as keyd is: no core dumps, not dumpable, memory locked where allowed,
see :mod:`kmsfs.hardening`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import os
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kmsfs.errors import (
    CorruptHeader,
    KeydUnavailable,
    KMSError,
)
from kmsfs.format.header import SLOT_KIND_ALGORITHMS, Header, SlotKind
from kmsfs.format.keys import FILE_ID_SIZE, full_context
from kmsfs.fs.config import FsConfig
from kmsfs.kms.caller import ForwardedCaller
from kmsfs.kms.datakeys import check_recipient_key

log = logging.getLogger("kmsfs.mount")

KEYD_TIMEOUT = 10.0
#: data keys of closed files kept at most (the oldest go first; about 15 MiB, see
#: :meth:`KeyManager._cache_key`). The cache is for reopening files closed in the last
#: ``cache_seconds``: a tree written or read and then read again (untar then read-all,
#: make then a second make). It must hold such a tree whole: a cache smaller than a tree
#: read in order gets no hit at all (each miss evicts the oldest key, the very next one
#: the scan needs), and every file costs a keyd Decrypt again. Capped at 4,096 it made
#: scripts/bench's cold read-all of 9,448 files ask keyd 9,324 times (issue 19).
MAX_CACHED_KEYS = 65_536
#: a cache entry's value: its expiry (monotonic seconds), then the data key
_EXPIRY = struct.Struct("<d")


@dataclass(frozen=True, slots=True, repr=False)
class PreparedKey:
    """A data key made ahead of time for a file that does not exist yet."""

    file_id: bytes
    data_key: bytes
    wrapped_key: bytes
    key_arn: str
    expires: float

    def __repr__(self) -> str:
        return f"PreparedKey(file_id={self.file_id.hex()})"


#: who a cache entry or a pool belongs to: None for the mount itself, else the uid of
#: the forwarded caller keyd answered for
PrincipalKey = int | None

#: keyd's answers that say "not for this key" (the pool of that key is emptied)
_KEY_REFUSED = ("DisabledException", "KMSInvalidStateException", "NotFoundException")


def _principal_key(caller: ForwardedCaller | None) -> PrincipalKey:
    return None if caller is None else caller.uid


def _forwarding(caller: ForwardedCaller | None) -> dict[str, ForwardedCaller]:
    """The client keyword forwarding *caller* (none for the mount itself, so clients
    without forwarding, AWS's, are called exactly as before)."""
    return {} if caller is None else {"on_behalf_of": caller}


class _Pool:
    """Data keys prepared for one (principal, CMK)."""

    __slots__ = ("caller", "key_arn", "keys", "last_used", "retry_after")

    def __init__(self, caller: ForwardedCaller | None, key_arn: str, now: float) -> None:
        #: the latest caller of this principal to create a file (its pid is only a hint)
        self.caller = caller
        self.key_arn = key_arn
        self.keys: deque[PreparedKey] = deque()
        self.last_used = now
        #: after keyd failed or refused: no background attempt before this time
        self.retry_after = 0.0


class KeyManager:
    """Data keys for the mount, per principal.

    With forwarding (``kmsfs mount --forward-callers``) each keyd call made for a FUSE
    request carries the request's caller (a :class:`ForwardedCaller`), and what keyd
    answered for one user serves that user only:

    - unwrapped keys are cached per (uid, file): a cached answer for alice is never
      used for bob, who is asked about at keyd as himself. A forwarded answer expires
      ``cache_seconds`` after keyd gave it (a revoked grant or a changed policy takes
      effect within that), whether or not the file is open meanwhile;
    - prepared data keys are pooled per (uid, CMK): a user's pool is made on their
      first create, generated as that user, holds up to ``pool_size`` keys, and is
      dropped when unused for ``cache_seconds``.

    ``caller=None`` is the mount itself (no forwarding; the mount's own keys: cached
    after the last close for ``cache_seconds``, as before forwarding existed). The
    mount process holds every key it was given in its memory, so its own principal
    reusing a key a user's open fetched is no new disclosure.
    """

    def __init__(
        self,
        client,
        config: FsConfig,
        *,
        cache_seconds: float = 60.0,
        pool_size: int = 8,
        max_cached_keys: int = MAX_CACHED_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._config = config
        self.cache_seconds = cache_seconds
        self.pool_size = pool_size
        self.max_cached_keys = max_cached_keys
        self._clock = clock
        #: _cache_key(principal, file id, wrapped key) -> expiry + data key (_EXPIRY),
        #: in the order stored, which is the order of expiry
        #: (an OrderedDict: evicting the oldest of a plain dict, del d[next(iter(d))],
        #: costs ~40 µs at 65,536 entries, as iteration skips the deleted slots)
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        #: (principal, wrapped blob, context) -> (plaintext, expiry): decrypt_blob's answers
        self._blobs: dict[tuple[PrincipalKey, bytes, tuple], tuple[bytes, float]] = {}
        #: (principal, CMK ARN) -> its pool; the mount's own pool for kmsfs.conf's CMK
        #: always exists
        self._pools: dict[tuple[PrincipalKey, str], _Pool] = {}
        self._own_pool = self._pool_for(None, config.key_arn)
        self._pool_wanted = trio.Event()
        self._keyd_down = False

    @property
    def _pool(self) -> deque[PreparedKey]:
        """The mount's own pool of kmsfs.conf's CMK (what there was before forwarding)."""
        return self._own_pool.keys

    def _pool_for(self, caller: ForwardedCaller | None, key_arn: str) -> _Pool:
        pool_key = (_principal_key(caller), key_arn)
        pool = self._pools.get(pool_key)
        now = self._clock()
        if pool is None:
            pool = self._pools[pool_key] = _Pool(caller, key_arn, now)
        elif caller is not None:
            pool.caller = caller
        pool.last_used = now
        return pool

    # ------------------------------------------------------------ keyd status
    def _keyd_failed(self, error: Exception, caller: ForwardedCaller | None = None) -> None:
        if isinstance(error, KeydUnavailable):
            if not self._keyd_down:
                log.error(
                    "keyd unreachable, file operations needing a key fail with EIO: %s", error
                )
            self._keyd_down = True
        elif isinstance(error, KMSError):
            self._keyd_down = False
            # prepared keys are not handed out after keyd refused: the CMK's state for
            # everyone, a refusal for the principal it was made for
            principal = _principal_key(caller)
            for (owner, _key_arn), pool in self._pools.items():
                if error.aws_type in _KEY_REFUSED or (
                    error.aws_type == "AccessDeniedException" and owner == principal
                ):
                    pool.keys.clear()

    def _keyd_ok(self) -> None:
        if self._keyd_down:
            log.warning("keyd reachable again")
            self._keyd_down = False

    async def _call(self, coroutine_function, *args, **kwargs):
        try:
            with trio.fail_after(KEYD_TIMEOUT):
                result = await coroutine_function(*args, **kwargs)
        except trio.TooSlowError:
            error = KeydUnavailable(f"keyd did not answer within {KEYD_TIMEOUT:g} s")
            self._keyd_failed(error)
            raise error from None
        except (KeydUnavailable, KMSError) as error:
            self._keyd_failed(error, kwargs.get("on_behalf_of"))
            raise
        self._keyd_ok()
        return result

    @staticmethod
    def _cache_key(principal: PrincipalKey, file_id: bytes, wrapped: bytes) -> bytes:
        """The cache's key for a file's data key: its file id, a digest of the wrapped key
        (a rewrapped or substituted header is a different entry) and the principal.

        One bytes object, and the value another: ~230 bytes an entry against ~440 for
        tuples holding the whole wrapped key (tests/fs/test_fs_key_cache.py).
        """
        key = file_id + hashlib.blake2b(wrapped, digest_size=16).digest()
        return key if principal is None else key + principal.to_bytes(8, "little")

    def _cached_key(self, cache_key: bytes) -> bytes | None:
        entry = self._cache.get(cache_key)
        if entry is None or _EXPIRY.unpack_from(entry)[0] <= self._clock():
            return None
        return entry[_EXPIRY.size :]

    def _cache_data_key(self, cache_key: bytes, data_key: bytes) -> None:
        """Keep a data key until ``cache_seconds`` after now (bounded, oldest out first)."""
        cache = self._cache
        cache[cache_key] = _EXPIRY.pack(self._clock() + self.cache_seconds) + data_key
        cache.move_to_end(cache_key)  # stored again: last, the oldest is evicted first
        while len(cache) > self.max_cached_keys:
            cache.popitem(last=False)

    def _expiry(self) -> float:
        return self._clock() + (self.cache_seconds if self.cache_seconds > 0 else math.inf)

    def _store(self, cache: dict, cache_key: tuple, value: bytes) -> None:
        """Cache a forwarded answer until ``cache_seconds`` after now (bounded)."""
        if self.cache_seconds <= 0:
            return
        cache.pop(cache_key, None)  # re-inserted last: the oldest is evicted first
        cache[cache_key] = (value, self._clock() + self.cache_seconds)
        while len(cache) > self.max_cached_keys:
            del cache[next(iter(cache))]

    # ---------------------------------------------------------------- unwrap
    def cached(self, header: Header, caller: ForwardedCaller | None = None) -> bytes | None:
        """What :meth:`unwrap` would answer from the cache alone (None: keyd is needed)."""
        wrapped = bytes(header.active_slot.wrapped_key)
        return self._cached_key(self._cache_key(_principal_key(caller), header.file_id, wrapped))

    async def unwrap(self, header: Header, caller: ForwardedCaller | None = None) -> bytes:
        """The plaintext data key of an existing file, for *caller* (None: the mount
        itself), from that principal's cache or keyd.

        For a recipient slot (format version 3) it is what keyd's RSA Decrypt returns,
        the payload holding the data key, bound to the file id and context: the format
        checks it when the file is opened (``FileKeyProvider.decrypt_recipient_key``).
        Only the recipient CMK the sealed kmsfs.conf names is asked (else CorruptHeader).
        """
        slot = header.active_slot
        wrapped = bytes(slot.wrapped_key)
        cache_key = self._cache_key(_principal_key(caller), header.file_id, wrapped)
        cached = self._cached_key(cache_key)
        if cached is not None:
            return cached
        if slot.kind != SlotKind.KMS_BLOB:
            try:
                check_recipient_key(slot.key_arn, self._config.recipient_key_arns)
            except CorruptHeader as error:
                log.error("file id %s refused: %s", header.file_id.hex(), error)
                raise
            response = await self._call(
                self._client.call,
                "Decrypt",
                {
                    "KeyId": slot.key_arn,
                    "CiphertextBlob": wrapped,
                    "EncryptionAlgorithm": SLOT_KIND_ALGORITHMS[slot.kind],
                },
                **_forwarding(caller),
            )
            data_key = base64.b64decode(response["Plaintext"])
        else:
            response = await self._call(
                self._client.decrypt,
                wrapped,
                encryption_context=header.full_context,
                **_forwarding(caller),
            )
            data_key = response["Plaintext"]
        if caller is not None and self.cache_seconds > 0:
            self._cache_data_key(cache_key, data_key)
        return data_key

    async def check_access(self, header: Header, held_key: bytes, caller: ForwardedCaller) -> None:
        """Ask (or the cache of *caller*'s answers) whether *caller* may have the key of
        a file the mount holds open already; keyd's answer must be the key held (else
        CorruptHeader: keyd and the header disagree). Refusals raise as for unwrap."""
        answered = await self.unwrap(header, caller)
        if not hmac.compare_digest(answered, held_key):
            log.error("file id %s: keyd's key differs from the one held", header.file_id.hex())
            raise CorruptHeader("keyd returned a different data key for an open file")

    async def decrypt_blob(
        self,
        wrapped: bytes,
        context: dict[str, str],
        caller: ForwardedCaller | None = None,
        *,
        key_id: str | None = None,
    ) -> bytes:
        """Decrypt a blob under kmsfs.conf's CMK or another (a directory's name key), for
        *caller*; the answer is kept for that principal for ``cache_seconds``. ``key_id``:
        the CMK the blob must be under (AWS's KeyId on Decrypt), if known."""
        cache_key = (_principal_key(caller), bytes(wrapped), tuple(sorted(context.items())))
        cached = self._blobs.get(cache_key)
        if cached is not None and cached[1] > self._clock():
            return cached[0]
        response = await self._call(
            self._client.decrypt,
            bytes(wrapped),
            encryption_context=context,
            **({} if key_id is None else {"key_id": key_id}),
            **_forwarding(caller),
        )
        plaintext = response["Plaintext"]
        self._store(self._blobs, cache_key, plaintext)
        return plaintext

    def remember(self, header: Header, data_key: bytes) -> None:
        """Keep a key for ``cache_seconds`` after its file's last close (the mount's own
        principal; a forwarded caller's answer keeps its own expiry)."""
        if self.cache_seconds <= 0:
            return
        wrapped = bytes(header.active_slot.wrapped_key)
        self._cache_data_key(self._cache_key(None, header.file_id, wrapped), data_key)

    def forget_all(self) -> None:
        self._cache.clear()
        self._blobs.clear()
        for pool in self._pools.values():
            pool.keys.clear()

    # ----------------------------------------------------------------- create
    async def _generate(self, pool: _Pool) -> PreparedKey:
        file_id = os.urandom(FILE_ID_SIZE)
        context = full_context(file_id, self._config.file_context)
        response = await self._call(
            self._client.generate_data_key,
            pool.key_arn,
            encryption_context=context,
            **_forwarding(pool.caller),
        )
        return PreparedKey(
            file_id=file_id,
            data_key=response["Plaintext"],
            wrapped_key=response["CiphertextBlob"],
            key_arn=response.get("KeyId", pool.key_arn),
            expires=self._expiry(),
        )

    async def new_file_key(
        self, key_arn: str | None = None, caller: ForwardedCaller | None = None
    ) -> PreparedKey:
        """A fresh data key for a new file under *key_arn* (None: kmsfs.conf's CMK), made
        for *caller* (None: the mount itself): from that principal's pool, else straight
        from keyd, forwarded as *caller*."""
        pool = self._pool_for(caller, key_arn or self._config.key_arn)
        prepared = self._take(pool)
        if prepared is not None:
            return prepared
        try:
            prepared = await self._generate(pool)
        except KMSError as error:
            if error.aws_type == "AccessDeniedException":
                # not refilled in the background (each try would be one more refusal in
                # keyd's audit log) until this principal's next create
                pool.retry_after = math.inf
            raise
        pool.retry_after = 0.0
        self._pool_wanted.set()
        return prepared

    def pooled_file_key(
        self, key_arn: str | None = None, caller: ForwardedCaller | None = None
    ) -> PreparedKey | None:
        """What :meth:`new_file_key` would answer from the pool alone (None: keyd is
        needed), without a checkpoint."""
        return self._take(self._pool_for(caller, key_arn or self._config.key_arn))

    def _take(self, pool: _Pool) -> PreparedKey | None:
        now = self._clock()
        while pool.keys:
            prepared = pool.keys.popleft()
            if prepared.expires > now:
                self._pool_wanted.set()
                return prepared
        return None

    # ------------------------------------------------------------ background
    async def run(self) -> None:
        """Keep the pools filled and drop expired cache entries; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fill_pool)
            nursery.start_soon(self._reap)

    async def _fill_pool(self) -> None:
        while True:
            self._pool_wanted = trio.Event()
            for pool in list(self._pools.values()):
                while len(pool.keys) < self.pool_size and pool.retry_after <= self._clock():
                    try:
                        pool.keys.append(await self._generate(pool))
                    except (KeydUnavailable, KMSError) as error:
                        # keyd down or the key refused: try later; refused to this
                        # principal: not before its next create (see new_file_key)
                        refused = getattr(error, "aws_type", None) == "AccessDeniedException"
                        pool.retry_after = math.inf if refused else self._clock() + 1.0
                        break
            if any(
                len(pool.keys) < self.pool_size and pool.retry_after > self._clock()
                for pool in self._pools.values()
            ):
                wait = 1.0
            else:
                wait = max(1.0, self.cache_seconds / 2)
            with trio.move_on_after(wait):
                await self._pool_wanted.wait()

    def drop_idle_pools(self) -> None:
        """Forget the pools of principals that made no file for ``cache_seconds`` (never
        the mount's own): their prepared keys go with them."""
        now = self._clock()
        idle = max(self.cache_seconds, 0.0)
        for pool_key, pool in list(self._pools.items()):
            if pool is not self._own_pool and pool.last_used + idle <= now:
                del self._pools[pool_key]

    async def _reap(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = self._clock()
            # data keys: stored in the order they expire, so the expired ones come first
            # (a pass over 65,536 live keys every second would cost ~10 ms each time)
            cache = self._cache
            while cache and _EXPIRY.unpack_from(cache[next(iter(cache))])[0] <= now:
                cache.popitem(last=False)
            for cache_key in [k for k, (_, expiry) in self._blobs.items() if expiry <= now]:
                del self._blobs[cache_key]
            for pool in self._pools.values():
                while pool.keys and pool.keys[0].expires <= now:
                    pool.keys.popleft()
            self.drop_idle_pools()


class FileKeyProvider:
    """The format's key provider for one open file, answering from keys fetched beforehand.

    The format's calls are synchronous; keyd's are not. So the mount fetches keys with
    awaits first (:meth:`KeyManager.unwrap`, :meth:`KeyManager.new_file_key`) and hands
    them over here: ``data_key`` for the file's existing header, ``prepared`` for the
    header an empty file gets with its first byte.
    """

    def __init__(self, data_key: bytes | None = None) -> None:
        #: the data key, or for a recipient slot (format version 3) keyd's RSA Decrypt
        #: output that holds it, which the format checks against the header
        self.data_key = data_key
        self.prepared: PreparedKey | None = None

    def decrypt_data_key(self, wrapped_blob: bytes, encryption_context: dict[str, str]) -> bytes:
        if self.data_key is None:
            raise KeydUnavailable("the file's data key was not fetched")
        return self.data_key

    def decrypt_recipient_key(
        self, key_id: str, wrapped_key: bytes, encryption_algorithm: str
    ) -> bytes:
        """A recipient slot's payload, fetched beforehand (:meth:`KeyManager.unwrap`)."""
        return self.decrypt_data_key(wrapped_key, {})

    def generate_data_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, str]:
        raise KeydUnavailable("no data key was prepared for this new file")

    def take_prepared_key(
        self, key_id: str, encryption_context: dict[str, str]
    ) -> tuple[bytes, bytes, bytes, str]:
        """``(file_id, data_key, wrapped_key, key_arn)`` made ahead for a new header."""
        prepared = self.prepared
        if prepared is None:
            raise KeydUnavailable("no data key was prepared for this new file")
        self.prepared = None
        self.data_key = prepared.data_key
        return prepared.file_id, prepared.data_key, prepared.wrapped_key, prepared.key_arn
