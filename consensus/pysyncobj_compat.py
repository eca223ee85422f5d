"""What raftmail relies on in pysyncobj beyond its public API, and the start-up check of it.

RaftNode (raft.py) and its PortGuard (raft_port.py) override or read private names of pysyncobj
to fix its defects; no other module may. A renamed or removed one would fail silently (an override
never called: a fix no longer applied), so every one is listed in PYSYNCOBJ_INTERNALS, a node
checks the list at start-up (`check_pysyncobj`) and refuses to run when one is missing.
pyproject.toml pins the version.

Also here, the pysyncobj codes and formats that code outside RaftNode reads: the names of its
failure codes (FAIL_NAMES), the command types of its journal entries, and `command_of_entry`,
which takes our command out of a stopped node's journal entry (forced recovery) with an
unpickler that can build nothing but ints, tuples and bytes; `load_entry_data`, the unpickler
pysyncobj's apply and catch-up get instead of pickle's (raft_wire.install).
"""
from __future__ import annotations

import io
import pickle
import sys
from typing import Any, Callable

from pysyncobj import FAIL_REASON, SyncObj

# pysyncobj's FAIL_REASON codes by number: a failed proposal's error names its reason.
FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if isinstance(v, int)}


# ------------------------------------------------------------------ pysyncobj internals
PYSYNCOBJ_VERSION = "0.3.17"
# (class, name, kind): "method" (defined on the class) or "attribute" (set in its __init__).
PYSYNCOBJ_INTERNALS: tuple[tuple[str, str, str], ...] = (
    ("SyncObj", "_SyncObj__callErrCallback", "method"),
    ("SyncObj", "_SyncObj__getEntries", "method"),
    ("SyncObj", "_SyncObj__loadDumpFile", "method"),  # keeps the journal tail on restart
    ("SyncObj", "_SyncObj__onMessageReceived", "method"),  # no needless truncation; contact times
    ("SyncObj", "_SyncObj__sendAppendEntries", "method"),  # one round of frames per tick
    ("SyncObj", "_SyncObj__setCurrentTerm", "method"),  # term and vote stored before use
    ("SyncObj", "_SyncObj__setState", "method"),
    ("SyncObj", "_checkCommandsToApply", "method"),  # nothing proposed while the disk is full
    ("SyncObj", "_doDestroy", "method"),
    ("SyncObj", "_isLeader", "method"),
    ("SyncObj", "_onTick", "method"),  # our tick thread; heartbeats read before an election
    ("SyncObj", "_SyncObj__commandsQueue", "attribute"),
    ("SyncObj", "_SyncObj__encryptor", "attribute"),
    ("SyncObj", "_SyncObj__lastResponseTime", "attribute"),
    ("SyncObj", "_SyncObj__raftCommitIndex", "attribute"),
    ("SyncObj", "_SyncObj__raftCurrentTerm", "attribute"),
    ("SyncObj", "_SyncObj__raftElectionDeadline", "attribute"),
    ("SyncObj", "_SyncObj__raftLeader", "attribute"),
    ("SyncObj", "_SyncObj__raftLog", "attribute"),
    ("SyncObj", "_SyncObj__raftState", "attribute"),
    ("SyncObj", "_SyncObj__serializer", "attribute"),
    ("SyncObj", "_SyncObj__transport", "attribute"),
    ("SyncObj", "_SyncObj__votedForNodeId", "attribute"),
    ("SyncObj", "_poller", "attribute"),
    ("SyncObj", "_SyncObj__doApplyCommand", "method"),  # entries read as data (raft_wire.py)
    ("SyncObj", "_SyncObj__parseChangeClusterRequest", "method"),
    ("TcpConnection", "_TcpConnection__processParseMessage", "method"),  # msgpack frames (raft_wire.py)
    ("TcpConnection", "_TcpConnection__processRead", "method"),  # bounded frames
    ("TcpConnection", "_TcpConnection__tryReadBuffer", "method"),
    ("TcpConnection", "_TcpConnection__readBuffer", "attribute"),
    ("TCPTransport", "_onTick", "method"),
    ("TCPTransport", "_connections", "attribute"),
    ("TCPTransport", "_server", "attribute"),
    ("TCPTransport", "_unknownConnections", "attribute"),  # handshakes bounded in number and time
    ("TcpServer", "_TcpServer__onNewConnectionCallback", "attribute"),  # new connections go through PortGuard
)
# raft_wire.install replaces module globals of pysyncobj (msgpack frames without zlib; log entries
# read as data only): (class, method, the globals of the class's module that method must read).
PYSYNCOBJ_REPLACED_GLOBALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("TcpConnection", "send", ("pickle", "zlib")),
    ("TcpConnection", "_TcpConnection__processParseMessage", ("pickle", "zlib")),
    ("SyncObj", "_SyncObj__doApplyCommand", ("pickle",)),
    ("SyncObj", "_SyncObj__parseChangeClusterRequest", ("pickle",)),
    ("SyncObj", "_SyncObj__onMessageReceived", ("pickle",)),  # a large entry sent in parts
)


class PysyncobjMismatch(Exception):
    """The installed pysyncobj lacks a name the wrapper relies on."""


def _names_set_in(function: Callable) -> set[str]:
    """Attribute names a function's code (and code nested in it) reads or sets."""
    import inspect
    found: set[str] = set()

    def walk(code: Any) -> None:
        found.update(code.co_names)
        for const in code.co_consts:
            if inspect.iscode(const):
                walk(const)
    walk(function.__code__)
    return found


def pysyncobj_mismatches() -> list[str]:
    """What of PYSYNCOBJ_INTERNALS the installed pysyncobj lacks, one phrase each."""
    import inspect

    from pysyncobj.tcp_connection import TcpConnection
    from pysyncobj.tcp_server import TcpServer
    from pysyncobj.transport import TCPTransport
    classes = {"SyncObj": SyncObj, "TcpConnection": TcpConnection, "TCPTransport": TCPTransport,
               "TcpServer": TcpServer}
    missing = []
    for cls_name, name, kind in PYSYNCOBJ_INTERNALS:
        cls = classes[cls_name]
        if kind == "method":
            if not inspect.isfunction(inspect.getattr_static(cls, name, None)):
                missing.append(f"{cls_name}.{name} (a method)")
        elif name not in _names_set_in(cls.__init__):
            missing.append(f"{cls_name}.{name} (an attribute its __init__ sets)")
    for cls_name, method, names in PYSYNCOBJ_REPLACED_GLOBALS:
        cls = classes[cls_name]
        module = sys.modules[cls.__module__]
        function = inspect.getattr_static(cls, method, None)
        for name in names:
            if not hasattr(module, name):
                missing.append(f"{module.__name__}.{name} (a module global)")
            elif not inspect.isfunction(function) or name not in _names_set_in(function):
                missing.append(f"{cls_name}.{method} reading the global {name}")
    return missing


def check_pysyncobj() -> None:
    """At start-up: raise PysyncobjMismatch naming what the installed pysyncobj lacks."""
    missing = pysyncobj_mismatches()
    if missing:
        import importlib.metadata
        try:
            installed = importlib.metadata.version("pysyncobj")
        except importlib.metadata.PackageNotFoundError:
            installed = "unknown"
        raise PysyncobjMismatch(f"the Raft wrapper needs pysyncobj {PYSYNCOBJ_VERSION} (installed: {installed}); "
                                f"missing: {'; '.join(missing)}")


# ------------------------------------------------------------------ reading a stopped node's log

# Globals a pysyncobj log entry may name: bytes as pickle protocol 2 writes them, and the node a
# membership change adds or removes. Every other global is refused, so an entry can build data only.
_BYTES_GLOBAL = ("_codecs", "encode")
ENTRY_GLOBALS = frozenset({_BYTES_GLOBAL, ("pysyncobj.node", "TCPNode")})


class _DataUnpickler(pickle.Unpickler):
    allowed: frozenset[tuple[str, str]] = frozenset({_BYTES_GLOBAL})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} refused in a Raft log entry")
        return super().find_class(module, name)


class _EntryUnpickler(_DataUnpickler):
    allowed = ENTRY_GLOBALS


def load_entry_data(data: bytes) -> Any:
    """Unpickle what pysyncobj put in a log entry (a call of our replicated method, a membership
    change, a code version) without running anything: see ENTRY_GLOBALS."""
    return _EntryUnpickler(io.BytesIO(data)).load()


REGULAR_COMMAND = 0  # pysyncobj's _COMMAND_TYPE.REGULAR: a call of a replicated method
NO_OP_COMMAND = 1  # pysyncobj's _COMMAND_TYPE.NO_OP: the first entry of an empty log


def command_of_entry(entry: bytes) -> bytes | None:
    """Our command blob in one journal entry, or None for pysyncobj's own entries (no-op,
    membership change, code version)."""
    if not entry or entry[0] != REGULAR_COMMAND:
        return None
    call = _DataUnpickler(io.BytesIO(entry[1:])).load()  # our call only: no node objects
    if not (isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], tuple) and len(call[1]) == 1
            and isinstance(call[1][0], bytes)):
        raise ValueError(f"journal entry is not a call of the one replicated method: {call!r:.80}")
    return call[1][0]
