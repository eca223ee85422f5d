"""A small, bounded, immutable picture of the replicated state, for readers that must not wait
for the apply lock: the node's event loop (scheduler rounds, /status, /metrics, housekeeping).

The Raft tick thread makes one after it applied commands (`view_of`, under the apply lock, from
the counters and read indexes: no scan of the submissions) and hands it to the event loop; readers
take whatever view is current, a few milliseconds behind the applied state at most. A view decides
nothing: every transition stays in the state machine, which re-checks what a command proposes.
Pure: no clock, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from . import readindex
from .batches import count_today, warmup_key
from .outcomes import STATE_NAMES
from .readindex import Due, Ready
from .shaping import DomainBackoff

if TYPE_CHECKING:
    from .state import MailState

_EMPTY: Mapping = MappingProxyType({})


def _none() -> Any:
    return field(default_factory=lambda: _EMPTY)


class BatchView(NamedTuple):
    """One leased batch; `items` only for the batches of the node that made the view."""

    id: str
    node: str
    domain: str
    lease: float
    renewals: int
    incarnation: str
    items: tuple[tuple[str, int], ...]
    site: str = ""  # the throttle key (the domain unless rolled up)
    source: str = ""  # the source address its holder binds ("": the system's choice)


@dataclass(frozen=True)
class StateView:
    applied: int = 0  # commands applied when the view was made
    counts: tuple[int, ...] = (0,) * len(STATE_NAMES)  # recipients per state
    stats: Mapping[str, int] = _none()
    submissions: int = 0
    campaigns: int = 0
    suppressed: int = 0
    event_seq: int = 0
    delivered_minutes: Mapping[int, int] = _none()  # minute -> recipients delivered (last hour)
    batches: Mapping[str, BatchView] = _none()
    node_batches: Mapping[str, int] = _none()  # batches held per node
    site_batches: Mapping[str, int] = _none()  # batches in flight per destination site
    site_recent: Mapping[str, tuple[tuple[float, int], ...]] = _none()  # (assigned at, recipients)
    backoff: Mapping[str, DomainBackoff] = _none()  # destination sites in adaptive backoff
    warmup: Mapping[str, tuple[int, int]] = _none()  # "source site" -> (UTC day, recipients that day)
    # For the submissions in the queue's heads: id -> (envelope sender, campaign), to pick a pool.
    head_submissions: Mapping[str, tuple[str, str]] = _none()
    incarnations: Mapping[str, str] = _none()  # node -> the process that announced itself last
    members: Mapping[str, Mapping[str, str]] = _none()  # members added or removed at run time
    # The heads of the queue, bounded (empty in the views of a node that does not lead).
    heads: bool = False  # the leader's view made for its scheduler: ready and deferred are filled
    ready: tuple[Ready, ...] = ()
    deferred: tuple[Due, ...] = ()
    oldest_waiting: float | None = None  # accepted_at of the oldest submission still waiting

    def queue_counts(self) -> dict[str, int]:
        return {name: self.counts[i] for i, name in enumerate(STATE_NAMES)}

    def eligible(self, now: float, limit: int) -> dict[str, list[list]]:
        """As MailState.eligible, from the view's heads: what the leader may propose to assign."""
        return readindex.eligible(self.ready, self.deferred, now, limit)

    def sent_last_minute(self, site: str, now: float) -> int:
        """Recipients assigned to `site` in the 60 s before `now`."""
        return sum(n for at, n in self.site_recent.get(site, ()) if at > now - 60)

    def warmed_today(self, source: str, site: str, now: float) -> int:
        """As consensus/batches.py's: recipients handed to `source` for `site` on `now`'s UTC day."""
        return count_today(self.warmup.get(warmup_key(source, site)), now)

    def batches_of(self, node: str) -> list[BatchView]:
        return [b for b in self.batches.values() if b.node == node]


def view_of(st: MailState, node: str, queue_head: int) -> StateView:
    """The view for `node`, with at most `queue_head` recipients in each of the queue's heads.
    Reads counters and indexes only: its cost follows the batches in flight and `queue_head`."""
    ix = st.index
    ready, deferred = tuple(ix.ready_head(st, queue_head)), tuple(ix.due_head(st, queue_head))
    heads = {r.submission for r in ready} | {d.submission for d in deferred}
    return StateView(
        applied=st.applied, counts=tuple(st.counts), stats=MappingProxyType(dict(st.stats)),
        submissions=len(st.submissions), campaigns=len(st.campaigns), suppressed=len(st.suppressed),
        event_seq=st.event_seq, delivered_minutes=MappingProxyType(dict(st.delivered_minutes)),
        batches=MappingProxyType({b.id: BatchView(b.id, b.node, b.domain, b.lease, b.renewals, b.incarnation,
                                                  tuple(b.items) if b.node == node else (), b.site, b.source)
                                  for b in st.batches.values()}),
        node_batches=MappingProxyType(dict(ix.node_batches)),
        site_batches=MappingProxyType(dict(st.site_batches)),
        site_recent=MappingProxyType({d: tuple(q) for d, q in st.site_recent.items()}),
        backoff=MappingProxyType(dict(st.backoff)),
        warmup=MappingProxyType({k: tuple(v) for k, v in st.warmup.items()}),
        head_submissions=MappingProxyType({sid: (st.submissions[sid].sender, st.submissions[sid].campaign)
                                           for sid in heads}),
        incarnations=MappingProxyType(dict(st.incarnations)),
        members=MappingProxyType({k: MappingProxyType(dict(v)) for k, v in st.members.items()}),
        heads=queue_head > 0, ready=ready, deferred=deferred,
        oldest_waiting=ix.oldest_waiting(),
    )
