"""One domain normaliser: the state machine, config, routes and metrics agree on what a domain is."""

from __future__ import annotations

import pytest

from raftmail.consensus.domains import domain_of, normalise_domain
from raftmail.consensus.state import MailState
from raftmail.node.config import DeliverySection, DomainLimits
from raftmail.node.metrics import domain_label
from test_state import T0, assign_cmd, run, submission, submit_cmd

pytestmark = pytest.mark.timeout(30)


def test_case_white_space_and_the_root_dot_do_not_make_another_domain() -> None:
    assert normalise_domain(" Example.COM. ") == "example.com"
    assert domain_of("Ann@Mail.Example.COM.") == "mail.example.com"
    assert domain_of("[IPv6:2001:DB8::1]") == "[ipv6:2001:db8::1]"
    limits = DeliverySection(domains={"default": DomainLimits(), "example.com": DomainLimits(max_per_minute=5)})
    assert limits.limits_for("EXAMPLE.com.").max_per_minute == 5
    assert domain_label("Example.com.", frozenset({"example.com"})) == "example.com"


def test_a_trailing_dot_recipient_shares_its_domains_batches_and_rate_limit() -> None:
    state = MailState()
    run(state, submit_cmd(T0, submission("s1", ["a@shop.test", "b@Shop.Test.", "c@other.test"])))
    assert state.eligible(T0 + 1, 100) == {"shop.test": [["s1", 0], ["s1", 1]], "other.test": [["s1", 2]]}
    items = [("s1", 0), ("s1", 1)]
    first = run(state, assign_cmd("mx-a", "shop.test", items[:1], T0 + 2, max_per_minute=1))
    assert first["batch"] == "b1"
    later = run(state, assign_cmd("mx-b", "shop.test", items[1:], T0 + 3, max_per_minute=1))
    assert later == {"batch": None, "reason": "max_per_minute"}
