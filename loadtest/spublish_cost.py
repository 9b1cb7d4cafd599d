"""Redis CPU per SPUBLISH against its subscribers, measured directly: the check of the capacity model's Redis cost.

The model (loadtest/capacity.py) takes Redis µs per group_send, a fixed part and a part per subscribed
worker, from timings of whole group_sends (one script that numbers, keeps and publishes). Here the part
per subscriber is measured without the layer: ``subscribers`` plain connections SSUBSCRIBE one shard
channel on one primary and read everything; a publisher sends ``messages`` SPUBLISH of a room message's
size; the node's own CPU (every thread, from schedstat) over the publishes, less the same publishes to
no subscriber, divided by the pushes. That counts what a command timer misses: writing the pushes to
the subscribers' sockets happens after the command, when the node flushes its clients.
"""

import asyncio

import redis.asyncio as aioredis

from loadtest.benchload import cpu_seconds

PAYLOAD = b"x" * 180  # about a room message as the layer publishes it (text, sender, offset, epoch, time)


async def _primary_for(cluster, channel):
    """(port, pid) of the primary serving ``channel``'s slot."""
    host, port = cluster.startup_nodes[0].rsplit(":", 1)
    client = aioredis.RedisCluster(host=host, port=int(port))
    try:
        await client.initialize()
        node = client.get_node_from_key(channel)
        return node.port, int((await client.info("server", target_nodes=node))["process_id"])
    finally:
        await client.aclose()


async def _run(port, pid, channel, subscribers, messages):
    """Node CPU seconds spent on ``messages`` publishes to ``subscribers`` readers, all read."""
    readers = [aioredis.Redis(port=port) for _ in range(subscribers)]
    pubsubs = [reader.pubsub() for reader in readers]
    for pubsub in pubsubs:
        await pubsub.execute_command("SSUBSCRIBE", channel)
        await pubsub.parse_response(block=True)  # the subscription's confirmation
    received = [0] * subscribers

    async def read(index, pubsub):
        while received[index] < messages:
            reply = await pubsub.parse_response(block=True)
            if reply and reply[0] in (b"smessage", "smessage"):
                received[index] += 1

    reading = [asyncio.ensure_future(read(i, p)) for i, p in enumerate(pubsubs)]
    publisher = aioredis.Redis(port=port)
    before = cpu_seconds(pid)
    for start in range(0, messages, 100):
        async with publisher.pipeline(transaction=False) as pipe:
            for _ in range(min(100, messages - start)):
                pipe.execute_command("SPUBLISH", channel, PAYLOAD)
            await pipe.execute()
    await asyncio.wait_for(asyncio.gather(*reading), 60)
    spent = cpu_seconds(pid) - before
    await publisher.aclose()
    for pubsub, reader in zip(pubsubs, readers):
        await pubsub.aclose()
        await reader.aclose()
    return spent


async def measure(cluster, subscriber_counts=(0, 10, 50, 100), messages=2000, repeats=3):
    """µs of node CPU per publish at each subscriber count (median of ``repeats``), and the fitted µs per subscriber."""
    channel = "spublish-cost-{room}"
    port, pid = await _primary_for(cluster, channel)
    per_publish = {}
    for count in subscriber_counts:
        runs = sorted([await _run(port, pid, channel, count, messages) for _ in range(repeats)])
        per_publish[count] = round(1e6 * runs[len(runs) // 2] / messages, 2)
    xs, ys = list(per_publish), list(per_publish.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return {
        "messages": messages,
        "payload_bytes": len(PAYLOAD),
        "us_per_publish": {str(k): v for k, v in per_publish.items()},
        "us_per_publish_alone": round(mean_y - slope * mean_x, 2),
        "us_per_subscriber": round(slope, 3),
    }
