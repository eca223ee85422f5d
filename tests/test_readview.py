"""The event loop reads the replicated state from the view the Raft tick thread publishes after it
applies: a scheduler round never takes the apply lock, and goes on while another thread holds it
(a real single-member Raft in-process, the real proposer and scheduler)."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

from raftmail.consensus.commands import Incarnate
from raftmail.node.bridge import Proposer
from raftmail.node.config_types import Address, DeliverySection, IntakeSection, StorageSection
from raftmail.node.leases import LeaseClock
from raftmail.node.readview import ReadView
from raftmail.node.scheduler import Scheduler
from test_raft_wrapper import free_port, propose_sync, start_single, submit_cmd

pytestmark = pytest.mark.timeout(60)


class CountingLock:
    """The apply lock, counting who takes it (by thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.takers: Counter[int] = Counter()

    def __enter__(self) -> "CountingLock":
        self.takers[threading.get_ident()] += 1
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self.takers[threading.get_ident()] += 1
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()


async def until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_the_scheduler_reads_the_published_view_and_never_the_apply_lock(tmp_path) -> None:
    raft = start_single(tmp_path / "raft", f"127.0.0.1:{free_port()}")
    lock = raft.state_lock = CountingLock()
    view = ReadView("n1", raft.is_leader)
    raft.read(view.publish)
    raft.on_tick = view.publish
    raft.on_tick_wanted = view.heads_wanted
    try:
        for i in range(3):
            propose_sync(raft, {**submit_cmd(i), "now": time.time()})  # not past max_age
        propose_sync(raft, Incarnate("n1", "inc-1", 1000.0))

        async def main() -> None:
            loop = asyncio.get_running_loop()
            view.attach(loop)
            await until(lambda: view.current.counts[0] == 3 and "n1" in view.current.incarnations,
                        what="the view to show the queue")
            # The queue's heads are made only on request: the views of plain ticks have none.
            assert not view.current.heads and view.current.ready == ()
            published = view.published
            with_heads = await view.with_heads(1000, 2.0)
            assert with_heads.heads
            assert sorted((r.submission, r.index) for r in with_heads.ready) == [("s0", 0), ("s1", 0), ("s2", 0)]
            assert view.published == published + 1  # one view made for it, though nothing was applied
            proposer = Proposer(raft, loop, 100)
            # A relay: every domain is its own site, and no MX lookup leaves the machine.
            relayed = DeliverySection(relay=Address("127.0.0.1", 9))
            scheduler = Scheduler(lambda: view.current, view.with_heads, proposer.propose, relayed, IntakeSection(),
                                  StorageSection(), LeaseClock(), lambda: ["n1"], raft.is_leader,
                                  lambda: raft.raftCurrentTerm)
            loop_thread = threading.get_ident()
            lock.takers[loop_thread] = 0  # the first view was made on this thread before the loop ran
            await scheduler.round()  # prunes, then assigns the three recipients: one batch
            await until(lambda: len(view.current.batches) == 1, what="the batch in the view")
            assert view.current.node_batches == {"n1": 1} and view.current.counts[0] == 0
            assert lock.takers[loop_thread] == 0, "the loop took the apply lock"
            # With the apply lock held elsewhere, a round (nothing to assign, no lease due) still answers.
            held, release = threading.Event(), threading.Event()

            def hold() -> None:
                with lock:
                    held.set()
                    release.wait(10)
            holder = threading.Thread(target=hold)
            holder.start()
            try:
                assert held.wait(5)
                scheduler._last_prune = time.time()
                await asyncio.wait_for(scheduler.round(), 2.0)
                assert scheduler.view().eligible(time.time(), 100) == {}
            finally:
                release.set()
                holder.join()
            assert lock.takers[loop_thread] == 0
        asyncio.run(main())
    finally:
        raft.stop()
