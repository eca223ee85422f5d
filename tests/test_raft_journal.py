"""The Raft journal on disk (consensus/journal.py) against pysyncobj's own FileJournal: a kill in
the middle of log compaction, a full disk, the term/vote file. Each case runs the journal in a
forked child that really dies (SIGKILL, or SIGBUS for pysyncobj on a full disk)."""
from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
from pathlib import Path

import pytest
from pysyncobj.journal import FileJournal

from raftmail.consensus.journal import (KILL_IN_REWRITE_ENV, JournalFull, ReservedJournal,
                                        write_atomically)
from raftmail.consensus.raft_snapshot import remove_stale_snapshot_temps

pytestmark = pytest.mark.timeout(60)

ENTRIES = 2000
KILL_AFTER = 500


def entry(i: int) -> tuple[bytes, int, int]:
    return (b"\x00" + b"command %06d " % i + b"x" * 80, i + 1, 3)


def run_in_child(fn) -> int:
    """Run fn() in a forked child; its wait status (the child exits 0 when fn returns)."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # a SIGBUS is expected in one case: no traceback dump
        code = 1
        try:
            fn()
            code = 0
        except BaseException as e:  # reported through the exit code and stderr
            os.write(2, f"child: {e!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def read_back(path: Path) -> list[tuple]:
    journal = ReservedJournal(str(path), reserve_bytes=4096)
    try:
        return [journal[i] for i in range(len(journal))]
    finally:
        journal._destroy()


class KilledAfter:
    """pysyncobj's FileJournal.add that SIGKILLs the process after `n` calls (the test hook's
    twin for pysyncobj's in-place rewrite)."""

    def __init__(self, journal: FileJournal, n: int) -> None:
        self.add, self.n, self.calls = journal.add, n, 0

    def __call__(self, *entry: object) -> None:
        self.add(*entry)
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("impl", ["ours", "pysyncobj"])
def test_kill_inside_compaction_rewrite(tmp_path: Path, impl: str) -> None:
    path = tmp_path / "journal.bin"

    def compact_and_die() -> None:
        if impl == "ours":
            os.environ[KILL_IN_REWRITE_ENV] = str(KILL_AFTER)
            journal = ReservedJournal(str(path), reserve_bytes=65536)
        else:
            journal = FileJournal(str(path))
        for i in range(ENTRIES):
            journal.add(*entry(i))
        if impl == "pysyncobj":
            journal.add = KilledAfter(journal, KILL_AFTER)
        journal.deleteEntriesTo(1)  # keep entries 2..2000: the re-add is where the kill lands

    status = run_in_child(compact_and_die)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    kept = read_back(path)
    if impl == "ours":
        # The old journal, whole: the rewrite never replaced it. Nothing left behind.
        assert kept == [entry(i) for i in range(ENTRIES)]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.bin"]
    else:
        # The defect: the restart accepts a journal cut short.
        assert len(kept) == KILL_AFTER and kept[-1] == entry(KILL_AFTER) and len(kept) < ENTRIES - 1


def test_compaction_rewrite_keeps_the_tail_and_the_journal_goes_on(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.bin")
    journal = ReservedJournal(path, reserve_bytes=65536)
    for i in range(300):
        journal.add(*entry(i))
    journal.deleteEntriesTo(100)
    for i in range(300, 320):
        journal.add(*entry(i))
    journal.deleteEntriesFrom(len(journal) - 5)
    journal._destroy()
    assert read_back(tmp_path / "journal.bin") == [entry(i) for i in range(100, 315)]


def test_pysyncobj_journal_files_load_unchanged(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.bin")
    old = FileJournal(path)
    for i in range(50):
        old.add(*entry(i))
    old.setCurrentTerm(7, "127.0.0.1:1")
    old._destroy()
    journal = ReservedJournal(path, reserve_bytes=65536)
    assert [journal[i] for i in range(len(journal))] == [entry(i) for i in range(50)]
    assert journal.getCurrentTerm() == 7 and journal.getVotedForNodeId() == "127.0.0.1:1"
    journal._destroy()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 2 MiB tmpfs the test can fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system to fill needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * 4096)
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("impl", ["ours", "pysyncobj"])
def test_full_disk_refuses_entries_instead_of_killing_the_process(small_fs: Path, impl: str) -> None:
    path = small_fs / "journal.bin"
    report = small_fs / "report"

    def append_until_full() -> None:
        journal = (ReservedJournal(str(path), reserve_bytes=65536) if impl == "ours"
                   else FileJournal(str(path)))
        fill(small_fs)
        accepted = 0
        try:
            for i in range(100_000):
                journal.add(*entry(i))
                accepted += 1
        except JournalFull:
            pass
        assert journal.space == "full" and len(journal) == accepted
        os.unlink(small_fs / "filler")
        assert journal.retry_space() and journal.space == "ok"
        journal.add(*entry(accepted))
        journal._destroy()
        report.write_text(str(accepted + 1))

    status = run_in_child(append_until_full)
    if impl == "pysyncobj":
        # The defect: a store into a sparse page of the mmap on a full disk.
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, status
        return
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    n = int(report.read_text())
    assert n > 100, "the reservation should have held a good number of entries"
    assert read_back(path) == [entry(i) for i in range(n)]


def test_term_and_vote_change_nothing_when_they_cannot_be_stored(small_fs: Path) -> None:
    path = str(small_fs / "journal.bin")
    journal = ReservedJournal(path, reserve_bytes=65536)
    journal.setCurrentTerm(4, "a")
    filler = fill(small_fs)
    with pytest.raises(OSError):
        journal.setCurrentTerm(5, "b")
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (4, "a")
    assert not (small_fs / "journal.bin.meta.tmp").exists()
    filler.unlink()
    journal._destroy()
    again = ReservedJournal(path, reserve_bytes=65536)
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (4, "a")
    again._destroy()


def test_interrupted_writes_leave_the_old_files_and_their_temps_are_removed(tmp_path: Path) -> None:
    """What a SIGKILL in the middle of each write leaves: a partial temp file next to the intact
    old file. The node starts on the old file and removes the temp files."""
    path = tmp_path / "journal.bin"
    journal = ReservedJournal(str(path), reserve_bytes=4096)
    journal.add(*entry(0))
    journal.setCurrentTerm(3, "x")
    journal._destroy()
    (tmp_path / "journal.bin.rewrite.tmp").write_bytes(b"PYSYNCOBJ partial")
    (tmp_path / "journal.bin.meta.tmp").write_bytes(b"\x80partial")
    write_atomically(tmp_path / "snapshot.bin", b"old snapshot")
    (tmp_path / "snapshot.bin.4242.tmp").write_bytes(b"partial snapshot")
    (tmp_path / "snapshot.bin.incoming.tmp").write_bytes(b"partial transfer")
    remove_stale_snapshot_temps(tmp_path / "snapshot.bin")
    journal = ReservedJournal(str(path), reserve_bytes=4096)
    assert [journal[0]] == [entry(0)] and journal.getCurrentTerm() == 3
    journal._destroy()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.bin", "journal.bin.meta", "snapshot.bin"]
    assert (tmp_path / "snapshot.bin").read_bytes() == b"old snapshot"
