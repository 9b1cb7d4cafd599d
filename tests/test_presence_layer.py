"""Presence in the layer: a group's members read from any process in one command, gone within the bound
after their process is SIGKILLed, and one member however many channels it has."""

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid

from conftest import ROOT

TIMEOUT = 3.0  # presence_timeout of these tests: the bound on a dead process's members

# A process that shows 100 members in a room, says so, then waits to be killed.
HOLDER = textwrap.dedent(
    """
    import asyncio, json, sys
    from channels_redis_cluster import RedisClusterChannelLayer

    async def main(hosts, prefix):
        layer = RedisClusterChannelLayer(hosts=hosts, prefix=prefix, presence_timeout=%s)
        channels = [await layer.new_channel() for _ in range(100)]
        for index, channel in enumerate(channels):
            await layer.presence_join("room", channel, f"member-{index}", f"Member {index}")
        print(json.dumps({"channels": channels}), flush=True)
        await asyncio.sleep(120)

    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2]))
    """ % TIMEOUT
)


async def test_members_are_read_from_another_process_and_counted_once_per_id(make_layer):
    alice_side, reader = make_layer(presence_timeout=TIMEOUT), make_layer(presence_timeout=TIMEOUT)
    first, second, bob = [await alice_side.new_channel() for _ in range(3)]
    await alice_side.presence_join("room", first, "alice", "Alice")
    await alice_side.presence_join("room", second, "alice", "Alice")  # a second tab
    await alice_side.presence_join("room", bob, "bob", None)
    members = {m["id"]: m for m in await reader.presence("room")}
    assert set(members) == {"alice", "bob"} and members["alice"]["name"] == "Alice" and members["bob"]["name"] is None
    assert sorted(members["alice"]["channels"]) == sorted([first, second])
    assert await alice_side.presence_leave("room", [first]) == 1
    assert {m["id"] for m in await reader.presence("room")} == {"alice", "bob"}
    assert await alice_side.presence_leave("room", [second, bob]) == 2
    assert await reader.presence("room") == []
    assert await alice_side.presence_leave("room", [second]) == 0  # gone already: nothing to say


async def test_join_and_leave_events_reach_watchers_only_when_something_changed(make_layer):
    layer, watching = make_layer(presence_timeout=TIMEOUT), make_layer(presence_timeout=TIMEOUT)
    events = asyncio.Queue()
    await watching.presence_watch("room", events.put_nowait)
    member = await layer.new_channel()
    await layer.presence_join("room", member, "m1", "M", event={"type": "presence.join", "id": "m1"})
    assert await asyncio.wait_for(events.get(), 5) == {"type": "presence.join", "id": "m1"}
    await layer.presence_leave("room", [member], event={"type": "presence.leave", "id": "m1"})
    await layer.presence_leave("room", [member], event={"type": "presence.leave", "id": "again"})
    await layer.presence_join("room", member, "m2", "M", event={"type": "marker"})
    assert await asyncio.wait_for(events.get(), 5) == {"type": "presence.leave", "id": "m1"}
    assert await asyncio.wait_for(events.get(), 5) == {"type": "marker"}
    await watching.presence_unwatch("room", events.put_nowait)
    assert watching.keys.presence_channel("room") not in (await watching._state()).presence_watchers


async def test_members_of_a_sigkilled_process_are_gone_within_the_timeout(make_layer, cluster_hosts):
    prefix = f"pr{uuid.uuid4().hex[:6]}"
    reader = make_layer(prefix=prefix, presence_timeout=TIMEOUT)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, json.dumps(cluster_hosts), prefix,
        cwd=ROOT / "services", stdout=subprocess.PIPE, env={"PYTHONPATH": str(ROOT / "services"), "PATH": ""},
    )
    try:
        channels = json.loads(await asyncio.wait_for(holder.stdout.readline(), 60))["channels"]
        gone = asyncio.get_running_loop().create_future()
        assert len(await reader.presence("room")) == 100
        await reader.on_processes_gone(lambda prefixes: gone.done() or gone.set_result(prefixes))
        holder.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await holder.wait()
        while await reader.presence("room"):
            assert time.monotonic() - killed_at <= TIMEOUT + 0.5, "members of a dead process outlived the bound"
            await asyncio.sleep(0.05)
        hidden_after = time.monotonic() - killed_at
        assert await asyncio.wait_for(gone, TIMEOUT) == {reader.owner_of(channels[0])}
        # The reader that met them removed them: nobody pays for them again.
        key = reader.keys.group_presence("room")
        state = await reader._state()
        for _ in range(100):
            if not await state.publisher.execute(key.encode(), "HLEN", key):
                break
            await asyncio.sleep(0.05)
        assert not await state.publisher.execute(key.encode(), "HLEN", key)
        print(f"100 members of a SIGKILLed process hidden after {hidden_after:.2f} s (bound {TIMEOUT} s)")
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
