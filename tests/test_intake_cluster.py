"""A real 3-node cluster: replicated intake, failover, no quorum, catch-up."""
from __future__ import annotations

import hashlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster import (SMTPSession, make_message, queued_as, submission_count, wait_converged_explained,
                     wait_for)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

NO_QUORUM_MARGIN = 2.0  # seconds past commit_timeout for the 451: SMTP round trips on a busy host


def test_submission_to_follower_is_committed_everywhere(make_cluster) -> None:
    c = make_cluster(sink=False)
    follower = c.followers()[0]
    msg = make_message(message_id="<f1@example.com>")
    code, text = c.submit(follower, ["a@example.com", "b@example.net"], msg)
    assert code == 250, text
    sid = queued_as(text)
    for nid in c.ids:
        sub = wait_for(lambda nid=nid: c.submission(nid, sid), 10, f"{sid} on {nid}")
        assert [r["address"] for r in sub["recipients"]] == ["a@example.com", "b@example.net"]
    holders = [nid for nid in c.ids if c.submission(nid, sid)["body_here"]]
    assert len(holders) >= 2
    digest = c.submission(c.ids[0], sid)["body"]
    for nid in holders:
        path = c.data_dir(nid) / "bodies" / digest[:2] / digest
        assert path.read_bytes() == msg


def retry_until_250(c, nids: list[str], rcpts: list[str], message: bytes, timeout: float) -> tuple[str, str, float]:
    """A client's retry loop: same message, same sender, over `nids` in turn, until one answers
    250. Returns (node, reply text, seconds taken). 4xx and refused connections are retried."""
    start = time.monotonic()
    deadline = start + timeout
    replies = []
    while time.monotonic() < deadline:
        for nid in nids:
            code, text = c.submit(nid, rcpts, message, timeout=10)
            if code == 250:
                return nid, text, time.monotonic() - start
            assert code in (0, 421, 451), (nid, code, text)  # never a permanent refusal
            replies.append((nid, code, text))
        time.sleep(0.1)  # pacing between client retries, not synchronisation
    raise AssertionError(f"no 250 within {timeout}s; last replies {replies[-4:]}")


def test_leader_sigkill_survivors_elect_a_new_leader_and_keep_answering_250(make_cluster) -> None:
    c = make_cluster()
    old = c.leader()
    survivors = [n for n in c.ids if n != old]
    killed_at = time.monotonic()
    c.kill(old)
    first = make_message(message_id="<failover-first@example.com>")
    nid, text, _ = retry_until_250(c, survivors, ["a@example.com"], first, 30)
    failover = time.monotonic() - killed_at
    print(f"\nfailover: leader {old} SIGKILLed, first 250 from {nid} after {failover:.2f}s")
    new = c.wait_leader(20, among=survivors)
    assert new != old
    sids = [queued_as(text)]
    for nid in survivors:
        msg = make_message(message_id=f"<failover-{nid}@example.com>")
        code, text = c.submit(nid, ["b@example.com"], msg)
        assert code == 250, (nid, text)
        sids.append(queued_as(text))
    c.wait_converged(survivors)
    for nid in survivors:
        for sid in sids:
            assert c.submission(nid, sid) is not None, (nid, sid)
    assert failover < 15


@pytest.mark.parametrize("fault", ["sigkill", "sigstop"])
def test_no_quorum_answers_451_then_the_same_retry_is_stored_once(make_cluster, fault: str) -> None:
    """SIGKILL: peers refuse connections at once. SIGSTOP: peers accept and never answer, so the
    intake must give up on its own deadline, commit_timeout."""
    commit_timeout = 3.0
    c = make_cluster(commit_timeout=commit_timeout)
    survivor = c.leader()
    down = [n for n in c.ids if n != survivor]
    before = submission_count(c, survivor)
    for nid in down:
        if fault == "sigkill":
            c.kill(nid)
        else:
            c.signal(nid, signal.SIGSTOP)
    msg = make_message(message_id="<no-quorum@example.com>")
    started = time.monotonic()
    code, text = c.submit(survivor, ["q@example.com"], msg)
    took = time.monotonic() - started
    print(f"\nwith 2 of 3 down ({fault}): {code} after {took:.2f}s ({text})")
    assert code == 451, text
    assert "4.3.0" in text
    assert took <= commit_timeout + NO_QUORUM_MARGIN
    assert submission_count(c, survivor) == before

    if fault == "sigkill":
        c.start(down[0])
    else:
        c.signal(down[0], signal.SIGCONT)
    _, text, took = retry_until_250(c, [survivor], ["q@example.com"], msg, 40)
    print(f"{down[0]} back: the retry got 250 after {took:.2f}s ({text})")
    sid = queued_as(text)
    live = [survivor, down[0]]
    wait_converged_explained(c, live)
    for nid in live:
        assert c.submission(nid, sid) is not None, nid
        assert submission_count(c, nid) == before + 1, nid
    # Once more, as a client that never saw the 250 would: still one submission.
    code, text = c.submit(down[0], ["q@example.com"], msg)
    assert code == 250 and queued_as(text) == sid, text
    wait_converged_explained(c, live)
    assert submission_count(c, survivor) == before + 1


def submit_with_retries(c, jobs: list[tuple[str, list[str], bytes]], threads: int,
                        per_job_timeout: float = 30.0) -> list[str]:
    """Submit (node, recipients, message) jobs from `threads` client threads, each reusing one
    connection per node and retrying 4xx until 250; returns the reply texts in job order."""
    replies: list[str | None] = [None] * len(jobs)
    lock = threading.Lock()
    todo = iter(range(len(jobs)))

    def client() -> None:
        sessions = {nid: SMTPSession(c, nid) for nid in c.ids}
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                nid, rcpts, message = jobs[i]
                deadline = time.monotonic() + per_job_timeout
                code, text = sessions[nid].send(rcpts, message)
                while code != 250 and time.monotonic() < deadline:
                    assert code in (0, 421, 451, 452), (nid, code, text)
                    code, text = sessions[nid].send(rcpts, message)
                assert code == 250, (nid, code, text)
                replies[i] = text
        finally:
            for session in sessions.values():
                session.close()
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(client) for _ in range(threads)]:
            f.result()
    return [r for r in replies if r is not None]


def test_node_down_during_1000_submissions_catches_up_with_every_body(make_cluster) -> None:
    # Every delivery is deferred for minutes, so every submission stays unfinished and every
    # node must hold every body (bodies of finished submissions are not fetched on catch-up).
    c = make_cluster(replies=["*=451 4.3.0 not now"], retry_first=300)
    down = c.followers()[0]
    live = [n for n in c.ids if n != down]
    c.kill(down)
    messages = [make_message(message_id=f"<bulk-{i}@example.com>", body=f"Submission {i}.\n")
                for i in range(1000)]
    jobs = [(live[i % 2], [f"r{i}@example.com"], m) for i, m in enumerate(messages)]
    started = time.monotonic()
    replies = submit_with_retries(c, jobs, threads=8)
    print(f"\n1000 submissions accepted by {live} in {time.monotonic() - started:.1f}s while {down} was down")
    assert len(replies) == 1000
    sids = [queued_as(text) for text in replies]
    assert len(set(sids)) == 1000
    leader = c.wait_leader(10, among=live)
    target = c.status(leader)["commit_index"]
    digests = {hashlib.sha256(m).hexdigest() for m in messages}

    restarted = time.monotonic()
    c.start(down)

    def applied() -> bool:
        st = c.status(down)
        return bool(st) and st["applied_index"] >= target
    wait_for(applied, 60, f"{down} to apply index {target}", interval=0.1)
    log_done = time.monotonic() - restarted

    def bodies_here() -> bool:
        return all((c.data_dir(down) / "bodies" / d[:2] / d).exists() for d in digests)
    wait_for(bodies_here, 60, f"{down} to hold all 1000 bodies", interval=0.2)
    print(f"{down} restarted: applied index {target} after {log_done:.1f}s, "
          f"every body after {time.monotonic() - restarted:.1f}s")

    wait_converged_explained(c)
    assert c.status(down)["applied_index"] >= target
    assert submission_count(c, down) == submission_count(c, leader) == 1000
    for i in range(0, 1000, 97):
        d = hashlib.sha256(messages[i]).hexdigest()
        assert (c.data_dir(down) / "bodies" / d[:2] / d).read_bytes() == messages[i]
        assert c.submission(down, sids[i])["body"] == d
