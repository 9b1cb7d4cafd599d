"""A client that reads slower than its room talks is closed with 4408, resumes, and misses nothing."""

import json
import urllib.request
from urllib.parse import urlsplit

from conftest import UNLIMITED_TYPING, local_stack
from loadtest import wsclient
from loadtest.member import Member, until

MESSAGES = 800  # of 15,000 characters: more than the kernel's socket buffers (4 MiB here) and the backlog of 100 hold


async def test_slow_client_is_closed_with_4408_then_resumes_without_loss():
    with local_stack(CHAT_HISTORY_SIZE="1000", CHAT_MAX_MESSAGE_CHARS="15000", **UNLIMITED_TYPING) as stack:
        url = urlsplit(stack["ws"])
        frames = []
        slow = await wsclient.connect(
            url.hostname,
            url.port,
            "/ws/chat/slow/",
            lambda data: frames.append(json.loads(data)),
            origin=stack["url"],
            subprotocol="chat.v2",
        )
        slow.transport.pause_reading()  # the client stops reading: its kernel buffers, then the server's fill
        sender = await Member(stack["ws"], "slow").start()
        for n in range(MESSAGES):
            await sender.say(f"{n:05d}" + "x" * 14995, nonce=str(n))
        await until(lambda: not sender.pending, 60, "the room to get every message")
        slow.transport.resume_reading()
        await until(lambda: slow.closed.done(), 30, "the slow client's socket to close")
        assert slow.close_code == 4408
        joined, *messages = frames
        assert joined["type"] == "joined"
        offsets = [frame["offset"] for frame in messages]
        assert offsets == list(range(joined["offset"] + 1, joined["offset"] + 1 + len(offsets)))
        assert len(offsets) < MESSAGES, "the client fell behind before it was closed"

        resumed = Member(stack["ws"], "slow")
        resumed.place.offset, resumed.place.epoch = offsets[-1], joined["epoch"]
        resumed.ready.set()
        await resumed.start()
        await until(lambda: resumed.recoveries, 30, "the resume to end")
        await until(lambda: resumed.offset == sender.offset, 30, "the resumed client to reach the top")
        assert resumed.recoveries == [True]
        assert resumed.offsets() == list(range(offsets[-1] + 1, sender.offset + 1))
        with urllib.request.urlopen(f"{stack['url']}/metrics", timeout=5) as response:
            metrics = dict(line.rsplit(" ", 1) for line in response.read().decode().splitlines() if line[:1] != "#")
        assert float(metrics["chat_closed_too_slow_total"]) == 1
        # Every message the slow client was not written is counted: overflow, or held back when it closed.
        not_written = sender.offset - offsets[-1]
        counted = float(metrics["channels_layer_overflow_total"]) + float(metrics["chat_messages_dropped_closing_total"])
        assert counted == not_written
        await resumed.stop()
        await sender.stop()
