"""The channel layer API on a real Redis Cluster: the spec's semantics, as channels_redis is tested."""

import asyncio

import pytest
import redis
from channels.exceptions import ChannelFull

from channels_redis_cluster.keys import KeyScheme


async def receive(layer, channel, timeout=3):
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def nothing_for(layer, channel, seconds=0.5):
    """Assert that no message arrives on ``channel`` within ``seconds``."""
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), seconds)


async def test_send_receive_normal_channel(make_layer):
    layer = make_layer()
    await layer.send("test-channel-1", {"type": "test.message", "text": "Ahoy-hoy!"})
    assert await receive(layer, "test-channel-1") == {"type": "test.message", "text": "Ahoy-hoy!"}


async def test_send_receive_process_channel(make_layer):
    layer = make_layer()
    channel = await layer.new_channel()
    assert "!" in channel
    await layer.send(channel, {"type": "test.message", "text": "local"})
    assert (await receive(layer, channel))["text"] == "local"


async def test_direct_send_to_another_instance(make_layer):
    sender, owner = make_layer(), make_layer()
    channel = await owner.new_channel()
    await sender.send(channel, {"type": "test.message", "n": 1})
    assert (await receive(owner, channel))["n"] == 1


@pytest.mark.parametrize("name", ["", "white space", "ünïcode", "x" * 101, 42, None])
async def test_invalid_channel_names_raise_type_error(make_layer, name):
    layer = make_layer()
    with pytest.raises(TypeError):
        await layer.send(name, {"type": "x"})
    with pytest.raises(TypeError):
        await layer.group_add("group", name)


@pytest.mark.parametrize("name", ["", "bad group", "x" * 101, 42, "a!b"])
async def test_invalid_group_names_raise_type_error(make_layer, name):
    layer = make_layer()
    channel = await layer.new_channel()
    with pytest.raises(TypeError):
        await layer.group_add(name, channel)
    with pytest.raises(TypeError):
        await layer.group_send(name, {"type": "x"})


async def test_message_must_be_a_dict(make_layer):
    layer = make_layer()
    with pytest.raises(TypeError):
        await layer.send("test-channel", "not a dict")
    with pytest.raises(TypeError):
        await layer.group_send("group", ["not", "a", "dict"])


async def test_normal_channel_full_raises(make_layer):
    layer = make_layer(capacity=3)
    for n in range(3):
        await layer.send("full-channel", {"type": "x", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send("full-channel", {"type": "x", "n": 3})
    assert [(await receive(layer, "full-channel"))["n"] for _ in range(3)] == [0, 1, 2]


async def test_process_channel_full_raises(make_layer):
    layer = make_layer(capacity=2)
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "x"})
    await layer.send(channel, {"type": "x"})
    with pytest.raises(ChannelFull):
        await layer.send(channel, {"type": "x"})


async def test_channel_capacity_patterns(make_layer):
    layer = make_layer(capacity=100, channel_capacity={"small-*": 1})
    await layer.send("small-one", {"type": "x"})
    with pytest.raises(ChannelFull):
        await layer.send("small-one", {"type": "x"})
    for _ in range(5):
        await layer.send("large-one", {"type": "x"})


async def test_capacity_is_per_channel_not_per_process(make_layer):
    """channels_redis#97: one busy channel must not make the process's other channels full."""
    sender, owner = make_layer(capacity=3), make_layer(capacity=3)
    busy, quiet = await owner.new_channel(), await owner.new_channel()
    await owner.group_add("per-channel", busy)
    await owner.group_add("per-channel", quiet)
    for n in range(10):
        await sender.send(busy, {"type": "x", "n": n})
    await sender.group_send("per-channel", {"type": "group"})
    assert (await receive(owner, quiet)) == {"type": "group"}
    assert [(await receive(owner, busy))["n"] for _ in range(3)] == [0, 1, 2]


async def test_fifo_per_channel(make_layer):
    sender, owner = make_layer(), make_layer()
    channel = await owner.new_channel()
    for n in range(50):
        await sender.send(channel, {"type": "x", "n": n})
    assert [(await receive(owner, channel))["n"] for _ in range(50)] == list(range(50))
    for n in range(20):
        await sender.send("fifo-normal", {"type": "x", "n": n})
    assert [(await receive(owner, "fifo-normal"))["n"] for _ in range(20)] == list(range(20))


async def test_message_expiry(make_layer):
    layer = make_layer(expiry=1)
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "x"})
    await layer.send("expiring-normal", {"type": "x"})
    await asyncio.sleep(1.2)  # the behaviour under test is the passage of time
    await nothing_for(layer, channel)
    await nothing_for(layer, "expiring-normal", 1.5)


async def test_normal_channel_message_reaches_exactly_one_reader(make_layer):
    layers = [make_layer() for _ in range(3)]
    sender = make_layer()
    readers = [asyncio.ensure_future(layer.receive("shared-queue")) for layer in layers]
    for n in range(3):
        await sender.send("shared-queue", {"type": "x", "n": n})
    got = await asyncio.wait_for(asyncio.gather(*readers), 5)
    assert sorted(m["n"] for m in got) == [0, 1, 2]
    for layer in layers:
        await nothing_for(layer, "shared-queue", 0.3)


async def test_cancelled_receive_keeps_message(make_layer):
    layer = make_layer()
    channel = await layer.new_channel()
    await nothing_for(layer, channel, 0.1)
    await layer.send(channel, {"type": "x", "n": 1})
    assert (await receive(layer, channel))["n"] == 1


async def test_groups_across_instances(make_layer):
    a, b = make_layer(), make_layer()
    a1, a2, b1 = await a.new_channel(), await a.new_channel(), await b.new_channel()
    for layer, channel in ((a, a1), (a, a2), (b, b1)):
        await layer.group_add("room", channel)
    await b.group_send("room", {"type": "message.1"})
    assert (await receive(a, a1))["type"] == "message.1"
    assert (await receive(a, a2))["type"] == "message.1"
    assert (await receive(b, b1))["type"] == "message.1"
    await a.group_discard("room", a2)
    await b.group_send("room", {"type": "message.2"})
    assert (await receive(a, a1))["type"] == "message.2"
    assert (await receive(b, b1))["type"] == "message.2"
    await nothing_for(a, a2)


async def test_every_concurrent_group_add_returns_only_once_the_group_is_subscribed(make_layer):
    """A socket is accepted when group_add returns: a message sent right after must reach it, even when
    other members of the same new group join at the same moment (the subscription is still in flight)."""
    b = make_layer()
    await b.group_send("warm-up", {"type": "warm.up"})
    for round_ in range(10):
        # A fresh instance: its first subscription also opens the connection that carries it.
        a = make_layer()
        channels = [await a.new_channel() for _ in range(20)]
        group = f"burst-{round_}"
        for joined in asyncio.as_completed([a.group_add(group, channel) for channel in channels]):
            await joined
            break  # the first group_add to return; the rest are still in flight
        await b.group_send(group, {"type": "burst", "round": round_})
        for channel in channels:
            assert (await receive(a, channel))["round"] == round_


async def test_group_add_from_another_worker(make_layer):
    """Any instance may add a channel that lives on another one; the owner then receives group sends."""
    owner, other = make_layer(), make_layer()
    channel = await owner.new_channel()
    await other.group_add("remote-add", channel)
    await other.group_send("remote-add", {"type": "hello"})
    assert (await receive(owner, channel))["type"] == "hello"
    await other.group_discard("remote-add", channel)
    await other.group_send("remote-add", {"type": "after"})
    await nothing_for(owner, channel)


async def test_normal_channel_in_group(make_layer):
    a, b = make_layer(), make_layer()
    await a.group_add("with-normal", "normal-member")
    await b.group_send("with-normal", {"type": "to.normal"})
    assert (await receive(b, "normal-member"))["type"] == "to.normal"


async def test_group_expiry(make_layer):
    layer = make_layer(group_expiry=1)
    channel = await layer.new_channel()
    await layer.group_add("short-lived", channel)
    await asyncio.sleep(1.2)  # the behaviour under test is the passage of time
    await layer.group_send("short-lived", {"type": "x"})
    await nothing_for(layer, channel)
    assert await layer.group_channels("short-lived") == []


async def test_group_full_drops_and_counts(make_layer):
    layer = make_layer(capacity=2)
    channel = await layer.new_channel()
    await layer.group_add("overflow", channel)
    for n in range(4):
        await layer.group_send("overflow", {"type": "x", "n": n})
    assert [(await receive(layer, channel))["n"] for _ in range(2)] == [0, 1]
    await nothing_for(layer, channel, 0.3)
    assert layer.stats["overflow"] == 2


@pytest.mark.parametrize("history", [0, 10])
async def test_group_send_returns_once_members_in_the_sending_process_hold_the_message(make_layer, history):
    # Capacity then applies at send, as in channels_redis: a receive between sends frees no room for a later one.
    layer = make_layer(capacity=1000, history_size=history)
    channel = await layer.new_channel()
    await layer.group_add("echo", channel)
    for n in range(300):
        await layer.group_send("echo", {"type": "x", "n": n})
        assert layer.stats["delivered"] == n + 1, f"message {n} was not in its member's buffer yet"


async def test_group_members_listed_from_any_worker(make_layer):
    a, b = make_layer(), make_layer()
    a1, b1 = await a.new_channel(), await b.new_channel()
    await a.group_add("listed", a1)
    await b.group_add("listed", b1)
    assert sorted(await make_layer().group_channels("listed")) == sorted([a1, b1])


async def test_flush_removes_keys_and_membership(make_layer, redis_cluster):
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("flushed", channel)
    await layer.send("flushed-normal", {"type": "x"})
    await layer.flush()
    assert await layer.group_channels("flushed") == []
    await nothing_for(layer, "flushed-normal", 1.5)
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    assert list(client.scan_iter(match=layer.keys.pattern(), target_nodes=redis.RedisCluster.PRIMARIES)) == []
    client.close()


def test_every_name_of_a_group_or_channel_shares_one_slot():
    """Each operation touches one slot: the group's channel and member set hash alike."""
    from redis.crc import key_slot

    keys = KeyScheme("asgi")
    for group in ("lobby", "chat_room-1", "x" * 99):
        assert key_slot(keys.group_channel(group)) == key_slot(keys.group_members(group).encode())
    slots = {key_slot(keys.group_channel(f"room{n}")) for n in range(200)}
    assert len(slots) > 150, "groups must spread over the cluster's slots"


async def test_group_send_is_one_script_and_one_spublish_whatever_the_size(make_layer, redis_cluster):
    """One EVALSHA on the group's primary: it publishes once and reads the group's normal channels (none here)."""
    owner = make_layer()
    channels = [await owner.new_channel() for _ in range(50)]
    for channel in channels:
        await owner.group_add("big-room", channel)
    sender = make_layer()
    await sender.group_send("big-room", {"type": "warmup"})
    port = redis_cluster.primary_for(sender.keys.group_channel("big-room"))
    client = redis.Redis(port=port)
    client.config_resetstat()
    await sender.group_send("big-room", {"type": "counted"})
    for channel in channels:
        assert [(await receive(owner, channel))["type"] for _ in range(2)] == ["warmup", "counted"]
    stats = client.info("commandstats")
    client.close()
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert stats["cmdstat_spublish"]["calls"] == 1
    in_script = ("cmdstat_evalsha", "cmdstat_spublish", "cmdstat_zremrangebyscore", "cmdstat_zrange")
    # The slot map read once a second by every loop that holds subscriptions (CLUSTER NODES) is not the send's.
    background = ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_ping", "cmdstat_cluster|nodes")
    other = {name: value["calls"] for name, value in stats.items() if name not in (*in_script, *background)}
    assert not other, other


async def test_no_sequence_gaps_in_normal_operation(make_layer):
    sender, owner = make_layer(), make_layer()
    channel = await owner.new_channel()
    await owner.group_add("counted", channel)
    for n in range(100):
        await sender.group_send("counted", {"type": "x", "n": n})
    assert [(await receive(owner, channel))["n"] for _ in range(100)] == list(range(100))
    assert owner.stats["sequence_gaps"] == 0
    assert owner.stats["out_of_order"] == 0
