"""Batch leases on real node processes against a real capture sink: a receiver slower than the
lease, receivers that never answer or drop the final dot, a receiver answering 421 for a while,
a message that cannot be rendered, recipients past max_age, and nodes whose wall clocks are 10 s
apart (Debian's `faketime`, monotonic clock untouched) including a batch holder restarted at once.

Every check is on what the sink received against what the cluster counts:
duplicates <= reassigned_in_flight + fenced_reports + maybe_delivered (replicated counters)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cluster import (PY, Cluster, Sink, port_open, deliveries_per_recipient, libfaketime, make_message,
                     queued_as, set_config, skewed_launch, wait_for)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(150)]

LEASE = 4.0
SLOW_RECEIVER_LEASE = 2.5  # lease_send_margin (1 s) must stay under half of it
FINAL = {"delivered", "bounced", "suppressed", "cancelled", "expired"}
_ASSIGNED = re.compile(r"assigned batch (\S+) \((\d+) recipients of (\S+)\) to (\S+),")


class BehaviourSink(Sink):
    """`raftmail sink` with the receiver behaviours of these tests (delay, no reply after the
    final dot, 421 for a while)."""

    def __init__(self, root: Path, *options: str) -> None:
        super().__init__(root)
        self.options = list(options)

    def start(self) -> None:
        cmd = [PY, "-m", "raftmail.cli", "sink", "--listen", f"127.0.0.1:{self.port}",
               "--maildir", str(self.maildir), *self.options]
        self.log = open(self.root / "sink.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        wait_for(lambda: port_open(self.port), 15, "sink to listen")


@pytest.fixture
def clusters(tmp_path: Path):
    made: list[Cluster] = []

    def factory(*sink_options: str, skew: dict[str, int] | None = None, delivery: dict | None = None,
                extra_toml: str = "", lease: float = LEASE, retry_first: float = 0.5) -> Cluster:
        root = tmp_path / f"c{len(made)}"
        root.mkdir()
        sink = BehaviourSink(root, *sink_options)
        c = Cluster(root, launch={n: skewed_launch(s) for n, s in (skew or {}).items()}, sink=sink,
                    lease_seconds=lease, retry_first=retry_first, extra_toml=extra_toml)
        set_config(c, "delivery", **(delivery or {}))
        made.append(c)
        c.start_all_and_wait()
        return c

    yield factory
    for c in made:
        c.close()


# ---------------------------------------------------------------- helpers

def submit(c: Cluster, rcpts: list[str], message: bytes | None = None) -> str:
    code, text = c.submit(c.leader() or c.ids[0], rcpts, message or make_message(message_id="<lease@example.com>"))
    assert code == 250, text
    return queued_as(text)


def records(c: Cluster, sid: str) -> list[dict]:
    ld = c.wait_leader()
    return c.submission(ld, sid)["recipients"]


def wait_final(c: Cluster, sid: str, timeout: float = 60.0) -> list[dict]:
    def final():
        recs = records(c, sid)
        return recs if all(r["state"] in FINAL for r in recs) else None
    try:
        return wait_for(final, timeout, f"every recipient of {sid} in a final state", interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}: {[(r['address'], r['state'], r['attempts'], r['text']) for r in records(c, sid)]}"
                             f"; stats {stats(c)}") from None


def stats(c: Cluster) -> dict:
    return c.status(c.wait_leader())["stats"]


def counted_bound(s: dict) -> int:
    """Extra copies the cluster accounts for: every lease return or give-back, every report that
    came after its lease, every final dot that got no reply."""
    return s.get("reassigned_in_flight", 0) + s.get("fenced_reports", 0) + s.get("maybe_delivered", 0)


def copies(c: Cluster) -> dict[str, int]:
    return deliveries_per_recipient(c.sink)


def check_no_loss(c: Cluster, sid: str, recs: list[dict]) -> None:
    """Delivered means the sink has it; duplicates within what the cluster counted; replicas agree."""
    got = copies(c)
    for r in recs:
        if r["state"] == "delivered":
            assert got.get(r["address"], 0) >= 1, f"{r['address']} is delivered but the sink never got it"
    dups = sum(n - 1 for n in got.values() if n > 1)
    s = stats(c)
    assert dups <= counted_bound(s), f"{dups} duplicates, only {counted_bound(s)} counted: {got} {s}"
    c.wait_converged()


# ---------------------------------------------------------------- 1. receivers and leases

def test_receiver_slower_than_the_lease_gets_one_copy_per_recipient(clusters) -> None:
    """The final dot's reply takes 20 % longer than the lease: the holder keeps its lease while it
    waits, so nothing expires and each recipient gets exactly one copy. A shorter lease than the
    other tests' (still over twice the send margin), so the three slow replies take 9 s, not 14."""
    lease = SLOW_RECEIVER_LEASE
    c = clusters("--delay", str(lease * 1.2), lease=lease, delivery={"command_timeout": lease * 3})
    rcpts = ["ann@example.com", "bob@example.com", "cy@example.com"]
    sid = submit(c, rcpts)
    recs = wait_final(c, sid, timeout=lease * 1.2 * 3 + 30)
    assert [r["state"] for r in recs] == ["delivered"] * 3
    assert copies(c) == {r: 1 for r in rcpts}
    s = stats(c)
    assert s["lease_expiries"] == 0 and s["reassigned_in_flight"] == 0, s
    check_no_loss(c, sid, recs)


def test_receiver_that_never_answers_the_final_dot_is_maybe_delivered_and_bounded(clusters) -> None:
    c = clusters("--after-data", "hang", delivery={"command_timeout": 1.5, "max_maybe_delivered": 2})
    rcpts = ["ann@example.com", "bob@example.com"]
    sid = submit(c, rcpts)
    recs = wait_final(c, sid, timeout=60)
    assert [r["state"] for r in recs] == ["expired", "expired"]
    assert all(r["maybe_delivered"] == 2 and "maybe delivered" in r["text"] for r in recs), recs
    s = stats(c)
    assert s["maybe_delivered"] == 4, s
    assert all(n <= 2 for n in copies(c).values()), copies(c)  # one copy per unanswered final dot at most
    check_no_loss(c, sid, recs)


def test_receiver_that_drops_the_connection_after_the_final_dot(clusters) -> None:
    c = clusters("--after-data", "drop", "--after-data-times", "2", delivery={"max_maybe_delivered": 3})
    rcpts = ["ann@example.com", "bob@example.com", "cy@example.com"]
    sid = submit(c, rcpts)
    recs = wait_final(c, sid, timeout=60)
    assert [r["state"] for r in recs] == ["delivered"] * 3, recs
    check_no_loss(c, sid, recs)
    assert sum(copies(c).values()) == 3 + 2  # the two dropped copies arrived, and were counted
    assert stats(c)["maybe_delivered"] == 2


def test_receiver_answering_421_for_a_while_gets_everything_once(clusters) -> None:
    c = clusters("--unavailable-for", "3")
    rcpts = ["ann@example.com", "bob@example.com", "cy@example.com"]
    sid = submit(c, rcpts)
    recs = wait_final(c, sid, timeout=60)
    assert [r["state"] for r in recs] == ["delivered"] * 3, recs
    assert copies(c) == {r: 1 for r in rcpts}
    assert any(e.get("why") == "unavailable" for e in c.sink.events("refused"))
    check_no_loss(c, sid, recs)


# ---------------------------------------------------------------- 2. rendering, max_age

def test_message_that_cannot_be_rendered_bounces_once(clusters, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    c = clusters(extra_toml=f'[delivery.dkim]\ndomain = "example.com"\nselector = "s1"\nkey_file = "{key_file}"\n')
    no_from = b"To: list@example.com\r\nSubject: no sender header\r\nMessage-ID: <nofrom@example.com>\r\n\r\nHi\r\n"
    sid = submit(c, ["ann@example.com", "bob@example.com"], no_from)
    recs = wait_final(c, sid, timeout=20)
    assert [r["state"] for r in recs] == ["bounced", "bounced"], recs
    assert all(r["attempts"] == 1 and "cannot be rendered" in r["text"] for r in recs), recs
    assert copies(c) == {}
    events = c.get(c.wait_leader(), "/events?after=0")["events"]
    assert sum(1 for e in events if e["outcome"] == "bounced" and "cannot be rendered" in e["text"]) == 2


def test_waiting_recipients_expire_after_max_age(clusters) -> None:
    """Recipients held back by a throttle never get an attempt: max_age still ends them."""
    c = clusters(delivery={"max_age": 6}, extra_toml='[delivery.domains."example.com"]\nmax_per_minute = 1\n')
    rcpts = ["ann@example.com", "bob@example.com", "cy@example.com"]
    sid = submit(c, rcpts)
    recs = wait_final(c, sid, timeout=30)
    assert sorted(r["state"] for r in recs) == ["delivered", "expired", "expired"], recs
    assert all("max_age" in r["text"] for r in recs if r["state"] == "expired")
    check_no_loss(c, sid, recs)


# ---------------------------------------------------------------- 3. clocks that disagree

def holder_not_leader(c: Cluster, node: str) -> str:
    """Make sure `node` is a follower (move leadership off it) and every node takes batches;
    return the leader."""
    for nid in c.ids:
        wait_for(lambda nid=nid: (c.status(nid) or {}).get("takes_batches"), 20, f"{nid} to take batches")
    c.wait_leader()
    return c.hand_leadership(away_from=node)


@pytest.mark.skipif(libfaketime() is None, reason="needs libfaketime (Debian's faketime)")
@pytest.mark.parametrize("skew", [10, -10], ids=["leader_ahead", "leader_behind"])
def test_wall_clocks_10s_apart_change_nothing(clusters, skew: int) -> None:
    """n1 and n2 (the leader among them) run 10 s off n3's wall clock; every batch, n3's
    included, needs a renewal (the receiver takes 1.5 s per message, 3 per batch, lease 4 s)."""
    c = clusters("--delay", "1.5", skew={"n1": skew, "n2": skew}, delivery={"batch_size": 3})
    holder_not_leader(c, "n3")
    rcpts = [f"r{i}@d{d}.example" for d in range(3) for i in range(3)]
    sid = submit(c, rcpts)
    recs = wait_final(c, sid, timeout=60)
    assert [r["state"] for r in recs] == ["delivered"] * len(rcpts), recs
    got = copies(c)
    s = stats(c)
    assert s["lease_expiries"] == 0, f"a healthy holder lost its lease: {s}"
    assert got == {r: 1 for r in rcpts}, got
    holders = {m.group(4) for nid in c.ids for m in _ASSIGNED.finditer(c.log_text(nid))}
    assert "n3" in holders, f"n3 (the other clock) held no batch: {holders}"
    check_no_loss(c, sid, recs)


@pytest.mark.skipif(libfaketime() is None, reason="needs libfaketime (Debian's faketime)")
def test_holder_restarted_at_once_while_the_leaders_clock_is_ahead(clusters) -> None:
    """n3 holds a batch and is SIGKILLed mid-batch with outcomes not yet reported, then started
    again at once; the leader's wall clock is 10 s ahead of n3's. The new process must not resume
    its previous process's batch: that batch goes back to the queue, counted."""
    c = clusters("--delay", "0.5", skew={"n1": 10, "n2": 10}, lease=8.0,
                 delivery={"report_interval": 5.0, "batch_size": 6})
    holder_not_leader(c, "n3")
    rcpts = [f"r{i}@d{d}.example" for d in range(3) for i in range(6)]
    sid = submit(c, rcpts)

    def n3_domain():
        for nid in c.ids:
            for m in _ASSIGNED.finditer(c.log_text(nid)):
                if m.group(4) == "n3":
                    return m.group(3)
        return None
    domain = wait_for(n3_domain, 20, "a batch for n3")
    wait_for(lambda: sum(n for a, n in copies(c).items() if a.endswith("@" + domain)) >= 2, 20,
             f"n3 to send two of {domain}")
    c.kill("n3")
    c.start("n3")
    recs = wait_final(c, sid, timeout=90)
    assert [r["state"] for r in recs] == ["delivered"] * len(rcpts), recs
    got = copies(c)
    assert set(got) == set(rcpts)
    check_no_loss(c, sid, recs)
    s = stats(c)
    assert s.get("batches_abandoned", 0) >= 1, s


def test_holder_cut_off_from_the_cluster_sends_nothing_after_its_lease(clusters) -> None:
    """The batch holder loses every peer (both SIGSTOPped) mid-batch: it cannot renew, so it stops
    before its lease ends; once the cluster is back, every recipient ends once-or-counted."""
    import signal
    import time
    c = clusters("--delay", "0.3", delivery={"batch_size": 50})
    rcpts = [f"r{i:02d}@example.com" for i in range(30)]
    sid = submit(c, rcpts)

    def holder():
        for nid in c.ids:
            for m in _ASSIGNED.finditer(c.log_text(nid)):
                return m.group(4)
        return None
    node = wait_for(holder, 20, "the batch to be assigned")
    wait_for(lambda: sum(copies(c).values()) >= 3, 20, "the holder to be sending")
    others = [n for n in c.ids if n != node]
    cut = time.time()  # the sink stamps its log on this machine's wall clock too
    for n in others:
        c.signal(n, signal.SIGSTOP)
    try:
        # Its last renewal was sent before the cut, so its lease ends before cut + LEASE; the last
        # copy may still be in the receiver's 0.3 s delay then.
        limit = cut + LEASE + 0.3 + 0.2
        deadline = time.monotonic() + LEASE + 2.0
        while time.monotonic() < deadline:
            late = [e for e in c.sink.delivered() if e["t"] > limit]
            assert not late, f"{len(late)} copies reached the receiver after {node}'s lease ended: {late[:3]}"
            time.sleep(0.1)
        sent_while_cut = [e for e in c.sink.delivered() if e["t"] > cut]
        assert len(sent_while_cut) < len(rcpts) - 3, "the holder went on sending although cut off"
    finally:
        for n in others:
            c.signal(n, signal.SIGCONT)
    recs = wait_final(c, sid, timeout=60)
    assert [r["state"] for r in recs] == ["delivered"] * len(rcpts), recs
    check_no_loss(c, sid, recs)
