"""Members added and removed at run time (join, leave). Handlers of the state machine
(consensus/state.py): pure; the Raft membership change itself is node/membership.py's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .commands import CommandRefused, MemberAdd, MemberLeave, MemberRemove, Result

if TYPE_CHECKING:
    from .state import MailState


def member_add(st: MailState, c: MemberAdd) -> Result:
    """A node joins (again; a leaving one stays). Retried with the same addresses it changes
    nothing."""
    nid, addrs = c.id, {"raft": c.raft, "smtp": c.smtp, "admin": c.admin}
    m = st.members.get(nid)
    status = m["status"] if m else None
    if status in ("active", "leaving") and any(m[k] != v for k, v in addrs.items()):
        raise CommandRefused(f"{nid} is a member with other addresses")
    other = next((k for k, v in st.members.items()
                  if k != nid and v["raft"] == addrs["raft"] and v["status"] != "removed"), None)
    if other is not None:
        raise CommandRefused(f"raft address {addrs['raft']} belongs to member {other}")
    if status == "active":
        return Result(ok=True, already=True)
    st.members[nid] = {**addrs, "status": "active"}
    return Result(ok=True)


def member_leave(st: MailState, c: MemberLeave) -> Result:
    """The node gets no new batches; it is removed once it holds none. Retried, or once it is
    removed, it changes nothing."""
    m = st.members.get(c.id)
    if m is None or m["status"] == "active":
        st.members[c.id] = {**(m or {"raft": c.raft, "smtp": c.smtp, "admin": c.admin}), "status": "leaving"}
    batches = sum(1 for b in st.batches.values() if b.node == c.id)
    return Result(ok=True, batches=batches)


def member_remove(st: MailState, c: MemberRemove) -> Result:
    status = st.members.get(c.id, {}).get("status")
    if status not in ("leaving", "removed"):
        raise CommandRefused(f"{c.id} is not leaving")
    st.members[c.id]["status"] = "removed"
    return Result(ok=True)
