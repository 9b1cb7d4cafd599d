"""Protocol v2 over room history: joined, ?history=, resume with since/epoch, catch-up, nonces."""

import asyncio
import json

from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from channels_redis_cluster.testing import send_numbered
from conftest import ORIGIN, join


async def say(client, count, prefix="m", nonce=False):
    """Send ``count`` messages from ``client``."""
    for n in range(count):
        frame = {"message": f"{prefix}{n}"}
        if nonce:
            frame["nonce"] = f"{prefix}{n}"
        await client.send_to(text_data=json.dumps(frame))


async def frames(client, count):
    return [await client.receive_json_from(timeout=3) for _ in range(count)]


async def drain(client, count):
    """Read the echo of ``count`` own messages; the offset and epoch of the last one."""
    got = await frames(client, count)
    return got[-1]["offset"], got[-1]["epoch"]


async def test_fresh_join_gets_top_and_the_latest_history(application):
    first = await join(application, "hist", v2=True)
    await say(first, 5)
    await drain(first, 5)
    late = await join(application, "hist", v2=True, query="?history=3")
    assert late.joined["offset"] == 5 and late.joined["epoch"] == first.joined["epoch"]
    assert [(f["offset"], f["message"]) for f in await frames(late, 3)] == [(3, "m2"), (4, "m3"), (5, "m4")]
    assert await late.receive_nothing(timeout=0.3)
    await first.disconnect()
    await late.disconnect()


async def test_a_message_sent_right_after_a_fresh_join_is_live_even_when_the_history_read_is_slow(application, monkeypatch):
    """The room's top is the seam; it is read before the handshake completes, never after a message the client is owed."""
    layer = get_channel_layer()
    talker = await join(application, "seam", v2=True)
    published = asyncio.Event()
    read = layer.group_history

    async def slow_read(*args, **kwargs):
        # A read that lags: it waits for the next room message (or half a second) before it reads.
        try:
            await asyncio.wait_for(published.wait(), 0.5)
        except TimeoutError:
            pass
        return await read(*args, **kwargs)

    monkeypatch.setattr(layer, "group_history", slow_read)
    fresh = WebsocketCommunicator(application, "/ws/chat/seam/", headers=ORIGIN, subprotocols=["chat.v2"])
    assert (await fresh.connect(timeout=5))[0]
    # Owed: sent after the handshake completed, before this client read a single frame.
    await say(talker, 1, "after-join")
    await frames(talker, 1)  # its echo: the message is published
    published.set()
    joined, message = await frames(fresh, 2)
    assert joined["type"] == "joined"
    assert message["message"] == "after-join0" and message["offset"] == joined["offset"] + 1
    await talker.disconnect()
    await fresh.disconnect()


async def test_resume_replays_what_was_missed_then_recovered_then_live(application):
    talker = await join(application, "resume", v2=True)
    listener = await join(application, "resume", v2=True)
    await say(talker, 3, "a")
    offset, epoch = (await frames(listener, 3))[-1]["offset"], listener.joined["epoch"]
    await listener.disconnect()
    await say(talker, 4, "b")
    await drain(talker, 7)
    back = await join(application, "resume", v2=True, query=f"?since={offset}&epoch={epoch}")
    assert back.joined["offset"] == 7
    replay = await frames(back, 5)
    assert [f["message"] for f in replay[:4]] == ["b0", "b1", "b2", "b3"]
    assert [f["offset"] for f in replay[:4]] == [4, 5, 6, 7]
    assert replay[4] == {"type": "recovered", "recovered": True, "offset": 7, "epoch": epoch}
    await say(talker, 1, "c")
    live = await back.receive_json_from(timeout=3)
    assert (live["offset"], live["message"]) == (8, "c0")
    await talker.disconnect()
    await back.disconnect()


async def test_resume_with_an_unknown_epoch_is_not_recovered(application):
    talker = await join(application, "lost-epoch", v2=True)
    await say(talker, 2)
    await drain(talker, 2)
    back = await join(application, "lost-epoch", v2=True, query="?since=1&epoch=0123456789abcdef")
    replay = await frames(back, 3)
    assert [f["offset"] for f in replay[:2]] == [1, 2], "what the room has is replayed"
    assert replay[2]["type"] == "recovered" and replay[2]["recovered"] is False
    await talker.disconnect()
    await back.disconnect()


async def test_resume_beyond_the_bound_is_not_recovered(application):
    talker = await join(application, "trimmed", v2=True)
    await say(talker, 25)  # the application keeps 20
    await drain(talker, 25)
    back = await join(application, "trimmed", v2=True, query=f"?since=2&epoch={talker.joined['epoch']}")
    replay = await frames(back, 21)
    assert [f["offset"] for f in replay[:20]] == list(range(6, 26))
    assert replay[20]["recovered"] is False and replay[20]["offset"] == 25
    await talker.disconnect()
    await back.disconnect()


async def test_resume_at_the_top_is_recovered_with_nothing_to_replay(application):
    talker = await join(application, "at-top", v2=True)
    await say(talker, 2)
    offset, epoch = await drain(talker, 2)
    back = await join(application, "at-top", v2=True, query=f"?since={offset}&epoch={epoch}")
    assert await back.receive_json_from(timeout=3) == {"type": "recovered", "recovered": True, "offset": 2, "epoch": epoch}
    await talker.disconnect()
    await back.disconnect()


async def test_a_resent_nonce_reaches_the_room_once(application):
    sender = await join(application, "nonce", v2=True)
    watcher = await join(application, "nonce", v2=True)
    await sender.send_to(text_data=json.dumps({"message": "once", "nonce": "n-1"}))
    await sender.send_to(text_data=json.dumps({"message": "once", "nonce": "n-1"}))
    await sender.send_to(text_data=json.dumps({"message": "next", "nonce": "n-2"}))
    got = await frames(watcher, 2)
    assert [(f["message"], f["offset"]) for f in got] == [("once", 1), ("next", 2)]
    assert await watcher.receive_nothing(timeout=0.3)
    assert get_channel_layer().stats["duplicates_suppressed"] == 1
    await sender.disconnect()
    await watcher.disconnect()


async def test_a_gap_in_live_offsets_is_filled_from_history(application):
    layer = get_channel_layer()
    client = await join(application, "gap", v2=True)
    # A message kept in the history whose publish never reached this worker, as in a failover window.
    lost = layer.keys.group_channel("chat_gap") + b":unsubscribed"  # same slot, no subscriber
    await send_numbered(
        layer, "chat_gap", {"type": "chat.message", "message": "unseen", "sent_at": 1.0, "sender": "x:1"}, shard_channel=lost
    )
    await say(client, 1, "after")
    got = await frames(client, 2)
    assert [(f["offset"], f["message"]) for f in got] == [(1, "unseen"), (2, "after0")]
    await client.disconnect()


async def test_lost_history_gives_a_new_epoch_and_says_so(application):
    layer = get_channel_layer()
    client = await join(application, "wiped", v2=True)
    await say(client, 2)
    _offset, epoch = await drain(client, 2)
    state = await layer._state()
    for key in layer.keys.group_history("chat_wiped"):  # as a primary that came back empty
        await state.commands.execute(key.encode(), "DEL", key)
    await say(client, 1, "new")
    message, notice = await frames(client, 2)
    assert notice["type"] == "recovered" and notice["recovered"] is False and notice["epoch"] != epoch
    assert (message["offset"], message["epoch"], message["message"]) == (1, notice["epoch"], "new0")
    await client.disconnect()


async def test_no_gap_and_no_duplicate_across_the_seam(application):
    talker = await join(application, "seam", v2=True)
    first = await join(application, "seam", v2=True)
    await say(talker, 3)
    offset = (await frames(first, 3))[-1]["offset"]
    await first.disconnect()
    sending = asyncio.ensure_future(say(talker, 60, "s"))
    back = await join(application, "seam", v2=True, query=f"?since={offset}&epoch={first.joined['epoch']}")
    await sending
    seen = []
    while len(seen) < 60:
        frame = await back.receive_json_from(timeout=3)
        if frame["type"] == "message":
            seen.append(frame["offset"])
        else:
            assert frame["type"] == "recovered" and frame["recovered"] is True
    assert seen == list(range(offset + 1, offset + 61))
    assert await back.receive_nothing(timeout=0.3)
    await talker.disconnect()
    await back.disconnect()


async def test_bad_resume_query_gets_an_error_and_4400(application):
    for query, error in (("?since=1", "bad_resume"), ("?since=x&epoch=ab", "bad_resume"), ("?history=9999", "bad_history")):
        client = WebsocketCommunicator(application, f"/ws/chat/bad-query/{query}", headers=ORIGIN, subprotocols=["chat.v2"])
        assert (await client.connect(timeout=5))[0]
        assert (await client.receive_json_from(timeout=3))["error"] == error
        assert (await client.receive_output(timeout=3))["code"] == 4400
