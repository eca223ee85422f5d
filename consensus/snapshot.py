"""The snapshot codec of the replicated state: msgpack, records as compact arrays, zlib level 1.

A snapshot from an older schema or an older layout of a record loads the same way on every
replica; the derived indexes (finished recipients, archive counts, body references, de-duplication
size, the read indexes) are rebuilt from what it holds. Pure: no clock, no I/O.
"""
from __future__ import annotations

import gc
import zlib
from collections import deque
from typing import TYPE_CHECKING

import msgpack

from .shaping import DomainBackoff
from .records import EVENT_RING, Archive, Assigned, Batch, Campaign, DedupeEntry, Event, Submission, Suppression

if TYPE_CHECKING:
    from .state import MailState

SCHEMA_VERSION = 2  # 2: clock-free leases (Batch carries a duration and a renewal counter)


def pack(st: MailState) -> bytes:
    """The whole state as msgpack: records as arrays in their field order (consensus/records.py)."""
    return msgpack.packb({
        "schema": st.schema,
        "submissions": [s.to_wire() for s in st.submissions.values()],
        "campaigns": [c.to_wire() for c in st.campaigns.values()],
        "open": list(st.open),
        "batches": [b.to_wire() for b in st.batches.values()],
        "batch_seq": st.batch_seq,
        # Keyed by destination site (a domain unless MX rollup groups it); the wire names are older.
        "domain_batches": st.site_batches,
        "domain_recent": {d: list(v) for d, v in st.site_recent.items()},
        "suppressed": st.suppressed,
        "dedupe": st.dedupe,
        "counts": st.counts,
        "stats": st.stats,
        "delivered_minutes": st.delivered_minutes,
        "events": list(st.events),
        "event_seq": st.event_seq,
        "members": st.members,
        "incarnations": st.incarnations,
        "archived": st.archived,
        "finished": list(st.finished),
        "applied": st.applied,
        # Only when there is any, so states without backoff keep the digest they had before it.
        **({"backoff": {d: b.to_wire() for d, b in st.backoff.items()}} if st.backoff else {}),
        **({"warmup": st.warmup} if st.warmup else {}),
    }, use_bin_type=True)


def load(st: MailState, blob: bytes) -> MailState:
    """Fill the empty state `st` from a snapshot (zlib of pack()), older schemas included."""
    # A bulk load of millions of records: the cyclic collector would rescan the growing heap many
    # times over (half the load's time, measured); nothing built here is cyclic.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(st, blob)
    finally:
        if enabled:
            gc.enable()


def _load(st: MailState, blob: bytes) -> MailState:
    w = msgpack.unpackb(zlib.decompress(blob), raw=False, strict_map_key=False)
    if w.get("schema") == 1:
        w = _from_schema_1(w)
    if w.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"snapshot schema {w.get('schema')} is not {SCHEMA_VERSION}")
    st.submissions = {s.id: s for s in map(Submission.from_wire, w["submissions"])}
    st.campaigns = {c.id: c for c in map(Campaign.from_wire, w["campaigns"])}
    st.open = dict.fromkeys(w["open"])
    st.batches = {b.id: b for b in map(Batch.from_wire, w["batches"])}
    st.batch_seq = w["batch_seq"]
    st.site_batches = dict(w["domain_batches"])
    st.site_recent = {d: deque(map(Assigned._make, v)) for d, v in w["domain_recent"].items()}
    st.backoff = {d: DomainBackoff.from_wire(b) for d, b in w.get("backoff", {}).items()}  # absent before it existed
    st.warmup = {k: list(v) for k, v in w.get("warmup", {}).items()}
    st.suppressed = dict(zip(w["suppressed"], map(Suppression.from_wire, w["suppressed"].values())))
    st.dedupe = {key: DedupeEntry(*e) for key, e in w["dedupe"].items()}  # older entries have 2 fields
    st.counts = list(w["counts"])
    st.stats = dict(w["stats"])
    st.delivered_minutes = {int(k): v for k, v in w["delivered_minutes"].items()}
    st.events = deque(map(Event._make, w["events"]), maxlen=EVENT_RING)
    st.event_seq = w["event_seq"]
    st.members = dict(w["members"])
    st.incarnations = dict(w.get("incarnations", {}))
    st.applied = w["applied"]
    if "finished" in w:
        st.finished = dict.fromkeys(w["finished"])
    else:  # a snapshot from before the finish order was kept: rebuild it the same way everywhere
        done = [s for s in st.submissions.values() if s.finished_at is not None]
        st.finished = dict.fromkeys(s.id for s in sorted(done, key=lambda s: s.finished_at))
    st.finished_rcpts = sum(len(st.submissions[sid].rcpts) for sid in st.finished)
    for sid, a in w["archived"].items():
        if len(a) < 5:  # an archive from before the count was kept: count its recipients' states
            _rcpts, states = msgpack.unpackb(zlib.decompress(a[2]), raw=False)
            a.append(len(states))
        st.archived[sid] = arch = Archive(*a)
        st.archived_rcpts += arch.recipients
    for sub in st.submissions.values():
        st.body_refs[sub.body] = st.body_refs.get(sub.body, 0) + 1
        camp = st.campaigns.get(sub.campaign)
        if camp is not None:
            sub.campaign = camp.id
    st.dedupe_size = sum(e.recipients() for e in st.dedupe.values())
    st.index.rebuild(st)
    return st


def _from_schema_1(w: dict) -> dict:
    """Schema 1 held a wall-clock lease end per batch: it becomes the lease duration it was
    granted, with no incarnation (the holder's next process gives it back, counted)."""
    batches = []
    for b in w["batches"]:
        bid, node, domain, items, lease_until, term, assigned_at = b[:7]
        batches.append([bid, node, domain, items, max(1.0, lease_until - assigned_at), term, assigned_at, "", 0])
    return {**w, "schema": 2, "batches": batches, "incarnations": {}}
