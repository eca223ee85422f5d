"""The Raft commands: one typed value per command, the one decoder, and the one result type.

A command travels as a msgpack map {"op": name, field: value, ...} with the keys journals have
always held, so an entry written by an earlier release decodes to the same value. Proposers build
commands with the classes below; the state machine decodes every entry with `decode_command`,
which checks every field and refuses (CommandRefused, with the field and what is wrong) before a
handler sees the command. Unknown keys are ignored, so a newer proposer's extra field is harmless.
Pure: no clock, no randomness, no I/O. Every command is here, in one module, on purpose: it is the
whole vocabulary of the log, what a reader checks first when a journal entry needs explaining.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple, Sequence, dataclass_transform

import msgpack

from .fields import CommandRefused, Item, count, is_item, items_of, num, opt_count, opt_num, string
from .outcomes import Verdict, judge_reply

_new_tuple = tuple.__new__  # a NamedTuple from values already checked, at a tuple's cost

# Bounds on what one command may carry: entries stay small, so Raft stays fast.
MAX_SUBMISSIONS_PER_COMMAND = 1000
MAX_ITEMS_PER_COMMAND = 5000
MAX_INCARNATION_CHARS = 64
MAX_SITE_CHARS = 255  # a destination site's key (consensus/batches.py), a source address
# Records one prune (or one submit's de-duplication upkeep) may archive, drop or forget: the tick
# thread applies it, so its work is bounded whatever the backlog; the leader prunes again soon
# while a prune answers "more". A protocol constant: every replica does the same work.
MAX_PRUNE_PER_COMMAND = 1000


class Result(dict):
    """What applying one command answered, the same on every replica: a map of named values, and
    {"error": why} when the command was refused (or, for a bug, failed). A dict, so it compares and
    serialises like one; `error` and `refused` say which kind of answer it is."""

    __slots__ = ()

    @classmethod
    def refusal(cls, why: str) -> "Result":
        return cls(error=why)

    @property
    def error(self) -> str | None:
        return self.get("error")

    @property
    def refused(self) -> bool:
        return "error" in self


def is_refusal(result: Any) -> bool:
    """Whether an applied command's result says it was refused (or failed): for any command."""
    return isinstance(result, dict) and "error" in result


class Command:
    """Base of every command: `op` names it on the wire; `to_wire` gives the msgpack map."""

    __slots__ = ()
    op: ClassVar[str]

    def to_wire(self) -> dict:
        wire: dict[str, Any] = {"op": self.op}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is not None:  # absent on the wire means "not given" (bounds not applied)
                wire[f.name] = v
        return wire

    @classmethod
    def from_wire(cls, m: dict) -> "Command":
        raise NotImplementedError


COMMANDS: dict[str, type[Command]] = {}


@dataclass_transform()
def command(cls: type) -> type:
    """Class decorator of a command: a slotted dataclass, registered under its op. (Not frozen:
    a frozen dataclass is several times slower to build, and the state decodes every entry.)"""
    cls = dataclass(slots=True)(cls)
    COMMANDS[cls.op] = cls
    return cls


# ------------------------------------------------------------------------------- submissions

@dataclass(slots=True)
class NewSubmission:
    """One accepted SMTP transaction, as intake proposes it. `key` is the idempotency key (sender
    and Message-ID): recipients already queued under it are not queued again."""

    id: str
    campaign: str
    sender: str
    body: str  # sha256 of the body in the body store
    size: int
    rcpts: Sequence[str]
    key: str | None = None
    scope: str = ""  # the message's From: domain (lower case): where an unsubscribe applies
    # Not sent before this time (the proposer's wall clock, seconds since the epoch), or None.
    not_before: float | None = None
    # None: `body` is a message. Else `body` is a template object (node/templates.py) and this is
    # the position of this submission's first recipient in its recipient data.
    template: int | None = None

    def to_wire(self) -> dict:
        w = {"id": self.id, "campaign": self.campaign, "sender": self.sender, "body": self.body,
             "size": self.size, "rcpts": list(self.rcpts)}
        if self.key is not None:
            w["key"] = self.key
        if self.scope:
            w["scope"] = self.scope
        if self.not_before is not None:
            w["not_before"] = self.not_before
        if self.template is not None:
            w["template"] = self.template
        return w

    @classmethod
    def from_wire(cls, s: Any) -> "NewSubmission":
        if not isinstance(s, dict):
            raise CommandRefused("a submission must be a map")
        sid, campaign, sender, body = string(s, "id"), string(s, "campaign"), string(s, "sender"), string(s, "body")
        size = count(s, "size")
        rcpts = s.get("rcpts")
        if not isinstance(rcpts, list) or not rcpts or not all(isinstance(r, str) and "@" in r for r in rcpts):
            raise CommandRefused("rcpts must be a non-empty list of addresses")
        key = s.get("key")
        if key is not None and not isinstance(key, str):
            raise CommandRefused("key must be a string")
        template = opt_count(s, "template")
        if template is not None and template < 0:
            raise CommandRefused("template must be a recipient position (>= 0)")
        return cls(sid, campaign, sender, body, size, tuple(rcpts), key, _scope(s, "submission").lower(),
                   opt_num(s, "not_before"), template)


@dataclass(slots=True)
class SubmissionRefused:
    """A submission of a submit command that did not decode: refused alone, its neighbours go on."""

    why: str


@command
class Submit(Command):
    """Queue submissions (intake's group commit: several SMTP transactions in one entry)."""

    op: ClassVar[str] = "submit"
    now: float
    window: float  # de-duplication window, seconds
    max_queued: int  # recipients waiting or in flight, cluster-wide
    subs: Sequence[NewSubmission | SubmissionRefused]
    max_dedupe: int | None = None  # recipients remembered for de-duplication (absent: no bound)

    def to_wire(self) -> dict:
        w = {"op": self.op, "now": self.now, "window": self.window, "max_queued": self.max_queued,
             "subs": [s.to_wire() for s in self.subs if isinstance(s, NewSubmission)]}
        if self.max_dedupe is not None:
            w["max_dedupe"] = self.max_dedupe
        return w

    @classmethod
    def from_wire(cls, m: dict) -> "Submit":
        now, window, max_queued = num(m, "now"), num(m, "window"), count(m, "max_queued")
        max_dedupe = opt_count(m, "max_dedupe")
        subs = m.get("subs")
        if not isinstance(subs, list) or not 0 < len(subs) <= MAX_SUBMISSIONS_PER_COMMAND:
            raise CommandRefused(f"submit: subs must be a list of 1 to {MAX_SUBMISSIONS_PER_COMMAND} submissions")
        decoded: list[NewSubmission | SubmissionRefused] = []
        for s in subs:
            try:
                decoded.append(NewSubmission.from_wire(s))
            except CommandRefused as e:
                decoded.append(SubmissionRefused(str(e)))
        return cls(now, window, max_queued, tuple(decoded), max_dedupe)


# ------------------------------------------------------------------------------- batches and leases

@command
class Assign(Command):
    """Lease recipients of one domain to one node (the leader's scheduler proposes it). The
    throttles count per `site`: the domain itself, or the MX rollup group it belongs to."""

    op: ClassVar[str] = "assign"
    node: str
    domain: str
    now: float
    lease: float  # seconds
    term: int
    max_connections: int
    max_per_minute: int
    items: Sequence[Item]
    site: str | None = None  # None: the domain
    source: str | None = None  # the source address the holder binds (a pool's), None: any
    daily_cap: int | None = None  # warm-up: recipients per UTC day for (source, site), None: no cap

    @classmethod
    def from_wire(cls, m: dict) -> "Assign":
        node, domain, now = string(m, "node"), string(m, "domain"), num(m, "now")
        # Entries of an earlier release carried a wall-clock lease end: its duration is the same.
        lease = num(m, "lease") if "lease" in m or "lease_until" not in m else num(m, "lease_until") - now
        if lease <= 0:
            raise CommandRefused("assign: lease must be a positive number of seconds")
        term, max_connections, max_per_minute = (count(m, k) for k in ("term", "max_connections", "max_per_minute"))
        items = m.get("items")
        if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS_PER_COMMAND:
            raise CommandRefused(f"assign: items must be a list of 1 to {MAX_ITEMS_PER_COMMAND} [submission, index]")
        site, source = m.get("site"), m.get("source")
        for key, v in (("site", site), ("source", source)):
            if v is not None and (not isinstance(v, str) or not 0 < len(v) <= MAX_SITE_CHARS):
                raise CommandRefused(f"assign: {key} must be a string of 1 to {MAX_SITE_CHARS} characters")
        return cls(node, domain, now, lease, term, max_connections, max_per_minute, items_of(items, "assign: items"),
                   site, source, opt_count(m, "daily_cap"))


@command
class Renew(Command):
    """The holder keeps its lease (the batch id is the fencing token)."""

    op: ClassVar[str] = "renew"
    batch: str
    node: str
    incarnation: str | None = None  # the holder's process; absent in entries of earlier releases

    @classmethod
    def from_wire(cls, m: dict) -> "Renew":
        batch, node = string(m, "batch"), string(m, "node")
        incarnation = m.get("incarnation")
        if incarnation is not None and not isinstance(incarnation, str):
            raise CommandRefused("renew: incarnation must be a string")
        return cls(batch, node, incarnation)


class ReportRow(NamedTuple):
    """One recipient's outcome in a report. `next_at` (a retry time, the proposer's clock) is
    required when the outcome is a deferral (judge_reply); `maybe_delivered`: the final dot got no
    reply."""

    submission: str
    index: int
    code: int  # SMTP reply code; 0 when no reply came at all
    enhanced: str | None
    text: str
    next_at: float | None
    remote: str = ""
    maybe_delivered: bool = False

    @classmethod
    def from_wire(cls, r: Any) -> "ReportRow":
        if not (isinstance(r, list) and len(r) >= 6 and is_item(r) and type(r[2]) is int
                and (r[3] is None or isinstance(r[3], str)) and isinstance(r[4], str)
                and (r[5] is None or type(r[5]) in (int, float) and math.isfinite(r[5]))):
            raise CommandRefused("report: each result is [submission, index, code, enhanced, text, next_at, "
                                 "remote, maybe_delivered]")
        if r[5] is None and judge_reply(r[2], r[3], r[4]).deferred:
            raise CommandRefused(f"report: reply code {r[2]} is a deferral and needs next_at")
        remote = r[6] if len(r) > 6 else ""
        if not isinstance(remote, str):
            raise CommandRefused("report: remote must be a string")
        maybe = r[7] if len(r) > 7 else False
        if not isinstance(maybe, bool):
            raise CommandRefused("report: maybe_delivered must be true or false")
        return _new_tuple(cls, (r[0], r[1], r[2], r[3], r[4], r[5], remote, maybe))  # checked: skip __new__

    def verdict(self) -> Verdict:
        return judge_reply(self.code, self.enhanced, self.text)


@command
class Report(Command):
    """Outcomes of sends, and leased recipients given back unattempted (`release`)."""

    op: ClassVar[str] = "report"
    batch: str
    node: str
    now: float
    max_age: float  # seconds after acceptance past which a deferral becomes expired
    results: Sequence[ReportRow]
    release: Sequence[Item] = ()
    max_maybe: int | None = None  # unanswered final dots before a recipient expires

    @classmethod
    def from_wire(cls, m: dict) -> "Report":
        now, max_age = num(m, "now"), num(m, "max_age")
        batch, node = string(m, "batch"), string(m, "node")
        results, release = m.get("results", []), m.get("release", [])
        if not isinstance(results, list) or not isinstance(release, list) \
                or len(results) + len(release) > MAX_ITEMS_PER_COMMAND:
            raise CommandRefused(f"report: results and release must be lists of at most {MAX_ITEMS_PER_COMMAND} "
                                 "rows together")
        rows = tuple(ReportRow.from_wire(r) for r in results)
        max_maybe = m.get("max_maybe")
        if max_maybe is not None and (type(max_maybe) is not int or max_maybe < 1):
            raise CommandRefused("report: max_maybe must be a positive integer")
        if not all(isinstance(r, list) and len(r) == 2 for r in release):
            raise CommandRefused("report: each release is [submission, index]")
        return cls(batch, node, now, max_age, rows, items_of(release, "report: release"), max_maybe)


@command
class Expire(Command):
    """Leases the leader measured as run out on its own clock: (batch id, renewals it saw)."""

    op: ClassVar[str] = "expire"
    now: float
    batches: Sequence[tuple[str, int]] = ()

    @classmethod
    def from_wire(cls, m: dict) -> "Expire":
        now = num(m, "now")
        # An entry of an earlier release (no batches: it compared wall clocks) expires nothing.
        pairs = m.get("batches", [])
        if not isinstance(pairs, list) or len(pairs) > MAX_ITEMS_PER_COMMAND or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int for p in pairs):
            raise CommandRefused(f"expire: batches must be a list of at most {MAX_ITEMS_PER_COMMAND} "
                                 "[batch id, renewals]")
        return cls(now, tuple((p[0], p[1]) for p in pairs))


@command
class Abandon(Command):
    """A restarted node gives back a batch leased to its previous process."""

    op: ClassVar[str] = "abandon"
    batch: str
    node: str
    incarnation: str
    now: float

    @classmethod
    def from_wire(cls, m: dict) -> "Abandon":
        return cls(string(m, "batch"), string(m, "node"), string(m, "incarnation"), num(m, "now"))


@command
class Incarnate(Command):
    """A node process announces its random incarnation id when it starts."""

    op: ClassVar[str] = "incarnate"
    node: str
    incarnation: str
    now: float

    @classmethod
    def from_wire(cls, m: dict) -> "Incarnate":
        node, incarnation, now = string(m, "node"), string(m, "incarnation"), num(m, "now")
        if len(incarnation) > MAX_INCARNATION_CHARS:
            raise CommandRefused(f"incarnate: incarnation id longer than {MAX_INCARNATION_CHARS} characters")
        return cls(node, incarnation, now)


@command
class ExpireUnsent(Command):
    """`max_age` for recipients still waiting: the proposer's `now` decides, the state re-checks."""

    op: ClassVar[str] = "expire_unsent"
    now: float
    max_age: float

    @classmethod
    def from_wire(cls, m: dict) -> "ExpireUnsent":
        return cls(num(m, "now"), num(m, "max_age"))


# ------------------------------------------------------------------------------- campaigns and suppression

@command
class Backoff(Command):
    """The leader's next adaptive-backoff step for one destination site (consensus/shaping.py).
    The wire key is "domain": sites were domains before MX rollup."""

    op: ClassVar[str] = "backoff"
    domain: str  # the site
    now: float
    level: int
    suspended_until: float
    reason: str

    @classmethod
    def from_wire(cls, m: dict) -> "Backoff":
        level, reason = count(m, "level"), m.get("reason", "")
        if not 0 <= level <= 30:
            raise CommandRefused(f"backoff: level must be 0 to 30, got {level}")
        if not isinstance(reason, str):
            raise CommandRefused("backoff: reason must be a string")
        return cls(string(m, "domain"), num(m, "now"), level, num(m, "suspended_until"), reason)


@command
class Pause(Command):
    op: ClassVar[str] = "pause"
    campaign: str

    @classmethod
    def from_wire(cls, m: dict) -> "Pause":
        return cls(string(m, "campaign"))


@command
class Resume(Command):
    op: ClassVar[str] = "resume"
    campaign: str

    @classmethod
    def from_wire(cls, m: dict) -> "Resume":
        return cls(string(m, "campaign"))


@command
class Cancel(Command):
    op: ClassVar[str] = "cancel"
    campaign: str
    now: float

    @classmethod
    def from_wire(cls, m: dict) -> "Cancel":
        return cls(string(m, "campaign"), num(m, "now"))


CAMPAIGN_ACTIONS = ("pause", "resume", "cancel")


def campaign_command(action: str, campaign: str, now: float) -> Pause | Resume | Cancel:
    """The command for an operator's campaign action (one of CAMPAIGN_ACTIONS)."""
    if action == "pause":
        return Pause(campaign)
    if action == "resume":
        return Resume(campaign)
    if action == "cancel":
        return Cancel(campaign, now)
    raise ValueError(f"unknown campaign action {action!r}")


MAX_ADDRESS = 320  # RFC 5321: 64 + 1 + 255
MAX_SCOPE = 253  # a domain name
MAX_REASON = 200
# Where a suppression came from: in-session bounces, late bounces (DSN), complaints (ARF), one-click
# and mailto unsubscribes, the operator's command, an import.
SUPPRESSION_SOURCES = ("bounce", "late-bounce", "complaint", "unsubscribe", "operator", "import")
FEEDBACK_KINDS = ("bounce", "complaint", "unsubscribe")
SCOPE_SEPARATOR = "\0"  # joins address and scope in a suppression key: in neither of them


def valid_address(address: Any) -> bool:
    """An address a suppression may name (the intake's and an import's addresses all are)."""
    return (isinstance(address, str) and 3 <= len(address) <= MAX_ADDRESS and "@" in address
            and not any(ch in address for ch in "\0\r\n") and address.rpartition("@")[0] != "")


def valid_scope(scope: Any) -> bool:
    """A suppression scope: a From: domain, or "" for every sender."""
    return isinstance(scope, str) and len(scope) <= MAX_SCOPE and SCOPE_SEPARATOR not in scope and " " not in scope


def _short(m: dict, key: str, default: str, limit: int) -> str:
    v = m.get(key, default)
    if not isinstance(v, str):
        raise CommandRefused(f"{key} must be a string")
    return v[:limit]


def _scope(m: dict, what: str) -> str:
    scope = m.get("scope", "")
    if not valid_scope(scope):
        raise CommandRefused(f"{what}: scope must be a domain or empty")
    return scope


@command
class Suppress(Command):
    """One address, from the operator or a one-click unsubscribe link. A link names the copy it
    came from (`event` "unsubscribed" with campaign, submission, index, node): every click is then
    reported as an event, also when the address was suppressed already."""

    op: ClassVar[str] = "suppress"
    address: str
    now: float
    reason: str = "operator"
    scope: str = ""  # a From: domain, or "" for every sender
    source: str = "operator"
    event: str | None = None
    campaign: str | None = None
    submission: str | None = None
    index: int | None = None
    node: str | None = None

    @classmethod
    def from_wire(cls, m: dict) -> "Suppress":
        address = m.get("address")
        if not valid_address(address):
            raise CommandRefused("suppress: not an address")
        scope, source = _scope(m, "suppress"), m.get("source", "operator")
        if source not in SUPPRESSION_SOURCES:
            raise CommandRefused(f"suppress: source must be one of {', '.join(SUPPRESSION_SOURCES)}")
        reason = _short(m, "reason", "operator", MAX_REASON)
        event = m.get("event")
        if event is None:
            return cls(address, num(m, "now"), reason, scope, source)
        index = m.get("index", -1)
        if event != "unsubscribed" or type(index) is not int:
            raise CommandRefused("suppress: event must be \"unsubscribed\", index an integer")
        return cls(address, num(m, "now"), reason, scope, source, event, _short(m, "campaign", "", 256),
                   _short(m, "submission", "", 256), index, _short(m, "node", "", 64))


@command
class SuppressMany(Command):
    """One batch of an import: (address, scope, reason) rows, every one valid (the importer counts
    and leaves out bad rows before proposing)."""

    op: ClassVar[str] = "suppress_many"
    now: float
    entries: Sequence[tuple[str, str, str]]
    source: str = "import"

    def to_wire(self) -> dict:
        return {"op": self.op, "now": self.now, "entries": [list(e) for e in self.entries], "source": self.source}

    @classmethod
    def from_wire(cls, m: dict) -> "SuppressMany":
        rows, source = m.get("entries"), m.get("source", "import")
        if not isinstance(rows, list) or not 0 < len(rows) <= MAX_ITEMS_PER_COMMAND \
                or source not in SUPPRESSION_SOURCES:
            raise CommandRefused(f"suppress_many: entries must be 1 to {MAX_ITEMS_PER_COMMAND} rows, source one of "
                                 f"{', '.join(SUPPRESSION_SOURCES)}")
        if not all(isinstance(r, list) and len(r) == 3 and valid_address(r[0]) and valid_scope(r[1])
                   and isinstance(r[2], str) for r in rows):
            raise CommandRefused("suppress_many: each entry is [address, scope (a domain or empty), reason]")
        return cls(num(m, "now"), tuple((r[0], r[1], r[2][:MAX_REASON]) for r in rows), source)


@command
class Unsuppress(Command):
    op: ClassVar[str] = "unsuppress"
    address: str
    scope: str = ""

    @classmethod
    def from_wire(cls, m: dict) -> "Unsuppress":
        return cls(string(m, "address"), _scope(m, "unsuppress"))


@command
class Feedback(Command):
    """A report that came back to a feedback address naming one copy (submission, index): a
    "bounce" with the reply code and enhanced status the report gave, a "complaint" or an
    "unsubscribe" (by mail). `scope` "cluster" suppresses for every sender, anything else for the
    copy's From: domain only."""

    op: ClassVar[str] = "feedback"
    kind: str
    submission: str
    index: int
    now: float
    node: str = ""
    scope: str = "domain"
    remote: str = ""
    text: str = ""
    code: int | None = None
    enhanced: str | None = None

    @classmethod
    def from_wire(cls, m: dict) -> "Feedback":
        kind, index = m.get("kind"), m.get("index")
        if kind not in FEEDBACK_KINDS or type(index) is not int:
            raise CommandRefused(f"feedback: kind must be one of {', '.join(FEEDBACK_KINDS)}, index an integer")
        code, enhanced = m.get("code"), m.get("enhanced")
        if kind == "bounce" and (type(code) is not int or not (enhanced is None or isinstance(enhanced, str))):
            raise CommandRefused("feedback: a bounce needs an integer code (and enhanced a string or null)")
        scope = m.get("scope", "domain")
        return cls(kind, string(m, "submission"), index, num(m, "now"), _short(m, "node", "", 64),
                   "cluster" if scope == "cluster" else "domain", _short(m, "remote", "", 100),
                   _short(m, "text", "", MAX_REASON), code if kind == "bounce" else None,
                   enhanced if kind == "bounce" else None)


@command
class Noop(Command):
    """A write whose only purpose is to learn that this node can commit (the drill, readiness)."""

    op: ClassVar[str] = "noop"

    @classmethod
    def from_wire(cls, m: dict) -> "Noop":
        return cls()


# ------------------------------------------------------------------------------- membership

_ADDRESS_KEYS = ("raft", "smtp", "admin")


@command
class MemberAdd(Command):
    op: ClassVar[str] = "member_add"
    id: str
    raft: str
    smtp: str
    admin: str

    @classmethod
    def from_wire(cls, m: dict) -> "MemberAdd":
        return cls(string(m, "id"), *(string(m, k) for k in _ADDRESS_KEYS))


@command
class MemberLeave(Command):
    op: ClassVar[str] = "member_leave"
    id: str
    raft: str
    smtp: str
    admin: str

    @classmethod
    def from_wire(cls, m: dict) -> "MemberLeave":
        return cls(string(m, "id"), *(string(m, k) for k in _ADDRESS_KEYS))


@command
class MemberRemove(Command):
    op: ClassVar[str] = "member_remove"
    id: str

    @classmethod
    def from_wire(cls, m: dict) -> "MemberRemove":
        return cls(string(m, "id"))


# ------------------------------------------------------------------------------- retention

@command
class Prune(Command):
    """Retention and count bounds (absent bounds are not applied)."""

    op: ClassVar[str] = "prune"
    now: float
    retention: float  # seconds a finished submission keeps its detail
    archive_retention: float  # seconds an archive is kept
    max_finished: int | None = None  # recipients, as memory follows them
    max_archived: int | None = None
    max_suppressed: int | None = None  # addresses
    dedupe_window: float | None = None
    max_dedupe: int | None = None

    @classmethod
    def from_wire(cls, m: dict) -> "Prune":
        return cls(num(m, "now"), num(m, "retention"), num(m, "archive_retention"),
                   *(opt_count(m, k) for k in ("max_finished", "max_archived", "max_suppressed")),
                   opt_num(m, "dedupe_window"), opt_count(m, "max_dedupe"))


# ------------------------------------------------------------------------------- group

@command
class Group(Command):
    """Commands one node proposed together in one entry (the bridge's group commit). Each is
    decoded and applied by itself, so a bad one is refused alone. Proposers never build this:
    the bridge frames already-encoded commands with `encode_group`."""

    op: ClassVar[str] = "group"
    cmds: Sequence[Any]  # each as decoded from msgpack, not yet checked

    @classmethod
    def from_wire(cls, m: dict) -> "Group":
        cmds = m.get("cmds")
        if not isinstance(cmds, list) or not cmds:
            raise CommandRefused("cmds must be a non-empty list")
        return cls(tuple(cmds))


# ------------------------------------------------------------------------------- codec

def decode_command(obj: Any) -> Command:
    """The typed command for a decoded msgpack value, every field checked; CommandRefused if not."""
    if isinstance(obj, Command):  # built in-process: checked exactly as it would come from the log
        obj = msgpack.unpackb(encode_command(obj), raw=False, strict_map_key=False)
    op = obj.get("op") if isinstance(obj, dict) else None
    cls = COMMANDS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise CommandRefused(f"unknown command {op!r}")
    return cls.from_wire(obj)


def encode_command(command: Command | dict) -> bytes:
    """msgpack bytes of a command (a map: see the module docstring)."""
    wire = command.to_wire() if isinstance(command, Command) else command
    return msgpack.packb(wire, use_bin_type=True)


_GROUP_HEAD = msgpack.packb("op") + msgpack.packb("group") + msgpack.packb("cmds")


def encode_group(blobs: list[bytes]) -> bytes:
    """{"op": "group", "cmds": [...]} around commands already encoded: no second encoding."""
    n = len(blobs)
    array = bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big") if n < 2**16
                                              else b"\xdd" + n.to_bytes(4, "big"))
    return b"\x82" + _GROUP_HEAD + array + b"".join(blobs)
