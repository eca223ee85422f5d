"""The pysyncobj internals the Raft wrapper relies on are listed, present, and checked at start-up."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import pysyncobj

from raftmail.consensus import raft
from raftmail.consensus.pysyncobj_compat import (PYSYNCOBJ_INTERNALS, PYSYNCOBJ_VERSION, PysyncobjMismatch,
                                                 check_pysyncobj, pysyncobj_mismatches)


def test_the_installed_pysyncobj_has_every_internal_the_wrapper_relies_on() -> None:
    import importlib.metadata
    assert importlib.metadata.version("pysyncobj") == PYSYNCOBJ_VERSION
    assert pysyncobj_mismatches() == []
    check_pysyncobj()


def test_every_mangled_pysyncobj_name_the_wrapper_uses_is_listed() -> None:
    # Every module of the product, not only raft.py: a private name used anywhere must be checked.
    root = Path(raft.__file__).parent.parent
    sources = [f for package in ("consensus", "node", "cli") for f in sorted((root / package).glob("*.py"))]
    assert Path(raft.__file__) in sources
    listed = {name for _, name, _ in PYSYNCOBJ_INTERNALS}
    used = {name for f in sources
            for name in re.findall(r"\b(_(?:SyncObj|TcpConnection|TCPTransport|TcpServer)__\w+)\b", f.read_text())}
    assert used <= listed, f"not listed: {sorted(used - listed)}"


def test_a_missing_internal_stops_the_node_with_the_expected_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(pysyncobj.SyncObj, "_SyncObj__loadDumpFile")
    assert "SyncObj._SyncObj__loadDumpFile (a method)" in pysyncobj_mismatches()
    with pytest.raises(PysyncobjMismatch, match=f"needs pysyncobj {re.escape(PYSYNCOBJ_VERSION)}.*_loadDumpFile"):
        check_pysyncobj()
