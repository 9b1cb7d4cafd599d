"""A worker's event loop held up (a burst of closes, a long collection) is not a node that stopped answering:
a command in flight and a shard subscription both outlast a hold-up longer than their deadlines, because
what the node answered meanwhile is read before they judge. A node that answers nothing is still dropped
after its deadline (``tests/test_partitions.py`` swallows its packets)."""

import asyncio
import time

from channels_redis_cluster import RedisClusterChannelLayer

COMMAND_TIMEOUT = 0.5
HEALTH_INTERVAL = 0.2


def held_up(seconds):
    """Hold the event loop up from within one of its callbacks, as a long burst of work does."""
    asyncio.get_running_loop().call_soon(time.sleep, seconds)


async def test_a_command_in_flight_while_the_loop_is_held_up_is_answered(cluster_hosts):
    layer = RedisClusterChannelLayer(hosts=cluster_hosts, prefix="hu", command_timeout=COMMAND_TIMEOUT)
    commands = (await layer._state()).commands
    assert await commands.execute(b"held", "PING") == b"PONG"  # the pipeline to the key's primary is connected
    pipeline = commands.pipelines[(await layer._state()).topology.primary_for(b"held").name]
    answer = pipeline.execute("ECHO", "answered")  # written by the pipeline's task before the hold-up runs
    held_up(3 * COMMAND_TIMEOUT)
    assert await asyncio.wait_for(answer, 5) == b"answered"
    assert not pipeline.closed and layer.stats["command_deadlines"] == 0
    await layer.close()


async def test_a_subscription_outlasts_a_held_up_loop(cluster_hosts):
    layer = RedisClusterChannelLayer(
        hosts=cluster_hosts, prefix="hs", command_timeout=COMMAND_TIMEOUT, health_interval=HEALTH_INTERVAL
    )
    channel = await layer.new_channel()
    await layer.group_add("held", channel)
    state = await layer._state()
    readers = set(map(id, state.subscriber.readers.values()))
    held_up(3 * (HEALTH_INTERVAL + COMMAND_TIMEOUT))
    await asyncio.sleep(0)  # the hold-up runs here
    await asyncio.sleep(3 * (HEALTH_INTERVAL + COMMAND_TIMEOUT))  # rounds of the watch after it, judged
    assert layer.stats["command_deadlines"] == 0
    assert set(map(id, state.subscriber.readers.values())) == readers  # the same connections, not new ones
    await layer.group_send("held", {"type": "m", "n": 1})
    assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 1
    await layer.close()
