"""BodyStore: content-addressed, write-once, verified on read."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import zlib
from pathlib import Path

import pytest

from raftmail.node.bodies import BodyStore, is_digest

pytestmark = pytest.mark.timeout(30)

NEWSLETTER = b"Subject: Spring sale\r\n\r\nEverything must go.\r\n"
RECEIPT = b"Subject: Your receipt\r\n\r\nThanks for your order.\r\n" * 50


def body_path(root: Path, digest: str) -> Path:
    return root / digest[:2] / digest


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def test_round_trip_and_layout(tmp_path: Path) -> None:
    store = BodyStore(tmp_path / "bodies", fsync=True)
    digest = store.put(NEWSLETTER)
    assert digest == hashlib.sha256(NEWSLETTER).hexdigest()
    assert body_path(tmp_path / "bodies", digest).read_bytes() == NEWSLETTER
    assert store.has(digest)
    assert store.get(digest) == NEWSLETTER
    assert list(store.digests()) == [digest]


def test_missing_body(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    absent = hashlib.sha256(b"never stored").hexdigest()
    assert store.get(absent) is None
    assert not store.has(absent)
    assert store.delete(absent) is False
    assert store.age_seconds(absent) is None


def test_write_once_keeps_existing_file(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    digest = store.put(NEWSLETTER)
    inode = body_path(tmp_path, digest).stat().st_ino
    assert store.put(NEWSLETTER) == digest
    store.put_verified(digest, NEWSLETTER)
    # The valid file was left in place, not rewritten.
    assert body_path(tmp_path, digest).stat().st_ino == inode
    assert store.stats() == (1, len(NEWSLETTER))


def test_put_repairs_a_corrupt_file(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    digest = store.put(NEWSLETTER)
    body_path(tmp_path, digest).write_bytes(b"rotten")
    store.put(NEWSLETTER)
    assert store.get(digest) == NEWSLETTER


def test_put_refreshes_age(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    digest = store.put(NEWSLETTER)
    old = time.time() - 3600
    os.utime(body_path(tmp_path, digest), (old, old))
    assert store.age_seconds(digest) >= 3600
    store.put(NEWSLETTER)
    assert store.age_seconds(digest) < 60


def test_corrupt_file_is_detected_and_removed(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    digest = store.put(RECEIPT)
    path = body_path(tmp_path, digest)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert store.get(digest) is None
    assert not path.exists()
    assert not store.has(digest)


def test_put_verified_rejects_mismatch(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    claimed = hashlib.sha256(NEWSLETTER).hexdigest()
    with pytest.raises(ValueError):
        store.put_verified(claimed, RECEIPT)
    assert not store.has(claimed)
    assert store.stats() == (0, 0)


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "A" * 64,
        "0" * 63,
        "0" * 65,
        "0" * 64 + "\n",
        "../" + "0" * 61,
        "",
    ],
)
def test_invalid_digest_rejected(tmp_path: Path, bad: str) -> None:
    store = BodyStore(tmp_path, fsync=False)
    assert not is_digest(bad)
    for call in (store.get, store.has, store.delete, store.age_seconds):
        with pytest.raises(ValueError):
            call(bad)
    with pytest.raises(ValueError):
        store.put_verified(bad, NEWSLETTER)


def test_is_digest() -> None:
    assert is_digest(hashlib.sha256(b"x").hexdigest())
    assert not is_digest(hashlib.sha256(b"x").hexdigest().upper())
    assert not is_digest(None)  # type: ignore[arg-type]


def test_leftover_temp_files_cleaned_at_start(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    digest = store.put(NEWSLETTER)
    shard = tmp_path / digest[:2]
    (shard / ".tmp-crashed").write_bytes(b"half a bo")
    (tmp_path / "ff").mkdir(exist_ok=True)
    (tmp_path / "ff" / ".tmp-other").write_bytes(b"")
    assert len(temp_files(tmp_path)) == 2
    reopened = BodyStore(tmp_path, fsync=False)
    assert temp_files(tmp_path) == []
    assert reopened.get(digest) == NEWSLETTER
    assert list(reopened.digests()) == [digest]


def test_stats_and_delete(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    assert store.stats() == (0, 0)
    a = store.put(NEWSLETTER)
    b = store.put(RECEIPT)
    assert store.stats() == (2, len(NEWSLETTER) + len(RECEIPT))
    assert sorted(store.digests()) == sorted([a, b])
    assert store.delete(a) is True
    assert store.stats() == (1, len(RECEIPT))
    assert store.get(a) is None


def test_stray_files_are_not_bodies(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    digest = store.put(NEWSLETTER)
    (tmp_path / "README").write_text("not a body")
    # A digest-named file in the wrong shard is not reachable by get(), so it is not listed.
    other = hashlib.sha256(b"elsewhere").hexdigest()
    wrong_shard = "00" if not other.startswith("00") else "01"
    (tmp_path / wrong_shard).mkdir(exist_ok=True)
    (tmp_path / wrong_shard / other).write_bytes(b"elsewhere")
    assert list(store.digests()) == [digest]


def test_concurrent_puts_of_the_same_body(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=True)
    body = os.urandom(256 * 1024)
    start = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            start.wait()
            for _ in range(5):
                results.append(store.put(body))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(results) == {hashlib.sha256(body).hexdigest()}
    assert store.get(results[0]) == body
    assert temp_files(tmp_path) == []
    assert store.stats() == (1, len(body))


def test_concurrent_put_and_get_never_returns_wrong_bytes(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    body = os.urandom(64 * 1024)
    digest = hashlib.sha256(body).hexdigest()
    stop = threading.Event()
    seen: list[bytes | None] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.get(digest))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(50):
            store.put(body)
            store.delete(digest)
    finally:
        stop.set()
        t.join()
    assert seen, "reader never ran"
    assert all(got in (None, body) for got in seen)


# -- put_many_verified: one call for a pushed batch ------------------------------------------


def campaign_bodies(n: int) -> list[tuple[str, bytes]]:
    bodies = [b"Subject: Offer %d\r\n\r\n" % i + os.urandom(100 + i) for i in range(n)]
    return [(hashlib.sha256(b).hexdigest(), b) for b in bodies]


def test_put_many_verified_stores_every_body(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=True)
    batch = campaign_bodies(40)
    store.put_many_verified(batch)
    for digest, data in batch:
        assert body_path(tmp_path, digest).read_bytes() == data
        assert store.get(digest) == data
    assert store.stats() == (40, sum(len(d) for _, d in batch))
    assert temp_files(tmp_path) == []


def test_put_many_verified_checks_everything_before_writing(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    batch = campaign_bodies(5)
    substituted = batch[:2] + [(batch[2][0], b"a substituted body")] + batch[3:]
    with pytest.raises(ValueError):
        store.put_many_verified(substituted)
    with pytest.raises(ValueError):
        store.put_many_verified(batch[:2] + [("../../etc/passwd", b"x")])
    # Not even the bodies before the bad one were written.
    assert store.stats() == (0, 0)
    assert list(tmp_path.iterdir()) == []


def test_put_many_verified_keeps_existing_files_and_refreshes_age(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    batch = campaign_bodies(3)
    digest, data = batch[0]
    store.put(data)
    path = body_path(tmp_path, digest)
    inode = path.stat().st_ino
    old = time.time() - 3600
    os.utime(path, (old, old))
    store.put_many_verified(batch + [batch[0]])  # already stored, and twice in the batch
    assert path.stat().st_ino == inode
    age = store.age_seconds(digest)
    assert age is not None and age < 60
    assert store.stats() == (3, sum(len(d) for _, d in batch))


def recorded_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths fsynced from now on (the disk is really synced)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def test_put_many_verified_fsyncs_each_file_and_each_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BodyStore(tmp_path / "bodies", fsync=True)
    batch = campaign_bodies(60)  # 60 bodies over 256 shards: some shards get several
    shards = {digest[:2] for digest, _ in batch}
    assert len(shards) < len(batch)
    synced = recorded_fsyncs(monkeypatch)
    store.put_many_verified(batch)
    root = str(tmp_path / "bodies")
    dirs = [p for p in synced if os.path.isdir(p)]
    files = [p for p in synced if not os.path.isdir(p)]
    assert len(files) == len(batch)  # temp files, fsynced before their rename
    # Each shard once, and the root once per shard that had to be created.
    assert sorted(p for p in dirs if p != root) == sorted(f"{root}/{s}" for s in shards)
    assert dirs.count(root) == len(shards)


def test_a_shard_found_existing_is_made_durable_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A crashed run (or another writer) may have made the shard without syncing the root: the
    # first body this store puts there syncs the root before it is acknowledged, later ones not.
    store = BodyStore(tmp_path, fsync=True)
    digest = hashlib.sha256(NEWSLETTER).hexdigest()
    (tmp_path / digest[:2]).mkdir()
    synced = recorded_fsyncs(monkeypatch)
    store.put(NEWSLETTER)
    assert synced.count(str(tmp_path)) == 1
    same_shard = next(
        b for b in (b"%d" % i for i in range(10_000))
        if hashlib.sha256(b).hexdigest()[:2] == digest[:2]
    )
    store.put(same_shard)
    assert synced.count(str(tmp_path)) == 1
    assert synced.count(str(tmp_path / digest[:2])) == 2  # each rename made durable


def test_body_files_are_private(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=False)
    digest = store.put(NEWSLETTER)
    assert body_path(tmp_path, digest).stat().st_mode & 0o077 == 0


def test_a_shard_removed_behind_the_stores_back_is_made_again(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, fsync=True)
    digest = store.put(NEWSLETTER)
    store.delete(digest)
    (tmp_path / digest[:2]).rmdir()
    assert store.put(NEWSLETTER) == digest
    assert store.get(digest) == NEWSLETTER


def test_recent_bodies_are_served_from_a_bounded_cache(tmp_path: Path) -> None:
    store = BodyStore(tmp_path, cache_bytes=40_000)
    bodies = [bytes([i]) * 4000 for i in range(20)]
    digests = [store.put(b) for b in bodies]
    cached = [d for d in digests if store.recent(d) is not None]
    assert cached == digests[-10:]  # the newest, within 40 000 bytes
    assert store._cache_bytes <= 40_000
    assert store.get(digests[0]) == bodies[0]  # from disk, and now cached again
    assert store.recent(digests[0]) == bodies[0]
    store.delete(digests[-1])
    assert store.recent(digests[-1]) is None and store.get(digests[-1]) is None
    big = b"x" * 20_000  # more than a quarter of the cache: never cached
    assert store.recent(store.put(big)) is None
    assert BodyStore(tmp_path / "off").recent(BodyStore(tmp_path / "off").put(b"hi")) is None


# -- collection and repair ----------------------------------------------------------------------

def test_collection_keeps_referenced_and_young_bodies(tmp_path: Path) -> None:
    from raftmail.node.bodies import collect_unreferenced
    store = BodyStore(tmp_path, fsync=False)
    live, old, young = store.put(b"live"), store.put(b"old"), store.put(b"young")
    for digest in (live, old):
        past = time.time() - 7200
        os.utime(body_path(tmp_path, digest), (past, past))
    assert collect_unreferenced(store, {live}, grace=3600) == 1
    assert store.has(live) and store.has(young) and not store.has(old)


def test_a_body_archived_then_stored_again_is_not_collected_before_it_is_applied(tmp_path: Path) -> None:
    """The same bytes as an archived submission arrive again: stored, not yet committed. The
    replicated state references no live submission with that body, so only the grace (the put
    refreshed the file's age) keeps the copy the new submission needs."""
    from raftmail.consensus.state import MailState
    from raftmail.node.bodies import collect_unreferenced
    from test_state import outcome, prune_cmd, report_cmd, assign_cmd, submit_cmd

    store = BodyStore(tmp_path, fsync=False)
    data = b"Subject: spring\r\n\r\nsale\r\n"
    digest = store.put(data)
    past = time.time() - 10 * 86400
    os.utime(body_path(tmp_path, digest), (past, past))
    state = MailState()
    sub = {"id": "s1", "campaign": "c", "sender": "a@x.test", "body": digest, "size": len(data),
           "rcpts": ["r@x.test"]}
    t = past
    state.apply(submit_cmd(t, sub))
    bid = state.apply(assign_cmd("n1", "x.test", [("s1", 0)], t + 1))["batch"]
    state.apply(report_cmd("n1", bid, t + 2, [outcome("s1", 0, 250)]))
    state.apply(prune_cmd(t + 7200))
    assert "s1" in state.archived and digest not in state.body_refs
    store.put(data)  # a new submission of identical bytes, stored, its commit not yet applied
    assert collect_unreferenced(store, set(state.body_refs), grace=3600) == 0
    assert store.get(digest) == data
    state.apply(submit_cmd(time.time(), {**sub, "id": "s2"}))
    assert digest in state.body_refs  # from here on the reference keeps it, whatever its age


def _queue(state, store: BodyStore, ids: range, *, stored: bool = True, t: float = 1000.0) -> list[str]:
    """One submission per id, each with a body of its own (in `store` unless not `stored`)."""
    from test_state import submit_cmd
    digests = []
    for i in ids:
        data = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
        digest = store.put(data) if stored else hashlib.sha256(data).hexdigest()
        state.apply(submit_cmd(t, {"id": f"s{i}", "campaign": "c", "sender": "a@x.test", "body": digest,
                                   "size": len(data), "rcpts": [f"r{i}@x.test"]}))
        digests.append(digest)
    return digests


def _repair_pass(repair, state) -> list[str]:
    return repair.missing(repair.state_read()(state))


def test_repair_fetches_again_a_body_lost_after_it_was_seen(tmp_path: Path) -> None:
    from raftmail.consensus.state import MailState
    from raftmail.node.bodies import BodyRepair
    store, state = BodyStore(tmp_path, fsync=False), MailState()
    digests = _queue(state, store, range(5))
    absent = _queue(state, store, range(5, 6), stored=False)[0]
    repair = BodyRepair(store, recheck_per_pass=2)
    assert _repair_pass(repair, state) == [absent]
    body_path(tmp_path, digests[3]).unlink()
    body_path(tmp_path, digests[1]).write_bytes(b"rotted")
    found: set[str] = set()
    for _ in range(3):  # 2 re-checks a pass: every held body within 3 passes
        found.update(_repair_pass(repair, state))  # (nothing fetches here: a lost body stays missing)
    assert found == {absent, digests[1], digests[3]}
    assert not body_path(tmp_path, digests[1]).exists()  # the corrupt copy is removed
    assert repair.rechecked == 8  # 2 per pass, 4 passes


def test_a_repair_pass_reads_only_what_was_queued_since_the_last(tmp_path: Path) -> None:
    """With millions of queued submissions a pass that walked the queue under the apply lock
    would stall Raft: after the first pass each reads only the submissions queued since."""
    from raftmail.consensus import snapshot
    from raftmail.consensus.state import MailState
    from raftmail.node.bodies import BodyRepair
    store, state = BodyStore(tmp_path, fsync=False), MailState()
    first = _queue(state, store, range(3000))
    repair = BodyRepair(store, recheck_per_pass=0)
    reads = []

    def one_pass() -> list[str]:
        read = repair.state_read()(state)
        reads.append(read[1])
        return repair.missing(read)

    assert one_pass() == [] and sorted(reads[-1]) == sorted(first)
    assert one_pass() == [] and reads[-1] == []
    later = _queue(state, store, range(3000, 3003)) + _queue(state, store, range(3003, 3004), stored=False)
    assert one_pass() == [later[-1]] and sorted(reads[-1]) == sorted(later)
    assert one_pass() == [later[-1]] and reads[-1] == []  # still lacking: fetched again
    store.put(b"Subject: 3003\r\n\r\nbody 3003\r\n")  # the fetch arrived
    assert one_pass() == [] and reads[-1] == []
    assert len(repair.held) == 3004
    # A state loaded from a snapshot counts positions afresh: the next pass reads it whole.
    state = snapshot.load(MailState(), zlib.compress(snapshot.pack(state)))
    assert one_pass() == [] and len(reads[-1]) == 3004


def test_repair_forgets_bodies_no_submission_refers_to(tmp_path: Path) -> None:
    from raftmail.consensus.state import MailState
    from raftmail.node.bodies import BodyRepair
    from test_state import assign_cmd, outcome, prune_cmd, report_cmd
    store, state = BodyStore(tmp_path, fsync=False), MailState()
    kept = _queue(state, store, range(3))
    done = _queue(state, store, range(3, 4))[0]
    lost = _queue(state, store, range(4, 5), stored=False)[0]
    repair = BodyRepair(store, recheck_per_pass=0, max_fetch=1)
    assert _repair_pass(repair, state) == [lost]
    assert set(repair.held) == set(kept) | {done}
    for sid in ("s3", "s4"):  # delivered (s4 by a node that had its body), then archived
        bid = state.apply(assign_cmd("n1", "x.test", [(sid, 0)], 1001.0))["batch"]
        state.apply(report_cmd("n1", bid, 1002.0, [outcome(sid, 0, 250)]))
    state.apply(prune_cmd(1002.0 + 7200))
    assert done not in state.body_refs and lost not in state.body_refs
    assert _repair_pass(repair, state) == []
    assert set(repair.held) == set(kept) and not repair.lacking


def test_a_body_no_peer_has_does_not_hold_up_the_others(tmp_path: Path) -> None:
    from raftmail.consensus.state import MailState
    from raftmail.node.bodies import BodyRepair
    store, state = BodyStore(tmp_path, fsync=False), MailState()
    lacking = _queue(state, store, range(3), stored=False)
    repair = BodyRepair(store, recheck_per_pass=0, max_fetch=2)
    assert _repair_pass(repair, state) == lacking[:2]
    assert _repair_pass(repair, state) == [lacking[2], lacking[0]]  # the first two failed: to the back


def test_a_pass_whose_read_failed_leaves_every_held_body_its_turn(tmp_path: Path) -> None:
    from raftmail.consensus.state import MailState
    from raftmail.node.bodies import BodyRepair
    store, state = BodyStore(tmp_path, fsync=False), MailState()
    digests = _queue(state, store, range(4))
    repair = BodyRepair(store, recheck_per_pass=0, forget_per_pass=2)
    _repair_pass(repair, state)
    repair.state_read()  # its read under the apply lock failed: missing() never ran
    _repair_pass(repair, state)
    assert sorted(repair.visits) == sorted(digests)  # each still asked about in turn
