"""The asyncio bridge's group commit, on a real single-member Raft node (journal on disk)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from raftmail.consensus.state import encode_command, encode_group
from raftmail.node.bridge import ProposalFailed, Proposer

from test_raft_wrapper import free_port, start_single, submit_cmd

pytestmark = pytest.mark.timeout(60)


def test_encode_group_wraps_encoded_commands() -> None:
    import msgpack
    for n in (1, 15, 16, 70000):
        cmds = [{"op": "noop", "i": i} for i in range(n)]
        assert msgpack.unpackb(encode_group([encode_command(c) for c in cmds])) == {"op": "group", "cmds": cmds}


def test_commands_proposed_together_share_entries_and_each_gets_its_own_result(tmp_path: Path) -> None:
    node = start_single(tmp_path, f"127.0.0.1:{free_port()}")

    async def main() -> tuple[list, Proposer]:
        proposer = Proposer(node, asyncio.get_running_loop(), max_waiting=500, max_entries_in_flight=1)
        cmds = [submit_cmd(i) for i in range(200)]
        cmds[7] = {"op": "no-such-op"}  # refused alone; its neighbours still commit
        results = await asyncio.gather(*(proposer.propose(c, 10) for c in cmds))
        return results, proposer
    try:
        results, proposer = asyncio.run(main())
        assert results[7] == {"error": "unknown command 'no-such-op'"}
        assert [r for i, r in enumerate(results) if i != 7] == [[["ok", f"s{i}"]] for i in range(200) if i != 7]
        assert proposer.commands == 200 and proposer.entries <= 10, proposer.entries
        assert node.read(lambda st: len(st.submissions)) == 199
    finally:
        node.stop()


def test_a_command_never_proposed_before_its_deadline_fails_as_not_committed(tmp_path: Path) -> None:
    node = start_single(tmp_path, f"127.0.0.1:{free_port()}")

    async def main() -> None:
        proposer = Proposer(node, asyncio.get_running_loop(), max_waiting=500, max_entries_in_flight=1,
                            max_entry_bytes=10)  # one command per entry
        proposer.entries_in_flight = 1  # the one slot is taken (as by an entry pysyncobj never answers)
        with pytest.raises(ProposalFailed) as e:
            await proposer.propose(submit_cmd(1), 0.2)
        assert e.value.unknown is False  # certainly not in the log: the client may be told 451
        task = asyncio.create_task(proposer.propose(submit_cmd(2), 5))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        proposer.entries_in_flight = 0
        assert await proposer.propose(submit_cmd(3), 5) == [["ok", "s3"]]
        assert proposer.in_flight == 0
    try:
        asyncio.run(main())
        assert node.read(lambda st: sorted(st.submissions)) == ["s3"]
    finally:
        node.stop()


def test_too_many_waiting_commands_are_refused_at_once(tmp_path: Path) -> None:
    node = start_single(tmp_path, f"127.0.0.1:{free_port()}")

    async def main() -> list:
        proposer = Proposer(node, asyncio.get_running_loop(), max_waiting=5)
        return await asyncio.gather(*(proposer.propose(submit_cmd(i), 5) for i in range(8)),
                                    return_exceptions=True)
    try:
        results = asyncio.run(main())
        refused = [r for r in results if isinstance(r, ProposalFailed)]
        assert len(refused) == 3 and all(not r.unknown for r in refused)
    finally:
        node.stop()
