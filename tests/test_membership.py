"""Membership: join a node while a campaign is sending, remove one cleanly, refuse a join or leave
that would leave the cluster without a working majority, and the operators' failover drill."""
from __future__ import annotations

import json

import pytest

from cluster import make_message, run_cli, start_founders, wait_for
from raftmail.node.membership import membership_quorum

pytestmark = pytest.mark.timeout(180)


@pytest.mark.cluster
def test_join_while_a_campaign_is_sending_then_leave(make_cluster) -> None:
    c = make_cluster(4, start=False, batch_size=10)
    full, leader = start_founders(c, 3)
    total = 0
    for i in range(10):
        rcpts = [f"a{i}-{j}@example.com" for j in range(30)]
        code, text = c.submit(leader, rcpts, make_message(message_id=f"<join-{i}@x>", campaign="grow"))
        assert code == 250, text
        total += len(rcpts)

    # The operator adds n4 to the file, joins it, starts it: it catches up, then takes batches.
    c.config_path.write_text(full)
    r = run_cli(c.config_path, "join", "--node", "n4")
    assert r.returncode == 0, r.stderr
    c.start("n4")
    # Like a load balancer: send it mail once /readyz says it is caught up and in a quorum.
    wait_for(lambda: c.get("n4", "/readyz").get("ready", True), 30, "n4 to be ready")
    for i in range(10, 30):
        rcpts = [f"a{i}-{j}@example.com" for j in range(30)]
        code, text = c.submit("n4" if i % 2 else leader, rcpts, make_message(message_id=f"<join-{i}@x>", campaign="grow"))
        assert code == 250, text
        total += len(rcpts)
    wait_for(lambda: c.queue(leader)["delivered"] >= total, 90, "the whole campaign delivered", interval=0.2)
    assert c.status("n4")["applied_index"] >= c.status(leader)["commit_index"] - 5
    assert "node=n4" in c.log_text("n4"), "the joined node never took a batch"
    per_rcpt = {}
    for e in c.sink.delivered():
        per_rcpt[e["rcpt"]] = per_rcpt.get(e["rcpt"], 0) + 1
    assert len(per_rcpt) == total and set(per_rcpt.values()) == {1}

    # Remove n2 cleanly: its batches move first, then it leaves and stops by itself.
    leaving = "n2"
    for i in range(30, 36):
        c.submit(leader if leader != leaving else "n1", [f"b{i}-{j}@example.com" for j in range(30)],
                 make_message(message_id=f"<leave-{i}@x>", campaign="grow"))
    r = run_cli(c.config_path, "leave", "--node", leaving, timeout=90)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not c.alive(leaving), 20, f"{leaving} to stop itself")
    rest = [n for n in c.ids if n != leaving]
    new_leader = c.wait_leader(30, among=rest)
    code, text = c.submit(new_leader, ["after-leave@example.com"], make_message(message_id="<after-leave@x>"))
    assert code == 250, text
    wait_for(lambda: c.queue(new_leader)["pending"] + c.queue(new_leader)["in_flight"] == 0, 60,
             "the queue to drain without the removed node")
    c.wait_converged(rest)


@pytest.mark.cluster
def test_drill_moves_leadership_and_everyone_catches_up(make_cluster) -> None:
    c = make_cluster()
    old = c.leader()
    r = run_cli(c.config_path, "drill", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    print(f"\ndrill: elected {result['elected_seconds']:.2f}s, accepting {result['accepting_seconds']:.2f}s, "
          f"caught up {result['caught_up_seconds']:.2f}s")
    assert result["old_leader"] == old and result["new_leader"] not in (None, old)
    assert result["accepting_seconds"] < 10
    new = c.wait_leader(20)
    assert new != old
    code, text = c.submit(new, ["drill@example.com"], make_message(message_id="<drill@x>"))
    assert code == 250, text


def _wait_caught_up(c, nid: str) -> str:
    """Until every live node is connected to every other one again, and nid has applied what the
    leader committed; the leader then (a restarted node may have started an election)."""
    live = [n for n in c.ids if c.alive(n)]

    def meshed() -> bool:
        sts = {n: c.status(n) or {} for n in live}
        return all(set(live) - {n} <= set(st.get("connected", [])) for n, st in sts.items())
    wait_for(meshed, 30, f"{live} to reconnect to each other")
    leader = c.wait_leader(30)
    target = c.status(leader)["commit_index"]
    wait_for(lambda: ((c.status(nid) or {}).get("applied_index") or 0) >= target, 30, f"{nid} to catch up")
    return leader


def _refused_for_lack_of_majority(r, down: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "without a working majority" in r.stderr and f"unreachable: {down}" in r.stderr, r.stderr
    assert "need" in r.stderr, r.stderr


@pytest.mark.cluster
def test_leave_while_a_member_is_down_is_refused_then_finishes_once_it_is_back(make_cluster) -> None:
    c = make_cluster(3)
    leader = c.wait_leader()
    down, other = [n for n in c.ids if n != leader]
    c.kill(down)

    # Without `down`, removing `other` (or the leader) leaves {the rest} needing both: refused,
    # before anything is committed, saying who is unreachable.
    for leaving in (other, leader):
        r = run_cli(c.config_path, "leave", "--node", leaving, timeout=60)
        _refused_for_lack_of_majority(r, down)
        assert "nothing was changed" in r.stderr, r.stderr
    assert c.alive(other)
    assert c.wait_leader(10, among=[leader, other]) == leader
    for nid in (leader, other):
        code, text = c.submit(nid, [f"during-{nid}@example.com"], make_message(message_id=f"<during-{nid}@x>"))
        assert code == 250, text

    # Once it is back, the leader itself leaves: it hands leadership over, the new leader finishes.
    c.start(down)
    leader = _wait_caught_up(c, down)
    r = run_cli(c.config_path, "leave", "--node", leader, timeout=90)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not c.alive(leader), 20, f"{leader} to stop itself")
    rest = [n for n in c.ids if n != leader]
    new_leader = c.wait_leader(30, among=rest)
    code, text = c.submit(new_leader, ["after-leave@example.com"], make_message(message_id="<after-leave@x>"))
    assert code == 250, text

    # Retried, the leave reports success, not an unknown member.
    r = run_cli(c.config_path, "leave", "--node", leader, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout
    c.wait_converged(rest)


@pytest.mark.cluster
def test_join_while_a_member_is_down_is_refused_then_succeeds_and_is_idempotent(make_cluster) -> None:
    c = make_cluster(4, start=False)
    full, leader = start_founders(c, 3)
    down = next(n for n in ("n1", "n2", "n3") if n != leader)
    up = [n for n in ("n1", "n2", "n3") if n != down]
    c.kill(down)
    c.config_path.write_text(full)

    # {n1..n4} would need 3 of 4 with two up and n4 not started: refused, nothing committed.
    r = run_cli(c.config_path, "join", "--node", "n4", timeout=60)
    _refused_for_lack_of_majority(r, down)
    assert c.wait_leader(10, among=up) == leader
    code, text = c.submit(leader, ["during-join@example.com"], make_message(message_id="<during-join@x>"))
    assert code == 250, text

    c.start(down)
    _wait_caught_up(c, down)
    r = run_cli(c.config_path, "join", "--node", "n4", timeout=60)
    assert r.returncode == 0, r.stderr
    r = run_cli(c.config_path, "join", "--node", "n4", timeout=60)  # retried: success, no change
    assert r.returncode == 0, r.stderr
    assert "already" in r.stdout
    c.start("n4")
    c.wait_leader(30)  # followed by every live node, n4 included
    # A node just started may answer 451 until its peer channel is up (nothing is queued then);
    # a client retries a 4xx, with the same Message-ID.
    msg = make_message(message_id="<after-join@x>")
    wait_for(lambda: c.submit("n4", ["after-join@example.com"], msg)[0] == 250, 20, "n4 to take a submission")
    c.wait_converged(c.ids)


def test_membership_arithmetic() -> None:
    """Who must be up for one join or leave, for 3, 4 and 5 members."""
    def check(action: str, members: int, down: set[int], node: int) -> tuple[bool, int]:
        before = {f"n{i}" for i in range(1, members + 1)}
        reachable = before - {f"n{i}" for i in down}
        voters, need, _, _ = membership_quorum(action, before, reachable, f"n{node}")
        return len(voters) >= need, need
    # 3 members: a leave needs both others (the leaving one stops first), a join all three.
    assert check("leave", 3, set(), 2) == (True, 2)
    assert check("leave", 3, {3}, 2) == (False, 2)
    assert check("leave", 3, {2}, 2) == (True, 2)  # removing the dead one: the other two suffice
    assert check("leave", 3, {3}, 1) == (False, 2)  # the leader leaving is no different
    assert check("join", 3, set(), 4) == (True, 3)
    assert check("join", 3, {3}, 4) == (False, 3)
    # 4 members: with the leaving node stopped before its removal commits, 3 of the 4 must be up.
    assert check("leave", 4, set(), 2) == (True, 3)
    assert check("leave", 4, {3}, 2) == (False, 3)
    assert check("leave", 4, {2}, 2) == (True, 3)
    assert check("join", 4, {3}, 5) == (True, 3)
    # 5 members: one down is fine for a leave or a join, two are not.
    assert check("leave", 5, {5}, 2) == (True, 3)
    assert check("leave", 5, {4, 5}, 2) == (False, 3)
    assert check("join", 5, {5}, 6) == (True, 4)
    assert check("join", 5, {4, 5}, 6) == (False, 4)


@pytest.mark.cluster
def test_leave_of_a_dead_member_needs_only_the_others(make_cluster) -> None:
    """Replacing a dead machine: removing it from 3 needs the other two, not it."""
    c = make_cluster(3)
    leader = c.wait_leader()
    dead = next(n for n in c.ids if n != leader)
    c.kill(dead)
    r = run_cli(c.config_path, "leave", "--node", dead, timeout=90)
    assert r.returncode == 0, r.stderr
    rest = [n for n in c.ids if n != dead]
    new_leader = c.wait_leader(30, among=rest)
    code, text = c.submit(new_leader, ["after-dead-leave@example.com"], make_message(message_id="<dead-leave@x>"))
    assert code == 250, text
