"""Presence through a crash and a join storm on the `make run` topology: the members of a SIGKILLed worker
leave every other member's list within CHAT_PRESENCE_TIMEOUT, no one else does, a live worker removes
their entries from Redis, and they come back, once each, when they reconnect elsewhere; 3,000 sockets
joining at once are each listed once."""

import asyncio
import collections
import os
import signal
import time

from test_rolling_restart import presence_in_redis

from conftest import local_stack
from loadtest import wsclient
from loadtest.member import Member, until

TIMEOUT = 3.0  # CHAT_PRESENCE_TIMEOUT of this stack
ON_VICTIM = 100  # members on the worker that is killed


async def test_members_of_a_sigkilled_worker_leave_within_the_bound_and_come_back_once():
    with local_stack(CHAT_PRESENCE_TIMEOUT=str(TIMEOUT), CHAT_PRESENCE_GRACE="1", CHAT_MESSAGES_PER_S="0") as stack:
        room, members, watchers = "presence-crash", [], []
        try:
            # The workers share one listening socket: connections made at once spread over them, though an
            # idle worker that is awake takes most. Watchers until two workers hold one: whichever is
            # killed, one watches from elsewhere.
            while len({w.served_by for w in watchers}) < 2:
                assert len(watchers) < 100, "every watcher landed on one worker"
                watchers += await asyncio.gather(*(Member(stack["ws"], room, presence=True).start() for _ in range(20)))
            # Members until one worker holds ON_VICTIM of them.
            while max(collections.Counter(m.served_by for m in members).values(), default=0) < ON_VICTIM:
                assert len(members) < 6 * ON_VICTIM, "no worker got enough members"
                members += await asyncio.gather(*(Member(stack["ws"], room).start() for _ in range(50)))
            victim = collections.Counter(m.served_by for m in members).most_common(1)[0][0]
            doomed = [m for m in (*members, *watchers) if m.served_by == victim]
            watcher = next(w for w in watchers if w.served_by != victim)
            everyone = {m.member for m in (*members, *watchers)}
            await until(lambda: set(watcher.present) == everyone, 15, "the watcher listing everyone")
            for member in doomed:
                member.stopping = True  # they stay away until the test brings them back
            seen_before = len(watcher.presence_frames)
            os.kill(int(victim.rpartition(":")[2]), signal.SIGKILL)
            killed_at = time.monotonic()
            survivors = everyone - {m.member for m in doomed}
            await until(lambda: set(watcher.present) == survivors, TIMEOUT + 5, "the dead worker's members leaving")
            gone_after = time.monotonic() - killed_at
            assert gone_after <= TIMEOUT + 1, f"{len(doomed)} members of a dead worker listed for {gone_after:.1f} s"
            left = [member for kind, member in watcher.presence_frames[seen_before:] if kind == "leave"]
            assert sorted(left) == sorted(everyone - survivors), "someone else left, or someone left twice"
            # With nobody reading the room, a live worker removes the dead one's entries from Redis.
            alive = len(members) + len(watchers) - len(doomed)
            while len(await presence_in_redis(stack, f"chat_{room}", every_channel=True)) != alive:
                assert time.monotonic() - killed_at <= TIMEOUT + TIMEOUT / 3 + 2, "a dead worker's entries stayed in Redis"
                await asyncio.sleep(0.1)
            reaped_after = time.monotonic() - killed_at
            # They come back elsewhere as the same members: one join each, no duplicate in the list.
            back = [await Member(stack["ws"], room, member_key=m.member_key).start() for m in doomed]
            assert {m.member for m in back} == {m.member for m in doomed}
            await until(lambda: set(watcher.present) == everyone, 15, "the members back")
            joins = collections.Counter(member for kind, member in watcher.presence_frames[seen_before:] if kind == "join")
            assert joins == collections.Counter(m.member for m in doomed), (
                "a member came back more than once, or one that never left"
            )
            print(
                f"{len(doomed)} members of a SIGKILLed worker left every list after {gone_after:.2f} s (bound {TIMEOUT} s),"
                f" their entries removed from Redis after {reaped_after:.2f} s"
            )
            members += back
        finally:
            for member in (*members, *watchers):
                if member.task is not None and not member.task.done():
                    await member.stop()


STORM = 3000  # sockets joining at once


async def test_presence_stays_exact_through_a_join_storm():
    with local_stack(CHAT_PRESENCE_TIMEOUT=str(TIMEOUT), CHAT_PRESENCE_GRACE="1") as stack:
        room = "presence-storm"
        watcher = await Member(stack["ws"], room, presence=True).start()
        port = int(stack["url"].rpartition(":")[2])
        sockets = []
        try:
            started = time.monotonic()
            for _ in range(0, STORM, 1000):  # a thousand handshakes in flight at a time
                sockets += await asyncio.gather(
                    *(wsclient.connect("127.0.0.1", port, f"/ws/chat/{room}/", lambda _: None) for _ in range(1000))
                )
            joined_in = time.monotonic() - started
            await until(lambda: len(watcher.present) == STORM + 1, 30, "every socket in the watcher's list")
            joins = [member for kind, member in watcher.presence_frames if kind == "join"]
            assert len(joins) == len(set(joins)) == STORM, "a join was shown twice, or missed"
            listed = await presence_in_redis(stack, f"chat_{room}")
            assert len(listed) == STORM + 1 and sum(len(entry["channels"]) for entry in listed) == STORM + 1
            for socket in sockets[: STORM // 2]:
                socket.close()  # a goodbye (1000): gone at once
            await until(lambda: len(watcher.present) == STORM - STORM // 2 + 1, 30, "half of them leaving")
            print(f"{STORM} sockets joined in {joined_in:.1f} s; the watcher listed each once, then saw half leave")
        finally:
            for socket in sockets:
                socket.close()
            await watcher.stop()
