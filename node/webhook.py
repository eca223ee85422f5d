"""Outcome events to an HTTP webhook: batches of events, POSTed as a JSON list, at least once.

Only the node that is the Raft leader posts, so a receiver does not get one copy per node. Every
node keeps its own cursor (the last event seq the receiver acknowledged with a 2xx) in
`webhook.cursor` in its data dir. When leadership moves, the new leader resumes from its own
cursor, which may be older than the old leader's: the receiver then gets some events again
(deduplicate on `seq`), never fewer. Events are lost to the webhook only if they leave the
replicated ring (EVENT_RING events) before any leader posted them; that is logged and counted.

Posting runs in its own task and reads the state under its lock only to copy a page of events,
in a worker thread, and only when the node's read view shows events past the cursor: a slow or
dead receiver never holds up intake or delivery.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable

from raftmail.node.config_types import MonitoringSection
from urllib.parse import urlsplit

import aiohttp

from raftmail.consensus.backoff import next_retry_delay
from raftmail.consensus.state import EVENT_FIELDS
from raftmail.node.tls import client_context

log = logging.getLogger("raftmail.webhook")

# The fields of one outcome event, in the order the state machine stores them (as GET /events).
IDLE_POLL = 0.5  # seconds between looks for new events (or for leadership)
RETRY_JITTER = 0.2  # +-20 % on each retry delay, so nodes and receivers do not beat in step

# read_events(after, limit) -> (events after `after` oldest first, oldest seq kept, newest seq)
EventReader = Callable[[int, int], "tuple[list[list], int, int]"]


def event_dict(event: list) -> dict:
    return dict(zip(EVENT_FIELDS, event))


def state_reader(raft: Any) -> EventReader:
    """An EventReader over a RaftNode's applied state."""
    def read(after: int, limit: int) -> tuple[list[list], int, int]:
        def page(st: Any) -> tuple[list[list], int, int]:
            events, oldest = st.events_after(after, limit)
            return events, oldest, st.event_seq
        return raft.read(page)
    return read


def retry_delay(failures: int, first: float, max_interval: float, jitter: float) -> float:
    """Seconds before retry number `failures` (1, 2, ...): doubling from `first`, jittered by
    +-`jitter`, never more than `max_interval` (the operator's longest wait, jitter included)."""
    delay = next_retry_delay(failures, first=first, max_interval=max_interval,
                             jitter_fraction=jitter, jitter=random.random())
    return min(max_interval, delay)


def display_url(url: str) -> str:
    """The URL without credentials or query (those often carry the receiver's token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def load_cursor(path: Path) -> int:
    try:
        return max(0, int(path.read_text().strip() or 0))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        # Restarting from the ring's start can only repeat events, never skip them.
        log.warning("webhook cursor %s unreadable (%s): starting from the oldest kept event", path, e)
        return 0


def save_cursor(path: Path, seq: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{seq}\n")
    os.replace(tmp, path)


class WebhookPoster:
    """Posts outcome events after the cursor while `is_leader()` says so."""

    def __init__(self, url: str, cursor_path: Path, read_events: EventReader, is_leader: Callable[[], bool], *,
                 batch: int = 500, timeout: float = 10.0, retry_first: float = 1.0,
                 max_retry_interval: float = 300.0, headers: dict[str, str] | None = None,
                 poll_interval: float = IDLE_POLL, newest_event: Callable[[], int] | None = None) -> None:
        self.url = url
        self.cursor_path = cursor_path
        self.read_events = read_events
        self.is_leader = is_leader
        self.batch = batch
        self.timeout = timeout
        self.retry_first = retry_first
        self.max_retry_interval = max_retry_interval
        self.headers = {"Content-Type": "application/json", "User-Agent": "raftmail-webhook", **(headers or {})}
        self.poll_interval = poll_interval
        self.newest_event = newest_event  # the newest event seq without a locked read (the read view)
        self.cursor = load_cursor(cursor_path)
        self.failures = 0
        self.posts_ok = self.posts_failed = self.events_posted = self.events_skipped = 0

    def session(self) -> aiohttp.ClientSession:
        # The same TLS policy as delivery's verified connections (node/tls.py): TLS 1.2 or later,
        # the certificate checked against the system's CAs and the host name.
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                     connector=aiohttp.TCPConnector(ssl=client_context(verify=True)))

    async def run(self) -> None:
        async with self.session() as session:
            while True:
                await asyncio.sleep(await self.step(session))

    async def step(self, session: aiohttp.ClientSession) -> float:
        """Post at most one batch; the seconds to wait before the next step."""
        if not self.is_leader():
            self.failures = 0
            return self.poll_interval
        if self.newest_event is not None and self.newest_event() <= self.cursor:
            return self.poll_interval
        events, oldest, newest = await asyncio.to_thread(self.read_events, self.cursor, self.batch)
        self._skip_lost(oldest, newest)
        if not events:
            return self.poll_interval
        error = await self._post(session, [event_dict(e) for e in events])
        if error is not None:
            self.failures += 1
            self.posts_failed += 1
            delay = retry_delay(self.failures, self.retry_first, self.max_retry_interval, RETRY_JITTER)
            log.warning("webhook %s: POST of events %d..%d failed (%s); retry %d in %.1fs",
                        display_url(self.url), events[0][0], events[-1][0], error, self.failures, delay)
            return delay
        if self.failures:
            log.info("webhook %s: delivering again after %d failed attempts", display_url(self.url), self.failures)
        self.failures = 0
        self.posts_ok += 1
        self.events_posted += len(events)
        self.cursor = events[-1][0]
        save_cursor(self.cursor_path, self.cursor)
        return 0.0 if len(events) >= self.batch else self.poll_interval

    def _skip_lost(self, oldest: int, newest: int) -> None:
        """Events older than the ring's oldest can no longer be posted: say so, move past them."""
        if self.cursor + 1 >= oldest or newest < oldest:
            return
        lost = oldest - 1 - self.cursor
        self.events_skipped += lost
        log.warning("webhook %s: events %d..%d left the replicated ring before this node posted them "
                    "(%d lost to the webhook; GET /events has what is kept)", display_url(self.url),
                    self.cursor + 1, oldest - 1, lost)
        self.cursor = oldest - 1

    async def _post(self, session: aiohttp.ClientSession, payload: list[dict]) -> str | None:
        """None when the receiver acknowledged with a 2xx, else what went wrong."""
        try:
            # Never redirected: the events (recipient addresses) go only where the operator said.
            async with session.post(self.url, data=json.dumps(payload), headers=self.headers,
                                    allow_redirects=False) as resp:
                await resp.read()
                if 300 <= resp.status < 400:
                    return f"HTTP {resp.status}: redirects are not followed; set webhook_url to the final URL"
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except asyncio.TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except aiohttp.ClientError as e:
            return f"{type(e).__name__}: {e}"


def poster_for(monitoring: MonitoringSection, cursor_path: Path, raft: Any, newest_event: Callable[[], int],
               cluster: str, node_id: str) -> WebhookPoster | None:
    """The node's webhook poster per [monitoring], or None when no webhook_url is set."""
    m = monitoring
    if not m.webhook_url:
        return None
    return WebhookPoster(m.webhook_url, cursor_path, state_reader(raft), raft.is_leader,
                         batch=m.webhook_batch, timeout=m.webhook_timeout, retry_first=m.webhook_retry_first,
                         max_retry_interval=m.webhook_max_retry_interval,
                         headers={"X-Raftmail-Cluster": cluster, "X-Raftmail-Node": node_id},
                         newest_event=newest_event)
