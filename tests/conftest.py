"""Shared fixtures: clusters of real node processes, torn down whatever happens."""
from __future__ import annotations

import compileall
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cluster import Cluster, Sink, SlowSink  # noqa: E402

ROOT = Path(__file__).parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """The suite starts a few hundred node and CLI processes: compile the package once here, so
    none of them compiles it from source again where Python is told not to write bytecode
    (PYTHONDONTWRITEBYTECODE), which cost each process about 0.15 s."""
    for package in ("node", "consensus", "cli"):
        compileall.compile_dir(ROOT / package, quiet=1)


@pytest.fixture
def make_cluster(tmp_path: Path):
    made: list[Cluster] = []

    def factory(n: int = 3, *, sink: bool = True, replies: list[str] | None = None, start: bool = True,
                delay: float = 0.0, **kw) -> Cluster:
        """`delay`: the sink waits that long per message, so batches stay in flight long enough
        to be paused, cancelled or have their sender killed."""
        root = tmp_path / f"c{len(made)}"
        root.mkdir()
        s = (SlowSink(root, replies, delay) if delay else Sink(root, replies)) if sink else None
        c = Cluster(root, n, sink=s, **kw)
        made.append(c)
        if start:
            c.start_all_and_wait()
        return c

    yield factory
    for c in made:
        c.close()
