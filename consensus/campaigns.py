"""Campaign controls (pause, resume, cancel). Handlers of the state machine (consensus/state.py):
pure.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .commands import Cancel, CommandRefused, Pause, Result, Resume
from .outcomes import CANCELLED, WAITING_STATES
from .records import Campaign

if TYPE_CHECKING:
    from .state import MailState


def _campaign(st: MailState, cid: str) -> Campaign:
    camp = st.campaigns.get(cid)
    if camp is None:
        raise CommandRefused(f"no campaign {cid!r}")
    return camp


def pause(st: MailState, c: Pause) -> Result:
    _campaign(st, c.campaign).paused = True
    st.index.campaign_changed(st, c.campaign)
    return Result(ok=True)


def resume(st: MailState, c: Resume) -> Result:
    _campaign(st, c.campaign).paused = False
    st.index.campaign_changed(st, c.campaign)
    return Result(ok=True)


def cancel(st: MailState, c: Cancel) -> Result:
    camp = _campaign(st, c.campaign)
    camp.cancelled = True
    n = 0
    for sid in camp.submissions:
        sub = st.submissions.get(sid)  # archived ones have nothing waiting
        if sub is None or not sub.waiting():
            continue
        for idx, rstate in enumerate(sub.states):
            if rstate in WAITING_STATES:
                st.set_state(sub, idx, CANCELLED, c.now)
                st.add_event(c.now, CANCELLED, sub, idx)
                n += 1
    return Result(ok=True, cancelled=n)

