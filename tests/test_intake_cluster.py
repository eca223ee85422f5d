"""Issue 2 on a real 3-node cluster: replicated intake, failover, no quorum, catch-up."""
from __future__ import annotations

import pytest

from cluster import make_message, queued_as, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


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
