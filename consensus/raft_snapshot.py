"""The Raft snapshot file: pysyncobj's serializer interface over our own msgpack file format.

pysyncobj writes its snapshot as a pickle (gzip level 9) in the tick thread once a subclass keeps
state of its own. `SnapshotFile` instead writes msgpack (the state blob is zlib level 1 already,
`MailState.to_snapshot`) in a forked child that closes every inherited socket (so an orphaned
child cannot hold the node's ports), fsyncs, then renames. A failed write removes its temp file
and is retried with backoff (pysyncobj forked again on every tick); temp files a kill left behind
are removed at start (`remove_stale_snapshot_temps`). A snapshot the leader streams is checked
before it replaces ours.

File: SNAPSHOT_MAGIC | length(8) | crc32(4) | msgpack [state blob, last entry, previous entry,
members] (`encode_snapshot` / `decode_snapshot`; backup and forced recovery write it too). What
the state blob holds is consensus/snapshot.py's business.
"""
from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import msgpack
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.node import TCPNode

from .journal import fsync_dir, is_no_space

log = logging.getLogger("raftmail.raft")

SNAPSHOT_MAGIC = b"RMSNAP1\n"
SNAPSHOT_TEMP_SUFFIX = ".tmp"  # snapshot.bin.<pid>.tmp (written), snapshot.bin.incoming.tmp (received)
SNAPSHOT_DELAY_ENV = "RAFTMAIL_TEST_SNAPSHOT_DELAY"
SNAPSHOT_EXIT_NO_SPACE = 28  # the snapshot child's exit code when the disk is full (ENOSPC)
SNAPSHOT_RETRY_FIRST = 2.0  # seconds before a failed snapshot is tried again, doubling
SNAPSHOT_RETRY_MAX = 60.0


class SnapshotFile:
    """pysyncobj's serializer interface, backed by our msgpack snapshot file.

    pysyncobj calls `serialize` from its tick thread when it compacts the log, `checkSerializing`
    on every tick, `deserialize` when it loads the file at start or after receiving it from the
    leader, and the transmission methods to stream the file to a follower that is far behind.
    """

    def __init__(self, path: Path, chunk_bytes: int, snapshot_state: Callable[[], bytes],
                 load_state: Callable[[bytes], None], fsync: bool = True) -> None:
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self._snapshot_state = snapshot_state
        self._load_state = load_state
        self._fsync = fsync
        self._pid = 0
        self._current_id = None
        self._outgoing: dict[Any, Any] = {}
        self._incoming = None
        self._peeked: tuple | None = None
        self.last_duration: float | None = None
        self._started = 0.0
        self.no_space = False  # the last snapshot write failed for want of space
        # Test-only: the snapshot child waits this long first, as a large state makes it take
        # seconds, so that many entries arrive while it runs (the tail a compaction keeps).
        self._test_delay = float(os.environ.get(SNAPSHOT_DELAY_ENV) or 0)
        self._failures = 0
        self._retry_at = 0.0

    # -- writing (log compaction)

    def serialize(self, data: tuple, entry_id: int) -> None:
        if self._pid != 0 or time.monotonic() < self._retry_at:
            return  # after a failure, pysyncobj would fork again on every tick
        _, last, prev, cluster = data
        self._current_id = entry_id
        self._started = time.monotonic()
        pid = os.fork()
        if pid:
            self._pid = pid
            return
        # Child: only this thread exists. Never take locks other threads may have held at fork.
        code = 1
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}{SNAPSHOT_TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            _close_inherited_fds(keep=fd)
            if self._test_delay:
                time.sleep(self._test_delay)
            blob = encode_snapshot(self._snapshot_state(), last, prev, [str(n) for n in cluster])
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
            if self._fsync:
                fsync_dir(self.path.parent)
            code = 0
        except BaseException as e:
            code = SNAPSHOT_EXIT_NO_SPACE if is_no_space(e) else 1
            try:
                os.unlink(tmp)  # a failed snapshot leaves nothing behind
            except OSError:
                pass
        finally:
            os._exit(code)

    def checkSerializing(self) -> tuple[int, Any]:
        if self._pid == 0:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        try:
            rpid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            self._pid = 0
            return SERIALIZER_STATE.FAILED, self._current_id
        if rpid == 0:
            return SERIALIZER_STATE.SERIALIZING, self._current_id
        self._pid = 0
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            self._outgoing = {}
            self.last_duration = time.monotonic() - self._started
            self.no_space = False
            self._failures = 0
            return SERIALIZER_STATE.SUCCESS, self._current_id
        self.no_space = code == SNAPSHOT_EXIT_NO_SPACE
        self._failures += 1
        delay = min(SNAPSHOT_RETRY_MAX, SNAPSHOT_RETRY_FIRST * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        if self.no_space:
            log.error("disk full: no space to write the Raft snapshot %s; the log is not compacted "
                      "until there is (next try in %.0f s)", self.path, delay)
        else:
            log.error("snapshot child failed (exit %s); next try in %.0f s", code, delay)
        return SERIALIZER_STATE.FAILED, self._current_id

    # -- reading

    def peek(self) -> tuple:
        """Decode the file once; `deserialize` reuses it (our journal fix reads it first)."""
        if self._peeked is None:
            state_blob, last, prev, cluster = decode_snapshot(self.path.read_bytes())
            # pysyncobj compares members as Node objects; a bare string would add ourselves as a peer.
            self._peeked = state_blob, last, prev, [TCPNode(a) for a in cluster]
        return self._peeked

    def deserialize(self) -> tuple:
        state_blob, last, prev, cluster = self.peek()
        self._peeked = None
        self._load_state(state_blob)
        return None, last, prev, cluster

    # -- streaming to a follower that needs the snapshot

    def getTransmissionData(self, tid: Any):
        if self._pid != 0:
            return None
        t = self._outgoing.get(tid)
        if t is None:
            try:
                t = self._outgoing[tid] = [open(self.path, "rb"), 0]
            except OSError:
                log.exception("cannot open snapshot for transmission")
                return None
        is_first = t[1] == 0
        try:
            data = t[0].read(self.chunk_bytes)
        except OSError:
            log.exception("cannot read snapshot for transmission")
            self._drop(tid)
            return False
        t[1] += len(data)
        is_last = not data
        if is_last:
            self._drop(tid)
        return data, is_first, is_last

    def cancelTransmisstion(self, tid: Any) -> None:  # pysyncobj's spelling
        self._drop(tid)

    def _drop(self, tid: Any) -> None:
        t = self._outgoing.pop(tid, None)
        if t is not None:
            t[0].close()

    def setTransmissionData(self, data) -> bool:
        if data is None:
            return False
        chunk, is_first, is_last = data
        tmp = self.path.with_name(self.path.name + ".incoming.tmp")
        if is_first:
            if self._incoming is not None:
                self._incoming.close()
            self._incoming = open(tmp, "wb")
        elif self._incoming is None:
            return False
        try:
            self._incoming.write(chunk)
            if not is_last:
                return False
            self._incoming.flush()
            if self._fsync:
                os.fsync(self._incoming.fileno())
            self._incoming.close()
            self._incoming = None
            decode_snapshot(tmp.read_bytes())  # refuse a damaged transfer before it replaces ours
            os.replace(tmp, self.path)
            self._peeked = None
            return True
        except Exception as e:
            if is_no_space(e):
                self.no_space = True
                log.error("disk full: no space for the snapshot the leader is sending (%s)", e)
            else:
                log.exception("received snapshot is unusable; waiting for the leader to resend")
            if self._incoming is not None:
                self._incoming.close()
            self._incoming = None
            try:
                tmp.unlink()
            except OSError:
                pass
            return False


def remove_stale_snapshot_temps(path: Path) -> None:
    """Temp files of snapshot writes that a kill interrupted: nothing refers to them."""
    for tmp in path.parent.glob(path.name + ".*" + SNAPSHOT_TEMP_SUFFIX):
        try:
            tmp.unlink()
            log.warning("removed %s left by an interrupted snapshot write", tmp)
        except FileNotFoundError:
            pass


def encode_snapshot(state_blob: bytes, last: tuple, prev: tuple, cluster: list[str]) -> bytes:
    # The state blob is compressed already (MailState.to_snapshot); the rest is small.
    packed = msgpack.packb([state_blob, list(last), list(prev), cluster], use_bin_type=True)
    return SNAPSHOT_MAGIC + len(packed).to_bytes(8, "big") + zlib.crc32(packed).to_bytes(4, "big") + packed


def decode_snapshot(raw: bytes) -> tuple:
    if not raw.startswith(SNAPSHOT_MAGIC):
        raise ValueError("not a raftmail snapshot")
    n = int.from_bytes(raw[8:16], "big")
    crc = int.from_bytes(raw[16:20], "big")
    packed = raw[20:20 + n]
    if len(packed) != n or zlib.crc32(packed) != crc:
        raise ValueError("snapshot is truncated or corrupt")
    state_blob, last, prev, cluster = msgpack.unpackb(packed, raw=False)
    return state_blob, tuple(last), tuple(prev), cluster


def _close_inherited_fds(keep: int) -> None:
    """In a fork child: release every socket and file of the node (keeps stdio and `keep`)."""
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 4096))
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass
