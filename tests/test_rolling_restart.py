"""The `make run` topology under a rolling restart: every worker stopped with SIGTERM, one after another,
while a room talks. Resuming (v2) members miss nothing and get nothing twice; v1 members' loss is counted.
"""

import json
import os
import signal
from pathlib import Path

from conftest import ROOT, UNLIMITED_TYPING, local_stack
from loadtest.member import Conversation, Member, until

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


async def presence_in_redis(stack, group, every_channel=False):
    """The room's members as a fresh layer instance reads them from the stack's cluster; with
    ``every_channel``, the channels its hash holds, those a reader hides included."""
    from channels_redis_cluster import RedisClusterChannelLayer

    layer = RedisClusterChannelLayer(hosts=[f"redis://127.0.0.1:{port}" for port in stack["ports"][1:]])
    try:
        if every_channel:
            key, state = layer.keys.group_presence(group), await layer._state()
            return [channel.decode() for channel in await state.commands.execute(key.encode(), "HKEYS", key)]
        return await layer.presence(group)
    finally:
        await layer.close()


def save(name, report):
    """Write a lifecycle report to artifacts/ and print it."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(f"{name}:", json.dumps(report))


PRESENCE = {"CHAT_PRESENCE_GRACE": "1", "CHAT_PRESENCE_TIMEOUT": "3"}


async def test_rolling_restart_loses_nothing_for_resuming_members():
    with local_stack(DRAIN_SECONDS="1", **UNLIMITED_TYPING, **PRESENCE) as stack:
        room = await Conversation(stack["ws"], "rolling").start()
        watcher = await Member(stack["ws"], "rolling", presence=True).start()
        await room.typed_more(25)
        originals = gunicorn_workers(stack["process"])
        assert len(originals) == 3
        for pid in originals:
            os.kill(pid, signal.SIGTERM)
            await until(
                lambda pid=pid: pid not in gunicorn_workers(stack["process"]) and len(gunicorn_workers(stack["process"])) == 3,
                30,
                f"worker {pid} to be replaced",
            )
        await room.typed_more(50)
        # Presence after every worker was replaced: each socket open now is listed once, no one else.
        # Resuming members kept their ids; a v1 socket is a new member after each reconnect.
        expected = {m.member for m in (*room.members, room.sender, watcher)}
        everyone = len(expected) + len(room.plain)
        await until(lambda: expected <= set(watcher.present) and len(watcher.present) == everyone, 15, "the list to settle")
        listed = await presence_in_redis(stack, "chat_rolling")
        assert len(listed) == everyone and all(len(entry["channels"]) == 1 for entry in listed), listed
        assert watcher.connections >= 2
        await watcher.stop()
        await room.finish()
    report = room.report()
    save("rolling_restart", report)
    assert report["typed_messages_in_the_room_once"]
    assert all(member.connections >= 2 for member in room.members), "every worker was stopped, so every member reconnected"
    assert report["resuming_recovered_exactly"] == len(room.members)
    assert report["resuming_duplicates"] == 0
