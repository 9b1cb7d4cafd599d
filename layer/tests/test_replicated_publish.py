"""A room message is published only once its primary's replica holds it: with the replica stopped, a send is
refused and nobody receives it; its resend with the same idempotency key, once the replica is back, lands once."""

import asyncio
import signal
import time

import pytest

from channels_redis_cluster import RedisClusterChannelLayer
from channels_redis_cluster.cluster import NotReplicated


async def test_a_send_its_replica_did_not_confirm_is_refused_and_its_resend_lands_once(own_cluster):
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    layer = RedisClusterChannelLayer(hosts=hosts, prefix="rp", history_size=50, replica_timeout=0.3)
    channel = await layer.new_channel()
    await layer.group_add("held", channel)
    primary = own_cluster.primary_for(layer.keys.group_channel("held"))
    replica = int(own_cluster.client(primary).execute_command("ROLE")[2][0][1])
    stopped = own_cluster.processes[replica]
    stopped.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(NotReplicated):
            await layer.group_send("held", {"type": "m", "n": 1}, idempotency_key="k1")
        assert time.monotonic() - started < 0.3 + layer.command_timeout
        assert layer.stats["not_replicated"] == 1
        # Written on the primary, but neither published nor shown as history.
        found = await layer.group_history("held", 0, (await layer.group_history("held")).epoch)
        assert (found.offset, found.messages) == (0, [])
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 1.0)  # bounded: the message that must not come
    finally:
        stopped.send_signal(signal.SIGCONT)
    assert await layer.group_send("held", {"type": "m", "n": 1}, idempotency_key="k1") == 1
    assert await layer.group_send("held", {"type": "m", "n": 2}, idempotency_key="k2") == 2
    got = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(2)]
    assert [(m["n"], m["__offset__"]) for m in got] == [(1, 1), (2, 2)]
    assert layer.stats["duplicates_suppressed"] == 1
    found = await layer.group_history("held", 0, got[0]["__epoch__"])
    assert [m["n"] for m in found.messages] == [1, 2] and found.recovered
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
