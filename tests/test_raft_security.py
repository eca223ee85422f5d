"""The Raft port trusts nobody: wrong secrets are refused and logged, huge frames are dropped."""
from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import zlib

import pytest

from cluster import SECRET, make_message, submission_count, wait_for
from raftmail.consensus.seal import FrameSealer, derive_key
from raftmail.node.runtime import RAFT_KEY_PURPOSE

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def test_node_with_wrong_secret_does_not_join_and_changes_nothing(make_cluster) -> None:
    c = make_cluster(start=False, sink=False)
    good = c.config_path.read_text()
    # n3 runs with another secret: same file otherwise.
    bad_path = c.root / "bad.toml"
    bad_path.write_text(good.replace('secret = "', 'secret = "WRONG-', 1))
    c.start("n1")
    c.start("n2")
    leader = c.wait_leader(30, among=["n1", "n2"])
    import subprocess, sys
    log = open(c.root / "n3.log", "ab")
    c.procs["n3"] = subprocess.Popen([sys.executable, "-m", "raftmail.cli", "start", "--config", str(bad_path),
                                      "--node", "n3"], stdout=log, stderr=log)
    wait_for(lambda: c.status("n3"), 20, "n3 to answer /status")
    code, text = c.submit(leader, ["a@example.com"], make_message(message_id="<ok@x>"))
    assert code == 250, text
    # The stranger is refused: it never learns of a leader, and what it is sent does not count.
    wait_for(lambda: c.status(leader)["peers_rejecting_secret"] == ["n3"] and c.status("n3")["peer_auth_failures"] > 0, 20,
             "the cluster to notice the wrong secret")
    s3 = c.status("n3")
    assert s3["leader"] is None and s3["role"] != "leader" or not s3["has_quorum"]
    code, text = c.submit("n3", ["b@example.com"], make_message(message_id="<bad@x>"))
    assert code == 451, text
    # Nothing it was sent reached the log, and the log did not reach it.
    assert submission_count(c, "n1") == 1 and submission_count(c, "n2") == 1
    assert submission_count(c, "n3") == 0 and c.status("n3")["commands_applied"] == 0
    # Both sides say so: the members name the stranger, the stranger the refused frames or
    # requests (which side dials the other depends on the ports).
    assert "n3 refuses this node's cluster secret" in c.log_text("n1") + c.log_text("n2")
    assert "wrong cluster secret" in c.log_text("n1") + c.log_text("n2") + c.log_text("n3")


def _raft_auth_failures(c, nid: str) -> int:
    return c.status(nid).get("raft_auth_failures", 0)


def test_oversized_frame_from_a_stranger_is_dropped(make_cluster) -> None:
    c = make_cluster(sink=False)
    nid = c.ids[0]
    with socket.create_connection(("127.0.0.1", c.raft[nid]), timeout=5) as s:
        s.sendall(struct.pack("i", 2**31 - 1) + b"x" * 65536)
        s.settimeout(5)
        deadline = time.monotonic() + 5
        closed = False
        while time.monotonic() < deadline:
            try:
                if s.recv(4096) == b"":
                    closed = True
                    break
            except ConnectionResetError:
                closed = True
                break
        assert closed, "the node kept a connection that announced a 2 GiB frame"
    wait_for(lambda: c.status(nid)["raft_oversized_frames"] >= 1, 10, "the drop to be counted")
    code, text = c.submit(nid, ["a@example.com"], make_message(message_id="<after@x>"))
    assert code == 250, text


def _flood_big_frame(port: int, claim: int, send: int, stop) -> None:
    """One connection announcing a `claim`-byte frame and streaming junk toward it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(struct.pack("i", claim))
            chunk, sent = b"\x5a" * 2**20, 0
            while sent < send and not stop.is_set():
                s.sendall(chunk)
                sent += len(chunk)
    except OSError:
        pass  # dropped by the node: what we want


def _flood_junk_frames(port: int, stop) -> None:
    """Connection after connection of small frames that fail authentication."""
    import os
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                for _ in range(20):
                    s.sendall(struct.pack("i", 1000) + os.urandom(1000))
        except OSError:
            time.sleep(0.01)


def _hold_half_open(port: int, n: int, stop) -> None:
    """Connections that never say anything."""
    socks = []
    try:
        for _ in range(n):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass
        stop.wait(30)
    finally:
        for s in socks:
            s.close()


def test_flooding_the_leaders_raft_port_costs_no_election(make_cluster) -> None:
    """Oversized frames (40 and 60 MiB), junk frames and half-open connections on the leader's
    Raft port at once: the leader keeps its term and every submission is answered 250 within
    commit_timeout."""
    import threading
    c = make_cluster(sink=False)
    leader = c.wait_leader()
    term = c.status(leader)["term"]
    port = c.raft[leader]
    stop = threading.Event()
    flood = [threading.Thread(target=_flood_big_frame, args=(port, claim, claim, stop), daemon=True)
             for claim in (60 * 2**20, 60 * 2**20, 40 * 2**20, 40 * 2**20)]
    flood += [threading.Thread(target=_flood_junk_frames, args=(port, stop), daemon=True) for _ in range(2)]
    flood += [threading.Thread(target=_hold_half_open, args=(port, 40, stop), daemon=True)]
    for t in flood:
        t.start()
    slow = []
    try:
        deadline = time.monotonic() + 12
        n = 0
        while time.monotonic() < deadline:
            n += 1
            started = time.monotonic()
            code, text = c.submit(leader, [f"r{n}@example.com"], make_message(message_id=f"<flood-{n}@x>"))
            took = time.monotonic() - started
            assert code == 250, f"submission {n} during the flood: {code} {text}"
            if took > 3.0:  # the harness's commit_timeout
                slow.append(round(took, 2))
    finally:
        stop.set()
        for t in flood:
            t.join(10)
    s = c.status(leader)
    assert s["term"] == term and s["role"] == "leader", f"term {term} -> {s['term']}, role {s['role']}"
    assert not slow, f"submissions slower than commit_timeout: {slow}"
    assert s["raft_oversized_frames"] >= 4 and s["raft_refused_connections"] >= 1
    print(f"\n{n} submissions answered 250 during the flood; refused connections "
          f"{s['raft_refused_connections']}, oversized frames {s['raft_oversized_frames']}, "
          f"auth failures {s['raft_auth_failures']}")


class _MakesADirectory:
    """Unpickling this runs os.mkdir: what a pickled frame could make a node do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


class _EarlierSealer(FrameSealer):
    VERSION = 0x52  # raftmail before msgpack frames: pysyncobj's zlib'd pickle inside


def _send_frame_and_wait_for_close(port: int, frame: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("i", len(frame)) + frame)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if s.recv(4096) == b"":
                    return
            except (ConnectionResetError, socket.timeout):
                return
        raise AssertionError("the node kept a connection whose first frame was a pickle")


def test_a_pickled_frame_under_the_secret_runs_nothing(make_cluster, tmp_path) -> None:
    # Whoever holds the cluster secret can seal frames; pysyncobj unpickled what opened, so a
    # sealed pickle ran code on the node. Frames are msgpack data now: nothing is unpickled.
    c = make_cluster(sink=False)
    nid = c.ids[0]
    password = derive_key(SECRET, "test", RAFT_KEY_PURPOSE).hex()
    marker = tmp_path / "made-by-a-frame"
    evil = pickle.dumps(_MakesADirectory(str(marker)))
    current = FrameSealer(password, lambda what: None)
    for payload in (zlib.compress(evil, 3), evil):
        _send_frame_and_wait_for_close(c.raft[nid], current.encrypt_at_time(payload, int(time.monotonic())))
    # As a node of the previous version framed it: refused, and the log says why.
    before = _raft_auth_failures(c, nid)
    earlier = _EarlierSealer(password, lambda what: None)
    _send_frame_and_wait_for_close(c.raft[nid], earlier.encrypt_at_time(zlib.compress(evil, 3), int(time.monotonic())))
    assert not marker.exists(), "a frame's pickle ran on the node"
    wait_for(lambda: _raft_auth_failures(c, nid) > before, 10, "the earlier-version frame to be counted")
    assert "raftmail node of an earlier version" in c.log_text(nid)
    code, text = c.submit(nid, ["a@example.com"], make_message(message_id="<after-pickle@x>"))
    assert code == 250, text
