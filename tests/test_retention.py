"""Bounded state: finished submissions shed their bodies and per-recipient detail after
the retention, keeping the counts and a compact record of each recipient's final state."""
from __future__ import annotations

import pytest

from cluster import make_message, queued_as, set_config, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def test_finished_submissions_are_archived_and_their_bodies_removed(make_cluster) -> None:
    c = make_cluster(start=False)
    set_config(c, "storage", body_retention_seconds=2.0, maintenance_interval_seconds=1.0,
               body_gc_grace_seconds=1.0)
    leader = c.start_all_and_wait()
    code, text = c.submit(leader, ["a@example.com", "b@example.com"], make_message(message_id="<ret@x>"))
    assert code == 250, text
    sid = queued_as(text)
    digest = c.submission(leader, sid)["body"]
    wait_for(lambda: c.queue(leader)["delivered"] == 2, 30, "delivery")
    # Archived: no per-recipient detail any more, the counts stay.
    wait_for(lambda: c.submission(leader, sid) is None, 30, "the submission to be archived")
    assert c.queue(leader)["delivered"] == 2
    campaigns = c.get(leader, "/campaigns")["campaigns"]
    assert campaigns and campaigns[0]["counts"]["delivered"] == 2
    # The body is gone from every node's store.
    for n in c.ids:
        path = c.data_dir(n) / "bodies" / digest[:2] / digest
        wait_for(lambda path=path: not path.exists(), 30, f"the body to leave {n}")
    c.wait_converged()
