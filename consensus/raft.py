"""Our wrapper around pysyncobj 0.3.17: the replicated log that carries MailState's commands.

`RaftNode` is the SyncObj subclass a node runs: journal hooks, the storage guard, the tick loop,
status and quorum. Its parts live beside it: the journal (journal.py), the snapshot file
(raft_snapshot.py), the Raft port's guard (raft_port.py), frame sealing (`FrameSealer`, seal.py),
and the list of pysyncobj's private names we use, checked at start-up (pysyncobj_compat.py).
What stays here are the overrides of SyncObj's own methods, which must sit on the one subclass.

pysyncobj as shipped is unsafe for us in the ways below; each fix lives in our own code, here or
in the module named, with a test that reproduces the defect:

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
  `SnapshotFile` (raft_snapshot.py) writes msgpack in a forked child, fsyncs, then renames; a
  failed write is retried with backoff, and temp files a kill left behind are removed at start.
* The Raft port trusts whoever connects: a secret is mandatory and the port binds the configured
  address only, never 0.0.0.0. Frames are sealed by `FrameSealer` (seal.py: AES-GCM,
  per-process subkeys) instead of pysyncobj's Fernet, which cost a quarter of the tick thread's CPU.
* Pickle on the wire and in the log: every frame was a zlib'd pickle, unpickled once it opened
  under the secret, and every applied entry was unpickled (whoever learned the secret could run
  code on every node). Frames are msgpack data, uncompressed; entries are read by an unpickler
  that refuses every global pysyncobj's entries do not need (raft_wire.py).
  (tests/test_raft_security.py::test_a_pickled_frame_under_the_secret_runs_nothing,
  tests/test_raft_internals.py::test_log_entries_are_unpickled_as_data_only)
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
* Silent authentication failures: `PortGuard` (raft_port.py) counts and logs the frames
  `FrameSealer` refuses, so a node started with the wrong secret is visible.
* One unauthenticated connection could cost the leader: pysyncobj buffers up to 64 MiB per
  connection, by concatenation in the Raft thread. `PortGuard` bounds frames, reads per event and
  connections that have not completed the handshake.
  (tests/test_raft_security.py::test_flooding_the_leaders_raft_port_costs_no_election)
* A stale leader kept for good: a leader cut off with a minority went on leading for 30 s
  (pysyncobj's leaderFallbackTimeout) and the followers on its side, which still heard it, kept
  reporting a quorum. Our leader steps down once a majority has not answered for
  `connection_timeout`, and a follower reports a quorum only while it heard from its leader within
  `LEADER_SILENCE_TIMEOUTS` election timeouts (`_SyncObj__onMessageReceived` notes when each peer
  was last heard, on this node's monotonic clock).
  (tests/test_raft_wrapper.py::test_a_leader_cut_off_with_a_minority_steps_down,
  tests/test_raft_wrapper.py::test_a_stalled_follower_reports_no_quorum,
  tests/faults/test_partitions.py::test_leader_cut_off_in_the_minority)
* Unbounded waits: commandsWaitLeader=False; callers bound their own waits.
* A round of frames per command (appendEntriesUseBatch=False): `_onTick` defers pysyncobj's
  `append_entries` rounds within a tick and sends one.
  (tests/test_raft_frames.py::test_one_append_entries_round_per_tick)
* A stalled follower's needless election: pysyncobj checks the election deadline before it reads
  the network, so a tick thread that was descheduled past the timeout started an election although
  the leader's heartbeats sat in its socket. `_read_before_election` reads them first.
  (tests/test_raft_frames.py::test_a_stalled_follower_reads_the_heartbeats_before_it_starts_an_election)
* A started node's needless election: pysyncobj lets only the greater address dial, and re-dials
  a peer that was down every `connectionRetryTime` (5 s as shipped). A node that starts is dialled
  by its greater peers only at their next retry; if that comes after its election timeout, it
  starts an election the moment it is connected and unseats a live leader (in 9 of 20 three-node
  cluster starts here with a 1 s retry). `dial_retry_seconds` re-dials within a third of the
  minimum election timeout, and a node's first election timeout is longer by one retry period
  and two heartbeats (`startup_grace_seconds`), so the leader's heartbeat comes first.
  (tests/test_raft_frames.py::test_a_node_that_restarts_is_dialled_before_its_election_timeout)
* No fsync anywhere: with `fsync_journal`, the journal is msynced (and the term/vote file is
  always fsynced) before this node sends any Raft message and before the next tick can commit, so
  an entry is on disk on a majority before any client hears `250`. One sync covers every entry
  added since the last one (group commit).
  (tests/test_raft_wrapper.py::test_fsync_mode_leaves_no_dirty_journal_pages)
"""
from __future__ import annotations

import logging
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.monotonic import monotonic as pysyncobj_clock

from .journal import JournalFull, ReservedJournal, is_no_space
from .pysyncobj_compat import NO_OP_COMMAND
from .raft_port import PortGuard
from .raft_snapshot import SnapshotFile, remove_stale_snapshot_temps
from .raft_wire import install as install_frame_codec
from .seal import FrameSealer
from .state import MailState

log = logging.getLogger("raftmail.raft")

ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}
SPACE_RETRY_SECONDS = 1.0  # while the disk is full, how often to try to reserve journal space again
# A follower that has not heard from its leader for this many (maximum) election timeouts does
# not count itself in a quorum: twice the time after which it would start an election itself.
LEADER_SILENCE_TIMEOUTS = 2.0


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
            raise ValueError("a cluster secret is required: the Raft port accepts what opens under it")
        install_frame_codec()  # before pysyncobj makes its first connection
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # Attributes set before SyncObj.__init__ are not part of pysyncobj's own snapshot data; ours
        # are snapshotted by SnapshotFile through MailState.to_snapshot.
        self.state_lock = threading.Lock()
        self.state = MailState()
        self._on_role_change = on_role_change
        # Called on the tick thread with each applied command's result (outside the state lock).
        self.on_applied: Callable[[Any], None] | None = None
        # Called on the tick thread, under the apply lock, after a tick that applied a command,
        # loaded a snapshot or changed whether this node leads: the node makes its read view there
        # (consensus/view.py).
        self.on_tick: Callable[[MailState], None] | None = None
        # Asked after a tick that applied nothing new: True makes the tick call on_tick anyway
        # (a reader waits for something only a fresh call makes, such as the queue's heads).
        self.on_tick_wanted: Callable[[], bool] = lambda: False
        self._ticked_at: tuple = ()  # (state object, commands applied, leads) last handed on
        self._stopping = threading.Event()
        self.leader_changes = 0
        self.tick_errors = 0
        self.resends_trimmed = 0
        self.append_entry_rounds = 0
        self._append_entries_due = False
        self._space_checked = 0.0
        self._stepped_down_at = 0.0
        # Peer node -> when this node last received a message from it (local monotonic clock).
        self._heard: dict[Any, float] = {}
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
            # A leader that no majority answered for this long steps down (pysyncobj's default,
            # 30 s, let a cut-off leader and its minority keep believing in a quorum).
            leaderFallbackTimeout=connection_timeout,
            logCompactionMinEntries=compaction_min_entries,
            logCompactionMinTime=compaction_min_seconds,
            logCompactionBatchSize=snapshot_chunk_bytes,
            dynamicMembershipChange=True,
            connectionRetryTime=self.dial_retry_seconds(election_timeout_min),
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
        self.port_guard = PortGuard(self._SyncObj__transport, max_frame_bytes=max_frame_bytes,
                                    max_pending_connections=max_pending_connections,
                                    handshake_timeout=handshake_timeout)
        sealer = FrameSealer(password, self.port_guard.auth_failed)
        self._SyncObj__encryptor = sealer
        for conn in self._SyncObj__transport._connections.values():  # made in __init__, not yet dialled
            conn.encryptor = sealer
        self.port_guard.install()
        if fsync_journal:
            transport = self._SyncObj__transport
            plain_send = transport.send

            def send_after_sync(node: Any, message: Any) -> Any:
                self.journal.sync()  # nothing leaves this node before what it says is on disk
                return plain_send(node, message)
            transport.send = send_after_sync
        self.addOnTickCallback(self._flush_append_entries)
        # The first election waits for the greater peers' next dial and a heartbeat or two.
        self._SyncObj__raftElectionDeadline += self.startup_grace_seconds(election_timeout_min, heartbeat_interval)
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
        not committed; the caller retries, by then with another leader).

        pysyncobj calls this after it applied the tick's entries and just before it waits for the
        network: the read view goes out here, not after that wait (up to a tick period later)."""
        try:
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
        finally:
            self._after_tick()

    # -- follower log safety

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        self._heard[node] = time.monotonic()
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

    @staticmethod
    def dial_retry_seconds(election_timeout_min: float) -> float:
        """How often a peer that is down is dialled again: within a third of the minimum
        election timeout."""
        return min(1.0, election_timeout_min / 3)

    def startup_grace_seconds(self, election_timeout_min: float, heartbeat_interval: float) -> float:
        """Added to a (re)started node's first election timeout: its greater peers dial it within
        a retry period, and the leader's next heartbeat follows; an election before that would
        unseat a live leader."""
        return self.dial_retry_seconds(election_timeout_min) + 2 * heartbeat_interval

    # -- one append_entries round per tick

    def _onTick(self, timeToWait: float = 0.0) -> None:
        """With appendEntriesUseBatch=False pysyncobj sends a round of append_entries to every
        follower for each command it takes from the queue and again after applying, each frame
        answered by the follower: most of a busy leader's frames said nothing new. Within a tick
        we defer those rounds and send one (before the tick waits for the network), carrying
        every new entry and the latest commit index."""
        self._read_before_election()
        self._storage_guard()
        self.port_guard.sweep()
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
                self._after_tick()
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

    def _after_tick(self) -> None:
        publish, st = self.on_tick, self.state
        if publish is None or ((id(st), st.applied, self._isLeader()) == self._ticked_at
                               and not self.on_tick_wanted()):
            return
        with self.state_lock:
            st = self.state
            self._ticked_at = (id(st), st.applied, self._isLeader())
            try:
                publish(st)
            except Exception:
                log.exception("read view publisher failed")

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
        silence = self._leader_silence(s)
        return {
            "role": ROLE_NAMES.get(s.get("state"), "unknown"),
            "term": s.get("raft_term"),
            "leader_addr": str(leader) if leader is not None else None,
            "commit_index": s.get("commit_idx"),
            "applied_index": s.get("last_applied"),
            "leader_commit_index": s.get("leader_commit_idx"),
            "log_len": s.get("log_len"),
            "has_quorum": self._counts_in_quorum(s, silence),
            # Seconds since this follower heard from its leader (None on the leader, or without one).
            "leader_silent_for": None if silence is None else round(min(silence, 1e9), 3),
            "partners_connected": [str(k)[len("partner_node_status_server_"):]
                                   for k, v in s.items()
                                   if str(k).startswith("partner_node_status_server_") and v == 2],
            "leader_changes": self.leader_changes,
            "auth_failures": self.port_guard.auth_failures,
            "oversized_frames": self.port_guard.oversized_frames,
            "refused_connections": self.port_guard.refused_connections,
            "resends_trimmed": self.resends_trimmed,
            "snapshot_seconds": self.snapshots.last_duration,
        }

    def is_leader(self) -> bool:
        return self._isLeader()

    def in_quorum(self) -> bool:
        """raft_status()["has_quorum"], without the rest of the status (asked per submission)."""
        for _ in range(3):  # the tick thread may change the member sets while we read them
            try:
                s = {"has_quorum": self.hasQuorum, "state": self._SyncObj__raftState,
                     "leader": self._SyncObj__raftLeader}
                break
            except RuntimeError:
                continue
        else:
            return True  # unknown: the commit itself decides
        return self._counts_in_quorum(s, self._leader_silence(s))

    def _leader_silence(self, s: dict) -> float | None:
        """Seconds since a follower last heard from its leader (None on a leader or without one)."""
        leader = s.get("leader")
        if s.get("state") == 2 or leader is None:
            return None
        heard = self._heard.get(leader)
        return float("inf") if heard is None else time.monotonic() - heard

    def _counts_in_quorum(self, s: dict, silence: float | None) -> bool:
        """pysyncobj's connected majority, and for a follower a leader heard lately: pysyncobj keeps
        a connection it does not send on "connected", so a follower cut off with its old leader, or
        stalled, would go on claiming a quorum (a follower without a leader has none to be in). A
        leader steps down once no majority answers (leaderFallbackTimeout)."""
        if not s.get("has_quorum"):
            return False
        if s.get("state") == 2:
            return True
        return silence is not None and silence <= LEADER_SILENCE_TIMEOUTS * self._election_timeout_max

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
