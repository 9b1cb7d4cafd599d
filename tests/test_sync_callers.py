"""The layer called the way Django code outside consumers calls it: async_to_sync, a fresh loop per call."""

import asyncio
import logging
import os
import threading
import uuid

from asgiref.sync import async_to_sync

from channels_redis_cluster import RedisClusterChannelLayer

CALLS = 50


def descriptors():
    return len(os.listdir("/proc/self/fd"))


class Listener:
    """A layer in an event loop of its own thread: a channel in a group, counting what arrives."""

    def __init__(self, hosts, prefix, group):
        self.layer = RedisClusterChannelLayer(hosts=hosts, prefix=prefix)
        self.group, self.received = group, []
        self.joined, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self.run(),), daemon=True)
        self.thread.start()
        assert self.joined.wait(10), "the listener did not join its group"

    async def run(self):
        channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, channel)
        self.joined.set()
        try:
            while len(self.received) < CALLS:
                self.received.append(await asyncio.wait_for(self.layer.receive(channel), 10))
        finally:
            await self.layer.close()
            self.done.set()


def test_group_send_from_sync_code_reaches_the_group_and_leaves_nothing_open(cluster_hosts, caplog):
    prefix, group = f"sync{uuid.uuid4().hex[:6]}", "sync-room"
    listener = Listener(cluster_hosts, prefix, group)
    layer = RedisClusterChannelLayer(hosts=cluster_hosts, prefix=prefix)
    async_to_sync(layer.group_send)(group, {"type": "warm.up", "n": -1})
    before = descriptors()
    with caplog.at_level(logging.WARNING):
        for n in range(CALLS - 1):
            async_to_sync(layer.group_send)(group, {"type": "chat.message", "n": n})
    assert listener.done.wait(20), f"{len(listener.received)} of {CALLS} arrived"
    assert [m["n"] for m in listener.received] == [-1, *range(CALLS - 1)]
    # Each call's loop closed its connections with it: no descriptor is left per call.
    assert descriptors() - before <= 2, f"{descriptors() - before} descriptors left after {CALLS - 1} calls"
    assert layer.stats["resubscribes"] == 0, "a closed loop is not a failover"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert not layer._states, "no loop state outlives its loop"


def test_a_forked_child_and_its_parent_both_send(cluster_hosts):
    """A process that forks after using the layer (a prefork server, a Celery pool): both go on sending."""
    prefix, group = f"fork{uuid.uuid4().hex[:6]}", "fork-room"
    listener = Listener(cluster_hosts, prefix, group)
    layer = RedisClusterChannelLayer(hosts=cluster_hosts, prefix=prefix)
    async_to_sync(layer.group_send)(group, {"type": "chat.message", "n": -1})
    child = os.fork()
    if child == 0:
        status = 1
        try:
            for n in range(CALLS // 2):
                async_to_sync(layer.group_send)(group, {"type": "chat.message", "n": 1000 + n})
            status = 0
        finally:
            os._exit(status)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    for n in range(CALLS // 2 - 1):
        async_to_sync(layer.group_send)(group, {"type": "chat.message", "n": n})
    assert listener.done.wait(20), f"{len(listener.received)} of {CALLS} arrived"
    numbers = [m["n"] for m in listener.received]
    assert sorted(numbers) == sorted([-1, *range(1000, 1000 + CALLS // 2), *range(CALLS // 2 - 1)])
