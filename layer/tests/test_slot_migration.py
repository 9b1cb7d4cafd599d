"""Move a room's slot to another primary under traffic: the same layer objects follow it."""

import asyncio
import time

from channels_redis_cluster import RedisClusterChannelLayer
from channels_redis_cluster.testing import migrate_slot


async def test_group_follows_its_slot_to_another_primary(own_cluster):
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    receiver = RedisClusterChannelLayer(hosts=hosts, prefix="mig")
    sender = RedisClusterChannelLayer(hosts=hosts, prefix="mig")
    channel = await receiver.new_channel()
    await receiver.group_add("moving-room", channel)
    await sender.group_send("moving-room", {"type": "before"})
    assert (await asyncio.wait_for(receiver.receive(channel), 3))["type"] == "before"

    shard_channel = receiver.keys.group_channel("moving-room")
    source = own_cluster.primary_for(shard_channel)
    target = next(port for port in own_cluster.running_primaries() if port != source)
    migrate_slot(own_cluster, shard_channel.decode(), target)
    assert own_cluster.primary_for(shard_channel) == target

    # Until the receiver has resubscribed on the new owner, a message may miss it (and be counted).
    deadline = time.monotonic() + 10
    n = 0
    while True:
        n += 1
        await sender.group_send("moving-room", {"type": "probe", "n": n})
        try:
            message = await asyncio.wait_for(receiver.receive(channel), 0.2)
            if message["type"] == "probe":
                break
        except TimeoutError:
            assert time.monotonic() < deadline, "delivery did not resume after the slot moved"
    for m in range(20):
        await sender.group_send("moving-room", {"type": "after", "m": m})
    got = []
    while len(got) < 20:
        message = await asyncio.wait_for(receiver.receive(channel), 3)
        if message["type"] == "after":
            got.append(message["m"])
    assert got == list(range(20))
    assert await sender.group_channels("moving-room") == [channel], "membership moved with the slot"
    await sender.close()
    await receiver.close()
