"""The `make run` topology under a rolling restart: every worker stopped with SIGTERM, one after another,
while a room talks. Resuming (v2) members miss nothing and get nothing twice; v1 members' loss is counted.
"""

import json
import os
import signal
from pathlib import Path

from conftest import ROOT, UNLIMITED_TYPING, local_stack
from loadtest.member import Conversation, until

ARTIFACTS = ROOT / "artifacts"


def children(pid):
    """Direct child processes of ``pid``."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def command_line(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def gunicorn_workers(stack_process):
    """PIDs of the uvicorn workers under the stack's gunicorn master."""
    master = next(pid for pid in children(stack_process.pid) if "gunicorn" in command_line(pid))
    return children(master)


def save(name, report):
    """Write a lifecycle report to artifacts/ and print it."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(f"{name}:", json.dumps(report))


async def test_rolling_restart_loses_nothing_for_resuming_members():
    with local_stack(DRAIN_SECONDS="1", **UNLIMITED_TYPING) as stack:
        room = await Conversation(stack["ws"], "rolling").start()
        await room.typed_more(25)
        originals = gunicorn_workers(stack["process"])
        assert len(originals) == 3
        for pid in originals:
            os.kill(pid, signal.SIGTERM)
            await until(lambda: pid not in gunicorn_workers(stack["process"]) and len(gunicorn_workers(stack["process"])) == 3,
                        30, f"worker {pid} to be replaced")
        await room.typed_more(50)
        await room.finish()
    report = room.report()
    save("rolling_restart", report)
    assert report["typed_messages_in_the_room_once"]
    assert all(member.connections >= 2 for member in room.members), "every worker was stopped, so every member reconnected"
    assert report["resuming_recovered_exactly"] == len(room.members)
    assert report["resuming_duplicates"] == 0
