"""The layer's scripts are in each primary's script cache before its first command: a burst of one script on a
new cluster meets no NOSCRIPT (every call of the burst is sent before the first answer, so loading on the
first NOSCRIPT cost one error and one EVAL of the whole text per call). A node whose scripts were flushed
(SCRIPT FLUSH) is still served, by EVAL."""

import asyncio

from asgiref.sync import async_to_sync

from channels_redis_cluster import RedisClusterChannelLayer, scripts

BURST = 200


def noscript_replies(cluster):
    """NOSCRIPT errors answered by every running node since it started."""
    total = 0
    for port in cluster.processes:
        stats = cluster.client(port).info("errorstats")
        total += stats.get("errorstat_NOSCRIPT", {}).get("count", 0)
    return total


async def burst(layer, group):
    """BURST members added, then all discarded at once: the script's first calls on its node, together."""
    channels = [await layer.new_channel() for _ in range(BURST)]
    await asyncio.gather(*(layer.group_add(group, channel) for channel in channels))
    await asyncio.gather(*(layer.group_discard(group, channel) for channel in channels))


async def test_a_burst_on_a_new_cluster_meets_no_noscript(own_cluster):
    layer = RedisClusterChannelLayer(hosts=[f"redis://{node}" for node in own_cluster.startup_nodes], prefix="sc")
    await burst(layer, "room")
    assert noscript_replies(own_cluster) == 0
    await layer.close()


async def test_a_node_that_lost_its_scripts_is_served_by_eval(own_cluster):
    layer = RedisClusterChannelLayer(hosts=[f"redis://{node}" for node in own_cluster.startup_nodes], prefix="sf")
    await burst(layer, "room")
    for port in own_cluster.running_primaries():
        own_cluster.client(port).script_flush()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)  # on a node that no longer holds the script: NOSCRIPT, then EVAL
    assert noscript_replies(own_cluster) > 0
    await layer.group_send("room", {"type": "m", "n": 1})
    assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 1
    await layer.close()


def test_a_sync_caller_loads_the_scripts_once_per_server(own_cluster):
    """Every ``async_to_sync`` call runs on a loop of its own, with pipelines of its own: the scripts are
    loaded by the first, not by each (15 of them, 23 KB, and a round trip more on every call)."""
    layer = RedisClusterChannelLayer(hosts=[f"redis://{node}" for node in own_cluster.startup_nodes], prefix="ss")
    for n in range(5):
        async_to_sync(layer.group_send)("room", {"type": "m", "n": n})
    loads = {
        port: own_cluster.client(port).info("commandstats").get("cmdstat_script|load", {}).get("calls", 0)
        for port in own_cluster.processes
    }
    assert max(loads.values()) == len(scripts.LOADED.scripts), loads  # the room's primary, once
