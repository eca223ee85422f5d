"""The Raft port trusts nobody: wrong secrets are refused and logged, huge frames are dropped."""
from __future__ import annotations

import socket
import struct
import time

import pytest

from cluster import make_message, wait_for

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
    assert c.status("n1")["submissions"] == 1 and c.status("n2")["submissions"] == 1
    assert c.status("n3")["submissions"] == 0 and c.status("n3")["commands_applied"] == 0
    assert "wrong cluster secret" in c.log_text("n1") + c.log_text("n2")


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
