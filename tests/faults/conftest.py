"""Fault-suite fixtures: clusters built for the scenarios, torn down whatever happens, and the
session's summary lines printed at the end (and written to $RAFTMAIL_FAULT_REPORT)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster import Cluster

from . import driver


@pytest.fixture
def fault_cluster(tmp_path: Path):
    made: list[Cluster] = []

    def factory(n: int = 3, **kw) -> Cluster:
        root = tmp_path / f"c{len(made)}"
        root.mkdir()
        c = driver.make_fault_cluster(root, n, **kw)
        made.append(c)
        c.start_all_and_wait()
        return c

    yield factory
    for c in made:
        c.close()


def pytest_terminal_summary(terminalreporter) -> None:
    if driver.SUMMARIES:
        terminalreporter.section("fault scenarios")
        for line in driver.SUMMARIES:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session) -> None:
    driver.write_report()
