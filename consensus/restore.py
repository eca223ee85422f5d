"""What a restored cluster starts from: the backed-up state made fit for a new membership.

Pure: the restore command hands in its own `now`; nothing here reads a clock or touches a disk."""
from __future__ import annotations

from .state import MailState


def restored_state(backup: MailState, now: float) -> tuple[MailState, int]:
    """The backup's state for a new cluster. Every leased batch is dropped and its recipients go
    back to the queue (or are cancelled with their campaign), counted as possibly in flight: the
    old cluster may have sent them. Members added at run time and process incarnations belong to
    the old cluster and are forgotten; the new cluster file lists the members. Pending, deferred,
    suppressions, campaign states and finished history are kept as they were. Returns the state
    and how many recipients came back from batches."""
    st = MailState.from_snapshot(backup.to_snapshot())  # a copy: the caller's state is not changed
    returned = sum(st._give_back(batch, now) for batch in list(st.batches.values()))
    st.domain_batches = {}
    st.members = {}
    st.incarnations = {}
    return st, returned
