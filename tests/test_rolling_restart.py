"""The `make run` topology under a rolling restart: every worker stopped with SIGTERM, one after another,
while a room talks. Resuming (v2) members miss nothing and get nothing twice; v1 members' loss is counted.
"""

import asyncio
import json
import os
import signal
from pathlib import Path

from conftest import ROOT, local_stack
from loadtest.member import Member

ARTIFACTS = ROOT / "artifacts"
INTERVAL = 0.02  # one message every 20 ms, as in the report


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


async def until(condition, timeout, what):
    """Wait for ``condition()`` to hold, checking every 50 ms; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_rolling_restart_loses_nothing_for_resuming_members():
    with local_stack(DRAIN_SECONDS="1") as stack:
        room = "rolling"
        resuming = [await Member(stack["ws"], room).start() for _ in range(16)]
        plain = [await Member(stack["ws"], room, v2=False).start() for _ in range(8)]
        sender = await Member(stack["ws"], room).start()
        sent = 0
        stop = asyncio.Event()

        async def talk():
            nonlocal sent
            while not stop.is_set():
                await sender.say(f"m{sent}", nonce=f"n{sent}")
                sent += 1
                await asyncio.sleep(INTERVAL)

        talking = asyncio.ensure_future(talk())
        await until(lambda: sent >= 25, 10, "traffic before the restarts")
        originals = gunicorn_workers(stack["process"])
        assert len(originals) == 3
        for pid in originals:
            os.kill(pid, signal.SIGTERM)
            await until(lambda: pid not in gunicorn_workers(stack["process"]) and len(gunicorn_workers(stack["process"])) == 3,
                        30, f"worker {pid} to be replaced")
        await until(lambda: sent >= 25 + 50, 10, "traffic after the restarts")
        stop.set()
        await talking
        await until(lambda: not sender.pending, 30, "the sender's typed messages to come back")
        texts = [text for _, _, text in sender.messages]
        top = sender.offset
        await until(lambda: all(member.offset == top for member in resuming), 30, "every resuming member to reach the top")
        await asyncio.sleep(0.5)  # time for a duplicate or a v1 straggler to show; nothing is awaited here
        for member in (*resuming, *plain, sender):
            await member.stop()

    typed = [f"m{n}" for n in range(sent)]
    report = {
        "messages_typed": sent,
        "room_got_each_typed_message_once": sorted(texts) == sorted(typed),
        "resuming_members": len(resuming),
        "resuming_missed": sum(len(set(range(m.joined_at + 1, top + 1)) - set(m.offsets())) for m in resuming),
        "resuming_duplicates": sum(len(m.offsets()) - len(set(m.offsets())) for m in resuming),
        "resuming_reconnects": sum(m.connections - 1 for m in resuming),
        "resumes_not_recovered": sum(not r for m in resuming for r in m.recoveries),
        "v1_members": len(plain),
        "v1_missed": sum(len(set(typed) - set(m.messages)) for m in plain),
        "v1_reconnects": sum(m.connections - 1 for m in plain),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "rolling_restart.json").write_text(json.dumps(report, indent=2))
    print("rolling restart:", json.dumps(report))
    assert sorted(texts) == sorted(typed), "every typed message reached the room exactly once"
    for member in resuming:
        assert member.connections >= 2, "every worker was stopped, so every member reconnected"
        assert member.offsets() == list(range(member.joined_at + 1, top + 1)), "no gap and no duplicate"
        assert all(member.recoveries)
    assert report["resuming_missed"] == 0 and report["resuming_duplicates"] == 0
