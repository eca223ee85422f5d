"""What raftmail relies on in pysyncobj beyond its public API, and the start-up check of it.

RaftNode (raft.py) and its PortGuard (raft_port.py) override or read private names of pysyncobj
to fix its defects; no other module may. A renamed or removed one would fail silently (an override
never called: a fix no longer applied), so every one is listed in PYSYNCOBJ_INTERNALS, a node
checks the list at start-up (`check_pysyncobj`) and refuses to run when one is missing.
pyproject.toml pins the version.

Also here, the pysyncobj codes and formats that code outside RaftNode reads: the names of its
failure codes (FAIL_NAMES), the command types of its journal entries, and `command_of_entry`,
which takes our command out of a stopped node's journal entry (forced recovery) with an
unpickler that can build nothing but ints, tuples and bytes.
"""
from __future__ import annotations

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
    ("TcpConnection", "_TcpConnection__processRead", "method"),  # bounded frames
    ("TcpConnection", "_TcpConnection__tryReadBuffer", "method"),
    ("TcpConnection", "_TcpConnection__readBuffer", "attribute"),
    ("TCPTransport", "_onTick", "method"),
    ("TCPTransport", "_connections", "attribute"),
    ("TCPTransport", "_server", "attribute"),
    ("TCPTransport", "_unknownConnections", "attribute"),  # handshakes bounded in number and time
    ("TcpServer", "_TcpServer__onNewConnectionCallback", "attribute"),  # new connections go through PortGuard
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

class _PlainUnpickler:
    """pysyncobj frames a replicated call as a pickle of (method id, (our msgpack blob,)). Reading
    a stopped node's journal (forced recovery) needs that blob back, and nothing else: this
    unpickler refuses every global, so it can only build ints, tuples and bytes."""

    @staticmethod
    def loads(data: bytes) -> Any:
        import io
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                # Protocol 2 writes bytes as _codecs.encode(text, "latin1"): the one global allowed.
                if (module, name) == ("_codecs", "encode"):
                    import codecs
                    return codecs.encode
                raise pickle.UnpicklingError(f"global {module}.{name} refused in a journal entry")
        return Restricted(io.BytesIO(data)).load()


REGULAR_COMMAND = 0  # pysyncobj's _COMMAND_TYPE.REGULAR: a call of a replicated method
NO_OP_COMMAND = 1  # pysyncobj's _COMMAND_TYPE.NO_OP: the first entry of an empty log


def command_of_entry(entry: bytes) -> bytes | None:
    """Our command blob in one journal entry, or None for pysyncobj's own entries (no-op,
    membership change, code version)."""
    if not entry or entry[0] != REGULAR_COMMAND:
        return None
    call = _PlainUnpickler.loads(entry[1:])
    if not (isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], tuple) and len(call[1]) == 1
            and isinstance(call[1][0], bytes)):
        raise ValueError(f"journal entry is not a call of the one replicated method: {call!r:.80}")
    return call[1][0]
