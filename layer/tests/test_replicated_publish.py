"""A room message is published only once its primary's replica holds it: with the replica stopped, a send is
refused and nobody receives it; its resend with the same idempotency key, once the replica is back, lands once.
On Valkey 8 and later the write, the WAIT and the publish go out in one round trip; on Redis in two."""

import asyncio
import signal
import time

import pytest

from channels_redis_cluster import RedisClusterChannelLayer
from channels_redis_cluster.cluster import NotReplicated
from channels_redis_cluster.testing import server_binary, server_version, wait_until


async def room_with_one_message(cluster, prefix, group):
    """A layer and a channel in ``group`` that got one message (offset 1): the scripts are loaded, so later
    sends take the path every send takes."""
    hosts = [f"redis://{node}" for node in cluster.startup_nodes]
    layer = RedisClusterChannelLayer(hosts=hosts, prefix=prefix, history_size=50, replica_timeout=0.3)
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    assert await layer.group_send(group, {"type": "m", "n": 0}) == 1
    assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 0
    return layer, channel


def replica_of(cluster, layer, group):
    """The server process of the replica of ``group``'s primary."""
    primary = cluster.primary_for(layer.keys.group_channel(group))
    return cluster.processes[int(cluster.client(primary).execute_command("ROLE")[2][0][1])]


async def test_a_send_its_replica_did_not_confirm_is_refused_and_its_resend_lands_once(own_cluster):
    layer, channel = await room_with_one_message(own_cluster, "rp", "held")
    stopped = replica_of(own_cluster, layer, "held")
    stopped.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(NotReplicated):
            await layer.group_send("held", {"type": "m", "n": 1}, idempotency_key="k1")
        assert time.monotonic() - started < 0.3 + layer.command_timeout
        assert layer.stats["not_replicated"] == 1
        # Written on the primary, but neither published nor shown as history.
        found = await layer.group_history("held", 0, (await layer.group_history("held")).epoch)
        assert (found.offset, [m["n"] for m in found.messages]) == (1, [0])
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 1.0)  # bounded: the message that must not come
    finally:
        stopped.send_signal(signal.SIGCONT)
    assert await layer.group_send("held", {"type": "m", "n": 1}, idempotency_key="k1") == 2
    assert await layer.group_send("held", {"type": "m", "n": 2}, idempotency_key="k2") == 3
    got = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(2)]
    assert [(m["n"], m["__offset__"]) for m in got] == [(1, 2), (2, 3)]
    assert layer.stats["duplicates_suppressed"] == 1
    found = await layer.group_history("held", 0, got[0]["__epoch__"])
    assert [m["n"] for m in found.messages] == [0, 1, 2] and found.recovered
    await layer.close()


async def test_published_as_written_when_asked(own_cluster):
    """With replicate_before_publish off a stopped replica changes nothing for the sender (the old behaviour)."""
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    layer = RedisClusterChannelLayer(hosts=hosts, prefix="rq", history_size=50, replicate_before_publish=False)
    channel = await layer.new_channel()
    await layer.group_add("fast", channel)
    primary = own_cluster.primary_for(layer.keys.group_channel("fast"))
    replica = int(own_cluster.client(primary).execute_command("ROLE")[2][0][1])
    own_cluster.processes[replica].send_signal(signal.SIGSTOP)
    try:
        assert await layer.group_send("fast", {"type": "m"}) == 1
        assert (await asyncio.wait_for(layer.receive(channel), 5))["__offset__"] == 1
    finally:
        own_cluster.processes[replica].send_signal(signal.SIGCONT)
    await layer.close()


@pytest.mark.parametrize("scripts_wait", [True, False], ids=["scripts ask WAIT", "publish in a second round trip"])
async def test_a_replica_marked_failed_since_the_slot_map_was_read_is_not_waited_for(own_cluster, scripts_wait):
    """The slot map is read every ``follow_interval``, and a stopped replica is marked failed after the node
    timeout: a send between the two waits for it in vain, asks the primary, finds it failed, and is
    published, not refused; so is the next one, which waits for no replica. Both ways of publishing: where
    scripts ask WAIT (Valkey 8+) and where they cannot (Redis, told here by the layer's own switch)."""
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    layer = RedisClusterChannelLayer(hosts=hosts, prefix="rf", history_size=50, replica_timeout=0.3, follow_interval=3600)
    channel = await layer.new_channel()
    await layer.group_add("gone", channel)
    assert await layer.group_send("gone", {"type": "m", "n": 0}) == 1
    assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 0
    for pipeline in (await layer._state()).commands.pipelines.values():
        pipeline.scripts_wait = pipeline.scripts_wait and scripts_wait
    primary = own_cluster.primary_for(layer.keys.group_channel("gone"))
    stopped = replica_of(own_cluster, layer, "gone")
    stopped_id = own_cluster.client(primary).execute_command("ROLE")[2][0][1]

    def marked_failed():
        lines = own_cluster.client(primary).execute_command("CLUSTER", "NODES")
        lines = lines if isinstance(lines, str) else lines.decode()
        line = next(line for line in lines.splitlines() if line.split()[1].split(":")[1].split("@")[0] == stopped_id)
        return "fail" in line.split()[2].split(",")

    stopped.send_signal(signal.SIGSTOP)
    try:
        await asyncio.to_thread(wait_until, marked_failed, "the stopped replica marked failed")
        assert await layer.group_send("gone", {"type": "m", "n": 1}) == 2
        got = await asyncio.wait_for(layer.receive(channel), 5)
        assert (got["n"], got["__offset__"]) == (1, 2)
        assert layer.stats["not_replicated"] == 0
        await (await layer._state()).topology.refresh()  # the one the first send started (it waits for the stopped node)
        started = time.monotonic()
        assert await layer.group_send("gone", {"type": "m", "n": 2}) == 3
        assert time.monotonic() - started < 0.3  # no wait now: the map leaves the stopped replica out
        got = await asyncio.wait_for(layer.receive(channel), 5)
        assert (got["n"], got["__offset__"]) == (2, 3)
    finally:
        stopped.send_signal(signal.SIGCONT)
    await layer.close()


def scripts_ask_wait():
    """Whether the servers the tests run count a connection's own writes when a script asks WAIT (Valkey 8+)."""
    name, version = server_version(server_binary())
    return name == "valkey" and int(version.split(".")[0]) >= 8


async def test_a_replicated_send_is_published_in_one_round_trip_where_scripts_can_ask_wait(own_cluster):
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    layer = RedisClusterChannelLayer(hosts=hosts, prefix="ro", history_size=50)
    channel = await layer.new_channel()
    await layer.group_add("trip", channel)
    for n in range(5):
        assert await layer.group_send("trip", {"type": "m", "n": n}, idempotency_key=f"k{n}") == n + 1
    assert await layer.group_send("trip", {"type": "m", "n": 4}, idempotency_key="k4") == 5  # a duplicate
    got = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(5)]
    assert [(m["n"], m["__offset__"]) for m in got] == [(n, n + 1) for n in range(5)]
    # The publishing script is loaded as the pipeline connects, so every send took one round trip on Valkey,
    # the first included; a duplicate publishes by offset (its own entry is an earlier one).
    assert layer.stats["published_in_one_round_trip"] == (5 if scripts_ask_wait() else 0)
    assert layer.stats["duplicates_suppressed"] == 1
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.5)  # bounded: the duplicate must not come
    await layer.close()


async def test_the_layer_asks_wait_from_a_script_only_where_it_counts_this_connections_writes(own_cluster):
    """With the replica stopped, a write on a connection and then WAIT from a script on it: Valkey 8+ answers
    that no replica holds the write; Redis 7.0 refuses WAIT in a script, and later Redis and Valkey 7 count the
    stopped replica. The layer must tell them apart."""
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    # Its send only opens the pipelines, where the layer tells the servers apart: it need not wait for a replica
    # (on a new cluster under CI's load, the replica's first acknowledgement once took longer than 0.5 s).
    layer = RedisClusterChannelLayer(hosts=hosts, prefix="rw", history_size=50, replicate_before_publish=False)
    await layer.group_send("probe", {"type": "m"})
    key = layer.keys.group_channel("probe")
    primary = own_cluster.primary_for(key)
    replica = int(own_cluster.client(primary).execute_command("ROLE")[2][0][1])
    stopped = own_cluster.processes[replica]
    stopped.send_signal(signal.SIGSTOP)
    try:
        with own_cluster.client(primary).pipeline(transaction=False) as one_connection:
            one_connection.set(key, "written while the replica is stopped")
            one_connection.eval("return redis.call('WAIT', 1, 0)", 0)
            counted = one_connection.execute(raise_on_error=False)[1]
    finally:
        stopped.send_signal(signal.SIGCONT)
    pipelines = list((await layer._state()).commands.pipelines.values())
    assert pipelines and {pipeline.scripts_wait for pipeline in pipelines} == {counted == 0}
    if scripts_ask_wait():
        assert counted == 0
    else:
        assert counted == 1 or "not allowed from script" in str(counted), counted
    await layer.close()


async def test_a_resend_whose_numbers_started_again_publishes_its_first_copy(own_cluster):
    """A sender's numbers start again after a quiet spell, so a resend's frame can carry the header of an
    older entry still in the history: the resend must publish its first copy, not take the older one for it."""
    layer, channel = await room_with_one_message(own_cluster, "rs", "quiet")
    stopped = replica_of(own_cluster, layer, "quiet")
    stopped.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(NotReplicated):
            await layer.group_send("quiet", {"type": "m", "n": 1}, idempotency_key="k1")
    finally:
        stopped.send_signal(signal.SIGCONT)
    (await layer._state()).sent.set(
        layer.keys.group_channel("quiet"), 0
    )  # what a quiet spell does: the next frame is number 1 again
    assert await layer.group_send("quiet", {"type": "m", "n": 1}, idempotency_key="k1") == 2
    got = await asyncio.wait_for(layer.receive(channel), 5)
    assert (got["n"], got["__offset__"]) == (1, 2)
    assert layer.stats["duplicates_suppressed"] == 1
    await layer.close()


async def test_a_resend_from_a_new_connection_waits_for_the_replicas_of_its_first_copy(own_cluster):
    """A duplicate writes no new entry, and a connection that wrote nothing has nothing for WAIT to wait for:
    the resend still must not publish a first copy its replicas do not hold."""
    first, channel = await room_with_one_message(own_cluster, "rn", "held")
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    second = RedisClusterChannelLayer(hosts=hosts, prefix="rn", history_size=50, replica_timeout=0.3)
    # Its slot map and connection made now: loaded with the replica stopped, they could outlast the node
    # timeout (2 s here), and a replica the cluster marks failed is rightly not waited for.
    await second.group_history("held")
    stopped = replica_of(own_cluster, first, "held")
    stopped.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(NotReplicated):
            await first.group_send("held", {"type": "m", "n": 1}, idempotency_key="k1")
        with pytest.raises(NotReplicated):  # another process resends it: its connection has written nothing
            await second.group_send("held", {"type": "m", "n": 1}, idempotency_key="k1")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first.receive(channel), 1.0)  # bounded: the message that must not come yet
    finally:
        stopped.send_signal(signal.SIGCONT)
    assert await second.group_send("held", {"type": "m", "n": 1}, idempotency_key="k1") == 2
    got = await asyncio.wait_for(first.receive(channel), 5)
    assert (got["n"], got["__offset__"]) == (1, 2)
    await first.close()
    await second.close()
