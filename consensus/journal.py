"""The Raft journal on disk: pysyncobj's journal interface and file format, with space reserved
ahead of use and every rewrite atomic.

pysyncobj's FileJournal, which this replaces, has three defects that cost data or the node:

* Log compaction (`deleteEntriesTo`) clears the file and re-adds the kept entries in place. A
  SIGKILL inside that window leaves a journal cut short, which the restart accepts: every node
  compacts at the same log length, so a whole-cluster kill there loses committed entries. Here
  the kept entries go to a new file that is fsynced and renamed over the old one (then the
  directory is fsynced): a kill leaves either the old journal or the new one, whole.
* The file grows sparsely (ftruncate) under an mmap. On a full disk, a store into a page with no
  block behind it raises SIGBUS and the process dies without a log line, again at every restart.
  Here every byte of the file is allocated (posix_fallocate) before it is mapped, the reservation
  is grown in chunks ahead of need, and an entry that does not fit and cannot get more space is
  refused with `JournalFull` (nothing written, nothing remembered), so the caller can stop.
* The term/vote file is replaced without fsync, and a failed write leaves its temporary file.

The on-disk format is pysyncobj's (journals written by it load unchanged): a 40-byte header
(name, version, format, offset of the end of the last record) and records
`len | idx | term | command | len` with little-endian lengths.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import struct
from pathlib import Path
from typing import Any, Callable

from pysyncobj.journal import (APP_NAME, APP_VERSION, FIRST_RECORD_OFFSET, JOURNAL_FORMAT_VERSION,
                               LAST_RECORD_OFFSET_OFFSET, NAME_SIZE, VERSION_SIZE)
from pysyncobj.pickle import dumps as psy_dumps, loads as psy_loads, to_bytes

log = logging.getLogger("raftmail.raft")

PAGE = mmap.PAGESIZE
# Test-only: SIGKILL this process after this many entries of a journal rewrite (log compaction)
# are written, to prove a kill there loses nothing. Read once, when a journal is opened.
KILL_IN_REWRITE_ENV = "RAFTMAIL_TEST_KILL_IN_JOURNAL_REWRITE"
REWRITE_SUFFIX = ".rewrite.tmp"
META_SUFFIX = ".meta"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class JournalFull(OSError):
    """An entry was refused: it does not fit the reserved space and the reservation cannot grow."""


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


def fsync_dir(path: Path | str) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header() -> bytes:
    return (APP_NAME.ljust(NAME_SIZE, b"\0") + APP_VERSION.ljust(VERSION_SIZE, b"\0")
            + struct.pack("<II", JOURNAL_FORMAT_VERSION, FIRST_RECORD_OFFSET))


def _record(command: Any, idx: int, term: int) -> bytes:
    data = struct.pack("<QQ", idx, term) + to_bytes(command)
    n = struct.pack("<I", len(data))
    return n + data + n


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomically(path: Path | str, data: bytes, *, fsync: bool = True) -> None:
    """Replace `path` with `data`: temp file, fsync, rename, directory fsync. On failure the old
    file is untouched and the temp file is removed."""
    path = str(path)
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(os.path.dirname(path) or ".")


def _parse_records(raw: memoryview | bytes, end: int, path: str) -> tuple[list[tuple[bytes, int, int]], int]:
    """The (command, index, term) records of a journal's bytes up to `end`, and where they end."""
    offset = FIRST_RECORD_OFFSET
    entries = []
    while offset < end:
        n = struct.unpack_from("<I", raw, offset)[0]
        if offset + n + 8 > end or struct.unpack_from("<I", raw, offset + 4 + n)[0] != n:
            raise RuntimeError(f"{path}: damaged record at byte {offset}")
        idx, term = struct.unpack_from("<QQ", raw, offset + 4)
        entries.append((bytes(raw[offset + 20:offset + 4 + n]), idx, term))
        offset += n + 8
    return entries, offset


def read_journal(path: Path | str) -> tuple[list[tuple[bytes, int, int]], dict]:
    """A stopped node's journal, read without changing it: its (command, index, term) entries
    and its term/vote/commit-index record (empty when there is none)."""
    raw = Path(path).read_bytes()
    if len(raw) < FIRST_RECORD_OFFSET or not raw.startswith(APP_NAME):
        raise RuntimeError(f"{path} is not a Raft journal")
    end = struct.unpack("<I", raw[LAST_RECORD_OFFSET_OFFSET:LAST_RECORD_OFFSET_OFFSET + 4])[0]
    if end > len(raw):
        raise RuntimeError(f"{path}: header says {end} bytes of records, file has {len(raw)}")
    entries, _ = _parse_records(raw, end, str(path))
    meta_path = str(path) + META_SUFFIX
    meta = MetaFile(meta_path, fsync=False).meta if os.path.exists(meta_path) else {}
    return entries, meta


class MetaFile:
    """The term/vote/commit-index file (pysyncobj's format), replaced atomically. Term and vote
    are always fsynced before they are acted on; the commit index (stored once a second) only
    with `fsync`, since it is only a hint."""

    def __init__(self, path: str, fsync: bool) -> None:
        self.path = path
        self._fsync = fsync
        self.meta: dict = {}
        if os.path.exists(path):
            raw = Path(path).read_bytes()
            try:
                self.meta = psy_loads(raw)
            except Exception as e:
                # An unreadable term/vote file must not silently become "term 0, no vote":
                # the node could vote twice in a term. Only a rename ever replaces it.
                raise RuntimeError(f"Raft term/vote file {path} is unreadable ({e}); "
                                   "restore it or move the node's raft directory away") from e
        self.stored = True

    def store(self, durable: bool) -> None:
        write_atomically(self.path, psy_dumps(self.meta), fsync=durable or self._fsync)
        self.stored = True


class ReservedJournal:
    """pysyncobj's Journal interface over a fully allocated, mmapped file (see module docstring).

    `space` says whether the journal can take entries: "ok"; "low" (the reservation could not be
    grown: entries still fit for now, but the node should stop taking on work); "full" (an entry
    was refused). `retry_space()` tries to grow again and clears the state when it can."""

    def __init__(self, path: str, *, reserve_bytes: int = 8 * 2**20, fsync: bool = False,
                 on_space_change: Callable[[str, str, str], None] | None = None) -> None:
        self.path = str(path)
        self.reserve_bytes = max(PAGE, _round_up(reserve_bytes, PAGE))
        self._fsync = fsync
        self._on_space_change = on_space_change
        self.space = "ok"
        self.space_error = ""
        self.dirty = True
        self.syncs = 0
        self.rewrites = 0
        kill_at = os.environ.get(KILL_IN_REWRITE_ENV)
        self._kill_in_rewrite = int(kill_at) if kill_at else None
        self._remove_stale_temps()
        if not os.path.exists(self.path):
            self._create()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self._mm: mmap.mmap | None = None
        self._entries: list[tuple[Any, int, int]] = []
        self._offset = FIRST_RECORD_OFFSET
        self._load()
        self._meta = MetaFile(self.path + META_SUFFIX, fsync)

    # -- opening

    def _remove_stale_temps(self) -> None:
        for tmp in (self.path + REWRITE_SUFFIX, self.path + META_SUFFIX + ".tmp"):
            try:
                os.unlink(tmp)
                log.warning("removed %s left by an interrupted write", tmp)
            except FileNotFoundError:
                pass

    def _create(self) -> None:
        """A new, empty journal, appearing whole or not at all."""
        tmp = self.path + REWRITE_SUFFIX
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, _header())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")

    def _load(self) -> None:
        size = os.fstat(self._fd).st_size
        header = os.pread(self._fd, FIRST_RECORD_OFFSET, 0)
        if len(header) < FIRST_RECORD_OFFSET or not header.startswith(APP_NAME):
            raise RuntimeError(f"{self.path} is not a Raft journal")
        end = struct.unpack("<I", header[LAST_RECORD_OFFSET_OFFSET:LAST_RECORD_OFFSET_OFFSET + 4])[0]
        if end > size:
            raise RuntimeError(f"{self.path}: header says {end} bytes of records, file has {size}")
        # A journal written by pysyncobj is sparse past its records: give every byte a block (or
        # cut the unused tail) before mapping it, so no store into the mapping can fault.
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as e:
            if not is_no_space(e):
                raise
            keep = _round_up(end, PAGE)
            if keep < size:
                os.ftruncate(self._fd, keep)
            os.posix_fallocate(self._fd, 0, keep)  # the records are written: nothing to allocate
        self._map()
        raw = memoryview(self._mm)[:end] if self._mm is not None else memoryview(b"")
        try:
            self._entries, self._offset = _parse_records(raw, end, self.path)
        finally:
            raw.release()
        self._reserve(self._offset + self.reserve_bytes)

    def _map(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        size = os.fstat(self._fd).st_size
        self._mm = mmap.mmap(self._fd, size) if size else None
        self._mapped = size

    # -- space

    def _reserve(self, upto: int) -> bool:
        """Allocate the file up to `upto` bytes (rounded up to whole chunks) and map it. False,
        with `space` set to "low", when the file system has no room; the mapping is unchanged."""
        if upto <= self._mapped:
            return True
        target = _round_up(upto, self.reserve_bytes)
        try:
            os.posix_fallocate(self._fd, 0, target)
        except OSError as e:
            if not is_no_space(e):
                raise
            if os.fstat(self._fd).st_size > self._mapped:  # a partial extension: take it back
                os.ftruncate(self._fd, self._mapped)
            self._set_space("low", f"cannot reserve {target - self._mapped} more bytes for the "
                                   f"Raft journal in {os.path.dirname(self.path)}: {e.strerror}")
            return False
        self._map()
        return True

    def _set_space(self, space: str, why: str = "") -> None:
        old = self.space
        if space == old or (space == "low" and old == "full"):
            return
        self.space, self.space_error = space, why
        if self._on_space_change is not None:
            self._on_space_change(old, space, why)

    def mark_no_space(self, why: str) -> None:
        """Something else of this journal's (the term/vote file) found no space."""
        self._set_space("low", why)

    def retry_space(self) -> bool:
        """Try again to reserve a chunk ahead (and store the meta file if it is behind); True,
        with space "ok", when both worked."""
        if not self._reserve(self._offset + self.reserve_bytes) or self._store_meta() is not None:
            return False
        self._set_space("ok")
        return True

    # -- pysyncobj's Journal interface

    def add(self, command: Any, idx: int, term: int) -> None:
        rec = _record(command, idx, term)
        end = self._offset + len(rec)
        if end > self._mapped and not self._reserve(end + self.reserve_bytes):
            self._set_space("full", f"Raft journal entry {idx} refused: no space in "
                                    f"{os.path.dirname(self.path)}")
            raise JournalFull(errno.ENOSPC, f"no space for Raft journal entry {idx}")
        self._mm[self._offset:end] = rec
        self._set_end(end)
        self._entries.append((command, idx, term))
        self.dirty = True
        if self._mapped - end < self.reserve_bytes // 2 and self.space == "ok":
            self._reserve(end + self.reserve_bytes)  # grow ahead; "low" if it cannot

    def _set_end(self, end: int) -> None:
        self._mm[LAST_RECORD_OFFSET_OFFSET:LAST_RECORD_OFFSET_OFFSET + 4] = struct.pack("<I", end)
        self._offset = end

    def clear(self) -> None:
        self._entries = []
        self._set_end(FIRST_RECORD_OFFSET)
        self.dirty = True

    def deleteEntriesFrom(self, entry_from: int) -> None:
        """Drop entries from position `entry_from` on (a conflict with the leader): one header
        store, atomic."""
        if entry_from >= len(self._entries):
            return
        end = self._offset
        for _ in range(len(self._entries) - entry_from):
            n = struct.unpack_from("<I", self._mm, end - 4)[0]
            end -= n + 8
        del self._entries[entry_from:]
        self._set_end(end)
        self.dirty = True

    def deleteEntriesTo(self, entry_to: int) -> None:
        """Drop entries before position `entry_to` (log compaction) by writing the kept ones to
        a new file and renaming it over the journal. Without room for the new file, the journal
        stays as it is (whole, only longer than needed) and compaction is tried again later."""
        kept = self._entries[entry_to:]
        tmp = self.path + REWRITE_SUFFIX
        fd = -1
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            parts = [_header()]
            end = FIRST_RECORD_OFFSET
            for n, (command, idx, term) in enumerate(kept, 1):
                rec = _record(command, idx, term)
                parts.append(rec)
                end += len(rec)
                if n == self._kill_in_rewrite:
                    _write_all(fd, b"".join(parts))
                    os.kill(os.getpid(), signal.SIGKILL)
            parts[0] = parts[0][:LAST_RECORD_OFFSET_OFFSET] + struct.pack("<I", end)
            _write_all(fd, b"".join(parts))
            target = _round_up(end + self.reserve_bytes, self.reserve_bytes)
            try:
                os.posix_fallocate(fd, 0, target)
            except OSError as e:
                if not is_no_space(e):
                    raise
                os.ftruncate(fd, end)  # no room to reserve ahead: the records alone
            os.fsync(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if not is_no_space(e):
                raise
            self._set_space("low", f"no space to compact the Raft journal: {e.strerror}")
            log.error("disk full: cannot rewrite the Raft journal for log compaction (%s); it is "
                      "kept whole and compaction is retried later", e.strerror)
            return
        fsync_dir(os.path.dirname(self.path) or ".")
        old_fd = self._fd
        self._fd = fd
        self._map()
        os.close(old_fd)
        self._entries = kept
        self._offset = end
        self.rewrites += 1
        self.dirty = False  # the new file was fsynced whole

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def sync(self) -> None:
        """msync the journal if anything changed since the last sync (group commit)."""
        if self.dirty and self._mm is not None:
            self.dirty = False
            self._mm.flush()
            self.syncs += 1

    def flush(self) -> None:
        if self._mm is not None:
            self._mm.flush()

    def _destroy(self) -> None:
        if self._mm is not None:
            self._mm.flush()
            self._mm.close()
            self._mm = None
        os.close(self._fd)

    # -- term, vote, commit index (the .meta file)

    def setRaftCommitIndex(self, index: int) -> None:
        self._meta.meta["raftCommitIndex"] = index
        self._meta.stored = False

    def getRaftCommitIndex(self) -> int:
        return self._meta.meta.get("raftCommitIndex", 1)

    def setCurrentTerm(self, term: int, voted_for: Any) -> None:
        """Durable before pysyncobj acts on it (RaftNode sets its own copy only afterwards)."""
        meta = self._meta.meta
        old = meta.get("currentTerm"), meta.get("votedForNodeId")
        meta["currentTerm"], meta["votedForNodeId"] = term, voted_for
        try:
            self._meta.store(durable=True)
        except BaseException:
            meta["currentTerm"], meta["votedForNodeId"] = old
            raise

    def getCurrentTerm(self) -> int:
        return self._meta.meta.get("currentTerm", 0)

    def getVotedForNodeId(self) -> Any:
        return self._meta.meta.get("votedForNodeId", None)

    def onOneSecondTimer(self) -> None:
        failed = self._store_meta()
        if failed is not None:
            self._set_space("low", f"cannot store the Raft commit index: {failed.strerror}")

    def _store_meta(self) -> OSError | None:
        """Store the meta file if it is behind; the error if the disk is full, else None."""
        if not self._meta.stored:
            try:
                self._meta.store(durable=False)
            except OSError as e:
                if not is_no_space(e):
                    raise
                return e
        return None
