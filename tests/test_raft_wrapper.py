"""Our pysyncobj wrapper on a real journal and snapshot on disk (single-member cluster in-process).

The whole-cluster SIGKILL test with three processes lives in test_cluster_durability.py.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from pysyncobj import FAIL_REASON
from pysyncobj import pickle as psy_pickle
from pysyncobj.journal import createJournal

from raftmail.consensus.raft import LEADER_SILENCE_TIMEOUTS, RaftNode
from raftmail.consensus.raft_snapshot import decode_snapshot, encode_snapshot
from raftmail.consensus.state import MailState, encode_command

pytestmark = pytest.mark.timeout(60)

SECRET = "test-secret-0123456789abcdef"
REGULAR = 0  # pysyncobj _COMMAND_TYPE.REGULAR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_cmd(i: int) -> dict:
    return {"op": "submit", "now": 1000.0 + i, "window": 86400.0, "max_queued": 10**9,
            "subs": [{"id": f"s{i}", "campaign": "c", "sender": "news@example.com",
                      "body": "0" * 64, "size": 10, "rcpts": [f"r{i}@example.com"], "key": f"k{i}"}]}


def propose_sync(node: RaftNode, command: dict, timeout: float = 5.0):
    done = threading.Event()
    box = {}

    def cb(result, err):
        box["r"], box["e"] = result, err
        done.set()

    node.submit(encode_command(command), cb)
    assert done.wait(timeout), "no commit callback"
    return box["r"], box["e"]


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def start_single(data_dir: Path, addr: str, cls=RaftNode, **kw) -> RaftNode:
    node = cls(addr, [], data_dir, password=SECRET, compaction_min_entries=10**6,
               compaction_min_seconds=10**6, **kw)
    wait_for(node.is_leader, what="single node to lead")
    return node


def applied_submissions(node: RaftNode) -> set[str]:
    return node.read(lambda st: set(st.submissions))


def test_commands_commit_and_survive_restart(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    node = start_single(tmp_path, addr)
    for i in range(20):
        result, err = propose_sync(node, submit_cmd(i))
        assert err == FAIL_REASON.SUCCESS and result == [["ok", f"s{i}"]]
    node.forceLogCompaction()
    wait_for(lambda: (tmp_path / "snapshot.bin").exists(), what="snapshot file")
    for i in range(20, 30):
        propose_sync(node, submit_cmd(i))
    node.stop()
    # The snapshot is ours: msgpack behind a magic header, never pickle.
    raw = (tmp_path / "snapshot.bin").read_bytes()
    assert raw.startswith(b"RMSNAP1\n")
    state_blob, last, prev, cluster = decode_snapshot(raw)
    assert cluster == [addr]
    assert len(MailState.from_snapshot(state_blob).submissions) >= 20

    node = start_single(tmp_path, addr)
    wait_for(lambda: len(applied_submissions(node)) == 30, what="replay of all 30 submissions")
    # No phantom member: the snapshot's member list must not make us our own peer.
    assert node.raft_status()["has_quorum"]
    assert [str(n) for n in node.otherNodes] == []
    node.stop()


def _orphan_snapshot_setup(tmp_path: Path, addr: str, total: int, at: int) -> None:
    """Leave the data dir as an orphaned compaction child leaves it: a journal with
    entries 1..N and a snapshot taken at the `at`-th of our commands, newer than the journal head."""
    node = start_single(tmp_path, addr)
    for i in range(total):
        propose_sync(node, submit_cmd(i))
    node.stop()
    journal = createJournal(str(tmp_path / "journal.bin"))
    entries = [journal[i] for i in range(len(journal))]
    journal._destroy()
    state = MailState()
    applied = 0
    for n, (command, idx, term) in enumerate(entries):
        if command[:1] == bytes([REGULAR]):
            _func_id, args = psy_pickle.loads(command[1:])
            state.apply_blob(args[0])
            applied += 1
            if applied == at:
                prev, last = entries[n - 1], entries[n]
                break
    (tmp_path / "snapshot.bin").write_bytes(encode_snapshot(state.to_snapshot(), last, prev, [addr]))


class UnfixedRaftNode(RaftNode):
    """pysyncobj's own loading path, without our journal-alignment fix."""

    def _keep_journal_tail(self) -> None:
        return None


def test_restart_keeps_journal_tail_newer_than_snapshot(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    _orphan_snapshot_setup(tmp_path, addr, total=60, at=40)
    node = start_single(tmp_path, addr)
    wait_for(lambda: len(applied_submissions(node)) == 60, what="all 60 acknowledged submissions")
    node.stop()


def test_unfixed_pysyncobj_loses_the_journal_tail(tmp_path: Path) -> None:
    """The defect itself, reproduced: without the fix the 20 entries after the snapshot vanish."""
    addr = f"127.0.0.1:{free_port()}"
    _orphan_snapshot_setup(tmp_path, addr, total=60, at=40)
    node = start_single(tmp_path, addr, cls=UnfixedRaftNode)
    time.sleep(0.5)  # give it every chance to replay; what it has now is what it will ever have
    wait_for(lambda: len(applied_submissions(node)) >= 40, what="snapshot load")
    assert len(applied_submissions(node)) == 40
    node.stop()


def test_busy_raft_port_fails_at_start(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        addr = "127.0.0.1:%d" % s.getsockname()[1]
        with pytest.raises(Exception, match="BindError"):
            RaftNode(addr, [], tmp_path, password=SECRET)


def test_secret_is_mandatory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret"):
        RaftNode(f"127.0.0.1:{free_port()}", [], tmp_path, password="")


def _journal_dirty_kb(pid: int, journal: Path) -> int:
    """Dirty pages of the journal's shared mapping, from /proc (the kernel's own accounting)."""
    smaps = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    dirty, inside = 0, False
    for line in smaps:
        if line and not line[0].isupper() or "-" in line.split(" ")[0]:
            inside = line.rstrip().endswith(str(journal))
            continue
        if inside and line.startswith("Shared_Dirty:") or inside and line.startswith("Private_Dirty:"):
            dirty += int(line.split()[1])
    return dirty


@pytest.mark.parametrize("fsync_journal", [False, True])
def test_fsync_mode_leaves_no_dirty_journal_pages(tmp_path: Path, fsync_journal: bool) -> None:
    """pysyncobj never msyncs its mmap journal: acknowledged entries sit in dirty pages that a
    power cut loses. With fsync_journal, every acknowledged entry is already written back."""
    import os
    addr = f"127.0.0.1:{free_port()}"
    node = start_single(tmp_path, addr, fsync_journal=fsync_journal)
    for i in range(50):
        _result, err = propose_sync(node, submit_cmd(i))
        assert err == FAIL_REASON.SUCCESS
        # Right after the acknowledgement: anything still dirty would be lost on power loss.
        dirty = _journal_dirty_kb(os.getpid(), tmp_path / "journal.bin")
        if fsync_journal:
            assert dirty == 0, f"entry {i} acknowledged with {dirty} KB of journal not on disk"
    if not fsync_journal:
        assert dirty > 0, "expected pysyncobj's default to leave the journal dirty (the defect)"
    else:
        assert node.journal.syncs >= 50
    node.stop()


class UntrimmedRaftNode(RaftNode):
    """pysyncobj's own append_entries handling, without our known-entries trim."""

    def _without_known_entries(self, message: dict) -> dict:
        return message


@pytest.mark.parametrize("cls,keeps", [(RaftNode, True), (UntrimmedRaftNode, False)])
def test_stale_resend_does_not_truncate_the_follower_log(tmp_path: Path, cls, keeps: bool) -> None:
    """A leader resending from a stale nextIndex made followers delete entries they had
    already applied. Feed the real handler such a resend and look at the journal."""
    from pysyncobj.node import TCPNode
    addr = f"127.0.0.1:{free_port()}"
    node = start_single(tmp_path, addr, cls=cls)
    for i in range(30):
        propose_sync(node, submit_cmd(i))
    log = node._SyncObj__raftLog
    entries = [log[i] for i in range(len(log))]
    last_idx, term = entries[-1][1], entries[-1][2]
    applied = node.raftLastApplied
    assert applied == last_idx
    k = len(entries) - 20  # resend 5 entries from 20 back, as a stale nextIndex makes the leader do
    resend = {"type": "append_entries", "term": term, "commit_index": last_idx,
              "prevLogIdx": entries[k - 1][1], "prevLogTerm": entries[k - 1][2],
              "entries": entries[k:k + 5]}
    leader = TCPNode(f"127.0.0.1:{free_port()}")

    def deliver():
        node._SyncObj__onMessageReceived(leader, resend)
    node.addOnTickCallback(deliver)  # on the tick thread, as the transport would
    wait_for(lambda: node._SyncObj__raftLeader == leader, what="the resend to be handled")
    node.removeOnTickCallback(deliver)
    ticked = threading.Event()
    node.addOnTickCallback(ticked.set)  # a whole tick after the resend: the journal is settled
    assert ticked.wait(5)
    now = [log[i][1] for i in range(len(log))]
    if keeps:
        assert now[-1] == last_idx, "entries the follower had already applied were deleted"
        assert node.resends_trimmed >= 1
    else:
        assert now[-1] == entries[k + 4][1], "expected pysyncobj as shipped to truncate (the defect)"
    node.stop()


class CutRaftNode(RaftNode):
    """A member whose incoming Raft messages from the peers in `cut` are dropped, as a network
    partition drops them; the TCP connections stay up (frames flow, their messages are discarded),
    so pysyncobj counts every peer as connected."""

    cut: frozenset = frozenset()

    def _SyncObj__onMessageReceived(self, node, message) -> None:
        if str(node) in self.cut:
            return
        RaftNode._SyncObj__onMessageReceived(self, node, message)


class LateFallbackRaftNode(CutRaftNode):
    """pysyncobj's own leaderFallbackTimeout (30 s) instead of ours."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._SyncObj__conf.leaderFallbackTimeout = 30.0


def start_members(tmp_path: Path, n: int, cls=RaftNode, **kw) -> list[RaftNode]:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    nodes = [cls(a, addrs, tmp_path / f"m{i}", password=SECRET, **kw) for i, a in enumerate(addrs)]
    wait_for(lambda: sum(x.is_leader() for x in nodes) == 1
             and all(x.raft_status()["has_quorum"] for x in nodes), what="a leader followed by every member")
    return nodes


CUT_CONNECTION_TIMEOUT = 1.5  # [raft] connection_timeout of these members: the leader's fallback


@pytest.mark.parametrize("cls,steps_down", [(CutRaftNode, True), (LateFallbackRaftNode, False)])
def test_a_leader_cut_off_with_a_minority_steps_down(tmp_path: Path, cls, steps_down: bool) -> None:
    """Five members; the leader and one follower are cut off from the other three (each side
    drops what the other sends). The old leader must step down once no majority answered for
    connection_timeout, and its follower must stop claiming a quorum; pysyncobj as shipped kept
    both for 30 s."""
    nodes = start_members(tmp_path, 5, cls, connection_timeout=CUT_CONNECTION_TIMEOUT)
    try:
        leader = next(x for x in nodes if x.is_leader())
        follower = next(x for x in nodes if x is not leader)
        minority = [leader, follower]
        majority = [x for x in nodes if x not in minority]
        for side, other in ((minority, majority), (majority, minority)):
            for x in side:
                x.cut = frozenset(str(o.selfNode) for o in other)

        def stepped_down() -> bool:
            return not leader.is_leader() and not any(x.raft_status()["has_quorum"] for x in minority)
        bound = CUT_CONNECTION_TIMEOUT + LEADER_SILENCE_TIMEOUTS * 0.7 + 1.0
        if steps_down:
            wait_for(stepped_down, bound, "the cut-off leader to step down and its follower to lose the quorum")
            wait_for(lambda: any(x.is_leader() for x in majority), 10, "the majority to elect a leader")
        else:
            time.sleep(bound)  # what the defect keeps for 30 s, it keeps past our bound
            assert leader.is_leader() and follower.raft_status()["has_quorum"], \
                "expected pysyncobj as shipped to keep the cut-off leader (the defect)"
    finally:
        for x in nodes:
            x.stop()


def test_a_stalled_follower_reports_no_quorum(tmp_path: Path) -> None:
    """A follower whose Raft thread hears nothing (stalled here; cut off alike) keeps its
    connections and its leader in pysyncobj's view; it must not report a quorum once it has
    not heard from the leader for LEADER_SILENCE_TIMEOUTS election timeouts."""
    nodes = start_members(tmp_path, 3)
    try:
        follower = next(x for x in nodes if not x.is_leader())
        gate, stalled = threading.Event(), threading.Event()

        def stall() -> None:
            stalled.set()
            gate.wait(30)
        follower.addOnTickCallback(stall)
        assert stalled.wait(5)
        started = time.monotonic()
        wait_for(lambda: not follower.raft_status()["has_quorum"], 5, "the stalled follower to report no quorum")
        took = time.monotonic() - started
        assert follower.raft_status()["leader_addr"] is not None, "pysyncobj still names the leader"
        assert took <= LEADER_SILENCE_TIMEOUTS * 0.7 + 0.5, took
        gate.set()  # before the removal: pysyncobj holds its callback lock while one runs
        follower.removeOnTickCallback(stall)
        wait_for(lambda: follower.raft_status()["has_quorum"], 5, "the follower to count again once it hears")
    finally:
        gate.set()
        for x in nodes:
            x.stop()
