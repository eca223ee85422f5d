"""Content-addressed store for message bodies.

Bodies never travel through Raft: the replicated log only carries a submission's metadata and
the SHA-256 of its body. Each node keeps the bodies it holds here, one file per body at
``root/<first 2 hex>/<sha256 hex>``. Files are written once, atomically (temp file + fsync +
rename + directory fsync), and verified against their name on every read, so a torn or rotted
file is never handed to the delivery path.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

from raftmail.consensus.journal import fsync_dir, is_no_space

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
# Temp files start with a dot so they can never be mistaken for a digest.
_TEMP_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20
# The repair pass re-reads and re-hashes at most this many held bodies per pass, oldest checked
# first, so a body deleted or rotted after it was first seen is fetched again, at bounded cost.
BODY_RECHECK_PER_PASS = 50
# Bodies fetched per repair pass.
BODY_REPAIR_MAX = 1000
# Bodies of newly queued submissions looked for on disk per pass (a stat each, in a thread).
BODY_LOOK_PER_PASS = 10000
# Held bodies asked of the state per pass whether a submission still refers to them (a dict
# lookup each, under the apply lock): in turn, so each is asked again after a round of them all.
BODY_FORGET_PER_PASS = 5000
# After a write failed for want of space: how often to look at the file system again, and how
# much must be free (at least, and in multiples of the body that failed) to take bodies again.
_SPACE_CHECK_SECONDS = 1.0
_SPACE_MIN_FREE = 1 << 20


def is_digest(s: str) -> bool:
    """True for a SHA-256 hex digest in canonical form (64 lowercase hex characters)."""
    return isinstance(s, str) and _DIGEST_RE.fullmatch(s) is not None


def body_digest(data: bytes) -> str:
    """The store key of a body."""
    return hashlib.sha256(data).hexdigest()


def _require_digest(digest: str) -> None:
    # Digests come from the network and the log; validating them here is what keeps a
    # crafted value like "../../etc/passwd" from ever becoming a path.
    if not is_digest(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")


def _verify(digest: str, data: bytes) -> None:
    _require_digest(digest)
    actual = body_digest(data)
    if actual != digest:
        raise ValueError(f"body hash {actual} does not match claimed digest {digest}")


def _file_matches(path: str, digest: str, size: int) -> bool:
    """Whether the file at *path* holds exactly the body with *digest* (of *size* bytes)."""
    try:
        if os.stat(path).st_size != size:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest() == digest
    except FileNotFoundError:
        return False


class BodyStore:
    """Write-once, hash-verified body files under one directory."""

    def __init__(self, root: Path, *, fsync: bool = True, cache_bytes: int = 0) -> None:
        self.root = Path(root)
        # Bodies just written or read, newest last, at most cache_bytes: the sender reads a body
        # seconds after intake wrote it, and a cache hit needs no thread hand-off or disk read.
        self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._cache_lock = threading.Lock()
        self._root = str(self.root)  # os calls on str paths: pathlib costs more than the write
        self._fsync = fsync
        # Shard directories known to be durable (created, or found, and the root fsynced since).
        self._durable_shards: set[str] = set()
        # Temp names: a random tag per store and a counter, cheaper than tempfile.mkstemp.
        self._temp_tag = os.urandom(6).hex()
        self._temp_names = itertools.count()
        # Serialises "replace file" against "remove corrupt file" so a reader that saw a rotten
        # copy cannot delete the good copy a concurrent put just renamed into place.
        self._swap_lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftover_temps()
        # Set when a write failed with ENOSPC/EDQUOT: (bytes that did not fit, when last checked).
        self._no_space: tuple[int, float] | None = None

    # -- paths -------------------------------------------------------------------------------

    def _path(self, digest: str) -> str:
        _require_digest(digest)
        return f"{self._root}/{digest[:2]}/{digest}"

    def _shard_dirs(self) -> Iterator[Path]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in entries:
            if _SHARD_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                yield Path(entry.path)

    def _remove_leftover_temps(self) -> None:
        # A crash between creating a temp file and os.replace leaves a temp file behind; nothing refers to it.
        for shard in self._shard_dirs():
            for entry in os.scandir(shard):
                if entry.name.startswith(_TEMP_PREFIX):
                    try:
                        os.unlink(entry.path)
                        log.info("removed leftover body temp file %s", entry.path)
                    except FileNotFoundError:
                        pass

    def _ensure_shard(self, shard: str) -> None:
        if shard in self._durable_shards:
            return
        try:
            os.mkdir(shard)
        except FileExistsError:
            pass
        # The directory entry must be durable too, or the body file is lost with it. Synced at
        # once, not deferred with the body files, and also when the shard was found existing:
        # another writer (or a crashed run) may have made it and not synced the root yet. Only
        # the first body of a shard per process pays it.
        if self._fsync:
            fsync_dir(self.root)
        self._durable_shards.add(shard)

    def _sync_dirs(self, touched: set[str]) -> None:
        if not self._fsync:
            return
        for directory in sorted(touched):
            fsync_dir(directory)

    # -- writing -----------------------------------------------------------------------------

    def put(self, data: bytes) -> str:
        """Store *data* and return its sha256 hex digest. Storing a body twice is a no-op."""
        digest = body_digest(data)
        self._store(digest, data)
        return digest

    def put_verified(self, digest: str, data: bytes) -> None:
        """Store a body received under a claimed *digest*; ValueError if it does not match."""
        _verify(digest, data)
        self._store(digest, data)

    def put_many_verified(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Store several bodies received under claimed digests, in one call.

        Every body is checked before anything is written, so a ValueError (bad digest or a body
        that does not match) leaves the store untouched. Each new file is fsynced, and each
        shard directory touched is fsynced once at the end rather than once per body.
        """
        bodies: dict[str, bytes] = {}
        for digest, data in items:
            _verify(digest, data)
            bodies[digest] = data
        touched: set[str] = set()
        try:
            for digest, data in bodies.items():
                self._write(digest, data, touched)
        finally:
            self._sync_dirs(touched)
        for digest, data in bodies.items():
            self._remember(digest, data)

    def _store(self, digest: str, data: bytes) -> None:
        touched: set[str] = set()
        try:
            self._write(digest, data, touched)
        finally:
            self._sync_dirs(touched)
        self._remember(digest, data)

    def _write(self, digest: str, data: bytes, touched: set[str]) -> None:
        try:
            self._write_file(digest, data, touched)
        except OSError as e:
            if is_no_space(e):
                if self._no_space is None:
                    log.error("disk full: cannot store a %d-byte body in %s (%s); this node refuses "
                              "submissions (452) until there is space", len(data), self.root, e.strerror)
                self.mark_no_space(len(data))
            raise

    def mark_no_space(self, need: int) -> None:
        """A write of `need` bytes here failed for want of space."""
        self._no_space = (need, time.monotonic())

    def space_problem(self) -> str | None:
        """Why this store cannot take bodies now, or None. After a write failed for want of space,
        the file system is looked at again (at most once a second) and the store counts as
        writable once twice the body that failed (at least 1 MiB) is free."""
        if self._no_space is None:
            return None
        need, checked = self._no_space
        now = time.monotonic()
        if now - checked >= _SPACE_CHECK_SECONDS:
            try:
                st = os.statvfs(self._root)
                free = st.f_bavail * st.f_frsize
            except OSError:
                free = 0
            if free >= max(2 * need, _SPACE_MIN_FREE):
                self._no_space = None
                log.warning("disk space available again for message bodies in %s", self.root)
                return None
            self._no_space = (need, now)
        return f"no space for message bodies in {self.root}"

    def _write_file(self, digest: str, data: bytes, touched: set[str]) -> None:
        """Put one body file in place (file fsynced); directories needing an fsync go to
        *touched*."""
        path = self._path(digest)
        shard = os.path.dirname(path)
        if _file_matches(path, digest, len(data)):
            # Refresh the mtime: collection deletes an unreferenced body only once it is older
            # than its grace, and a body just submitted again (not yet committed) must not look
            # old. Under the swap lock: delete_if_idle() checks the age and unlinks under it.
            try:
                with self._swap_lock:
                    os.utime(path)
                # Another writer may have renamed it in and not yet synced the directory
                # (a batch syncs its directories at the end): sync it before we answer too.
                touched.add(shard)
                return
            except FileNotFoundError:
                pass  # deleted between the check and the touch; write it again below
        self._ensure_shard(shard)
        # A unique temp name per writer makes concurrent puts of the same body safe: each
        # renames a complete file over the same name, and the rename is atomic.
        tmp_name, fd = self._create_temp(shard)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            with self._swap_lock:
                os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        touched.add(shard)

    def _create_temp(self, shard: str) -> tuple[str, int]:
        """A new, empty temp file in *shard*: (its path, an fd open for writing)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(100):
            name = f"{shard}/{_TEMP_PREFIX}{self._temp_tag}-{next(self._temp_names)}"
            try:
                # 0600 like mkstemp's: bodies are people's mail.
                return name, os.open(name, flags, 0o600)
            except FileExistsError:
                continue  # a leftover with this name: take the next one
            except FileNotFoundError:
                # The shard was removed behind our back: make it (durably) again.
                self._durable_shards.discard(shard)
                self._ensure_shard(shard)
        raise FileExistsError(f"no free temp file name in {shard}")

    # -- reading -----------------------------------------------------------------------------

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) > self._cache_limit // 4:  # a few huge bodies must not flush the rest
            return
        with self._cache_lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return
            self._cache[digest] = data
            self._cache_bytes += len(data)
            while self._cache_bytes > self._cache_limit:
                self._cache_bytes -= len(self._cache.popitem(last=False)[1])

    def _forget(self, digest: str) -> None:
        with self._cache_lock:
            data = self._cache.pop(digest, None)
            if data is not None:
                self._cache_bytes -= len(data)

    def recent(self, digest: str) -> bytes | None:
        """The body if it is in the in-memory cache of recent bodies: cheap enough for the loop."""
        with self._cache_lock:
            return self._cache.get(digest)

    def get(self, digest: str) -> bytes | None:
        """The body with *digest*, or None if absent or found corrupt (and then removed)."""
        cached = self.recent(digest)
        if cached is not None:
            return cached
        path = self._path(digest)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        actual = body_digest(data)
        if actual == digest:
            self._remember(digest, data)
            return data
        self._remove_corrupt(path, st, actual)
        return None

    def _remove_corrupt(self, path: str, seen: os.stat_result, actual: str) -> None:
        with self._swap_lock:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return
            if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
                return  # a put replaced the bad copy while we were reading it
            os.unlink(path)
        log.warning("body file %s is corrupt (content hashes to %s); removed it", path, actual)

    def has(self, digest: str) -> bool:
        """Whether a file for *digest* exists. Cheap: the content is verified only by get()."""
        return os.path.isfile(self._path(digest))

    def delete(self, digest: str) -> bool:
        """Remove the body; True if it was there."""
        path = self._path(digest)
        self._forget(digest)
        try:
            with self._swap_lock:
                os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def delete_if_idle(self, digest: str, min_age: float) -> bool:
        """Remove the body if its file was last stored at least *min_age* seconds ago; True if
        removed. The age check and the unlink are one step against a put refreshing the file."""
        path = self._path(digest)
        with self._swap_lock:
            try:
                if time.time() - os.stat(path).st_mtime < min_age:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                return False
        self._forget(digest)
        return True

    def verify(self, digest: str) -> bool:
        """Whether the file for *digest* exists and hashes to it; a corrupt one is removed. Reads
        the disk, not the cache, and caches nothing."""
        path = self._path(digest)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                h = hashlib.sha256()
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            self._forget(digest)
            return False
        if h.hexdigest() == digest:
            return True
        self._forget(digest)
        self._remove_corrupt(path, st, h.hexdigest())
        return False

    def digests(self) -> Iterator[str]:
        """Digests of all stored bodies (unverified), in no particular order."""
        for shard in self._shard_dirs():
            for entry in os.scandir(shard):
                if is_digest(entry.name) and entry.name.startswith(shard.name):
                    yield entry.name

    def stats(self) -> tuple[int, int]:
        """(number of bodies, total bytes on disk)."""
        count = total = 0
        for digest in self.digests():
            try:
                total += os.stat(self._path(digest)).st_size
            except FileNotFoundError:
                continue  # deleted while we were counting
            count += 1
        return count, total

    def age_seconds(self, digest: str) -> float | None:
        """Seconds since the body was last stored, from the file's mtime; None if absent."""
        try:
            mtime = os.stat(self._path(digest)).st_mtime
        except FileNotFoundError:
            return None
        return max(0.0, time.time() - mtime)


def collect_unreferenced(store: BodyStore, referenced: Collection[str], grace: float) -> int:
    """Delete the bodies that no live submission references (*referenced*: the replicated
    state's body references) and that were last stored more than *grace* seconds ago. The grace
    covers a body stored for a submission that is not committed yet; returns how many went."""
    removed = 0
    for digest in list(store.digests()):
        if digest not in referenced and store.delete_if_idle(digest, grace):
            removed += 1
    return removed


class BodyRepair:
    """Which bodies this node must fetch: those that unfinished submissions need and it lacks.

    No pass walks the queue: with millions of queued submissions a walk under the apply lock
    would stall Raft every pass. A submission's body is looked for once, when the submission
    enters the open list (every open one's after a start or a snapshot load). A body seen on disk
    is remembered and re-checked (read and hashed) later in turn, BODY_RECHECK_PER_PASS per pass,
    so one deleted or rotted since is fetched again; it is forgotten once no submission refers to
    it (asked in turn, BODY_FORGET_PER_PASS per pass). A body not on disk is fetched every pass
    until it is, or until no submission refers to it.

    A pass is `state_read()` run under the apply lock, then `missing()` on its result, in a
    thread (it reads the disk)."""

    def __init__(self, store: BodyStore, recheck_per_pass: int = BODY_RECHECK_PER_PASS,
                 max_fetch: int = BODY_REPAIR_MAX, look_per_pass: int = BODY_LOOK_PER_PASS,
                 forget_per_pass: int = BODY_FORGET_PER_PASS) -> None:
        self.store = store
        self.recheck_per_pass = recheck_per_pass
        self.max_fetch = max_fetch
        self.look_per_pass = look_per_pass
        self.forget_per_pass = forget_per_pass
        self.held: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recently verified first
        self.visits: collections.deque[str] = collections.deque()  # held bodies, in their turn to be asked about
        self.lacking: collections.OrderedDict[str, None] = collections.OrderedDict()  # to fetch, in turn
        self.unchecked: collections.deque[str] = collections.deque()  # newly queued, not looked for yet
        self.mark: Any = None  # where the state's open list was read up to (ReadIndex.bodies_opened_since)
        self._visited: list[str] = []
        self._fetching: list[str] = []
        self.rechecked = 0  # bodies re-verified, for tests and metrics

    def state_read(self) -> Callable[[Any], tuple[Any, list[str], set[str]]]:
        """What the next pass needs of the replicated state, as a function of it: the bodies of
        submissions queued since the last pass, and which of the bodies this pass asks about no
        submission refers to any more. Its cost is theirs, not the queue's."""
        mark = self.mark
        self.visits.extend(self._visited)  # a pass that failed after its read: their turn again
        count = min(self.forget_per_pass, len(self.visits))
        self._visited = [self.visits.popleft() for _ in range(count)]
        asked = (self._visited + list(itertools.islice(self.held, self.recheck_per_pass))
                 + list(itertools.islice(self.lacking, self.max_fetch)))

        def read(st: Any) -> tuple[Any, list[str], set[str]]:
            new_mark, bodies = st.index.bodies_opened_since(st, mark)
            return new_mark, bodies, {d for d in asked if d not in st.body_refs}
        return read

    def missing(self, read: tuple[Any, list[str], set[str]]) -> list[str]:
        """One pass on what `state_read()` returned (blocking disk reads: run it in a thread); the
        digests to fetch."""
        self.mark, bodies, unreferenced = read
        for digest in unreferenced:
            self.held.pop(digest, None)
            self.lacking.pop(digest, None)
        self.visits.extend(d for d in self._visited if d in self.held)
        self._visited = []
        for digest in self._fetching:  # fetched since the last pass?
            if digest in self.lacking and self.store.has(digest):
                del self.lacking[digest]
                self._hold(digest)
        self.unchecked.extend(bodies)
        for _ in range(min(self.look_per_pass, len(self.unchecked))):
            digest = self.unchecked.popleft()
            if digest in self.held or digest in self.lacking:
                continue
            if self.store.has(digest):
                self._hold(digest)
            else:
                self.lacking[digest] = None
        for digest in list(itertools.islice(self.held, self.recheck_per_pass)):
            self.rechecked += 1
            if self.store.verify(digest):
                self.held.move_to_end(digest)
            else:
                del self.held[digest]  # (its turn in visits lapses: it is no longer held)
                log.warning("body %s that this node held is gone or corrupt: fetching it again", digest[:12])
                self.lacking[digest] = None
        # Those fetched now go to the back: bodies no peer has cannot hold up the others.
        self._fetching = list(itertools.islice(self.lacking, self.max_fetch))
        for digest in self._fetching:
            self.lacking.move_to_end(digest)
        return self._fetching

    def _hold(self, digest: str) -> None:
        self.held[digest] = None
        self.visits.append(digest)
