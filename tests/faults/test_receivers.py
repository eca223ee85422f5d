"""Fault scenario: a receiver that misbehaves in turns during a campaign. The capture sink is
restarted (same port and maildir) with one behaviour after another, in an order drawn by the seed:
slower per message than the lease, hanging after the final dot, dropping the connection after the
final dot, and answering 421 to every connection for a while; a node holding batches is SIGKILLed
and restarted in the middle. Same invariants as the other scenarios (driver.verify); the copies
the receiver took without answering are counted as maybe delivered and bound the duplicates.

Seeds as in test_faults.py (RAFTMAIL_FAULT_SEED, RAFTMAIL_FAULT_SEEDS)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster import SlowSink, wait_for

from .driver import LEASE_SECONDS, check, holders, kill, record, restart, seeds, verify, wait_holder
from .test_faults import SCENARIO_TIMEOUT, start_campaign

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.timeout(SCENARIO_TIMEOUT)]

SLOW_DELAY = LEASE_SECONDS + 1.0  # seconds per message: longer than the lease (renewals must carry it)
NO_REPLY_MESSAGES = 2  # messages the sink takes without answering in the hang and drop turns
UNAVAILABLE_SECONDS = 3.0  # the 421 turn
TURN_WAIT = 45.0  # seconds for a turn's behaviour to show at the sink
BEHAVIOURS = ("slow", "hang", "drop", "unavailable")


class TurnSink(SlowSink):
    """The fault suite's sink, restartable with one misbehaviour (`raftmail sink` options)."""

    def __init__(self, root: Path, replies: list[str], delay: float, host: str) -> None:
        super().__init__(root, replies, delay, host=host)
        self.base_delay = delay
        self.options: list[str] = []

    def command(self) -> list[str]:
        return super().command() + self.options

    def turn(self, behaviour: str) -> None:
        """Restart as `behaviour` (open connections are cut, as when a receiver restarts)."""
        self.stop()
        self.delay, self.options = self.base_delay, []
        if behaviour == "slow":
            self.delay = SLOW_DELAY
        elif behaviour in ("hang", "drop"):
            self.options = ["--after-data", behaviour, "--after-data-times", str(NO_REPLY_MESSAGES)]
        elif behaviour == "unavailable":
            self.options = ["--unavailable-for", str(UNAVAILABLE_SECONDS)]
        self.start()


def shown(sink: TurnSink, behaviour: str, since: float) -> bool:
    """The sink acted out `behaviour` since `since`."""
    events = [e for e in sink.events() if e.get("t", 0) >= since]
    if behaviour == "slow":
        return any(e["event"] == "message" for e in events)
    if behaviour in ("hang", "drop"):
        return sum(1 for e in events if e["event"] == "no_reply" and e.get("how") == behaviour) >= NO_REPLY_MESSAGES
    return any(e["event"] == "refused" and e.get("why") == "unavailable" for e in events) \
        and time.time() - since > UNAVAILABLE_SECONDS


@pytest.mark.parametrize("seed", seeds())
def test_receiver_misbehaves_in_turns_with_a_node_kill(fault_cluster, seed: int) -> None:
    c = fault_cluster(3)
    sink = TurnSink(c.sink.root, c.sink.replies, c.sink.delay, c.sink.host)
    sink.port, sink.proc, sink.log = c.sink.port, c.sink.proc, c.sink.log
    c.sink = sink  # the cluster's close() stops whichever sink process runs last
    rng, traffic = start_campaign(c, seed, "receivers", letters=48, pace=0.5)
    turns = rng.sample(BEHAVIOURS, len(BEHAVIOURS))
    kill_after = rng.randrange(1, len(turns))  # the node kill lands between two turns
    done = []
    for i, behaviour in enumerate(turns):
        if i == kill_after:
            victim = wait_holder(c, lambda h, ld: next((n for n in rng.sample(c.ids, 3) if h.get(n)), None),
                                 TURN_WAIT, "a node holding batches")
            held = holders(c)
            kill(c, [victim])
            restart(c, [victim])
            print(f"  killed {victim} (batches held {held}) and restarted it", flush=True)
        since = time.time()
        sink.turn(behaviour)
        wait_for(lambda: shown(sink, behaviour, since), TURN_WAIT, f"the sink's {behaviour} turn", interval=0.2)
        done.append(f"{behaviour} {time.time() - since:.1f}s")
        print(f"  sink turn {behaviour}: {done[-1]}", flush=True)
    sink.turn("reply")
    v = verify(c, traffic, "receivers", seed, [])
    v.notes.append(f"sink turns: {done}; maybe_delivered {v.stats.get('maybe_delivered', 0)}")
    record(v)
    assert v.stats.get("maybe_delivered", 0) > 0, "no final dot went unanswered"
    check(v, c)
