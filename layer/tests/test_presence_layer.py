"""Presence in the layer: a group's members read from any process in one command, gone within the bound
after their process is SIGKILLed (and then removed from Redis by a live process), one member however
many channels it has, and written back when a failover or a lost lease made Redis forget them."""

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

from channels_redis_cluster import RedisClusterChannelLayer

TIMEOUT = 3.0  # presence_timeout of these tests: the bound on a dead process's members

# A process that shows 100 members in each of its rooms ("room" unless named), says so, then waits to be killed.
HOLDER = textwrap.dedent(
    """
    import asyncio, json, sys
    from channels_redis_cluster import RedisClusterChannelLayer

    async def main(hosts, prefix, rooms):
        layer = RedisClusterChannelLayer(hosts=hosts, prefix=prefix, presence_timeout=PRESENCE_TIMEOUT)
        channels = [await layer.new_channel() for _ in range(100)]
        for room in rooms:
            for index, channel in enumerate(channels):
                await layer.presence_join(room, channel, f"member-{index}", f"Member {index}")
        print(json.dumps({"channels": channels}), flush=True)
        await asyncio.sleep(120)

    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:] or ["room"]))
    """
).replace("PRESENCE_TIMEOUT", str(TIMEOUT))


async def start_holder(hosts, prefix, *rooms):
    """The holder process and its channels, once they are all shown."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        json.dumps(hosts),
        prefix,
        *rooms,
        stdout=subprocess.PIPE,
        env={"PATH": ""},
    )
    try:
        return holder, json.loads(await asyncio.wait_for(holder.stdout.readline(), 60))["channels"]
    except BaseException:
        holder.kill()
        await holder.wait()
        raise


async def command(layer, key, *args):
    """One command on the primary of ``key``'s slot, through ``layer``'s connections."""
    state = await layer._state()
    return await state.commands.execute(key.encode(), *args)


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
    assert watching.keys.presence_channel("room") not in (await watching._state()).presence.watchers


async def test_members_of_a_sigkilled_process_are_gone_within_the_timeout(make_layer, cluster_hosts):
    prefix = f"pr{uuid.uuid4().hex[:6]}"
    reader = make_layer(prefix=prefix, presence_timeout=TIMEOUT)
    holder, channels = await start_holder(cluster_hosts, prefix)
    try:
        gone = asyncio.get_running_loop().create_future()
        assert len(await reader.presence("room")) == 100
        await reader.on_channels_gone(lambda is_gone: gone.done() or gone.set_result(is_gone))
        holder.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await holder.wait()
        while await reader.presence("room"):
            assert time.monotonic() - killed_at <= TIMEOUT + 0.5, "members of a dead process outlived the bound"
            await asyncio.sleep(0.05)
        hidden_after = time.monotonic() - killed_at
        is_gone = await asyncio.wait_for(gone, TIMEOUT)
        assert all(is_gone(channel) for channel in channels) and not is_gone(await reader.new_channel())
        # Removed from Redis too (by the reader that met them or by the live process that reaps them).
        key = reader.keys.group_presence("room")
        for _ in range(100):
            if not await command(reader, key, "HLEN", key):
                break
            await asyncio.sleep(0.05)
        assert not await command(reader, key, "HLEN", key)
        print(f"100 members of a SIGKILLed process hidden after {hidden_after:.2f} s (bound {TIMEOUT} s)")
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_a_dead_process_entries_are_removed_by_a_live_one_without_a_read(make_layer, cluster_hosts):
    prefix = f"pr{uuid.uuid4().hex[:6]}"
    # Ended leases are forgotten after group_expiry: 4 s here, so the test sees that happen too.
    live = make_layer(prefix=prefix, presence_timeout=TIMEOUT, group_expiry=4)
    await live.on_channels_gone(lambda is_gone: None)  # a live process that renews its lease and never reads
    holder, channels = await start_holder(cluster_hosts, prefix, "room", "hall")
    dead = live.owner_of(channels[0])
    keys = [live.keys.group_presence(room) for room in ("room", "hall")]
    groups = live.keys.presence_groups(dead)
    assert [await command(live, key, "HLEN", key) for key in keys] == [100, 100]
    assert sorted(await command(live, groups, "SMEMBERS", groups)) == [b"hall", b"room"]
    holder.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await holder.wait()
    bound = TIMEOUT + TIMEOUT / 3 + 1  # the lease ends, a renewal sees it, the reap runs
    while any([await command(live, key, "HLEN", key) for key in keys]):
        assert time.monotonic() - killed_at <= bound, "a dead process's entries stayed in Redis"
        await asyncio.sleep(0.05)
    reaped_after = time.monotonic() - killed_at
    assert live.stats["presence_reaped"] == 200
    reaping, leases = live.keys.presence_reaping(), live.keys.presence_leases()
    # Marked reaped, and its group set deleted, in one script run just after the last group's removal.
    while await command(live, reaping, "HGET", reaping, dead) != b"done":
        assert time.monotonic() - killed_at <= bound + 1, "the dead process was never marked reaped"
        await asyncio.sleep(0.05)
    assert not await command(live, groups, "EXISTS", groups)
    # Once forgotten, the lease's mark goes with it: nothing of a dead process stays, and nothing returns.
    while await command(live, leases, "ZSCORE", leases, dead) is not None:
        assert time.monotonic() - killed_at <= bound + 4 + TIMEOUT, "an ended lease was never forgotten"
        await asyncio.sleep(0.1)
    assert not await command(live, reaping, "HEXISTS", reaping, dead)
    assert await live.presence("room") == [] and await live.presence("hall") == []
    print(f"200 entries of a SIGKILLed process removed from Redis after {reaped_after:.2f} s (bound {bound:.1f} s)")


async def test_entries_lost_with_a_lease_are_written_back(make_layer):
    holder = make_layer(presence_timeout=TIMEOUT)
    channels = [await holder.new_channel() for _ in range(20)]
    for index, channel in enumerate(channels):
        await holder.presence_join("room", channel, f"m{index}", None)
    await holder.presence_leave("room", channels[:5])
    key, leases = holder.keys.group_presence("room"), holder.keys.presence_leases()
    groups = holder.keys.presence_groups((await holder._state()).client_prefix)
    # The node of the leases came back empty, and the room's entries were lost as well.
    for name in (leases, groups, key):
        await command(holder, name, "DEL", name)
    lost_at = time.monotonic()
    while await command(holder, key, "HLEN", key) < 15:
        assert time.monotonic() - lost_at <= TIMEOUT / 3 + 1, "entries of a lost lease were not written back"
        await asyncio.sleep(0.05)
    assert {m["id"] for m in await holder.presence("room")} == {f"m{index}" for index in range(5, 20)}
    assert await command(holder, groups, "SMEMBERS", groups) == [b"room"]
    assert holder.stats["presence_restored"] == 15


async def test_a_new_process_writes_nothing_back_at_its_first_renewals(make_layer, redis_cluster):
    """A lease missing at a process's first renewal is a new one, not a lost one: nothing is written back then
    (it once ran a script per group on the first three beats, when a reconnect storm fills a new worker)."""
    holder = make_layer(presence_timeout=TIMEOUT)
    key = holder.keys.group_presence("room")
    port = redis_cluster.primary_for(key)
    seen, stop = [], threading.Event()

    def watch():
        with redis_cluster.client(port).monitor() as monitor:
            for command in monitor.listen():
                if stop.is_set():
                    return
                if not command["command"].startswith("SCRIPT LOAD"):  # a script's text, not what ran
                    seen.append(command["command"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    channels = [await holder.new_channel() for _ in range(5)]
    for index, channel in enumerate(channels):
        await holder.presence_join("room", channel, f"m{index}", None)
    await asyncio.sleep(2 * TIMEOUT / 3 + 0.5)  # two more renewals: bounded, what must not happen is awaited
    await command(holder, key, "HLEN", key)  # one command after them, so the monitor has seen them all
    stop.set()
    assert any("HSETNX" in line or "HSET" in line for line in seen), "the monitor saw none of the joins"
    assert not [line for line in seen if "HSETNX" in line], "entries were written back with no lease lost"
    await holder.presence_leave("room", channels)


async def test_entries_a_failover_lost_are_written_back_and_shown(own_cluster):
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    holder = RedisClusterChannelLayer(hosts=hosts, prefix="pf", presence_timeout=TIMEOUT)
    watcher = RedisClusterChannelLayer(hosts=hosts, prefix="pf", presence_timeout=TIMEOUT)
    try:
        channels = [await holder.new_channel() for _ in range(50)]
        for index, channel in enumerate(channels):
            await holder.group_add("room", channel)  # as a chat socket is: the process subscribes the room's slot
            await holder.presence_join("room", channel, f"m{index}", None)
        events = asyncio.Queue()
        await watcher.presence_watch("room", events.put_nowait)
        key = holder.keys.group_presence("room")
        victim = own_cluster.primary_for(key)
        # What asynchronous replication loses in a failover is what the replica never got; deleting it on
        # the primary and waiting for the replica to apply that leaves the replica as such a loss would.
        primary = own_cluster.client(victim)
        primary.delete(key)
        assert primary.execute_command("WAIT", 1, 5000) == 1
        own_cluster.kill(victim)
        killed_at = time.monotonic()
        # As a watcher's view does: read the members again whenever told to (a subscription gap, or the
        # holder saying it wrote entries back). Joins and leaves of others would come as events.
        shown, bound = set(), own_cluster.node_timeout_ms / 1000 + 10
        while len(shown) < 50:
            event = await asyncio.wait_for(events.get(), bound - (time.monotonic() - killed_at))
            if event is None:
                shown = {m["id"] for m in await watcher.presence("room")}
        assert shown == {f"m{index}" for index in range(50)}
        assert holder.stats["presence_restored"] == 50
        assert {m["id"] for m in await watcher.presence("room")} == shown
        print(f"50 entries lost in a failover written back and shown {time.monotonic() - killed_at:.2f} s after the kill")
    finally:
        await holder.close()
        await watcher.close()


async def test_a_process_paused_past_its_lease_comes_back_listed(make_layer, cluster_hosts):
    prefix = f"pr{uuid.uuid4().hex[:6]}"
    live = make_layer(prefix=prefix, presence_timeout=TIMEOUT)
    await live.on_channels_gone(lambda is_gone: None)  # renews, and so reaps
    holder, channels = await start_holder(cluster_hosts, prefix)
    key, reaping = live.keys.group_presence("room"), live.keys.presence_reaping()
    try:
        holder.send_signal(signal.SIGSTOP)  # a frozen VM, a debugger: alive, but its lease ends
        paused_at = time.monotonic()
        while await command(live, key, "HLEN", key):
            assert time.monotonic() - paused_at <= TIMEOUT + TIMEOUT / 3 + 1, "a paused process's entries were never reaped"
            await asyncio.sleep(0.05)
        holder.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        # Its next renewal finds its lease ended: it writes its entries back, and again on the next beats,
        # since readers that still take it for dead may remove them until they see it renewed.
        while len(await live.presence("room")) != 100:
            assert time.monotonic() - resumed_at <= TIMEOUT + 2, "a process back from a pause stayed unlisted"
            await asyncio.sleep(0.1)
        back_after = time.monotonic() - resumed_at
        await asyncio.sleep(TIMEOUT)  # a window for a late reaper or reader to remove them again; nothing to await
        assert len(await live.presence("room")) == 100 and await command(live, key, "HLEN", key) == 100
        assert await command(live, reaping, "HGET", reaping, live.owner_of(channels[0])) is None  # reaped again if it dies
        print(f"100 entries of a process paused past its lease listed again {back_after:.2f} s after it resumed")
    finally:
        holder.kill()
        await holder.wait()
