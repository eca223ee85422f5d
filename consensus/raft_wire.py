"""Raft frames as msgpack data instead of pysyncobj's pickle and zlib.

pysyncobj's TcpConnection pickles every message, compresses it with zlib and seals it; the
receiver opens, decompresses and unpickles whatever opens under the cluster secret. So whoever
learned the secret could make every node run code of their choosing, and every frame paid for
pickle and zlib (`bench/frames.py` measures both framings).
`install` gives TcpConnection this codec and no compression instead: a frame can only ever hold
data. pysyncobj also unpickles every log entry it applies (and a large entry sent in parts), and
an entry comes from whoever leads: `install` gives it an unpickler that refuses every global but
the two an entry needs (pysyncobj_compat.ENTRY_GLOBALS). Entries are small msgpack commands already, and snapshots are compressed by the state
machine, so there is little left for zlib to win.

Tuples stay tuples (an extension type): pysyncobj compares the log entries it receives with those
it holds, and pickle kept the difference. Anything else that is not plain data refuses to be sent.

Frames sealed by a node of an earlier version (pickled, sealer version 0x52) do not open here:
`FrameSealer` names that case in its log line.
"""
from __future__ import annotations

from typing import Any

import msgpack
import pysyncobj.pickle as pysyncobj_pickle

from .pysyncobj_compat import load_entry_data

_TUPLE = 1  # msgpack extension code of a tuple, packed as the array of its items


def _pack_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return msgpack.ExtType(_TUPLE, dumps(list(value)))
    raise TypeError(f"a Raft frame holds plain data only, not {type(value).__name__}")


def _unpack_ext(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(loads(data))
    raise ValueError(f"unknown extension type {code} in a Raft frame")


class FrameCodec:
    """pysyncobj.pickle's dumps/loads, in msgpack: what TcpConnection.send and its parser call."""

    @staticmethod
    def dumps(message: Any) -> bytes:
        return dumps(message)

    @staticmethod
    def loads(data: bytes) -> Any:
        return loads(data)


class NoCompression:
    """zlib's compress/decompress as TcpConnection calls them, doing nothing."""

    @staticmethod
    def compress(data: bytes, level: int = -1) -> bytes:
        return data

    @staticmethod
    def decompress(data: bytes) -> bytes:
        return data


def dumps(message: Any) -> bytes:
    # strict_types: a tuple (or any subclass of a plain type) goes through _pack_default.
    return msgpack.packb(message, use_bin_type=True, strict_types=True, default=_pack_default)


def loads(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_unpack_ext)


class EntryPickle:
    """pysyncobj.pickle as pysyncobj.syncobj uses it for log entries: writing unchanged, reading
    through an unpickler that refuses every global an entry has no use for."""

    dumps = staticmethod(pysyncobj_pickle.dumps)
    loads = staticmethod(load_entry_data)


def install() -> None:
    """Make pysyncobj in this process frame its messages with msgpack and read log entries as data
    only. Idempotent; call before pysyncobj starts (RaftNode does)."""
    import pysyncobj.syncobj as syncobj
    import pysyncobj.tcp_connection as tcp_connection

    tcp_connection.pickle = FrameCodec
    tcp_connection.zlib = NoCompression
    # An entry reaches the log from whoever leads, and is applied (unpickled) on every node.
    syncobj.pickle = EntryPickle
