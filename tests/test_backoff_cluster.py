"""Adaptive backoff on a real cluster: a receiver that answers 421 4.7.0 gets its limits lowered,
then is suspended (nothing is sent to it, across a leader kill), then recovers once its replies
are clean, and every recipient is delivered once."""
from __future__ import annotations

import re
import time
import urllib.request

import pytest

from cluster import deliveries_per_recipient, make_message, queued_as, run_cli, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(150)]

SUSPEND = 5.0
BACKOFF = (f'\n[delivery.backoff]\nstep_seconds = 0.5\nsuspend_level = 2\nsuspend_seconds = {SUSPEND}\n'
           'recover_after = 2\nrecover_seconds = 0.5\n'
           '\n[delivery.domains."throttle.test"]\nmax_connections = 4\n')


def backoff_of(c, nid: str) -> dict | None:
    st = c.status(nid)
    return None if st is None else st["backoff"].get("throttle.test", {})


def test_a_throttling_receiver_is_slowed_suspended_across_a_failover_and_recovers(make_cluster) -> None:
    # Twice 421 for every address: the first round slows, the second suspends. (With clean
    # replies in the second round, retry jitter decides whether they come first and step the
    # domain back before the 421s that would suspend it.)
    rcpts = [f"t{i}@throttle.test" for i in range(6)]
    replies = [f"{a}=421 4.7.0 Try again later, closing connection*2" for a in rcpts]
    c = make_cluster(replies=replies, extra_toml=BACKOFF)
    leader = c.wait_leader()
    code, text = c.submit(c.followers()[0], rcpts, make_message(campaign="throttled"))
    assert code == 250, text
    sid = queued_as(text)

    slowed = wait_for(lambda: (b := backoff_of(c, leader)) and b["level"] >= 1 and b, 30, "the domain to be slowed")
    assert slowed["max_connections"] <= 2 and "421" in slowed["reason"], slowed
    suspended = wait_for(lambda: (b := backoff_of(c, leader)) and b["suspended_for"] > 0 and b, 30,
                         "the domain to be suspended")
    suspended_at = time.monotonic()
    assert suspended["level"] == 2 and suspended["max_connections"] == 1, suspended
    rcpts_before = len(c.sink.events("rcpt"))

    # The suspension is replicated: a new leader keeps it.
    c.kill(leader)
    survivors = [n for n in c.ids if n != leader]
    new_leader = c.wait_leader(30, among=survivors)
    kept = backoff_of(c, new_leader)
    assert kept and kept["suspended_for"] > 0 and kept["level"] == 2, kept
    with urllib.request.urlopen(f"http://127.0.0.1:{c.admin[new_leader]}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert 'raftmail_backoff_level{site="throttle.test"} 2.0' in metrics
    assert re.search(r'raftmail_backoff_suspended_seconds\{site="throttle.test"\} [1-9]', metrics)
    r = run_cli(c.config_path, "status")
    assert r.returncode == 0 and "backoff: throttle.test level 2: suspended" in r.stdout, r.stdout + r.stderr
    # Nothing is sent to the domain while it is suspended (measured up to shortly before its end).
    while time.monotonic() < suspended_at + SUSPEND - 1.5:
        assert len(c.sink.events("rcpt")) == rcpts_before, "a RCPT reached the suspended domain"
        time.sleep(0.2)

    # After it: clean replies step it back to its configured limits; everyone delivered once.
    # (It may be suspended again first: addresses that were not tried yet still answer 421.)
    wait_for(lambda: backoff_of(c, new_leader) == {}, 60, "the domain to recover")
    wait_for(lambda: len(deliveries_per_recipient(c.sink)) == len(rcpts), 30, "every recipient delivered")
    assert deliveries_per_recipient(c.sink) == {a: 1 for a in rcpts}
    sub = c.submission(new_leader, sid)
    assert [r["state"] for r in sub["recipients"]] == ["delivered"] * len(rcpts)
    log = "".join(c.log_text(n) for n in c.ids)
    assert "backoff: throttle.test suspended" in log and "back to its configured limits" in log
