"""The layer called the way Django code outside consumers calls it: async_to_sync, a fresh loop per call."""

import asyncio
import concurrent.futures
import logging
import os
import subprocess
import sys
import threading
import uuid

import pytest
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


def receive(layer, channel):
    """One message of ``channel`` from sync code, failing instead of waiting forever."""
    return async_to_sync(asyncio.wait_for)(layer.receive(channel), 10)


def run_elsewhere(hosts, prefix, code):
    """Run ``code`` (statements using ``layer``) in a new Python process with a layer on the same prefix."""
    script = (
        "import sys; from asgiref.sync import async_to_sync\n"
        "from channels_redis_cluster import RedisClusterChannelLayer\n"
        f"layer = RedisClusterChannelLayer(hosts={hosts!r}, prefix={prefix!r})\n" + code
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("history", [False, True], ids=["plain", "history"])
def test_a_normal_channel_in_a_group_outlives_the_process_that_added_it(cluster_hosts, history):
    """A worker's normal channel joins a group from a process that exits; sends from others still reach it."""
    prefix, group, worker = f"norm{uuid.uuid4().hex[:6]}", "jobs", "background-worker"
    config = {"group_history": {"*": 10}} if history else {}
    run_elsewhere(cluster_hosts, prefix, f"async_to_sync(layer.group_add)({group!r}, {worker!r})\n")
    layer = RedisClusterChannelLayer(hosts=cluster_hosts, prefix=prefix, **config)
    for n in range(3):
        async_to_sync(layer.group_send)(group, {"type": "job", "n": n})
    received = [receive(layer, worker) for _ in range(3)]
    assert [m["n"] for m in received] == [0, 1, 2]
    if history:
        assert [m["__offset__"] for m in received] == [1, 2, 3]
    # And a third process receives what a fourth sends, once the member is discarded no longer.
    async_to_sync(layer.group_discard)(group, worker)
    async_to_sync(layer.group_send)(group, {"type": "job", "n": 3})
    run_elsewhere(cluster_hosts, prefix, f"async_to_sync(layer.group_add)({group!r}, {worker!r})\n")
    run_elsewhere(cluster_hosts, prefix, f"async_to_sync(layer.group_send)({group!r}, {{'type': 'job', 'n': 4}})\n")
    assert receive(layer, worker)["n"] == 4, "a discarded member got a message"
    assert async_to_sync(layer.group_channels)(group) == [worker]


def test_a_channel_made_in_one_call_is_received_in_another(cluster_hosts):
    """new_channel, send and receive each in its own async_to_sync call, as a management command does."""
    layer = RedisClusterChannelLayer(hosts=cluster_hosts, prefix=f"spec{uuid.uuid4().hex[:6]}")
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.send)(channel, {"type": "first"})
    assert receive(layer, channel)["type"] == "first"
    assert layer.stats["parked"] == 1
    # A message waiting in a loop's buffer when its loop closes is kept for the next loop too.

    async def make_and_fill():
        made = await layer.new_channel()
        await layer.send(made, {"type": "buffered"})
        return made

    buffered = async_to_sync(make_and_fill)()
    assert receive(layer, buffered)["type"] == "buffered"
    other = RedisClusterChannelLayer(hosts=cluster_hosts, prefix="elsewhere")
    try:
        receive(other, channel)
    except ValueError:
        pass
    else:
        raise AssertionError("a channel of another process was received")


def test_a_channel_of_a_loop_in_another_thread_is_received_here(cluster_hosts):
    """A loop that runs in a thread makes the channel; the main thread's loop receives what is sent to it."""
    layer = RedisClusterChannelLayer(hosts=cluster_hosts, prefix=f"thr{uuid.uuid4().hex[:6]}")
    made, stop = concurrent.futures.Future(), threading.Event()

    async def owner():
        made.set_result(await layer.new_channel())
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await layer.close()

    thread = threading.Thread(target=asyncio.run, args=(owner(),))
    thread.start()
    try:
        channel = made.result(10)
        async_to_sync(layer.send)(channel, {"type": "across"})
        assert receive(layer, channel)["type"] == "across"
        assert layer.stats["parked"] == 0, "the owning loop listens: nothing goes through a queue"
    finally:
        stop.set()
        thread.join(10)
