"""Processes and ports for the harness: loopback-only ports, child processes that are always
cleaned up, and polling with a deadline."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from raftmail.node.local_cluster import LOOPBACK, free_ports, port_open

DEFAULT_STOP_GRACE = 10.0
DEFAULT_POLL_INTERVAL = 0.05
LOG_TAIL_BYTES = 4000

T = TypeVar("T")


class BenchError(Exception):
    """A run that could not be measured; its text goes into the table."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (the OS picks it)."""
    return free_ports(1)[0]


def wait_until(probe: Callable[[], T | None], timeout: float, what: str,
               interval: float = DEFAULT_POLL_INTERVAL) -> T:
    """Poll `probe` until it returns something truthy; BenchError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float, what: str) -> None:
    wait_until(lambda: port_open(port), timeout, f"{what} to listen on {LOOPBACK}:{port}")


def tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The end of a log file, for error messages."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass(eq=False)  # identity semantics: children live in a set
class Child:
    """A process the harness started; stdout and stderr go to `log` unless captured."""

    name: str
    proc: subprocess.Popen
    log: Path | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(timeout=grace)
        finally:
            _REGISTRY.discard(self)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=DEFAULT_STOP_GRACE)
        _REGISTRY.discard(self)

    def log_tail(self) -> str:
        return tail(self.log) if self.log else ""


_REGISTRY: set[Child] = set()
_CLEANUPS: list[Callable[[], None]] = []


def spawn(name: str, argv: Sequence[str], log: Path | None = None, *, cwd: Path | None = None,
          env: dict[str, str] | None = None, capture: bool = False,
          stdin: int | None = subprocess.DEVNULL) -> Child:
    """Start a child in its own session (so a terminal's Ctrl-C reaches only the harness, which
    then stops every child itself). Output goes to `log`, or to pipes with `capture`."""
    if capture:
        out, err = subprocess.PIPE, subprocess.PIPE
        handle = None
    else:
        handle = open(log, "ab") if log else subprocess.DEVNULL
        out, err = handle, subprocess.STDOUT
    try:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, stdin=stdin, cwd=cwd, env=env,
                                start_new_session=True)
    finally:
        if handle not in (None, subprocess.DEVNULL):
            handle.close()
    child = Child(name, proc, log)
    _REGISTRY.add(child)
    return child


def on_exit(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run `cleanup` when the harness exits, even on SIGTERM; returns a function that cancels it."""
    _CLEANUPS.append(cleanup)

    def cancel() -> None:
        if cleanup in _CLEANUPS:
            _CLEANUPS.remove(cleanup)

    return cancel


def cleanup_all() -> None:
    """Stop everything still running: registered cleanups first (Postfix, clusters), then children."""
    while _CLEANUPS:
        cleanup = _CLEANUPS.pop()
        try:
            cleanup()
        except Exception:  # one failed cleanup must not keep the others from running
            pass
    for child in list(_REGISTRY):
        try:
            child.stop(grace=3.0)
        except Exception:
            pass


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def install_cleanup_handlers() -> None:
    """SIGTERM and SIGHUP become SystemExit, so atexit cleanups run and no daemon is left behind."""
    atexit.register(cleanup_all)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process, from /proc."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")
