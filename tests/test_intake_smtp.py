"""IntakeSMTP's shortcuts around aiosmtpd must not change what aiosmtpd decides: MAIL/RCPT path
parsing (_getaddr) and the per-connection hook tables. No cluster: server objects only."""
from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from aiosmtpd.smtp import SMTP, auth_mechanism
from hypothesis import given, settings
from hypothesis import strategies as st

from raftmail.node.intake import Intake
from raftmail.node.smtp_server import IntakeHandler, IntakeSMTP, _HookListing, start_smtp_server

from test_security import intake_for

SERVER_KW: dict[str, Any] = dict(data_size_limit=10_000, enable_SMTPUTF8=True, decode_data=False,
                                 hostname="intake.test", timeout=30, require_starttls=False,
                                 auth_require_tls=False)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def server(loop: asyncio.AbstractEventLoop) -> IntakeSMTP:
    return intake_server(loop)


def intake_server(loop: asyncio.AbstractEventLoop, handler: Any = None, **kw: Any) -> IntakeSMTP:
    return IntakeSMTP(handler or IntakeHandler(None), intake=None, connections={"open": 0, "refused": 0},  # type: ignore[arg-type]
                      max_connections=1, loop=loop, **{**SERVER_KW, **kw})


def outcome(getaddr: Callable[[str], Any], arg: str) -> tuple[str, Any]:
    try:
        return "returned", getaddr(arg)
    except Exception as e:  # aiosmtpd's parser raises IndexError on "<", for one
        return "raised", type(e)


# --------------------------------------------------------------------------------------------
# _getaddr: the fast path answers exactly as aiosmtpd's parser
# --------------------------------------------------------------------------------------------

ODD_PATHS = [
    "", "<>", "<> ", "<> SIZE=10", "<>SIZE=10", "<>>", "< >", "<", ">", "<<a@b.c>>", "<a@b.c>", "<a@b.c",
    "a@b.c", " <a@b.c>", "<a@b.c> SIZE=10 BODY=8BITMIME", "<a@b.c>SIZE=10", "<a@b.c>\tX", "<a@b.c> \t X",
    "<a@b.c>  \x0bX", "<a@b.c>\x0bX", "<a@b.c> (comment) X", "<a@b.c>(comment)", "<a@b.c> X (c)", "<a@b.c> >",
    "<a@b.c>>", "<a@b.c.>", "<.a@b.c>", "<a.@b.c>", "<a..b@c.d>", "<a@b..c>", "<a@@b.c>", "<a@b@c.d>",
    "<@b.c>", "<a@>", "<a>", "<a.b>", "<@x:a@b.c>", "<@x,@y:a@b.c>", '<"a b"@c.d>', '<"a"@c.d>', "<a\\b@c.d>",
    "<a b@c.d>", "<a@b c.d>", "<a(c)@b.d>", "<a@b(c).d>", "<a@[127.0.0.1]>", "<a@[IPv6:::1]>",
    "<=?utf-8?q?a?=@b.c>", "<a@=?utf-8?q?b?=>", "<a=?x@b.c>", "<a?=@b.c>", "<nëws@example.com>",
    "<a@exämple.com>", "<a@b\x0bc.d>", "<a\x00@b.c>", "<a@b.c\udcff>", "<a@b.c> \udcff", "<a@b.c>\r\nX",
    "<A.B-C+tag@Mail.Example.COM> SMTPUTF8", "<!#$%&'*+/=?^_`{|}~-@x.y>", "<a@b.c> SIZE=10\x85",
    "<a@b.c>\xa0SIZE", "<a@b.c>\u2003 SIZE", "<a@b.c>\t\t(x)(y) Z", "<a@b.c> \\", "<a@b.c> )",
]


@pytest.mark.parametrize("arg", ODD_PATHS)
def test_getaddr_matches_aiosmtpd_on_odd_paths(server: IntakeSMTP, arg: str) -> None:
    assert outcome(server._getaddr, arg) == outcome(lambda a: SMTP._getaddr(server, a), arg)


def test_getaddr_matches_aiosmtpd_with_a_local_part_limit(loop: asyncio.AbstractEventLoop) -> None:
    ours = intake_server(loop)
    ours.local_part_limit = 3
    for arg in ("<abc@d.e>", "<abcd@d.e>", "<> X", "<a@b.c> SIZE=1"):
        assert outcome(ours._getaddr, arg) == outcome(lambda a: SMTP._getaddr(ours, a), arg), arg


def test_getaddr_takes_the_fast_path_for_common_paths(loop: asyncio.AbstractEventLoop,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ours = intake_server(loop)
    expected = {arg: SMTP._getaddr(ours, arg) for arg in
                ("<news@example.com>", "<news@example.com> SIZE=2048 BODY=8BITMIME", "<>", "<> SIZE=10")}

    def parser(self: SMTP, arg: str) -> Any:
        raise AssertionError(f"parsed {arg!r} with aiosmtpd's parser")
    monkeypatch.setattr(SMTP, "_getaddr", parser)
    assert {arg: ours._getaddr(arg) for arg in expected} == expected


_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_ODD_WORDS = ["", "=?utf-8?q?x?=", "=?", "?=", '"q q"', "a b", "a\\b", "(c)", "[1.2.3.4]", "é", "\x0b", "\udcff",
              "@", "<", ">", ":", ","]
_REST = ["", " ", "  ", "\t", "\x0b", "\x85", "\xa0", "(c)", "(", ")", "SIZE=10", "BODY=8BITMIME", "X", ">", "<",
         "\\", "é", "\r\n"]
_words = st.one_of(st.text(alphabet=_ATEXT, min_size=1, max_size=6), st.sampled_from(_ODD_WORDS))
_dot_atoms = st.lists(_words, min_size=1, max_size=3).map(".".join)
_noise = st.lists(st.sampled_from([*_ATEXT, *_ODD_WORDS, *_REST]), max_size=8).map("".join)


@st.composite
def paths(draw: st.DrawFn) -> str:
    """Mostly near the simple form <local@domain>rest: odd words in the address, whitespace,
    comments and parameters after it, and sometimes noise spliced in anywhere."""
    address = draw(st.sampled_from(["", "x"])) and f"{draw(_dot_atoms)}@{draw(_dot_atoms)}"
    arg = (draw(st.sampled_from(["<", "<", "", " <"])) + address + draw(st.sampled_from([">", ">", ""]))
           + "".join(draw(st.lists(st.sampled_from(_REST), max_size=5))))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        at = draw(st.integers(0, len(arg)))
        arg = arg[:at] + draw(_noise) + arg[at:]
    return arg


@settings(derandomize=True, max_examples=3000, deadline=None, database=None)
@given(arg=paths())
def test_getaddr_matches_aiosmtpd_property(server: IntakeSMTP, arg: str) -> None:
    assert outcome(server._getaddr, arg) == outcome(lambda a: SMTP._getaddr(server, a), arg)


# --------------------------------------------------------------------------------------------
# Hook tables: the same as aiosmtpd's full scan builds
# --------------------------------------------------------------------------------------------

class OtherHandler:
    """More kinds of hooks than IntakeHandler has: a renamed AUTH mechanism, a '__' in a name."""

    async def handle_NOOP(self, server: SMTP, session: Any, envelope: Any, arg: str) -> str:
        return "250 OK"

    @auth_mechanism("X-TEST")
    async def auth_anything(self, server: SMTP, args: list[str]) -> Any:
        return None

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> Any:
        return None


class InstanceHook(IntakeSMTP):
    def __init__(self, *args: Any, **kw: Any) -> None:
        self.smtp_XYZZY = self.smtp_NOOP  # an instance attribute is listed by dir() too
        super().__init__(*args, **kw)


def tables(server: SMTP) -> dict[str, Any]:
    """aiosmtpd's tables, with methods bound to the server itself as (name, function) in order."""
    def unbound(method: Any) -> Any:
        return method.__func__ if getattr(method, "__self__", None) is server else method
    return {"auth": [(name, unbound(impl.method), impl.is_builtin) for name, impl in server._auth_methods.items()],
            "smtp": [(name, unbound(method)) for name, method in server._smtp_methods.items()],
            "handle": list(server._handle_hooks.items()), "ehlo": server._ehlo_hook_ver}


HANDLERS = {"intake": lambda: IntakeHandler(None), "other": OtherHandler, "none": object}


@pytest.mark.parametrize("cls", [IntakeSMTP, InstanceHook])
@pytest.mark.parametrize("exclude", [None, ["LOGIN"]])
@pytest.mark.parametrize("handler_name", list(HANDLERS))
def test_hook_tables_are_aiosmtpds(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch,
                                   cls: type[IntakeSMTP], exclude: list[str] | None, handler_name: str) -> None:
    handler = HANDLERS[handler_name]()
    kw = dict(intake=None, connections={"open": 0, "refused": 0}, max_connections=1, loop=loop,
              auth_exclude_mechanism=exclude, **SERVER_KW)
    ours = cls(handler, **kw)
    for obj in (ours, handler):
        assert not getattr(obj, "_listing_hooks_only", False) and dir(obj) == sorted(object.__dir__(obj))
    with monkeypatch.context() as m:  # the reference: aiosmtpd scans every attribute
        m.setattr(_HookListing, "__dir__", object.__dir__)
        reference = cls(handler, **kw)
    assert tables(ours) == tables(reference)
    if handler_name == "intake":
        assert tables(ours)["ehlo"] == "new"
        assert [name for name, *_ in tables(ours)["auth"]] == (["PLAIN"] if exclude else ["LOGIN", "PLAIN"])
    # A plain aiosmtpd server with the same handler: the same handler hooks, AUTH and commands.
    plain = SMTP(handler, loop=loop, auth_exclude_mechanism=exclude, **SERVER_KW)
    for key in ("handle", "ehlo"):
        assert tables(ours)[key] == tables(plain)[key]
    assert [(name, builtin) for name, _, builtin in tables(ours)["auth"]] == \
        [(name, builtin) for name, _, builtin in tables(plain)["auth"]]
    assert [name for name, _ in tables(ours)["smtp"]] == \
        sorted([name for name, _ in tables(plain)["smtp"]] + ["XYZZY"] * (cls is InstanceHook))


# --------------------------------------------------------------------------------------------
# A real server: the idle timer and the EHLO reply
# --------------------------------------------------------------------------------------------

def decisions_only_intake(tmp_path: Path, intake_toml: str) -> Intake:
    """An Intake for its SMTP decisions only: these sessions never reach the final dot."""
    return intake_for(tmp_path, f'allow_networks = ["127.0.0.1/32"]\n{intake_toml}')


async def reply(reader: asyncio.StreamReader) -> list[bytes]:
    lines = [await asyncio.wait_for(reader.readline(), 5)]
    while lines[-1][3:4] == b"-":
        lines.append(await asyncio.wait_for(reader.readline(), 5))
    return lines


def test_slow_message_text_is_not_idle_and_silence_gets_421_after_the_timeout(tmp_path: Path) -> None:
    idle = 0.6
    intake = decisions_only_intake(tmp_path, f"idle_timeout = {idle}")

    async def session() -> float:
        server = await start_smtp_server(intake, "127.0.0.1", 0, hostname="intake.test")
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        loop = asyncio.get_running_loop()
        try:
            assert (await reply(reader))[0].startswith(b"220")
            for command, code in ((b"EHLO c.test", b"250"), (b"MAIL FROM:<a@example.com>", b"250"),
                                  (b"RCPT TO:<b@example.com>", b"250"), (b"DATA", b"354")):
                writer.write(command + b"\r\n")
                assert (await reply(reader))[-1].startswith(code)
            for _ in range(6):  # 1.8 s of message text, never idle for 0.6 s
                writer.write(b"slow\r\n")
                last = loop.time()
                await asyncio.sleep(idle / 2)
            assert (await reply(reader))[0].startswith(b"421 4.4.2")
            return loop.time() - last
        finally:
            writer.close()
            server.close()

    silent_for = asyncio.run(session())
    assert idle - 0.05 <= silent_for <= idle + 1.0, silent_for


def test_the_ehlo_reply_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    intake = decisions_only_intake(tmp_path, "")
    pushed: list[Any] = []
    push = SMTP.push

    async def recording_push(self: SMTP, status: Any) -> None:
        pushed.append(status)
        await push(self, status)
    monkeypatch.setattr(SMTP, "push", recording_push)

    async def session() -> list[bytes]:
        server = await start_smtp_server(intake, "127.0.0.1", 0, hostname="intake.test")
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        try:
            await reply(reader)
            pushed.clear()
            writer.write(b"EHLO client.test\r\n")
            return await reply(reader)
        finally:
            writer.close()
            server.close()

    lines = asyncio.run(session())
    assert lines[0] == b"250-intake.test\r\n" and lines[-1] == b"250 HELP\r\n" and len(lines) > 3, lines
    assert pushed == [b"".join(lines)[:-2].decode()]


def test_password_checks_are_bounded_and_never_stall_other_sessions(tmp_path: Path) -> None:
    """scrypt runs in the AUTH pool, two at a time, with a short waiting line: AUTH beyond it gets
    454 at once (no slow-down: not the client's failure), and other sessions keep their replies."""
    from raftmail.node.auth import hash_password
    slow_hash = hash_password("right", n=2**16)  # about 0.2 s per check
    intake = decisions_only_intake(tmp_path, f'allow_plaintext_auth_on_loopback = true\n'
                                             f'[intake.users]\nalice = "{slow_hash}"')
    assert intake.auth is not None
    intake.auth.max_waiting = 2
    token = base64.b64encode(b"\0alice\0right")

    async def session() -> tuple[list[bytes], float]:
        server = await start_smtp_server(intake, "127.0.0.1", 0, hostname="intake.test")
        address = server.sockets[0].getsockname()[:2]
        try:
            clients = [await asyncio.open_connection(*address) for _ in range(8)]
            bystander = await asyncio.open_connection(*address)
            for reader, writer in [*clients, bystander]:
                await reply(reader)
                writer.write(b"EHLO c.test\r\n")
                await reply(reader)
            for _, writer in clients:  # every AUTH at once
                writer.write(b"AUTH PLAIN " + token + b"\r\n")
            await asyncio.sleep(0.05)  # the checks are under way
            loop = asyncio.get_running_loop()
            started = loop.time()
            bystander[1].write(b"NOOP\r\n")
            assert (await reply(bystander[0]))[0].startswith(b"250")
            noop = loop.time() - started
            answers = [(await asyncio.wait_for(reply(reader), 10))[0][:3] for reader, _ in clients]
            for _, writer in [*clients, bystander]:
                writer.close()
            return answers, noop
        finally:
            server.close()

    answers, noop = asyncio.run(session())
    assert answers.count(b"454") >= 1 and answers.count(b"235") >= 4, answers
    assert set(answers) <= {b"235", b"454"}, answers
    assert noop < 0.15, noop


# --------------------------------------------------------------------------------------------
# aiosmtpd internals: every one listed, and the start-up check finds one that is gone
# --------------------------------------------------------------------------------------------

# What IntakeSMTP overrides that aiosmtpd documents (or asyncio's Protocol defines).
DOCUMENTED_OVERRIDES = {"connection_made", "connection_lost", "push"}


def test_the_installed_aiosmtpd_has_every_internal_intake_relies_on() -> None:
    import aiosmtpd

    from raftmail.node.smtp_server import AIOSMTPD_VERSION, aiosmtpd_mismatches, check_aiosmtpd
    assert aiosmtpd.__version__ == AIOSMTPD_VERSION
    assert aiosmtpd_mismatches() == []
    check_aiosmtpd()


def test_every_aiosmtpd_name_intake_overrides_or_reads_is_listed() -> None:
    import re

    from raftmail.node import smtp_server as intake
    listed = {name for name, _, _ in intake.AIOSMTPD_INTERNALS}
    overridden = {n for n in vars(IntakeSMTP) if hasattr(SMTP, n) and not n.startswith("__")}
    assert overridden - DOCUMENTED_OVERRIDES <= listed
    # Private names of aiosmtpd's read or set anywhere in the module (our own never clash).
    source = Path(intake.__file__).read_text()
    used = set(re.findall(r"(?:self|super\(\)|server)\.(_[A-Za-z]\w*)", source))
    theirs = set(dir(SMTP)) | intake._code_strings(SMTP.__init__.__code__)
    assert used & theirs <= listed


async def _renamed_async(self: Any, argument: str) -> None:
    pass


@pytest.mark.parametrize("name, change, phrase", [
    ("_timeout_cb", None, "SMTP._timeout_cb (a method)"),
    ("_getaddr", lambda self, address: None, "SMTP._getaddr(self, arg)"),
    ("smtp_DATA", lambda self, arg: None, "SMTP.smtp_DATA (an async method)"),
    ("check_auth_needed", _renamed_async, "SMTP.check_auth_needed(self, caller_method)"),
    ("command_size_limits", None, "SMTP.command_size_limits (a class attribute of type dict)"),
])
def test_the_check_names_an_internal_that_is_gone_or_changed(monkeypatch: pytest.MonkeyPatch, name: str,
                                                              change: Any, phrase: str) -> None:
    from raftmail.node.smtp_server import AiosmtpdMismatch, check_aiosmtpd
    if change is None:
        monkeypatch.delattr(SMTP, name)
    else:
        monkeypatch.setattr(SMTP, name, change)
    with pytest.raises(AiosmtpdMismatch) as e:
        check_aiosmtpd()
    assert "aiosmtpd 1.4.6" in str(e.value) and phrase in str(e.value), str(e.value)


def test_the_check_names_an_attribute_init_no_longer_sets() -> None:
    from raftmail.node.smtp_server import aiosmtpd_mismatches

    class Renamed(SMTP):
        def __init__(self) -> None:  # sets neither _timeout_handle nor _timeout_duration
            self.timer = None

    assert "SMTP._timeout_handle (an attribute SMTP.__init__ sets)" in aiosmtpd_mismatches(Renamed)
    assert any("hooks named smtp_*" in m for m in aiosmtpd_mismatches(Renamed))
