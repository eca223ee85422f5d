"""The pysyncobj internals the Raft wrapper relies on are listed, present, and checked at start-up."""
from __future__ import annotations

import os
import pickle
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


def test_frames_that_stop_going_through_the_replaced_globals_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import pysyncobj.tcp_connection as tcp_connection
    monkeypatch.delattr(tcp_connection, "zlib")
    assert "pysyncobj.tcp_connection.zlib (a module global)" in pysyncobj_mismatches()
    monkeypatch.setattr(tcp_connection.TcpConnection, "send", lambda self, message: None)
    assert "TcpConnection.send reading the global pickle" in pysyncobj_mismatches()


def test_a_missing_internal_stops_the_node_with_the_expected_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(pysyncobj.SyncObj, "_SyncObj__loadDumpFile")
    assert "SyncObj._SyncObj__loadDumpFile (a method)" in pysyncobj_mismatches()
    with pytest.raises(PysyncobjMismatch, match=f"needs pysyncobj {re.escape(PYSYNCOBJ_VERSION)}.*_loadDumpFile"):
        check_pysyncobj()


class _MakesADirectory:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_log_entries_are_unpickled_as_data_only(tmp_path) -> None:
    # An entry reaches every node's apply from whoever leads: pysyncobj unpickled it with pickle's
    # own unpickler, so an entry could run code on every node.
    import pysyncobj.pickle as pysyncobj_pickle
    import pysyncobj.syncobj as syncobj
    from pysyncobj.node import TCPNode

    from raftmail.consensus import raft_wire

    marker = tmp_path / "made-by-an-entry"
    evil = pysyncobj_pickle.dumps((_MakesADirectory(str(marker)), ()))
    raft_wire.install()
    with pytest.raises(pickle.UnpicklingError, match="posix.mkdir refused"):
        syncobj.pickle.loads(evil)
    assert not marker.exists()
    # What pysyncobj itself puts in entries still reads: our call, a membership change.
    assert syncobj.pickle.loads(pysyncobj_pickle.dumps((0, (b"\x93\x01",)))) == (0, (b"\x93\x01",))
    change = syncobj.pickle.loads(pysyncobj_pickle.dumps(["add", "127.0.0.1:7001", TCPNode("127.0.0.1:7001")]))
    assert change[:2] == ["add", "127.0.0.1:7001"] and change[2].address == "127.0.0.1:7001"
