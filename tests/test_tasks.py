"""Background tasks are kept and supervised: a crash is logged and counted, a loop starts again."""
from __future__ import annotations

import asyncio
import logging

import pytest

from raftmail.node.tasks import Tasks

pytestmark = pytest.mark.timeout(30)


def test_a_crashed_loop_is_logged_counted_and_started_again(caplog: pytest.LogCaptureFixture) -> None:
    runs = []

    async def loop() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    async def main() -> Tasks:
        tasks = Tasks(restart_pause=0.01)
        tasks.keep(loop, "the loop")
        deadline = asyncio.get_running_loop().time() + 5
        while len(runs) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await tasks.stop()
        return tasks
    with caplog.at_level(logging.ERROR, logger="raftmail.node"):
        tasks = asyncio.run(main())
    assert len(runs) == 3 and tasks.crashes == 2
    assert sum("the loop crashed" in r.getMessage() for r in caplog.records) == 2


def test_a_one_shot_task_that_dies_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise ValueError("bad")

    async def main() -> Tasks:
        tasks = Tasks()
        t = tasks.start(fails(), "a report")
        await asyncio.gather(t, return_exceptions=True)
        await asyncio.sleep(0)
        await tasks.stop()
        return tasks
    with caplog.at_level(logging.ERROR, logger="raftmail.node"):
        tasks = asyncio.run(main())
    assert tasks.crashes == 1
    assert any("task a report died" in r.getMessage() for r in caplog.records)
