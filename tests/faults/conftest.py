"""Fault-suite fixtures: clusters built for the scenarios, torn down whatever happens, and the
session's summary lines printed at the end (and written to $RAFTMAIL_FAULT_REPORT)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster import Cluster, set_config

from . import driver, netns


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


@pytest.fixture
def partition_cluster(tmp_path: Path):
    """Clusters whose nodes each run in a network namespace of their own (see netns.py), with
    the sink and the clients in the root namespace: factory(n) -> (cluster, network). Every
    node process is killed and every namespace removed afterwards, whatever happens. `raft` sets
    keys of the cluster file's [raft] section."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    made: list[tuple[Cluster | None, netns.Network]] = []

    def factory(n: int = 3, raft: dict | None = None, **kw) -> tuple[Cluster, netns.Network]:
        root = tmp_path / f"c{len(made)}"
        root.mkdir()
        net = netns.Network([f"n{i + 1}" for i in range(n)])
        made.append((None, net))
        net.up()
        c = driver.make_fault_cluster(root, n, sink_host=net.gateway, hosts=net.hosts,
                                      launch={nid: net.launch(nid) for nid in net.ids}, **kw)
        # The clients submit from the root namespace's address on the bridge.
        set_config(c, "intake", allow_networks=[str(net.subnet)])
        # Admin addresses off loopback need a token (a node refuses to start without one).
        set_config(c, "cluster", admin_token="partition-suite-admin-token-0123456789")
        if raft:  # [raft] keys of this cluster (timeouts)
            set_config(c, "raft", **raft)
        made[-1] = (c, net)
        c.start_all_and_wait()
        return c, net

    yield factory
    for c, net in reversed(made):
        try:
            if c is not None:
                c.close()
        finally:
            net.close()


def pytest_terminal_summary(terminalreporter) -> None:
    if driver.SUMMARIES:
        terminalreporter.section("fault scenarios")
        for line in driver.SUMMARIES:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session) -> None:
    driver.write_report()
