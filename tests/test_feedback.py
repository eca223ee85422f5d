"""The feedback loop's pure parts: tokens (links and VERP addresses, key rotation, forgeries),
reading DSNs, ARF reports and junk, the RFC 6409 content fixes, and the state machine's
suppression entries, scopes and feedback events."""
from __future__ import annotations

import msgpack
import pytest

from raftmail.consensus.records import Suppression
from raftmail.consensus.state import MailState
from raftmail.consensus.suppression import entry_key
from raftmail.node.content import from_domain, normalize_bare_lf, with_date
from raftmail.node.feedback import BOUNCE_KIND, UNSUBSCRIBE_KIND, FeedbackKeys, LinkToken, parse_report

pytestmark = pytest.mark.timeout(60)

K1, K2 = "k" * 32, "second-key-0123456789abcdef-0123456789"
T0 = 1_800_000_000.0
LINK = LinkToken("ann@example.org", "spring", "example.com", "18c5f3a2b1c-n1-12-abc123", 3)


# ---------------------------------------------------------------- tokens


def test_link_token_round_trip_is_opaque_deterministic_and_rotates() -> None:
    token = FeedbackKeys([K1]).link_token(LINK)
    assert "ann" not in token and "spring" not in token
    assert token == FeedbackKeys([K1]).link_token(LINK)  # a retry renders the same bytes
    assert FeedbackKeys([K1]).read_link_token(token) == LINK
    assert FeedbackKeys([K2, K1]).read_link_token(token) == LINK  # old links still work after rotation
    assert FeedbackKeys([K2]).read_link_token(token) is None  # ... until the old key is dropped


@pytest.mark.parametrize("forged", ["", "x", "A" * 150, "ünïcode", "a" * 5000, "%%%", None])
def test_forged_link_tokens_are_refused(forged: str | None) -> None:
    keys = FeedbackKeys([K1])
    token = keys.link_token(LINK)
    if forged is None:  # one character altered
        forged = token[:10] + ("B" if token[10] != "B" else "C") + token[11:]
    assert keys.read_link_token(forged) is None


def test_verp_local_part_round_trip_case_insensitive_and_short() -> None:
    keys = FeedbackKeys([K1])
    local = keys.local_part(BOUNCE_KIND, "18c5f3a2b1c-n1-1234-abc123", 999)
    assert len(local) <= 64 and local == local.lower() and local[0] == "b"
    assert keys.read_local_part(local) == ("b", "18c5f3a2b1c-n1-1234-abc123", 999)
    assert keys.read_local_part(local.upper()) == ("b", "18c5f3a2b1c-n1-1234-abc123", 999)
    assert FeedbackKeys([K2, K1]).read_local_part(local) is not None
    assert FeedbackKeys([K2]).read_local_part(local) is None
    # The kind is authenticated: a bounce address is no unsubscribe address.
    assert keys.read_local_part("u" + local[1:]) is None
    assert keys.read_local_part(keys.local_part(UNSUBSCRIBE_KIND, "s", 0)) == ("u", "s", 0)
    for bad in ("", "b", "bzz", "x" + local[1:], local[:-1] + ("a" if local[-1] != "a" else "b"), "b" + "a" * 3000):
        assert keys.read_local_part(bad) is None


# ---------------------------------------------------------------- reports

DSN = (b"From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered\r\nMIME-Version: 1.0\r\n"
       b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
       b"--B\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n"
       b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n"
       b"Final-Recipient: rfc822; ann@example.org\r\nAction: ACTION\r\nStatus: STATUS\r\n"
       b"Diagnostic-Code: smtp; 550 STATUS user unknown\r\n\r\n--B--\r\n")


def dsn(action: str, status: str) -> bytes:
    return DSN.replace(b"ACTION", action.encode()).replace(b"STATUS", status.encode())


def test_dsn_hard_soft_and_success() -> None:
    r = parse_report(dsn("failed", "5.1.1"), 1 << 20)
    assert (r.kind, r.code, r.enhanced, r.remote) == ("bounce", 550, "5.1.1", "mx.example.org")
    r = parse_report(dsn("delayed", "4.4.1"), 1 << 20)
    assert (r.kind, r.code, r.enhanced) == ("bounce", 450, "4.4.1")
    assert parse_report(dsn("delivered", "2.0.0"), 1 << 20).kind == "ignored"
    # A "failed" whose status says temporary counts as temporary: an event, never a suppression.
    assert parse_report(dsn("failed", "4.1.1"), 1 << 20).code == 450


def test_arf_complaint() -> None:
    arf = (b"From: fbl@isp.example\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/report; report-type=feedback-report; boundary="F"\r\n\r\n'
           b"--F\r\nContent-Type: text/plain\r\n\r\nabuse report\r\n--F\r\nContent-Type: message/feedback-report\r\n\r\n"
           b"Feedback-Type: abuse\r\nUser-Agent: FBL/1\r\nVersion: 1\r\n\r\n--F--\r\n")
    r = parse_report(arf, 1 << 20)
    assert r.kind == "complaint" and "abuse" in r.text


@pytest.mark.parametrize("junk", [b"", b"\xff\xfe\x00garbage", b"Subject: hi\r\n\r\nhello", b"From:\r\n\r\n" * 1000,
                                  b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno parts"])
def test_junk_is_unparsed_never_an_exception(junk: bytes) -> None:
    assert parse_report(junk, 1 << 20).kind in ("unparsed", "ignored")


def test_a_non_standard_bounce_through_flufl_bounce() -> None:
    # Exim's classic format, one of flufl.bounce's detectors.
    exim = (b"From: Mail Delivery System <Mailer-Daemon@mx.example.org>\r\nTo: b@bounces.example.com\r\n"
            b"Subject: Mail delivery failed: returning message to sender\r\nX-Failed-Recipients: ann@example.org\r\n\r\n"
            b"This message was created automatically by mail delivery software.\r\n\r\n"
            b"A message that you sent could not be delivered to one or more of its\r\n"
            b"recipients. This is a permanent error. The following address(es) failed:\r\n\r\n"
            b"  ann@example.org\r\n    SMTP error from remote mail server after RCPT TO:<ann@example.org>:\r\n"
            b"    550 5.1.1 User unknown\r\n")
    r = parse_report(exim, 1 << 20)
    assert (r.kind, r.code, r.enhanced) == ("bounce", 550, "5.1.1")


# ---------------------------------------------------------------- RFC 6409 content fixes


def test_content_fixes() -> None:
    assert normalize_bare_lf(b"a\nb\r\nc\n..d\n.\r\n") == b"a\r\nb\r\nc\r\n.d\r\n\r\n"
    assert normalize_bare_lf(b"bare\rcr\n") == b"bare\rcr\r\n"  # a bare CR is refused later
    dated = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: s\r\n\r\nDate: no\r\n"
    assert with_date(dated, T0) == dated
    added = with_date(b"Subject: s\r\n\r\nDate: in the body\r\n", 0)
    assert added == b"Date: Thu, 01 Jan 1970 00:00:00 +0000\r\nSubject: s\r\n\r\nDate: in the body\r\n"
    assert from_domain(b'From: "A, B" <news@News.Example.COM>\r\n\r\n') == "news.example.com"
    assert from_domain(b"Subject: s\r\n\r\nFrom: x@y.example\r\n") == ""


# ---------------------------------------------------------------- state machine


def run(st: MailState, c: dict):
    return st.apply_blob(msgpack.packb(c, use_bin_type=True))


def submit(st: MailState, sid: str, rcpts: list[str], scope: str, now: float, campaign: str = "c") -> list:
    return run(st, {"op": "submit", "now": now, "window": 86400, "max_queued": 10 ** 6,
                    "subs": [{"id": sid, "campaign": campaign, "sender": f"news@{scope}", "body": "d" * 64,
                              "size": 10, "rcpts": rcpts, "scope": scope}]})


def states(st: MailState, sid: str) -> list[str]:
    return [st.recipient(sid, i)["state"] for i in range(len(st.submissions[sid].rcpts))]


def test_unsubscribe_and_complaint_are_scoped_to_the_from_domain_bounces_are_not() -> None:
    st = MailState()
    submit(st, "s1", ["ann@x.test", "bob@x.test", "cat@x.test", "dan@x.test"], "shop.example", T0)
    assert run(st, {"op": "feedback", "kind": "unsubscribe", "submission": "s1", "index": 0, "now": T0 + 1,
                    "node": "n1", "scope": "domain"}) == {"matched": True, "suppressed": True}
    assert run(st, {"op": "feedback", "kind": "complaint", "submission": "s1", "index": 1, "now": T0 + 2,
                    "text": "complaint: abuse"})["suppressed"]
    assert run(st, {"op": "feedback", "kind": "bounce", "submission": "s1", "index": 2, "now": T0 + 3,
                    "code": 550, "enhanced": "5.1.1", "text": "late bounce"})["suppressed"]
    # A policy block and a temporary failure suppress nothing.
    assert not run(st, {"op": "feedback", "kind": "bounce", "submission": "s1", "index": 3, "now": T0 + 4,
                        "code": 550, "enhanced": "5.7.1", "text": "blocked"})["suppressed"]
    assert not run(st, {"op": "feedback", "kind": "bounce", "submission": "s1", "index": 3, "now": T0 + 5,
                        "code": 450, "enhanced": "4.2.2", "text": "full"})["suppressed"]
    assert st.suppressed == {entry_key("ann@x.test", "shop.example"): Suppression(0, "unsubscribe", T0 + 1, "unsubscribe"),
                             entry_key("bob@x.test", "shop.example"): Suppression(0, "complaint: abuse", T0 + 2, "complaint"),
                             "cat@x.test": Suppression(550, "late bounce", T0 + 3, "late-bounce")}
    outcomes = [(e[2], e[6]) for e in st.events if e[2] != "suppressed"]
    assert outcomes == [("unsubscribed", "ann@x.test"), ("complained", "bob@x.test"), ("bounced", "cat@x.test"),
                        ("bounced", "dan@x.test"), ("delayed", "dan@x.test")]
    submit(st, "s2", ["ann@x.test", "bob@x.test", "cat@x.test", "dan@x.test"], "shop.example", T0 + 10)
    assert states(st, "s2") == ["suppressed", "suppressed", "suppressed", "pending"]
    submit(st, "s3", ["ANN@x.test", "bob@x.test", "cat@x.test"], "other.example", T0 + 11)
    assert states(st, "s3") == ["pending", "pending", "suppressed"]
    # Cluster-wide when asked; unknown copies are counted, not fatal.
    run(st, {"op": "feedback", "kind": "unsubscribe", "submission": "s3", "index": 1, "now": T0 + 12,
             "scope": "cluster"})
    assert "bob@x.test" in st.suppressed
    assert run(st, {"op": "feedback", "kind": "complaint", "submission": "nope", "index": 0, "now": T0}) == \
        {"matched": False}
    assert st.stats["feedback_unmatched"] == 1


def test_suppress_import_remove_and_snapshot() -> None:
    st = MailState()
    assert run(st, {"op": "suppress", "address": "A@x.test", "scope": "", "reason": "asked", "now": T0}) == \
        {"ok": True, "new": True}
    good = [["b@x.test", "", "list"], ["c@x.test", "shop.example", ""], ["a@x.test", "", "again"]]
    # The importer leaves bad rows out; a batch that still holds one is refused whole, unchanged.
    for bad in (["bad", "", ""], ["d\0@x.test", "", ""], "junk", ["e@x.test", "has space", ""]):
        before = dict(st.suppressed)
        assert "error" in run(st, {"op": "suppress_many", "now": T0 + 1, "entries": good + [bad]})
        assert st.suppressed == before
    assert run(st, {"op": "suppress_many", "now": T0 + 1, "entries": good}) == {"added": 2, "already": 1}
    assert st.suppressed["a@x.test"] == Suppression(0, "asked", T0, "operator")
    assert st.suppressed[entry_key("c@x.test", "shop.example")] == Suppression(0, "import", T0 + 1, "import")
    copy = MailState.from_snapshot(st.to_snapshot())
    assert copy.digest() == st.digest() and copy.suppressed == st.suppressed
    assert run(st, {"op": "unsuppress", "address": "c@x.test", "scope": "shop.example"}) == {"ok": True}
    assert run(st, {"op": "unsuppress", "address": "c@x.test"}) == {"ok": False}
    assert "error" in run(st, {"op": "suppress_many", "now": T0, "entries": [["x@y.z", "", ""]] * 5001})
    assert "error" in run(st, {"op": "suppress", "address": "x@y.z", "source": "gossip", "now": T0})


def test_feedback_finds_archived_copies() -> None:
    st = MailState()
    submit(st, "s1", ["ann@x.test"], "shop.example", T0)
    run(st, {"op": "assign", "node": "n1", "domain": "x.test", "now": T0, "lease": 30, "term": 1,
             "max_connections": 10, "max_per_minute": 0, "items": [["s1", 0]]})
    run(st, {"op": "report", "batch": "b1", "node": "n1", "now": T0 + 1, "max_age": 1e6,
             "results": [["s1", 0, 250, "2.0.0", "ok", None, "mx"]]})
    run(st, {"op": "prune", "now": T0 + 100, "retention": 10, "archive_retention": 1e9})
    assert "s1" in st.archived and "s1" not in st.submissions
    copy = MailState.from_snapshot(st.to_snapshot())
    assert run(copy, {"op": "feedback", "kind": "complaint", "submission": "s1", "index": 0, "now": T0 + 200})[
        "suppressed"]
    assert entry_key("ann@x.test", "shop.example") in copy.suppressed
