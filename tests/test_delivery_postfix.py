"""Delivery's pipelined SMTP client against Postfix: its smtp-sink and its smtpd (a private
instance from bench/lib/postfix.py, relaying into an aiosmtpd recorder). Both offer PIPELINING,
so MAIL, RCPT and DATA go in one write. Skipped where Postfix is not installed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raftmail.node.routes import Route
from test_delivery import Recorder, make_messages, run_batch, start_server, wait_until

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.lib import postfix  # noqa: E402
from bench.lib.peers import find_tool, running_as_root  # noqa: E402
from bench.lib.procs import free_port, wait_port  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world_readable_dir():
    # Postfix's own user and smtp-sink's "nobody" must reach their folders; pytest's are private.
    path = Path(tempfile.mkdtemp(prefix="raftmail-postfix-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def test_smtp_sink_takes_a_pipelined_batch(world_readable_dir: Path) -> None:
    binary = find_tool("smtp-sink")
    if binary is None:
        pytest.skip("smtp-sink is not installed (bench/install-peers.sh installs it)")
    dumps = world_readable_dir / "dumps"
    dumps.mkdir()
    os.chown(dumps, 65534, 65534)  # nobody
    port = free_port()
    user = ["-u", "nobody"] if running_as_root() else []
    sink = subprocess.Popen([binary, *user, "-d", f"{dumps}/%H%M%S.", f"127.0.0.1:{port}", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, 10.0, "smtp-sink")
        messages = make_messages(20)
        outcomes = asyncio.run(run_batch([Route("127.0.0.1", port)], messages))
        assert [(o.index, o.code) for o in outcomes] == [(i, 250) for i in range(20)]
        dumped = sorted(dumps.iterdir())
        assert len(dumped) == 20
        bodies = b"".join(p.read_bytes() for p in dumped)
        for _, recipient, _ in messages:
            assert f"To: {recipient}".encode() in bodies
        assert bodies.count(b"\n.dot\n") == 20  # dot-stuffing undone by the receiver (which writes LF)
    finally:
        sink.kill()
        sink.wait()


def test_postfix_smtpd_takes_a_pipelined_batch_with_a_refused_recipient(world_readable_dir: Path) -> None:
    why = postfix.available()
    if why:
        pytest.skip(why)

    async def scenario() -> None:
        recorder = Recorder()
        listener, relay_port = await start_server(recorder)
        refuse = "inline:{ { user1@example.org = 550 5.1.1 no such user } }"
        relay = postfix.PostfixRelay(world_readable_dir / "postfix", relay_port, settings={
            "smtpd_recipient_restrictions": f"check_recipient_access {refuse}, permit_mynetworks, reject",
        })
        await asyncio.to_thread(relay.start)
        try:
            messages = make_messages(4)
            outcomes = await run_batch([Route("127.0.0.1", relay.port)], messages)
            assert [(o.index, o.code) for o in outcomes] == [(0, 250), (1, 550), (2, 250), (3, 250)]
            assert outcomes[1].enhanced == "5.1.1" and "no such user" in outcomes[1].text
            # Postfix relays what it took into the recorder, bodies intact.
            await wait_until(lambda: len(recorder.transactions) == 3, deadline=60.0)
            got = {t.rcpt_tos[0]: t.content for t in recorder.transactions}
            for index, recipient, body in messages:
                if index != 1:
                    assert body.split(b"\r\n\r\n", 1)[1] in got[recipient]
            assert "user1@example.org" not in got
        finally:
            await asyncio.to_thread(relay.remove)
            listener.close()

    asyncio.run(scenario())
