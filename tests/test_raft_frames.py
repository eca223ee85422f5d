"""The Raft port's frames: FrameSealer (our AES-GCM in place of pysyncobj's Fernet) and one
append_entries round per tick. In-process pysyncobj nodes on real sockets."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pysyncobj import FAIL_REASON, SyncObj

from raftmail.consensus.raft import RaftNode
from raftmail.consensus.seal import FrameSealer, SealError
from raftmail.consensus.state import encode_command

from test_raft_wrapper import SECRET, free_port, submit_cmd, wait_for

pytestmark = pytest.mark.timeout(90)


def sealers(secret_a: str = SECRET, secret_b: str = SECRET) -> tuple[FrameSealer, FrameSealer, list[str]]:
    failures: list[str] = []
    return FrameSealer(secret_a, failures.append), FrameSealer(secret_b, failures.append), failures


def test_sealed_frames_open_on_another_node_with_the_same_secret() -> None:
    a, b, failures = sealers()
    frame = a.encrypt_at_time(b"append_entries", 1234)
    assert b"append_entries" not in frame  # sealed, not just signed
    assert b.extract_timestamp(frame) == 1234
    assert b.decrypt(frame) == b"append_entries"
    assert a.encrypt_at_time(b"x", 1) != a.encrypt_at_time(b"x", 1)  # a fresh nonce each time
    assert failures == []


def test_a_wrong_secret_a_tampered_frame_and_a_fernet_token_are_refused_and_counted() -> None:
    a, stranger, failures = sealers(SECRET, "another-secret")
    frame = a.encrypt_at_time(b"vote for me", 7)
    with pytest.raises(SealError):
        stranger.extract_timestamp(frame)
    b = FrameSealer(SECRET, failures.append)
    tampered = bytearray(frame)
    tampered[-1] ^= 1
    with pytest.raises(SealError):
        b.decrypt(bytes(tampered))
    later = bytearray(frame)
    later[1:9] = (10**6).to_bytes(8, "big")  # the timestamp pysyncobj orders frames by is authenticated
    with pytest.raises(SealError):
        b.extract_timestamp(bytes(later))
    with pytest.raises(SealError):  # pysyncobj's own Fernet: an old node, or not ours at all
        b.decrypt(Fernet(Fernet.generate_key()).encrypt_at_time(b"x", 7))
    assert len(failures) == 4 and "failed authentication" in failures[0] and "not a token" in failures[3]
    assert b.decrypt(frame) == b"vote for me"  # the failures did not poison the sender's key


class EagerRaftNode(RaftNode):
    """pysyncobj as shipped: a round of append_entries for every command and after every apply."""

    def _onTick(self, timeToWait: float = 0.0) -> None:
        SyncObj._onTick(self, timeToWait)


def start_cluster(root: Path, cls: type[RaftNode]) -> list[RaftNode]:
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [cls(a, addrs, root / a.replace(":", "_"), password=SECRET, compaction_min_entries=10**6,
                 compaction_min_seconds=10**6) for a in addrs]
    wait_for(lambda: sum(n.is_leader() for n in nodes) == 1, 30, "a leader")
    return nodes


def burst_of_commands(leader: RaftNode, count: int) -> int:
    """Queue `count` commands on the leader's tick thread (so one tick takes them all) and return
    the append_entries frames the leader sent until all were committed."""
    transport = leader._SyncObj__transport
    plain_send = transport.send
    frames = [0]

    def counting_send(node, message):
        if isinstance(message, dict) and message.get("type") == "append_entries":
            frames[0] += 1
        return plain_send(node, message)
    transport.send = counting_send
    committed = threading.Semaphore(0)
    results: list[int] = []

    def done(result, err):
        results.append(err)
        committed.release()
    queued = threading.Event()

    def queue_all() -> None:
        if not queued.is_set():
            queued.set()
            for i in range(count):
                leader.submit(encode_command(submit_cmd(i)), done)
    leader.addOnTickCallback(queue_all)
    for _ in range(count):
        assert committed.acquire(timeout=30), "a command was not committed"
    leader.removeOnTickCallback(queue_all)
    transport.send = plain_send
    assert results == [FAIL_REASON.SUCCESS] * count
    return frames[0]


@pytest.mark.parametrize("cls,coalesced", [(RaftNode, True), (EagerRaftNode, False)])
def test_one_append_entries_round_per_tick(tmp_path: Path, cls: type[RaftNode], coalesced: bool) -> None:
    nodes = start_cluster(tmp_path, cls)
    try:
        leader = next(n for n in nodes if n.is_leader())
        frames = burst_of_commands(leader, 100)
        if coalesced:
            assert frames <= 20, f"{frames} append_entries frames for 100 commands taken in one tick"
        else:
            assert frames >= 100, "expected pysyncobj as shipped to send about a frame per command"
        digest = leader.read(lambda st: sorted(st.submissions))
        wait_for(lambda: all(n.read(lambda st: sorted(st.submissions)) == digest for n in nodes), 20,
                 "every node to apply the burst")
        assert len(digest) == 100
    finally:
        for n in nodes:
            n.stop()


class StalledRaftNode(RaftNode):
    """Its tick thread stalls once, before a tick, as a descheduled process's would."""
    stall = 0.0

    def _onTick(self, timeToWait: float = 0.0) -> None:
        if self.stall:
            stall, self.stall = self.stall, 0.0
            time.sleep(stall)
        super()._onTick(timeToWait)


class UnreadStalledRaftNode(StalledRaftNode):
    """pysyncobj as shipped: the election deadline is checked before the network is read."""

    def _read_before_election(self) -> None:
        pass


@pytest.mark.parametrize("cls,keeps_term", [(StalledRaftNode, True), (UnreadStalledRaftNode, False)])
def test_a_stalled_follower_reads_the_heartbeats_before_it_starts_an_election(
        tmp_path: Path, cls: type[StalledRaftNode], keeps_term: bool) -> None:
    nodes = start_cluster(tmp_path, cls)
    try:
        def settled() -> RaftNode | None:
            leaders = [n for n in nodes if n.is_leader()]
            if len(leaders) == 1 and all(n._getLeader() == leaders[0].selfNode and n.raftCurrentTerm ==
                                         leaders[0].raftCurrentTerm for n in nodes if n is not leaders[0]):
                return leaders[0]
            return None
        found: list[RaftNode] = []
        wait_for(lambda: found.append(settled()) or found[-1] is not None, 20, "every follower to follow one leader")
        leader = found[-1]
        follower = next(n for n in nodes if n is not leader)
        term = leader.raftCurrentTerm
        ticked = threading.Event()
        follower.stall = 2.0  # well past the 0.7 s election timeout; heartbeats keep arriving
        follower.addOnTickCallback(lambda: ticked.set() if not follower.stall else None)
        assert ticked.wait(10)
        ticked.clear()
        assert ticked.wait(10)  # a whole tick after the stall
        if keeps_term:
            assert follower.raftCurrentTerm == term and leader.is_leader()
        else:
            wait_for(lambda: follower.raftCurrentTerm > term, 10, "the stalled follower to start an election")
    finally:
        for n in nodes:
            n.stop()


class SlowDialRaftNode(RaftNode):
    """Re-dials a peer that was down only after its election timeout (the 1 s we once had), and
    a started node's first election timeout is the usual one."""

    @staticmethod
    def dial_retry_seconds(election_timeout_min: float) -> float:
        return 1.0

    def startup_grace_seconds(self, election_timeout_min: float, heartbeat_interval: float) -> float:
        return 0.0


@pytest.mark.parametrize("cls,keeps_leader", [(RaftNode, True), (SlowDialRaftNode, False)])
def test_a_node_that_restarts_is_dialled_before_its_election_timeout(
        tmp_path: Path, cls: type[RaftNode], keeps_leader: bool) -> None:
    """The follower with the least address is dialled by both others (pysyncobj lets only the
    greater address dial). It restarts just after the leader tried to dial it and failed, while
    the other follower dials it at once: it must hear the leader before its election timeout, or
    it starts an election with its remembered term + 1 that unseats the leader."""
    addrs = sorted(f"127.0.0.1:{free_port()}" for _ in range(3))
    least, others = addrs[0], addrs[1:]
    make = lambda a: cls(a, addrs, tmp_path / a.replace(":", "_"), password=SECRET,  # noqa: E731
                         compaction_min_entries=10**6, compaction_min_seconds=10**6)
    nodes = [make(a) for a in others]  # the least address joins later, so it never leads
    restarted: RaftNode | None = None
    try:
        wait_for(lambda: sum(n.is_leader() for n in nodes) == 1, 30, "a leader of the two")
        leader = next(n for n in nodes if n.is_leader())
        follower = next(n for n in nodes if n is not leader)
        first = make(least)
        term = leader.raftCurrentTerm
        wait_for(lambda: str(first._getLeader()) == str(leader.selfNode) and first.raftCurrentTerm == term, 10,
                 "the third node to follow")
        first.stop()
        dials = {n: n._SyncObj__transport for n in nodes}
        wait_for(lambda: all(dials[n]._lastConnectAttempt.get(dials[n]._nodeAddrToNode[least]) for n in nodes), 10,
                 "both to have tried to dial it again")
        dials[leader]._lastConnectAttempt[dials[leader]._nodeAddrToNode[least]] = time.monotonic()  # just failed
        dials[follower]._lastConnectAttempt.pop(dials[follower]._nodeAddrToNode[least], None)  # dials at once
        restarted = make(least)
        window = time.monotonic() + 2.1  # three maximum election timeouts: a needless election comes within
        if keeps_leader:
            while time.monotonic() < window:
                assert leader.is_leader() and leader.raftCurrentTerm == term and restarted.raftCurrentTerm <= term
                time.sleep(0.02)
            assert str(restarted._getLeader()) == str(leader.selfNode) and restarted.raftCurrentTerm == term
        else:
            wait_for(lambda: leader.raftCurrentTerm > term, window - time.monotonic(), "the slow dial to cost an election")
    finally:
        for n in nodes + ([restarted] if restarted is not None else []):
            n.stop()
