"""Room history in the layer: offsets, bounds, idempotency, and epochs across a change of writing server."""

import asyncio

from channels_redis_cluster.testing import send_numbered


async def test_offsets_are_gapless_and_messages_carry_them(make_layer):
    layer = make_layer(history_size=10)
    channel = await layer.new_channel()
    await layer.group_add("numbered", channel)
    offsets = [await layer.group_send("numbered", {"type": "m", "n": n}) for n in range(3)]
    assert offsets == [1, 2, 3]
    got = [await layer.receive(channel) for _ in range(3)]
    assert [m["__offset__"] for m in got] == [1, 2, 3] and len({m["__epoch__"] for m in got}) == 1
    assert [m["n"] for m in got] == [0, 1, 2]


async def test_history_off_delivers_messages_exactly_as_sent(make_layer):
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("plain", channel)
    assert await layer.group_send("plain", {"type": "m"}) is None
    assert await layer.receive(channel) == {"type": "m"}


async def test_bounds_by_size_and_age_and_per_pattern(make_layer):
    layer = make_layer(history_size=5, history_age=0.3, group_history={"big-*": {"size": 50}})
    for n in range(8):
        await layer.group_send("small", {"type": "m", "n": n})
        await layer.group_send("big-one", {"type": "m", "n": n})
    small = await layer.group_history("small", since=0, epoch=(await layer.group_history("small")).epoch)
    assert [m["n"] for m in small.messages] == [3, 4, 5, 6, 7] and not small.recovered
    assert len((await layer.group_history("big-one", last=50)).messages) == 8
    await asyncio.sleep(0.35)  # past the age bound
    aged = await layer.group_history("small", since=8, epoch=small.epoch)
    assert aged.messages == [] and aged.recovered and aged.offset == 8, "nothing missed: exact with nothing to replay"
    assert not (await layer.group_history("small", since=7, epoch=small.epoch)).recovered


async def test_a_new_writer_rotates_the_epoch_and_clients_up_to_its_top_resume_exactly(make_layer):
    layer = make_layer(history_size=100)
    for n in range(5):
        await layer.group_send("moved", {"type": "m", "n": n})
    before = await layer.group_history("moved")
    offset, _, rotated, _, _ = await send_numbered(layer, "moved", {"type": "m", "n": 5}, writer="another-server-process")
    assert (offset, rotated) == (6, 1)
    # This layer's own server process reads next: a second rotation, and the first epoch still links.
    after = await layer.group_history("moved", since=5, epoch=before.epoch)
    assert after.recovered and after.epoch != before.epoch and [m["n"] for m in after.messages] == [5]
    assert layer.stats["epoch_rotations"] >= 1


async def test_writes_lost_in_a_failover_are_never_reused_under_the_same_epoch(make_layer):
    """The promoted replica never got offsets 4-5: new messages take 4-5 again, under a new epoch."""
    layer = make_layer(history_size=100)
    for n in range(5):
        await layer.group_send("lossy", {"type": "m", "n": n})
    old = await layer.group_history("lossy")
    state = await layer._state()
    meta, log, _ = layer.keys.group_history("lossy")
    await state.commands.execute(meta.encode(), "HSET", meta, "top", 3)  # the replica's state: offsets 1-3
    await state.commands.execute(log.encode(), "LTRIM", log, 0, 2)
    offset, epoch, rotated, _, _ = await send_numbered(layer, "lossy", {"type": "m", "n": "new"}, writer="promoted-replica")
    assert offset == 4 and rotated == 1 and epoch.decode() != old.epoch
    saw_lost = await layer.group_history("lossy", since=5, epoch=old.epoch)
    assert not saw_lost.recovered and [m["n"] for m in saw_lost.messages] == ["new"]
    before_fork = await layer.group_history("lossy", since=2, epoch=old.epoch)
    assert before_fork.recovered and [m["n"] for m in before_fork.messages] == [2, "new"]
    assert {m["__epoch__"] for m in before_fork.messages} == {before_fork.epoch} and before_fork.epoch != old.epoch


async def test_an_idempotency_key_is_published_once_within_the_window(make_layer):
    layer = make_layer(history_size=3)
    channel = await layer.new_channel()
    await layer.group_add("once", channel)
    assert await layer.group_send("once", {"type": "m", "n": 0}, idempotency_key="k") == 1
    assert await layer.group_send("once", {"type": "m", "n": 0}, idempotency_key="k") == 1
    assert layer.stats["duplicates_suppressed"] == 1
    for n in range(1, 4):  # "k" leaves the window of 3
        await layer.group_send("once", {"type": "m", "n": n})
    assert await layer.group_send("once", {"type": "m", "n": 0}, idempotency_key="k") == 5
    got = [(await layer.receive(channel))["__offset__"] for _ in range(5)]
    assert got == [1, 2, 3, 4, 5]
    assert layer.stats["sequence_gaps"] == 0, "the suppressed send counted no gap at the receiver"


async def test_what_was_published_while_a_subscription_moved_is_delivered_from_history(make_layer, redis_cluster):
    """A message that reached no subscription (as in the instant a primary dies) and has no later one
    to reveal the gap is delivered once the subscription is back."""
    import redis

    receiver, sender = make_layer(history_size=50), make_layer(history_size=50)
    channel = await receiver.new_channel()
    await receiver.group_add("quiet", channel)
    await sender.group_send("quiet", {"type": "m", "n": 1})
    assert (await asyncio.wait_for(receiver.receive(channel), 5))["n"] == 1
    # Numbered and kept, but published where no one listens: the message this subscription missed.
    await send_numbered(sender, "quiet", {"type": "m", "n": 2}, shard_channel=sender.keys.group_channel("quiet") + b":nobody")
    before = receiver.stats["resubscribes"]
    for port in redis_cluster.ports:  # the subscription's connection ends, as with its primary
        redis.Redis(port=port).client_kill_filter(_type="pubsub")
    assert (await asyncio.wait_for(receiver.receive(channel), 10))["n"] == 2
    assert receiver.stats["resynced"] == 1 and receiver.stats["resubscribes"] > before
    await sender.group_send("quiet", {"type": "m", "n": 3})
    assert (await asyncio.wait_for(receiver.receive(channel), 5))["n"] == 3, "nothing twice"


async def test_history_keys_outlive_every_write_by_their_bound_and_not_by_much_more(make_layer, redis_cluster):
    import redis

    layer = make_layer(history_size=10, history_age=20, expiry=60, group_expiry=40)
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    meta, log, keys = layer.keys.group_history("kept")
    await layer.group_send("kept", {"type": "m"})
    assert 20_000 - 500 < client.pttl(log) <= 20_000 * 17 // 16
    assert 40_000 - 500 < client.pttl(meta) <= 40_000 * 17 // 16
    assert client.pttl(keys) == -2, "no idempotency key sent: no key set"
    # A write within the bound leaves the expiry alone: no PEXPIRE for replicas to apply per message.
    client.pexpire(log, 20_500)
    await layer.group_send("kept", {"type": "m"}, idempotency_key="k1")
    assert 20_000 < client.pttl(log) <= 20_500
    assert 20_000 - 500 < client.pttl(keys) <= 20_000 * 17 // 16
    # Under the bound, it is pushed out again: the log outlives this write by 20 s at least.
    client.pexpire(log, 19_000)
    await layer.group_send("kept", {"type": "m"})
    assert client.pttl(log) > 20_000
    client.close()
