"""How much CPU other people's processes use: the harness waits for a quiet machine before a run
and discards a run during which others used more than a tenth of a core (full mode only).

"Ours" is the harness and everything below it, plus registered roots (Postfix's master, which
daemonizes away from us). Kernel threads are not counted as others: on loopback they mostly do
our own network work."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .procs import BenchError

CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000

DEFAULT_IDLE_THRESHOLD = 0.06   # cores others may use before a run starts
DEFAULT_NOISY_THRESHOLD = 0.10  # cores others may use during a run before it is discarded
DEFAULT_SETTLE_WINDOW = 1.0     # seconds over which "idle" is measured
DEFAULT_MAX_WAIT = 120.0        # give up waiting for a quiet machine after this long

_EXTRA_ROOTS: set[int] = set()


def register_root(pid: int) -> None:
    """Count `pid` and its descendants as ours (for daemons that left our process tree)."""
    _EXTRA_ROOTS.add(pid)


def unregister_root(pid: int) -> None:
    _EXTRA_ROOTS.discard(pid)


@dataclass(frozen=True)
class ProcCpu:
    ppid: int
    ticks: int           # utime + stime of the process itself
    kernel_thread: bool


def read_stat(pid_dir: Path) -> ProcCpu | None:
    try:
        text = (pid_dir / "stat").read_text()
    except OSError:
        return None  # exited while we looked
    fields = text.rsplit(")", 1)[1].split()
    # After the command name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime ...
    return ProcCpu(ppid=int(fields[1]), ticks=int(fields[11]) + int(fields[12]),
                   kernel_thread=bool(int(fields[6]) & PF_KTHREAD))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU the processes have used so far, all threads, together."""
    ticks = 0
    for pid in pids:
        stat = read_stat(Path(f"/proc/{pid}"))
        if stat is None:
            raise BenchError(f"process {pid} is gone: its CPU cannot be counted")
        ticks += stat.ticks
    return ticks / CLK_TCK


def snapshot() -> dict[int, ProcCpu]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = read_stat(entry)
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def ours(table: dict[int, ProcCpu]) -> set[int]:
    """The harness's process tree plus the registered roots' trees."""
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    found, stack = set(), [os.getpid(), *_EXTRA_ROOTS]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


def others_ticks(before: dict[int, ProcCpu], after: dict[int, ProcCpu]) -> int:
    """CPU ticks that processes not ours used between two snapshots (new processes count whole)."""
    mine = ours(after) | ours(before)
    used = 0
    for pid, stat in after.items():
        if pid in mine or stat.kernel_thread:
            continue
        previous = before.get(pid)
        used += stat.ticks - (previous.ticks if previous and previous.ticks <= stat.ticks else 0)
    return used


class OthersMeter:
    """Cores' worth of CPU that others used between start() and stop()."""

    def __init__(self) -> None:
        self._before: dict[int, ProcCpu] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._before, self._t0 = snapshot(), time.monotonic()

    def stop(self) -> float:
        seconds = max(1e-6, time.monotonic() - self._t0)
        return others_ticks(self._before, snapshot()) / CLK_TCK / seconds


@dataclass(frozen=True)
class IdlePolicy:
    """Full mode checks the machine; quick mode (enabled=False) never waits or discards."""

    enabled: bool
    idle_threshold: float = DEFAULT_IDLE_THRESHOLD
    noisy_threshold: float = DEFAULT_NOISY_THRESHOLD
    settle_window: float = DEFAULT_SETTLE_WINDOW
    max_wait: float = DEFAULT_MAX_WAIT

    def wait_for_idle(self) -> tuple[bool, float]:
        """Block until others use less than idle_threshold; returns (became idle, their usage)."""
        if not self.enabled:
            return True, 0.0
        deadline = time.monotonic() + self.max_wait
        usage = 0.0
        while time.monotonic() < deadline:
            meter = OthersMeter()
            meter.start()
            time.sleep(self.settle_window)
            usage = meter.stop()
            if usage < self.idle_threshold:
                return True, usage
        return False, usage

    def noisy(self, others_cores: float) -> bool:
        return self.enabled and others_cores > self.noisy_threshold
