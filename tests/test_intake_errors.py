"""Bad SMTP input on a real 3-node cluster. Each gets its reply code, nothing is queued
for it, and the same node keeps serving the next client."""
from __future__ import annotations

import smtplib
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from cluster import Cluster, Sink, make_message, queued_as, set_config, submission_count, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]

MAX_RECIPIENTS = 5
MAX_MESSAGE_BYTES = 20_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("errors")
    c = Cluster(root, 3, sink=Sink(root))
    set_config(c, "intake", max_recipients=MAX_RECIPIENTS, max_message_bytes=MAX_MESSAGE_BYTES)
    try:
        c.start_all_and_wait()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def node(cluster: Cluster) -> str:
    """All bad input goes to one follower, the node whose resilience is under test."""
    return cluster.followers()[0]


def open_session(c: Cluster, nid: str) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", c.smtp[nid], timeout=15)
    s.ehlo("client.test")
    return s


def assert_serves_next_client(c: Cluster, nid: str, tag: str) -> str:
    """A well-formed submission right after the bad one is queued as usual."""
    before = submission_count(c, nid)
    code, text = c.submit(nid, ["next@example.com"], make_message(message_id=f"<next-{tag}-{uuid.uuid4().hex}@example.com>"))
    assert code == 250, text
    sid = queued_as(text)
    wait_for(lambda: c.submission(nid, sid), 10, f"{sid} applied on {nid}")
    assert submission_count(c, nid) == before + 1
    return sid


def test_oversized_message_gets_552(cluster: Cluster, node: str) -> None:
    before = submission_count(cluster, node)
    big = make_message(message_id="<big@example.com>", size=MAX_MESSAGE_BYTES * 2)
    code, text = cluster.submit(node, ["big@example.com"], big)
    assert code == 552, text
    assert "5.3.4" in text
    assert submission_count(cluster, node) == before
    assert_serves_next_client(cluster, node, "oversized")


def test_size_parameter_over_limit_gets_552_at_mail(cluster: Cluster, node: str) -> None:
    with open_session(cluster, node) as s:
        assert s.has_extn("size") and int(s.esmtp_features["size"]) == MAX_MESSAGE_BYTES
        code, text = s.mail("news@example.com", [f"SIZE={MAX_MESSAGE_BYTES + 1}"])
        assert code == 552, text
        assert b"5.3.4" in text
        # The same session may still send a message that declares a size within the limit.
        code, text = s.mail("news@example.com", [f"SIZE={MAX_MESSAGE_BYTES // 2}"])
        assert code == 250, text
    assert_serves_next_client(cluster, node, "size-param")


def test_recipients_over_the_limit_get_452_from_the_first_one_over(cluster: Cluster, node: str) -> None:
    rcpts = [f"r{i}@example.com" for i in range(MAX_RECIPIENTS + 2)]
    with open_session(cluster, node) as s:
        assert s.mail("news@example.com")[0] == 250
        replies = [s.rcpt(r) for r in rcpts]
        codes = [code for code, _ in replies]
        assert codes == [250] * MAX_RECIPIENTS + [452, 452], replies
        assert b"4.5.3" in replies[MAX_RECIPIENTS][1]
        code, text = s.data(make_message(message_id="<many@example.com>"))
        assert code == 250, text
    sub = wait_for(lambda: cluster.submission(node, queued_as(text.decode())), 10, "the capped submission")
    # Only the recipients that got 250 are queued; the client retries the rest in a new transaction.
    assert [r["address"] for r in sub["recipients"]] == rcpts[:MAX_RECIPIENTS]
    assert_serves_next_client(cluster, node, "rcpt-limit")


@pytest.mark.parametrize("command, codes", [
    ("RCPT TO:<no-at-sign>", {553}),
    ("RCPT TO:<user@nodot>", {553}),
    ("RCPT TO:<a@b@example.com>", {501, 553}),
    ("RCPT TO:garbage <", {501}),
])
def test_malformed_recipient_is_refused(cluster: Cluster, node: str, command: str, codes: set[int]) -> None:
    with open_session(cluster, node) as s:
        assert s.mail("news@example.com")[0] == 250
        code, text = s.docmd(command)
        assert code in codes, (command, code, text)
        # The refusal did not poison the transaction: a good recipient still completes it.
        assert s.rcpt("ok@example.com")[0] == 250
        code, text = s.data(make_message(message_id=f"<after-{uuid.uuid4().hex}@example.com>"))
        assert code == 250, text
    assert_serves_next_client(cluster, node, "bad-rcpt")


@pytest.mark.parametrize("command, codes", [
    ("MAIL FROM:<nobody>", {553}),
    ("MAIL FROM:<a@b@example.com>", {501, 553}),
    ("MAIL FROM:", {501}),
])
def test_malformed_sender_is_refused(cluster: Cluster, node: str, command: str, codes: set[int]) -> None:
    with open_session(cluster, node) as s:
        code, text = s.docmd(command)
        assert code in codes, (command, code, text)
        assert s.docmd("RCPT TO:<x@example.com>")[0] == 503  # no sender was recorded
    assert_serves_next_client(cluster, node, "bad-sender")


def test_null_sender_gets_553(cluster: Cluster, node: str) -> None:
    with open_session(cluster, node) as s:
        code, text = s.docmd("MAIL FROM:<>")
        assert code == 553, text
        assert b"5.1.7" in text
    assert_serves_next_client(cluster, node, "null-sender")


def test_disconnect_in_the_middle_of_data_commits_nothing(cluster: Cluster, node: str) -> None:
    cluster.wait_converged()
    before = {n: submission_count(cluster, n) for n in cluster.ids}
    with socket.create_connection(("127.0.0.1", cluster.smtp[node]), timeout=10) as sock:
        f = sock.makefile("rb")

        def command(line: bytes) -> bytes:
            sock.sendall(line + b"\r\n")
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            return reply

        assert f.readline().startswith(b"220")
        assert command(b"EHLO client.test").startswith(b"250")
        assert command(b"MAIL FROM:<news@example.com>").startswith(b"250")
        assert command(b"RCPT TO:<cut@example.com>").startswith(b"250")
        assert command(b"DATA").startswith(b"354")
        half = make_message(message_id="<cut@example.com>", size=4000)
        sock.sendall(half[: len(half) // 2])  # no final dot: the client vanishes mid-message
    sid = assert_serves_next_client(cluster, node, "after-cut")
    cluster.wait_converged()
    for n in cluster.ids:
        assert submission_count(cluster, n) == before[n] + 1, n
        assert cluster.submission(n, sid) is not None


def test_node_serves_normally_after_all_bad_input(cluster: Cluster, node: str) -> None:
    assert cluster.alive(node)
    msg = make_message(message_id="<final@example.com>")
    code, text = cluster.submit(node, ["final@example.com", "final@example.net"], msg)
    assert code == 250, text
    sid = queued_as(text)
    cluster.wait_converged()
    for n in cluster.ids:
        sub = cluster.submission(n, sid)
        assert sub is not None and [r["address"] for r in sub["recipients"]] == \
            ["final@example.com", "final@example.net"]
    assert cluster.status(node)["intake"]["refused_451"] == 0
