"""The Raft port's guard: what a connection may cost the node before and after its handshake.

pysyncobj buffers up to 64 MiB per connection, growing a bytes object by concatenation in the Raft
thread (a 60 MiB frame took 20 s, and the followers elected another leader), keeps any number of
connections that never complete its handshake, and drops frames that fail the cluster secret's
check without a word. `PortGuard` caps a frame at `max_frame_bytes` (`PENDING_FRAME_BYTES` before
the handshake), reads into a bytearray at most one frame's worth per event, allows at most
`max_pending_connections` connections that have not completed the handshake, each for
`handshake_timeout` seconds, and counts and logs (rate-limited) every refusal and every frame
that failed authentication, so a node started with the wrong secret is visible.
(tests/test_raft_security.py::test_flooding_the_leaders_raft_port_costs_no_election)

It reaches into pysyncobj's connection and server objects; those private names are listed in
pysyncobj_compat.PYSYNCOBJ_INTERNALS.
"""
from __future__ import annotations

import logging
import struct
import time
from typing import Any, Callable

log = logging.getLogger("raftmail.raft")

# Before its handshake a connection sends a sealed 32-byte key, then an address: tiny frames.
PENDING_FRAME_BYTES = 4096
# Seconds between log lines about refused connections or frames: a flood must not flood the log.
LOG_INTERVAL = 5.0


class PortGuard:
    """Bounds on the incoming connections of one node's Raft port (pysyncobj's TCPTransport)."""

    def __init__(self, transport: Any, *, max_frame_bytes: int, max_pending_connections: int,
                 handshake_timeout: float) -> None:
        self._transport = transport
        self._max_frame_bytes = max_frame_bytes
        self._max_pending = max_pending_connections
        self._handshake_timeout = handshake_timeout
        self._pending: dict[Any, float] = {}  # incoming connections before their handshake -> accepted at
        self.auth_failures = 0
        self.oversized_frames = 0
        self.refused_connections = 0
        self._last_auth_log = 0.0
        self._last_port_log = 0.0

    def install(self) -> None:
        """Route the server's new connections through `accept`. Call it after pysyncobj's __init__
        (which makes and binds the server) and before the first tick (whose poll accepts)."""
        server = self._transport._server
        accept = server._TcpServer__onNewConnectionCallback
        server._TcpServer__onNewConnectionCallback = lambda conn: self.accept(conn, accept)

    def auth_failed(self, what: str) -> None:
        """A frame failed the cluster secret's check (FrameSealer's `on_failure`)."""
        self.auth_failures += 1
        now = time.monotonic()
        if now - self._last_auth_log > LOG_INTERVAL:
            self._last_auth_log = now
            log.error("raft port: %s; connection dropped; %d such frames so far", what, self.auth_failures)

    def accept(self, conn: Any, accept: Callable[[Any], None]) -> None:
        """A new incoming connection on the Raft port. Until it completes pysyncobj's handshake
        (a sealed key exchange, then the peer's address) it may hold only a few small frames:
        at most `max_pending_connections` such connections at once, each for at most
        `handshake_timeout` seconds (`sweep`); the newest is refused beyond that."""
        self.sweep()
        if len(self._pending) >= self._max_pending:
            self.refused_connections += 1
            self._port_warning(f"refused a connection: {len(self._pending)} connections have not "
                               "completed the handshake")
            conn.disconnect()
            return
        self._pending[conn] = time.monotonic()
        self._bound_reads(conn)
        accept(conn)

    def sweep(self) -> None:
        """Forget connections that finished the handshake; drop those past the timeout.
        pysyncobj times a connection out only when it has an event, so one that sends nothing
        would otherwise stay open for good."""
        if not self._pending:
            return
        unknown = self._transport._unknownConnections
        now = time.monotonic()
        for conn, since in list(self._pending.items()):
            if conn not in unknown or conn.state == 0:  # handshake done, or closed
                del self._pending[conn]
            elif now - since > self._handshake_timeout:
                del self._pending[conn]
                self.refused_connections += 1
                self._port_warning("dropped a connection that did not complete the handshake in "
                                   f"{self._handshake_timeout:g} s")
                conn.disconnect()

    def _port_warning(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_port_log > LOG_INTERVAL:
            self._last_port_log = now
            log.warning("raft port: %s (%d connections refused or dropped so far)", what,
                        self.refused_connections)

    def _bound_reads(self, conn: Any) -> Any:
        """Cap what an incoming connection may make us buffer: a frame may claim at most
        `max_frame_bytes` (the first frame before the handshake `PENDING_FRAME_BYTES`), and one
        read event takes at most that much from the socket, into a bytearray (pysyncobj grows a bytes
        object by concatenation: quadratic, tens of seconds of the Raft thread for a 60 MiB frame)."""
        read_once = conn._TcpConnection__processRead
        unknown = self._transport._unknownConnections  # before the handshake
        conn._TcpConnection__readBuffer = bytearray()
        taken = [0]
        try_read = conn._TcpConnection__tryReadBuffer

        def bounded_try_read() -> None:
            taken[0] = 0
            try_read()

        def bounded_read() -> bool:
            # Before the handshake the first frame must be small; the buffer may already hold
            # what an honest peer sends right after its address (an append_entries, a snapshot
            # chunk), so the buffer bound is the same for every connection.
            frame_limit = PENDING_FRAME_BYTES if conn in unknown else self._max_frame_bytes
            buf = conn._TcpConnection__readBuffer
            if not isinstance(buf, bytearray):
                buf = conn._TcpConnection__readBuffer = bytearray(buf)
            before = len(buf)
            more = read_once()
            buf = conn._TcpConnection__readBuffer
            taken[0] += len(buf) - before
            claimed = struct.unpack("i", buf[:4])[0] if len(buf) >= 4 else 0  # pysyncobj's framing
            if claimed > frame_limit or claimed < 0 or len(buf) > 2 * (self._max_frame_bytes + 4):
                self.oversized_frames += 1
                self._port_warning(f"incoming frame of {claimed} bytes exceeds the {frame_limit}-byte "
                                   "limit; connection dropped")
                conn.disconnect()
                return False
            # Leave the rest in the socket for the next poll: one connection cannot hold the
            # Raft thread for more than one frame's worth of reading per event.
            return more and taken[0] < self._max_frame_bytes + 4
        conn._TcpConnection__processRead = bounded_read
        conn._TcpConnection__tryReadBuffer = bounded_try_read
        return conn
