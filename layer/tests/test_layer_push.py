"""Layer push on a real Redis Cluster: attached receivers, and LayerPushMixin's order, backlog and failures."""

import asyncio
import contextvars
import uuid
from typing import ClassVar

import pytest
from channels.consumer import AsyncConsumer
from channels.layers import channel_layers
from channels.testing import ApplicationCommunicator
from django.test import override_settings

from channels_redis_cluster.consumer import LayerPushMixin, start_eagerly


async def until(condition, timeout=5):
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_attached_channel_gets_group_and_direct_messages_instead_of_its_buffer(make_layer):
    owner, sender = make_layer(), make_layer()
    channel = await owner.new_channel()
    arrived = []
    await owner.attach(channel, lambda message: arrived.append(message) or True)
    await owner.group_add("pushed", channel)
    await sender.group_send("pushed", {"type": "m", "n": 1})
    await sender.send(channel, {"type": "m", "n": 2})
    await until(lambda: len(arrived) == 2)
    assert [m["n"] for m in arrived] == [1, 2]
    owner.detach(channel)
    await sender.group_send("pushed", {"type": "m", "n": 3})
    assert (await asyncio.wait_for(owner.receive(channel), 3))["n"] == 3  # back to receive() once detached
    assert len(arrived) == 2


async def test_a_full_or_failing_receiver_is_counted_and_does_not_stop_the_others(make_layer):
    owner, sender = make_layer(), make_layer()
    full, failing, healthy = [await owner.new_channel() for _ in range(3)]
    arrived = []

    def fail(message):
        raise RuntimeError("receiver bug")

    await owner.attach(full, lambda message: False)
    await owner.attach(failing, fail)
    await owner.attach(healthy, lambda message: arrived.append(message) or True)
    for channel in (full, failing, healthy):
        await owner.group_add("mixed", channel)
    for n in range(3):
        await sender.group_send("mixed", {"type": "m", "n": n})
    await until(lambda: len(arrived) == 3)
    assert [m["n"] for m in arrived] == [0, 1, 2]
    assert owner.stats["overflow"] == 6


async def test_attach_refuses_a_channel_of_another_process(make_layer):
    owner, other = make_layer(), make_layer()
    channel = await other.new_channel()
    with pytest.raises(ValueError):
        await owner.attach(channel, lambda message: True)


class Recorder(LayerPushMixin, AsyncConsumer):
    """Joins a group when told to; its handlers wait on a gate when the message asks them to."""

    gate = started = None
    seen: ClassVar[list] = []

    async def join(self, message):
        await self.channel_layer.group_add(message["group"], self.channel_name)
        await self.send({"type": "joined"})
        if message.get("wait"):
            type(self).started.set()
            await type(self).gate.wait()

    async def note(self, message):
        if message.get("wait"):
            type(self).started.set()
            await type(self).gate.wait()
        if message.get("fail"):
            raise RuntimeError("handler bug")
        type(self).seen.append(message["n"])


@pytest.fixture
async def recorder(cluster_hosts, make_layer):
    """Starts Recorder connections on the default layer; returns (join, a layer in another process's role)."""
    prefix = f"push{uuid.uuid4().hex[:8]}"
    layers = {
        "default": {
            "BACKEND": "channels_redis_cluster.RedisClusterChannelLayer",
            "CONFIG": {"hosts": cluster_hosts, "prefix": prefix, "capacity": 2},
        },
        "memory": {"BACKEND": "channels.layers.InMemoryChannelLayer"},
    }
    with override_settings(CHANNEL_LAYERS=layers):
        Recorder.gate, Recorder.started, Recorder.seen = asyncio.Event(), asyncio.Event(), []
        communicators = []

        async def join(group, alias="default", wait=False):
            consumer = type("Consumer", (Recorder,), {"channel_layer_alias": alias})
            communicator = ApplicationCommunicator(consumer.as_asgi(), {"type": "test"})
            communicators.append(communicator)
            await communicator.send_input({"type": "join", "group": group, "wait": wait})
            assert await communicator.receive_output(timeout=5) == {"type": "joined"}
            return communicator

        yield join, make_layer(prefix=prefix)
        for communicator in communicators:
            if communicator.future.done():
                await communicator.wait(timeout=0)  # re-raises whatever ended the consumer
            else:
                communicator.future.cancel()
        await channel_layers["default"].close()


async def test_messages_behind_a_suspended_handler_wait_in_order_and_the_backlog_is_bounded(recorder):
    join, sender = recorder
    communicator = await join("slow")
    layer = channel_layers["default"]
    await sender.group_send("slow", {"type": "note", "n": 0, "wait": True})
    await asyncio.wait_for(Recorder.started.wait(), 5)
    for n in range(1, 5):
        await sender.group_send("slow", {"type": "note", "n": n})
    # Two wait behind the suspended handler (the channel's capacity); the other two are counted as overflow.
    await until(lambda: layer.stats["overflow"] == 2)
    assert Recorder.seen == []
    Recorder.gate.set()
    await until(lambda: len(Recorder.seen) == 3)
    assert Recorder.seen == [0, 1, 2]
    await communicator.send_input({"type": "join", "group": "after"})  # the connection still serves its client
    assert await communicator.receive_output(timeout=5) == {"type": "joined"}


async def test_layer_messages_wait_while_a_client_event_is_handled(recorder):
    join, sender = recorder
    await join("held", wait=True)  # the join handler stays suspended after joining
    layer = channel_layers["default"]
    await sender.group_send("held", {"type": "note", "n": 1})
    await until(lambda: layer.stats["delivered"] == 1)
    assert Recorder.seen == []
    Recorder.gate.set()
    await until(lambda: Recorder.seen == [1])


async def test_a_failing_layer_handler_closes_its_connection_with_1011(recorder):
    join, sender = recorder
    communicator = await join("failing")
    await sender.group_send("failing", {"type": "note", "n": 0, "fail": True})
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 1011}


async def test_layers_without_attach_run_channels_own_loop(recorder):
    join, _ = recorder
    await join("memory-group", alias="memory")
    await channel_layers["memory"].group_send("memory-group", {"type": "note", "n": 7})
    await until(lambda: Recorder.seen == [7])


HANDLER_VAR = contextvars.ContextVar("handler_var", default="caller's")


async def test_start_eagerly_gives_the_coroutine_a_context_of_its_own():
    gate = asyncio.Event()

    async def sets_and_waits():
        HANDLER_VAR.set("handler's")
        await gate.wait()
        return HANDLER_VAR.get()

    task = start_eagerly(sets_and_waits())
    assert HANDLER_VAR.get() == "caller's"
    gate.set()
    assert await task == "handler's"


async def test_start_eagerly_finishes_now_or_hands_the_rest_to_a_task():
    async def immediate():
        return 1

    assert start_eagerly(immediate()) is None
    gate, steps = asyncio.Event(), []

    async def suspends():
        steps.append("before")
        await gate.wait()
        steps.append("after")
        return 2

    task = start_eagerly(suspends())
    assert steps == ["before"] and not task.done()
    gate.set()
    assert await task == 2 and steps == ["before", "after"]
    gate.clear()
    steps.clear()
    cancelled = start_eagerly(suspends())
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert steps == ["before"]  # the cancellation reached the coroutine where it waited

    async def fails():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        start_eagerly(fails())
