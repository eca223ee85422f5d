"""What a restored cluster starts from: the backed-up state made fit for a new membership.

Pure: the restore command hands in its own `now`; nothing here reads a clock or touches a disk."""
from __future__ import annotations

from .batches import give_back
from .state import MailState


def restored_state(backup: MailState, now: float) -> tuple[MailState, int]:
    """The backup's state for a new cluster. Every leased batch is dropped and its recipients go
    back to the queue (or are cancelled with their campaign), counted as possibly in flight: the
    old cluster may have sent them. Members added at run time and process incarnations belong to
    the old cluster and are forgotten; the new cluster file lists the members. Pending, deferred,
    suppressions, campaign states and finished history are kept as they were. Returns the state
    and how many recipients came back from batches."""
    st = MailState.from_snapshot(backup.to_snapshot())  # a copy: the caller's state is not changed
    returned = sum(give_back(st, batch, now) for batch in list(st.batches.values()))
    st.site_batches = {}
    st.members = {}
    st.incarnations = {}
    return st, returned


def forced_state(survivor: MailState, now: float, node_id: str, addresses: dict[str, str],
                 lost: dict[str, dict[str, str]]) -> tuple[MailState, int]:
    """The state a surviving node starts a one-member cluster from (forced recovery after the
    loss of a majority): as for a restore, every leased batch comes back to the queue counted as
    possibly sent and incarnations are forgotten; the survivor (`node_id`, its raft/smtp/admin
    `addresses`) stays an active member and every lost member (id -> addresses) is recorded as
    removed, so no part of the node waits for them. Returns the state and how many recipients
    came back from batches."""
    st, returned = restored_state(survivor, now)
    for nid, addr in lost.items():
        st.members[nid] = {**addr, "status": "removed"}
    st.members[node_id] = {**addresses, "status": "active"}
    return st, returned
