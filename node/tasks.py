"""Every background task of a node, kept and supervised: a task that dies is logged at error
level with its traceback, and a long-running loop is started again after a pause, so a bug in one
loop neither vanishes silently nor stops the node."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger("raftmail.node")

RESTART_PAUSE = 1.0  # seconds before a crashed loop starts again


class Tasks:
    def __init__(self, restart_pause: float = RESTART_PAUSE) -> None:
        self._running: set[asyncio.Task] = set()
        self._stopping = False
        self.restart_pause = restart_pause
        self.crashes = 0  # shown in /metrics: each one is a bug

    def start(self, coro: Awaitable, name: str) -> asyncio.Task:
        """Run `coro` once; a crash is logged, not lost."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    def keep(self, loop: Callable[[], Awaitable], name: str) -> asyncio.Task:
        """Run the loop `loop()` for the node's life: started again after a crash."""
        async def supervised() -> None:
            while True:
                try:
                    await loop()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.crashes += 1
                    log.exception("%s crashed; starting it again in %.0f s", name, self.restart_pause)
                await asyncio.sleep(self.restart_pause)
        return self.start(supervised(), name)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is not None:
            self.crashes += 1
            log.error("task %s died: %r", task.get_name(), exc, exc_info=exc)

    async def stop(self) -> None:
        """Cancel every task and wait for them to end."""
        self._stopping = True
        tasks = list(self._running)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
