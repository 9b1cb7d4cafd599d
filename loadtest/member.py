"""A room member that stays in its room through restarts: reconnects with backoff and jitter, resumes
(chat.v2) or rejoins (v1), resends what it typed that never came back, and records what it got.

The lifecycle tests count with it what each member was owed and what it received.
"""

import asyncio
import json
import random
from urllib.parse import urlencode

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from loadtest.resume import Place

V2 = "chat.v2"


class Member:
    """One member of ``room`` at ``base`` (ws://host:port); ``v2`` resumes, otherwise it rejoins as v1."""

    def __init__(self, base, room, v2=True, origin=None, backoff=(0.05, 2.0), token=None, presence=False, member_key=None):
        self.base, self.room, self.v2, self.token = base, room, v2, token
        self.presence = presence  # v2: ask for the room's members (?presence=1) and keep them in .present
        self.member_key = member_key  # v2 without identity: the key that keeps this member one across resumes
        self.member = None  # v2: this member's id in the room's presence
        self.present = {}  # member id -> name, as the join, leave and presence frames say
        self.presence_frames = []  # (type, member id) of every join and leave frame
        self.served_by = None  # X-Served-By of the current connection
        self.origin = origin or base.replace("ws://", "http://", 1)
        self.backoff = backoff
        self.place = Place()  # v2: the last room message it has, and the room's top when it first joined
        self.messages = []  # v2: (offset, epoch, text) of every room message, in arrival order; v1: text
        self.arrivals = []  # loop time at which each of ``messages`` arrived
        self.refusals = 0  # error frames saying a message was not delivered (unavailable): resent later
        self.recoveries = []  # v2: the recovered flag of every recovered frame
        self.close_codes = []
        self.pending = {}  # nonce -> text typed but not seen back yet
        self.sending = set()  # resends under way, kept until done: the loop holds tasks only weakly
        self.connections = 0
        self.socket = None
        self.ready = asyncio.Event()
        self.stopping = False
        self.task = None
        self.resending = None

    @property
    def offset(self):
        return self.place.offset

    @property
    def epoch(self):
        return self.place.epoch

    @property
    def joined_at(self):
        return self.place.joined_at

    def url(self):
        query = {"token": self.token} if self.token else {}
        if self.v2:
            query.update(self.place.query())
        if self.v2 and self.presence:
            query["presence"] = 1
        if self.v2 and self.member_key:
            query["member_key"] = self.member_key
        return f"{self.base}/ws/chat/{self.room}/" + (f"?{urlencode(query)}" if query else "")

    async def start(self):
        """Join the room; returns once the first connection is open (and, for v2, joined)."""
        self.task = asyncio.ensure_future(self._run())
        await asyncio.wait_for(self.ready.wait(), 30)
        return self

    async def _run(self):
        delay = self.backoff[0]
        while not self.stopping:
            try:
                async with connect(
                    self.url(), origin=self.origin, subprotocols=[V2] if self.v2 else None, open_timeout=10, close_timeout=2
                ) as socket:
                    self.socket = socket
                    self.served_by = socket.response.headers.get("x-served-by")
                    self.connections += 1
                    delay = self.backoff[0]
                    if not self.v2:
                        self.ready.set()
                    async for text in socket:
                        self._handle(json.loads(text))
                    self.close_codes.append(socket.close_code)
            except ConnectionClosed as closed:
                self.close_codes.append(closed.rcvd.code if closed.rcvd else None)
            except (TimeoutError, OSError, InvalidHandshake):
                pass
            finally:
                self.socket = None
            code = self.close_codes[-1] if self.close_codes else None
            if code is not None and 4400 <= code < 4500 and code != 4408:
                return  # refused for what it did (4408 only says "too slow": resume)
            if self.stopping:
                return
            # Exponential backoff with full jitter, so a drained worker's clients spread out.
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, self.backoff[1])

    def _handle(self, frame):
        if not self.v2:
            self.messages.append(frame["message"])
            self.arrivals.append(asyncio.get_running_loop().time())
            return
        kind = frame.get("type")
        if kind == "message":
            self.messages.append((frame["offset"], frame["epoch"], frame["message"]))
            self.arrivals.append(asyncio.get_running_loop().time())
            self.place.on_frame(frame)
            self.pending.pop(frame.get("nonce"), None)
        elif kind == "presence":
            self.present = {member["id"]: member["name"] for member in frame["members"]}
        elif kind in ("join", "leave"):
            self.presence_frames.append((kind, frame["member"]["id"]))
            if kind == "join":
                self.present[frame["member"]["id"]] = frame["member"]["name"]
            else:
                self.present.pop(frame["member"]["id"], None)
        elif kind == "joined":
            self.member = frame.get("member", {}).get("id")
            self.member_key = frame.get("member_key", self.member_key)
            if self.place.epoch is None:
                self.place.on_frame(frame)
                self._resend()
            self.ready.set()
        elif kind == "recovered":
            self.recoveries.append(frame["recovered"])
            self.place.on_frame(frame)
            self._resend()
        elif kind == "error" and frame.get("error") == "unavailable":
            # A message that could not be made durable: resend what has not come back, with the same nonces.
            self.refusals += 1
            if self.resending is None or self.resending.done():
                self.resending = asyncio.ensure_future(self._resend_later())

    async def _resend_later(self):
        await asyncio.sleep(random.uniform(0.1, 0.3))
        self._resend()

    def _resend(self):
        for nonce, text in self.pending.items():
            sending = asyncio.ensure_future(self._send(nonce, text))
            self.sending.add(sending)
            sending.add_done_callback(self.sending.discard)

    async def _send(self, nonce, text):
        socket = self.socket
        if socket is not None:
            try:
                await socket.send(json.dumps({"message": text, "nonce": nonce} if self.v2 else {"message": text}))
            except ConnectionClosed:
                pass  # resent after the resume

    async def say(self, text, nonce):
        """Type ``text``; a v2 member keeps it until it comes back, and resends it after a resume."""
        if self.v2:
            self.pending[nonce] = text
        await self._send(nonce, text)

    def offsets(self):
        """v2: the offsets received, in order."""
        return [offset for offset, _, _ in self.messages]

    async def stop(self):
        """Leave: close the open socket and wait for the loop to end. A member between sockets (connecting,
        which may take the whole 10 s open timeout through a cut link, or waiting out its backoff) is
        cancelled instead: a user who closes the tab does not wait for a handshake to finish."""
        self.stopping = True
        if self.task is None:
            return
        if self.socket is not None:
            await self.socket.close()
        else:
            self.task.cancel()
        try:
            await asyncio.wait_for(self.task, 10)
        except asyncio.CancelledError:
            if not self.task.cancelled():
                raise

    async def come_back(self):
        """After ``stop()``: connect again, resuming (v2) from where it stopped."""
        self.stopping = False
        self.ready.clear()
        return await self.start()


async def until(condition, timeout, what):
    """Wait for ``condition()`` to hold, checking every 50 ms; AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Conversation:
    """A room that talks steadily while something happens to the servers: resuming (v2) members, plain
    v1 members and one typing member; ``report()`` counts what each was owed and what it got.

    The typing member sends 1/``interval`` messages a second (50 by default): run it on a stack whose
    per-socket message limit is off (CHAT_MESSAGES_PER_S=0)."""

    def __init__(self, base, room, resuming=16, plain=8, interval=0.02, origin=None, token=None):
        self.members = [Member(base, room, origin=origin, token=token) for _ in range(resuming)]
        self.plain = [Member(base, room, v2=False, origin=origin, token=token) for _ in range(plain)]
        self.sender = Member(base, room, origin=origin, token=token)
        self.interval = interval
        self.typed = 0
        self.stop_talking = asyncio.Event()
        self.talking = None

    async def start(self):
        for member in (*self.members, *self.plain, self.sender):
            await member.start()
        self.talking = asyncio.ensure_future(self._talk())
        return self

    async def _talk(self):
        while not self.stop_talking.is_set():
            await self.sender.say(f"m{self.typed}", nonce=f"n{self.typed}")
            self.typed += 1
            await asyncio.sleep(self.interval)

    async def typed_more(self, count, timeout=30):
        """Return once ``count`` more messages were typed."""
        target = self.typed + count
        await until(lambda: self.typed >= target, timeout, f"{count} more messages")

    async def finish(self, timeout=60):
        """Stop typing; wait until the typed messages came back and every resuming member has the room's top."""
        self.stop_talking.set()
        await self.talking
        await until(lambda: not self.sender.pending, timeout, "the typed messages to come back")
        top = (self.sender.offset, self.sender.epoch)
        try:
            await until(
                lambda: all((m.offset, m.epoch) == top for m in self.members), timeout, "every resuming member to reach the top"
            )
        except AssertionError as late:
            behind = [
                {
                    "offset": m.offset,
                    "epoch": m.epoch,
                    "connections": m.connections,
                    "open": m.socket is not None,
                    "close_codes": m.close_codes[-5:],
                    "recoveries": m.recoveries[-5:],
                }
                for m in self.members
                if (m.offset, m.epoch) != top
            ]
            raise AssertionError(f"{late}: the top is {top}; behind it: {behind}") from None
        await asyncio.sleep(0.5)  # a window for duplicates or v1 stragglers to show; nothing is awaited here
        for member in (*self.members, *self.plain, self.sender):
            await member.stop()

    def report(self):
        """What each kind of member was owed and got.

        Owed: every typed message (members joined before the first). A resuming member whose stream was
        not exact must have been told ``recovered: false``; ``silently_short`` counts those that were not.
        """
        typed = {f"m{n}" for n in range(self.typed)}
        room = [text for *_, text in self.sender.messages]
        exact = told = silent = duplicates = 0
        for member in self.members:
            texts = [text for *_, text in member.messages]
            duplicates += len(texts) - len(set(texts))
            if not all(member.recoveries):
                told += 1
            elif typed - set(texts) or not self._gapless(member):
                silent += 1
            else:
                exact += 1
        return {
            "messages_typed": self.typed,
            "typed_messages_in_the_room_once": sorted(room) == sorted(typed),
            "lost_for_everyone": len(typed - set(room)),
            "resuming_members": len(self.members),
            "resuming_recovered_exactly": exact,
            "resuming_told_not_recovered": told,
            "resuming_silently_short": silent,
            "resuming_duplicates": duplicates,
            "resuming_reconnects": sum(m.connections - 1 for m in self.members),
            "v1_members": len(self.plain),
            "v1_missed": sum(len(typed - set(m.messages)) for m in self.plain),
            "v1_reconnects": sum(m.connections - 1 for m in self.plain),
        }

    @staticmethod
    def _gapless(member):
        """Within each epoch, offsets follow on by one from where the member joined or resumed."""
        offsets = member.offsets()
        return offsets == list(range(member.joined_at + 1, member.joined_at + 1 + len(offsets)))
