"""Our wrapper around pysyncobj 0.3.17: the replicated log that carries MailState's commands.

pysyncobj as shipped is unsafe for us in the ways below; each fix lives here (or in journal.py),
in our own code, with a test that reproduces the defect:

* Journal tail dropped on restart: a snapshot written by a fork child that outlived its killed
  parent is newer than the journal head, and `__loadDumpFile` then clears the whole journal,
  committed entries included. `_SyncObj__loadDumpFile` below first cuts the journal only up to the
  snapshot point, keeping every newer entry.
  (tests/test_raft_wrapper.py::test_restart_keeps_journal_tail_newer_than_snapshot)
* Log compaction rewrote the journal in place: a SIGKILL inside the rewrite (every node compacts
  at the same log length) left a journal cut short, and committed entries were lost. Our
  `ReservedJournal` (journal.py) writes the kept entries to a new file, fsyncs and renames it.
  (tests/test_raft_journal.py::test_kill_inside_compaction_rewrite,
  tests/test_cluster_durability.py::test_sigkill_inside_the_journal_rewrite_on_every_node_loses_nothing)
* A full disk killed the node: the journal was a sparse mmap, and a store into a page with no
  block behind it raised SIGBUS, silently, at every restart. `ReservedJournal` allocates space
  ahead of use and refuses an entry it cannot store (`JournalFull`). A node that cannot store
  never campaigns, hands leadership over (`_storage_guard`), proposes nothing
  (`_checkCommandsToApply`), and acknowledges only what it stored; it takes up again by itself
  once space is freed. Term and vote are stored before pysyncobj acts on them
  (`_SyncObj__setCurrentTerm`), so a failed store sends no vote.
  (tests/test_raft_journal.py::test_full_disk_refuses_entries_instead_of_killing_the_process,
  tests/test_disk_full.py)
* Snapshots are pickle, gzip level 9, and written in the tick thread when customised:
  `SnapshotFile` writes msgpack (zlib level 1) in a forked child that closes every inherited socket
  (so an orphaned child cannot hold the node's ports), fsyncs, then renames. A failed write
  removes its temp file and is retried with backoff (pysyncobj forked again on every tick);
  temp files a kill left behind are removed at start.
* The Raft port trusts whoever connects: a secret is mandatory and the port binds the configured
  address only, never 0.0.0.0. Frames are sealed by `FrameSealer` (AES-GCM, per-process subkeys)
  instead of pysyncobj's Fernet, which cost a quarter of the tick thread's CPU.
* Positional method ids: exactly one replicated method takes a msgpack command.
* Tick thread dies with its creator thread: we run our own tick thread.
* Followers re-truncating entries they already hold: pysyncobj deletes everything after
  `prevLogIdx` whenever its log is longer, conflict or not, so a resend from a stale nextIndex
  throws away (already applied) entries, and racing compaction once emptied a journal for good.
  `_SyncObj__onMessageReceived` first drops the entries we already hold with the same term (the
  Raft paper, section 5.3, truncates only on a conflict) and, when the rest of our log is provably
  the leader's (its last term is the leader's current term: the Log Matching property),
  acknowledges it whole.
  (tests/test_raft_wrapper.py::test_stale_resend_does_not_truncate_the_follower_log)
* Silent authentication failures: `FrameSealer` counts and logs frames that fail the cluster
  secret's check, so a node started with the wrong secret is visible.
* One unauthenticated connection could cost the leader: pysyncobj buffers up to 64 MiB per
  connection, growing a bytes object by concatenation in the Raft thread (a 60 MiB frame took
  20 s, and the followers elected another leader). `_accept` and `_bound_reads` cap a frame at
  `max_frame_bytes` (4 KiB before the handshake), read into a bytearray at most one frame's worth
  per event, and allow at most `max_pending_connections` connections that have not completed the
  handshake, each for `handshake_timeout` seconds.
  (tests/test_raft_security.py::test_flooding_the_leaders_raft_port_costs_no_election)
* Unbounded waits: commandsWaitLeader=False; callers bound their own waits.
* A round of frames per command (appendEntriesUseBatch=False): `_onTick` defers pysyncobj's
  `append_entries` rounds within a tick and sends one.
  (tests/test_raft_frames.py::test_one_append_entries_round_per_tick)
* A stalled follower's needless election: pysyncobj checks the election deadline before it reads
  the network, so a tick thread that was descheduled past the timeout started an election although
  the leader's heartbeats sat in its socket. `_read_before_election` reads them first.
  (tests/test_raft_frames.py::test_a_stalled_follower_reads_the_heartbeats_before_it_starts_an_election)
* No fsync anywhere: with `fsync_journal`, the journal is msynced (and the term/vote file is
  always fsynced) before this node sends any Raft message and before the next tick can commit, so
  an entry is on disk on a majority before any client hears `250`. One sync covers every entry
  added since the last one (group commit).
  (tests/test_raft_wrapper.py::test_fsync_mode_leaves_no_dirty_journal_pages)
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import msgpack
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.monotonic import monotonic as pysyncobj_clock
from pysyncobj.node import TCPNode

from .journal import JournalFull, ReservedJournal, fsync_dir, is_no_space
from .seal import SealError, Sealer
from .state import MailState

log = logging.getLogger("raftmail.raft")

SNAPSHOT_MAGIC = b"RMSNAP1\n"
SNAPSHOT_TEMP_SUFFIX = ".tmp"  # snapshot.bin.<pid>.tmp (written), snapshot.bin.incoming.tmp (received)
SNAPSHOT_DELAY_ENV = "RAFTMAIL_TEST_SNAPSHOT_DELAY"
SNAPSHOT_EXIT_NO_SPACE = 28  # the snapshot child's exit code when the disk is full (ENOSPC)
SNAPSHOT_RETRY_FIRST = 2.0  # seconds before a failed snapshot is tried again, doubling
SNAPSHOT_RETRY_MAX = 60.0

ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}
NO_OP_COMMAND = 1  # pysyncobj's _COMMAND_TYPE.NO_OP: the first entry of an empty log
# Before its handshake a connection sends a sealed 32-byte key, then an address: tiny frames.
PENDING_FRAME_BYTES = 4096
SPACE_RETRY_SECONDS = 1.0  # while the disk is full, how often to try to reserve journal space again
# PBKDF2 rounds from the cluster secret to the Raft frame key: once per process start.
FRAME_KEY_ITERATIONS = 100_000


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


class FrameSealer:
    """pysyncobj's encryptor interface (encrypt_at_time, extract_timestamp, decrypt) over our
    AES-GCM `Sealer`, in place of its Fernet: about 25x less CPU per frame (no base64, one pass,
    the tag checked once instead of twice). Failures are counted and logged through `on_failure`
    instead of silently dropped. The timestamp pysyncobj orders frames by is authenticated."""

    VERSION = 0x52

    def __init__(self, password: str, on_failure: Callable[[str], None]) -> None:
        master = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), b"raftmail raft frames v1",
                                     FRAME_KEY_ITERATIONS)
        self._sealer = Sealer(master, version=self.VERSION, purpose=b"raftmail raft frames v1")
        self._on_failure = on_failure
        self._opened: tuple[bytes, int, bytes] | None = None  # (frame, stamp, plaintext) last checked

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        return self._sealer.seal(data, int(current_time))

    def _open(self, frame: bytes) -> tuple[int, bytes]:
        if self._opened is not None and self._opened[0] is frame:
            return self._opened[1], self._opened[2]
        try:
            stamp, plain = self._sealer.open(frame)
        except SealError as e:
            self._on_failure(f"frame refused ({e}) under this cluster's secret")
            raise
        self._opened = (frame, stamp, plain)
        return stamp, plain

    def extract_timestamp(self, frame: bytes) -> int:
        """pysyncobj checks the timestamp before it decrypts: we authenticate here, once."""
        return self._open(frame)[0]

    def decrypt(self, frame: bytes, *_: Any, **__: Any) -> bytes:
        try:
            return self._open(frame)[1]
        finally:
            self._opened = None


class RaftNode(SyncObj):
    """One member of the cluster: pysyncobj plus MailState, with our fixes."""

    def __init__(self, self_addr: str, peer_addrs: list[str], data_dir: Path, *, password: str,
                 election_timeout_min: float = 0.3, election_timeout_max: float = 0.7,
                 heartbeat_interval: float = 0.08, connection_timeout: float = 3.5,
                 compaction_min_entries: int = 5000, compaction_min_seconds: float = 300.0,
                 snapshot_chunk_bytes: int = 262144, commands_queue_size: int = 1000,
                 fsync_snapshots: bool = True, fsync_journal: bool = False,
                 max_frame_bytes: int = 4 * 2**20, max_pending_connections: int = 16,
                 handshake_timeout: float = 5.0, journal_reserve_bytes: int = 8 * 2**20,
                 on_role_change: Callable[[str, str], None] | None = None) -> None:
        if not password:
            raise ValueError("a cluster secret is required: pysyncobj unpickles what reaches its port")
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # Attributes set before SyncObj.__init__ are not part of pysyncobj's own snapshot data; ours
        # are snapshotted by SnapshotFile through MailState.to_snapshot.
        self.state_lock = threading.Lock()
        self.state = MailState()
        self._on_role_change = on_role_change
        # Called on the tick thread with each applied command's result (outside the state lock).
        self.on_applied: Callable[[Any], None] | None = None
        self._stopping = threading.Event()
        self.leader_changes = 0
        self.tick_errors = 0
        self.auth_failures = 0
        self.oversized_frames = 0
        self.resends_trimmed = 0
        self.append_entry_rounds = 0
        self._append_entries_due = False
        self._last_auth_log = 0.0
        self._last_port_log = 0.0
        self._max_frame_bytes = max_frame_bytes
        self._max_pending = max_pending_connections
        self._handshake_timeout = handshake_timeout
        self._pending: dict[Any, float] = {}  # incoming connections before their handshake -> accepted at
        self.refused_connections = 0
        self._space_checked = 0.0
        self._stepped_down_at = 0.0
        self.snapshot_path = data_dir / "snapshot.bin"
        remove_stale_snapshot_temps(self.snapshot_path)
        # Our journal replaces pysyncobj's FileJournal (see journal.py); opened before pysyncobj
        # so a journal it cannot read stops the node before it binds its port.
        self.journal = ReservedJournal(str(data_dir / "journal.bin"), reserve_bytes=journal_reserve_bytes,
                                       fsync=fsync_journal, on_space_change=self._journal_space_changed)
        self._fsync_journal = fsync_journal
        conf = SyncObjConf(
            journalFile=None,  # pysyncobj keeps an empty in-memory journal until we swap ours in
            # Always set with a journal (without it a restart loses the state);
            # SnapshotFile replaces the pickle writer.
            fullDumpFile=str(self.snapshot_path),
            password=password,
            bindAddress=self_addr,
            autoTick=False,
            appendEntriesUseBatch=False,
            commandsWaitLeader=False,
            commandsQueueSize=commands_queue_size,
            raftMinTimeout=election_timeout_min,
            raftMaxTimeout=election_timeout_max,
            appendEntriesPeriod=heartbeat_interval,
            connectionTimeout=connection_timeout,
            logCompactionMinEntries=compaction_min_entries,
            logCompactionMinTime=compaction_min_seconds,
            logCompactionBatchSize=snapshot_chunk_bytes,
            dynamicMembershipChange=True,
            connectionRetryTime=1.0,  # a restarted peer is re-dialled within a second, not five
            bindRetryTime=0.5,
            maxBindRetries=6,
            onStateChanged=self._role_changed,
        )
        self._tick_period = min(0.05, heartbeat_interval / 2)
        self._election_timeout_max = election_timeout_max
        super().__init__(self_addr, [p for p in peer_addrs if p != self_addr], conf)
        self._use_journal(self.journal)
        self.snapshots = SnapshotFile(self.snapshot_path, snapshot_chunk_bytes,
                                      self._snapshot_state, self._load_state, fsync=fsync_snapshots)
        self._SyncObj__serializer = self.snapshots
        sealer = FrameSealer(password, self._auth_failed)
        self._SyncObj__encryptor = sealer
        for conn in self._SyncObj__transport._connections.values():  # made in __init__, not yet dialled
            conn.encryptor = sealer
        server = self._SyncObj__transport._server
        accept = server._TcpServer__onNewConnectionCallback
        server._TcpServer__onNewConnectionCallback = lambda conn: self._accept(conn, accept)
        if fsync_journal:
            transport = self._SyncObj__transport
            plain_send = transport.send

            def send_after_sync(node: Any, message: Any) -> Any:
                self.journal.sync()  # nothing leaves this node before what it says is on disk
                return plain_send(node, message)
            transport.send = send_after_sync
        self.addOnTickCallback(self._flush_append_entries)
        self._tick_thread = threading.Thread(target=self._tick_loop, name="raft-tick", daemon=True)
        self._tick_thread.start()

    # -- the journal: ours in place of pysyncobj's, and what a node does when it cannot store

    def _use_journal(self, journal: ReservedJournal) -> None:
        """Swap our journal in and restore what pysyncobj's __init__ restores from its own."""
        if len(journal) == 0:
            journal.add(struct.pack("B", NO_OP_COMMAND), 1, 0)
        self._SyncObj__raftLog = journal
        self._SyncObj__raftCurrentTerm = max(journal.getCurrentTerm(), journal[-1][2])
        self._SyncObj__votedForNodeId = journal.getVotedForNodeId()
        self._SyncObj__raftCommitIndex = journal.getRaftCommitIndex()

    def _SyncObj__setCurrentTerm(self, term: int, voted_for: Any) -> None:
        """pysyncobj sets term and vote in memory before it stores them; a failed store (a full
        disk) then left a vote acted on but not durable. Store first; on failure nothing changes
        and the vote or term change is not sent."""
        self.journal.setCurrentTerm(term, voted_for)
        self._SyncObj__raftCurrentTerm = term
        self._SyncObj__votedForNodeId = voted_for

    def _journal_space_changed(self, old: str, new: str, why: str) -> None:
        if new == "ok":
            log.warning("disk space available again for the Raft journal: storing, voting and "
                        "campaigning again")
        else:
            log.error("disk full: %s; this node stops taking submissions (452), does not campaign, "
                      "hands leadership over, and acknowledges only entries it stored", why)

    def storage_problems(self) -> dict[str, str]:
        """What this node's Raft storage cannot do now, by store ("journal", "snapshot")."""
        out = {}
        if self.journal.space != "ok":
            out["journal"] = self.journal.space_error
        if self.snapshots.no_space:
            out["snapshot"] = f"no space to write {self.snapshot_path}"
        return out

    def _storage_guard(self) -> None:
        """Runs before every tick. While the journal cannot store: never start an election, and
        as leader hand leadership over (TimeoutNow to a caught-up follower; after an election
        timeout without a successor, step down)."""
        journal = self.journal
        if journal.space == "ok":
            self._stepped_down_at = 0.0
            return
        now = time.monotonic()
        if now - self._space_checked >= SPACE_RETRY_SECONDS:
            self._space_checked = now
            if journal.retry_space():
                return
        if self._SyncObj__raftState == 2:
            if not self._stepped_down_at:
                self._stepped_down_at = now
                log.error("disk full: handing Raft leadership over")
                self.transferLeadership()
            elif now - self._stepped_down_at > self._election_timeout_max:
                log.error("disk full: no successor took over; stepping down")
                self._SyncObj__raftLeader = None
                self._SyncObj__setState(0)
        else:
            self._SyncObj__raftElectionDeadline = pysyncobj_clock() + self._election_timeout_max

    def _checkCommandsToApply(self) -> None:
        """A leader that cannot store proposes nothing: queued commands fail at once (NOT_LEADER:
        not committed; the caller retries, by then with another leader)."""
        if self.journal.space != "ok" and self._SyncObj__raftState == 2:
            queue = self._SyncObj__commandsQueue
            while True:
                try:
                    _command, callback = queue.get_nowait()
                except Exception:  # queue.Empty
                    break
                self._SyncObj__callErrCallback(FAIL_REASON.NOT_LEADER, callback)
            return
        SyncObj._checkCommandsToApply(self)

    # -- follower log safety

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "append_entries" \
                and "prevLogIdx" in message and "transmission" not in message:
            message = self._without_known_entries(message)
        SyncObj._SyncObj__onMessageReceived(self, node, message)

    def _without_known_entries(self, message: dict) -> dict:
        if message["term"] < self.raftCurrentTerm:
            return message
        get = self._SyncObj__getEntries
        prev = get(message["prevLogIdx"], 1)
        if not prev or prev[0][2] != message["prevLogTerm"]:
            return message  # a real mismatch: pysyncobj's own handling (reset) is right
        entries = list(message.get("entries", []))
        known = 0
        for entry in entries:
            mine = get(entry[1], 1)
            if not mine or mine[0][2] != entry[2]:
                break
            known += 1
        prev_idx, prev_term = message["prevLogIdx"], message["prevLogTerm"]
        if known:
            prev_idx, prev_term = entries[known - 1][1], entries[known - 1][2]
            entries = entries[known:]
        last = self._SyncObj__raftLog[-1]
        if not entries and last[1] > prev_idx and last[2] == message["term"]:
            # Our tail was written in the leader's own term, so it is the leader's: keep it.
            prev_idx, prev_term = last[1], last[2]
        if known or prev_idx != message["prevLogIdx"]:
            self.resends_trimmed += 1
            message = dict(message, prevLogIdx=prev_idx, prevLogTerm=prev_term, entries=entries)
        return message

    # -- port hardening

    def _auth_failed(self, what: str) -> None:
        self.auth_failures += 1
        now = time.monotonic()
        if now - self._last_auth_log > 5.0:  # a flood must not flood the log
            self._last_auth_log = now
            log.error("raft port: %s (wrong cluster secret, or not a raftmail node); connection "
                      "dropped; %d such frames so far", what, self.auth_failures)

    def _accept(self, conn: Any, accept: Callable[[Any], None]) -> None:
        """A new incoming connection on the Raft port. Until it completes pysyncobj's handshake
        (a sealed key exchange, then the peer's address) it may hold only a few small frames:
        at most `max_pending_connections` such connections at once, each for at most
        `handshake_timeout` seconds (`_sweep_pending`); the newest is refused beyond that."""
        self._sweep_pending()
        if len(self._pending) >= self._max_pending:
            self.refused_connections += 1
            self._port_warning(f"refused a connection: {len(self._pending)} connections have not "
                               "completed the handshake")
            conn.disconnect()
            return
        self._pending[conn] = time.monotonic()
        self._bound_reads(conn)
        accept(conn)

    def _sweep_pending(self) -> None:
        """Forget connections that finished the handshake; drop those past the timeout.
        pysyncobj times a connection out only when it has an event, so one that sends nothing
        would otherwise stay open for good."""
        if not self._pending:
            return
        unknown = self._SyncObj__transport._unknownConnections
        now = time.monotonic()
        for conn, since in list(self._pending.items()):
            if conn not in unknown or conn.state == 0:  # handshake done, or closed
                del self._pending[conn]
            elif now - since > self._handshake_timeout:
                del self._pending[conn]
                self.refused_connections += 1
                self._port_warning("dropped a connection that did not complete the handshake in "
                                   f"{self._handshake_timeout:g} s")
                conn.disconnect()

    def _port_warning(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_port_log > 5.0:  # a flood must not flood the log
            self._last_port_log = now
            log.warning("raft port: %s (%d connections refused or dropped so far)", what,
                        self.refused_connections)

    def _bound_reads(self, conn: Any) -> Any:
        """Cap what an incoming connection may make us buffer: a frame may claim at most
        `max_frame_bytes` (the first frame before the handshake `PENDING_FRAME_BYTES`), and one
        read event takes at most that much from the socket, into a bytearray (pysyncobj grows a bytes object by
        concatenation: quadratic, tens of seconds of the Raft thread for a 60 MiB frame)."""
        read_once = conn._TcpConnection__processRead
        unknown = self._SyncObj__transport._unknownConnections  # before the handshake
        conn._TcpConnection__readBuffer = bytearray()
        taken = [0]
        try_read = conn._TcpConnection__tryReadBuffer

        def bounded_try_read() -> None:
            taken[0] = 0
            try_read()

        def bounded_read() -> bool:
            # Before the handshake the first frame must be small; the buffer may already hold
            # what an honest peer sends right after its address (an append_entries, a snapshot
            # chunk), so the buffer bound is the same for every connection.
            frame_limit = PENDING_FRAME_BYTES if conn in unknown else self._max_frame_bytes
            buf = conn._TcpConnection__readBuffer
            if not isinstance(buf, bytearray):
                buf = conn._TcpConnection__readBuffer = bytearray(buf)
            before = len(buf)
            more = read_once()
            buf = conn._TcpConnection__readBuffer
            taken[0] += len(buf) - before
            claimed = struct.unpack("i", buf[:4])[0] if len(buf) >= 4 else 0  # pysyncobj's framing
            if claimed > frame_limit or claimed < 0 or len(buf) > 2 * (self._max_frame_bytes + 4):
                self.oversized_frames += 1
                self._port_warning(f"incoming frame of {claimed} bytes exceeds the {frame_limit}-byte "
                                   "limit; connection dropped")
                conn.disconnect()
                return False
            # Leave the rest in the socket for the next poll: one connection cannot hold the
            # Raft thread for more than one frame's worth of reading per event.
            return more and taken[0] < self._max_frame_bytes + 4
        conn._TcpConnection__processRead = bounded_read
        conn._TcpConnection__tryReadBuffer = bounded_try_read
        return conn

    # -- the one replicated method

    @replicated
    def _command(self, blob: bytes) -> Any:
        with self.state_lock:
            result = self.state.apply_blob(blob)
        if self.on_applied is not None:
            try:  # the node shell notes local times of applied results (lease clocks)
                self.on_applied(result)
            except Exception:
                log.exception("apply observer failed")
        return result

    def submit(self, blob: bytes, callback: Callable[[Any, int], None]) -> None:
        """Queue a msgpack command for replication; `callback(result, err)` runs on the tick thread
        (QUEUE_FULL inline). err is a pysyncobj FAIL_REASON."""
        self._command(blob, callback=callback)

    def read(self, fn: Callable[[MailState], Any]) -> Any:
        """Run `fn` on the state under the apply lock (the tick thread mutates it)."""
        with self.state_lock:
            return fn(self.state)

    # -- snapshots

    def _snapshot_state(self) -> bytes:
        return self.state.to_snapshot()  # fork child: no other thread, no lock needed

    def _load_state(self, blob: bytes) -> None:
        loaded = MailState.from_snapshot(blob)
        with self.state_lock:
            self.state = loaded

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:
        """Keep journal entries newer than the snapshot (see the module docstring)."""
        if not clearJournal:
            try:
                self._keep_journal_tail()
            except Exception:
                log.exception("could not align the journal with the snapshot")
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)

    def _keep_journal_tail(self) -> None:
        _, last, prev, _ = self.snapshots.peek()
        journal = self._SyncObj__raftLog
        if len(journal) < 2:
            return
        p = prev[1] - journal[0][1]
        if 0 < p < len(journal) - 1 and tuple(journal[p]) == tuple(prev) and tuple(journal[p + 1]) == tuple(last):
            log.warning("snapshot at %d is newer than the journal head %d: trimming the journal to it, "
                        "keeping %d newer entries", last[1], journal[0][1], len(journal) - p - 2)
            journal.deleteEntriesTo(p)

    # -- one append_entries round per tick

    def _onTick(self, timeToWait: float = 0.0) -> None:
        """With appendEntriesUseBatch=False pysyncobj sends a round of append_entries to every
        follower for each command it takes from the queue and again after applying, each frame
        answered by the follower: most of a busy leader's frames said nothing new. Within a tick
        we defer those rounds and send one (before the tick waits for the network), carrying
        every new entry and the latest commit index."""
        self._read_before_election()
        self._storage_guard()
        self._sweep_pending()
        self._append_entries_due = False
        self.__dict__["_SyncObj__sendAppendEntries"] = self._defer_append_entries
        try:
            SyncObj._onTick(self, timeToWait)
        finally:
            self._flush_append_entries()

    def _read_before_election(self) -> None:
        """pysyncobj checks a follower's election deadline at the start of a tick, before it reads
        the network: a tick thread that was stalled past the timeout (descheduled on a busy
        machine, or waiting for the GIL) started an election although the leader's heartbeats
        sat unread in its socket. Read them first; a live leader then keeps its term."""
        if self._SyncObj__raftState != 2 and self._SyncObj__raftElectionDeadline < pysyncobj_clock() \
                and self._SyncObj__transport.ready:
            self._poller.poll(0)

    def _defer_append_entries(self) -> None:
        self._append_entries_due = True

    def _flush_append_entries(self) -> None:
        """Runs as pysyncobj's last step before it polls the network, and after every tick."""
        self.__dict__.pop("_SyncObj__sendAppendEntries", None)
        if self._append_entries_due:
            self._append_entries_due = False
            self.append_entry_rounds += 1
            SyncObj._SyncObj__sendAppendEntries(self)  # type: ignore[attr-defined]

    # -- the tick thread

    def _tick_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._fsync_journal:
                    self.journal.sync()  # before the next tick may commit and acknowledge
                self.doTick(self._tick_period)
            except OSError as e:
                if not is_no_space(e):
                    self.tick_errors += 1
                    log.exception("raft tick failed")
                elif not isinstance(e, JournalFull):  # JournalFull was logged when it began
                    self.journal.mark_no_space(f"cannot store Raft state: {e.strerror}")
                time.sleep(self._tick_period)
            except Exception:
                self.tick_errors += 1
                log.exception("raft tick failed")
                time.sleep(self._tick_period)
        try:
            self._doDestroy()
        except Exception:
            log.exception("raft shutdown failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._tick_thread.join(timeout)

    def _role_changed(self, old: int, new: int) -> None:
        if new == 2 or old == 2:
            self.leader_changes += 1
        log.info("raft role %s -> %s (term %s)", ROLE_NAMES.get(old), ROLE_NAMES.get(new),
                 self.raftCurrentTerm)
        if self._on_role_change is not None:
            self._on_role_change(ROLE_NAMES.get(old, "?"), ROLE_NAMES.get(new, "?"))

    # -- introspection

    def raft_status(self) -> dict:
        s = self.getStatus()
        leader = s.get("leader")
        return {
            "role": ROLE_NAMES.get(s.get("state"), "unknown"),
            "term": s.get("raft_term"),
            "leader_addr": str(leader) if leader is not None else None,
            "commit_index": s.get("commit_idx"),
            "applied_index": s.get("last_applied"),
            "leader_commit_index": s.get("leader_commit_idx"),
            "log_len": s.get("log_len"),
            "has_quorum": bool(s.get("has_quorum")),
            "partners_connected": [str(k)[len("partner_node_status_server_"):]
                                   for k, v in s.items()
                                   if str(k).startswith("partner_node_status_server_") and v == 2],
            "leader_changes": self.leader_changes,
            "auth_failures": self.auth_failures,
            "oversized_frames": self.oversized_frames,
            "refused_connections": self.refused_connections,
            "resends_trimmed": self.resends_trimmed,
            "snapshot_seconds": self.snapshots.last_duration,
        }

    def is_leader(self) -> bool:
        return self._isLeader()

    def responsive_partners(self, within: float) -> list[str]:
        """The leader's real view of its followers: the partners connected now that answered an
        append_entries in the last `within` seconds (a frozen process keeps its TCP connection).
        Empty on a non-leader: pysyncobj tracks answers only while it leads."""
        if not self._isLeader():
            return []
        for _ in range(3):  # the tick thread may change the dict while we copy it
            try:
                answered = dict(self._SyncObj__lastResponseTime)
                break
            except RuntimeError:
                continue
        else:
            return []
        since = pysyncobj_clock() - within
        return sorted(str(n) for n in list(self.otherNodes)
                      if self.isNodeConnected(n) and answered.get(n, since - 1) >= since)


FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}
