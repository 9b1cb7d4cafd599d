"""Presence in the chat (protocol v2, ?presence=1): a snapshot after joined, then join and leave frames;
a resume within the grace shows neither; v1 clients see nothing new; bad presence queries get 4400."""

import asyncio
import json
import time

from django.test import override_settings
from test_abuse_limits import IDENTITY_ON, refused

from chat import consumers, presence
from chat.tokens import mint
from conftest import join
from loadtest.member import until


async def next_frame(client, timeout=3):
    return await client.receive_json_from(timeout=timeout)


async def say(client, text):
    await client.send_json_to({"message": text})


async def watcher_and_member(application, room):
    """Alice watching ``room`` and Bob in it, once Alice was told he came."""
    alice = await join(application, room, v2=True, query="?presence=1")
    await next_frame(alice)
    bob = await join(application, room, v2=True)
    assert await next_frame(alice) == {"type": "join", "member": bob.joined["member"]}
    return alice, bob


async def leaves_settled():
    """Every presence leave waiting out its grace has gone through."""
    await asyncio.gather(*list(consumers._LEAVING))


async def test_a_watcher_gets_the_members_then_their_joins_and_leaves(application):
    alice = await join(application, "pres-a", v2=True, query="?presence=1")
    me = alice.joined["member"]
    assert me["name"] is None and len(alice.joined["member_key"]) == 32
    assert await next_frame(alice) == {"type": "presence", "count": 1, "members": [me]}
    bob = await join(application, "pres-a", v2=True)
    assert await next_frame(alice) == {"type": "join", "member": bob.joined["member"]}
    old = await join(application, "pres-a")  # a v1 client is a member too, and sees nothing new
    joined = await next_frame(alice)
    assert joined["type"] == "join" and joined["member"]["id"] not in (me["id"], bob.joined["member"]["id"])
    await say(old, "hello")
    assert (await next_frame(old))["message"] == "hello"
    assert (await next_frame(alice))["message"] == "hello"
    assert (await next_frame(bob))["message"] == "hello"
    await bob.disconnect(code=1000)  # a goodbye: gone at once, no grace
    assert await next_frame(alice) == {"type": "leave", "member": bob.joined["member"]}
    await old.disconnect(code=1001)
    assert await next_frame(alice) == {"type": "leave", "member": joined["member"]}
    await alice.disconnect(code=1000)


async def test_a_resume_within_the_grace_shows_neither_a_leave_nor_a_join(application):
    with override_settings(CHAT_PRESENCE_GRACE=1):
        alice, bob = await watcher_and_member(application, "pres-b")
        await bob.disconnect(code=1006)  # the network dropped: bob comes back where he was
        query = f"?since={bob.joined['offset']}&epoch={bob.joined['epoch']}&member_key={bob.joined['member_key']}"
        back = await join(application, "pres-b", v2=True, query=query)
        assert back.joined["member"] == bob.joined["member"] and (await next_frame(back))["type"] == "recovered"
        await leaves_settled()  # the old socket's leave has gone through: bob is still there by his new one
        await say(alice, "still here?")
        assert (await next_frame(alice))["message"] == "still here?", "alice saw bob leave or join again"
        await back.disconnect(code=1000)
        assert await next_frame(alice) == {"type": "leave", "member": bob.joined["member"]}
        await alice.disconnect(code=1000)


async def test_a_socket_gone_without_goodbye_leaves_after_the_grace(application):
    with override_settings(CHAT_PRESENCE_GRACE=1):
        alice, bob = await watcher_and_member(application, "pres-c")
        await bob.disconnect(code=1006)
        gone_at = time.monotonic()
        assert await next_frame(alice, timeout=5) == {"type": "leave", "member": bob.joined["member"]}
        assert time.monotonic() - gone_at >= 0.9, "a resume would have had no time to come back"
        await alice.disconnect(code=1000)


async def test_the_tabs_of_one_identity_are_one_member_with_its_name(application):
    with override_settings(**IDENTITY_ON):
        token = mint("dana", "Dana")
        alice = await join(application, "pres-d", v2=True, query=f"?presence=1&token={mint('alice', 'Alice')}")
        await next_frame(alice)
        first = await join(application, "pres-d", v2=True, query=f"?token={token}")
        assert "member_key" not in first.joined and first.joined["member"]["name"] == "Dana"
        assert await next_frame(alice) == {"type": "join", "member": first.joined["member"]}
        second = await join(application, "pres-d", v2=True, query=f"?token={token}")
        assert second.joined["member"] == first.joined["member"]
        await first.disconnect(code=1000)
        await say(alice, "one tab left")
        assert (await next_frame(alice))["message"] == "one tab left", "dana left while a tab was open"
        await second.disconnect(code=1000)
        assert await next_frame(alice) == {"type": "leave", "member": first.joined["member"]}
        await alice.disconnect(code=1000)


async def test_bad_presence_queries_are_refused_with_4400(application):
    error = await refused(application, "pres-e", 4400, "?presence=yes", v2=True)
    assert error["error"] == "bad_presence"
    error = await refused(application, "pres-e", 4400, "?member_key=not-hex", v2=True)
    assert error["error"] == "bad_member_key"


class FrameSink:
    """Stands in for a watching consumer: keeps the frames a view tells it."""

    def __init__(self):
        self.frames = []

    def presence_frame_soon(self, frame):
        self.frames.append(json.loads(frame))


async def test_a_read_that_crosses_events_keeps_what_they_changed(make_layer):
    """A view's read of the members and the room's events come over different connections: a join written
    after Redis answered the read can arrive first, and so can a leave. The view applies them over the
    answer, so the member who joined stays listed (and is not told as leaving), and the one who left stays
    gone. Real layer and cluster; the read is held back until both events have arrived, which is the race
    a storm of thousands of joins hit by chance."""
    layer = make_layer()
    group = "chat_view-race"
    await layer.presence_join(group, "c-leaving", "a-leaving", event=presence.join_event("c-leaving", "a-leaving", None))
    view = presence.RoomView(layer, group)
    sink = FrameSink()
    view.watchers.add(sink)
    await view.ready
    assert set(view.members) == {"a-leaving"}
    read_members = layer.presence

    async def answer_overtaken_by_events(group_read):
        answer = await read_members(group_read)
        await layer.presence_join(group, "c-new", "a-new", event=presence.join_event("c-new", "a-new", None))
        await layer.presence_leave(group, ["c-leaving"], event=presence.leave_event("c-leaving", "a-leaving", None))
        await until(lambda: "a-new" in view.members and "a-leaving" not in view.members, 5, "the events at the view")
        return answer

    layer.presence = answer_overtaken_by_events
    try:
        frames = await view.read()
    finally:
        del layer.presence
        await view.close()
    assert set(view.members) == {"a-new"}
    assert frames == []  # what the events changed was told as they came, and the answer changes nothing
    assert [(f["type"], f["member"]["id"]) for f in sink.frames] == [("join", "a-new"), ("leave", "a-leaving")]
