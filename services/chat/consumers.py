"""The tutorial's async chat consumer, hardened: validated input, clear errors, metrics, and v2's resume."""

import asyncio
import json
import logging
import time

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from channels_redis_cluster import EPOCH, OFFSET, LayerPushMixin, shared
from chatsite.identity import worker_id
from chatsite.worker import DIRECT_WRITE

from . import metrics, presence, tokens
from .limits import IdentityQuota, TokenBucket, WorkerSockets
from .protocol import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_NOT_FOUND,
    CLOSE_TOO_MANY,
    CLOSE_TOO_SLOW,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNAVAILABLE,
    ROOM_NAME,
    ROOM_NAME_RULE,
    V2,
    BadFrame,
    Resume,
    error_frame,
    joined_frame,
    parse_client_frame,
    parse_query,
    recovered_frame,
)

logger = logging.getLogger(__name__)


_last_message = (None, None, {})  # message, sent_at, {(version, room): text}


def _frame(event, version, room, live=True):
    """The text frame of a room message, encoded once per version and worker rather than once per recipient.

    The layer hands every local member a shallow copy of one event, so their ``message`` and
    ``sent_at`` are the same objects: each encoding of the last message is reused while they are,
    one per (version, room), so a room whose v1 and v2 members alternate encodes a message twice,
    not once per member. Holding them in the cache keeps their ids from being reused by other
    objects. The fan-out latency of live messages is observed here too, once per message and worker.
    """
    global _last_message
    message, sent_at = event["message"], event["sent_at"]
    cached_message, cached_sent_at, texts = _last_message
    if cached_message is not message or cached_sent_at is not sent_at:
        texts = {}
        _last_message = (message, sent_at, texts)
        if live:
            metrics.FANOUT_LATENCY.observe(max(0.0, time.time() - sent_at))
    key = (version, room)
    text = texts.get(key)
    if text is not None:
        return text
    if version == 1:
        text = json.dumps({"message": message})
    else:
        frame = {"type": "message", "room": room, "message": message, "sender": event["sender"], "sent_at": sent_at}
        if OFFSET in event:
            frame["offset"], frame["epoch"] = event[OFFSET], event[EPOCH]
        if "nonce" in event:
            frame["nonce"] = event["nonce"]
        if "name" in event:
            frame["name"] = event["name"]
        text = json.dumps(frame)
    texts[key] = text
    return text


_NO_EXTENSIONS = {}  # the scope of a server that offers none

SENT, GAP = "sent", "gap"  # where a room message falls in a v2 client's stream (ChatConsumer.place)

_LEAVING = set()  # presence leaves waiting out their grace


def _ignore_result(task):
    if not task.cancelled():
        task.exception()


class ChatConsumer(LayerPushMixin, AsyncWebsocketConsumer):
    """Joins the room's group, relays client messages to it and group messages to the client."""

    room_group_name = None
    closing = False
    groups = ()  # the room's group is joined in connect(); a tuple spares each connection an empty list
    # v2 with room history: the offset and epoch of the last room message this client has (or joined at)
    offset = None
    epoch = None
    holds_slot = False  # counted in WorkerSockets
    identity = None  # with CHAT_IDENTITY on: whom the socket's token names
    claimed = False  # holds a place in IdentityQuota
    token_timer = None  # closes the socket when its token ends
    bucket = None  # messages per second, made at the first message
    member = None  # this socket's member id in the room's presence, once recorded there
    member_key = None  # an anonymous member's secret, for its resumes
    watching = False  # a v2 client that asked for presence
    opened = False  # the handshake was accepted (a client may leave before)

    async def dispatch(self, message):
        """Channels' dispatch without its per-message close of old database connections.

        That close is a thread-pool round trip for every frame and every room message (most of a
        worker's time under fan-out load); this app has no database, so there is nothing to close.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        try:
            await handler(message)
        except OSError:
            # A write found the client gone (uvicorn raises ClientDisconnected, as when a client drops its
            # handshake mid-connect) and the consumer would end without its disconnect: end it as one, or
            # what connect took (presence entry, group, socket and identity places) is never given back.
            if message["type"] not in ("websocket.connect", "websocket.receive"):
                raise
            await self.websocket_disconnect({"type": "websocket.disconnect", "code": 1006})

    async def websocket_disconnect(self, message):
        """Channels' websocket_disconnect without its close of old database connections (see dispatch)."""
        try:
            await self.disconnect(message["code"])
        except asyncio.CancelledError:
            # The worker's graceful timeout ended this socket's clean-up: a stopping worker that held 16,700
            # sockets on a loaded machine did not give every group back within 25 s, and uvicorn logged a
            # traceback at ERROR for each (20,000 of them). What was not undone lapses by itself (group
            # expiry, the worker's presence lease); counted, not logged per socket.
            metrics.DISCONNECTS_CUT_SHORT.inc()
        raise StopConsumer()

    async def connect(self):
        self.room_name = self.scope["url_route"]["kwargs"]["room_name"]
        self.version = 2 if V2 in self.scope.get("subprotocols", ()) else 1
        subprotocol = V2 if self.version == 2 else None
        try:
            if not ROOM_NAME.fullmatch(self.room_name):
                raise BadFrame(CLOSE_NOT_FOUND, "bad_room", f"invalid room name: {ROOM_NAME_RULE}")
            # Refused before anything is held for it, so one worker cannot be driven out of memory.
            if not WorkerSockets.take():
                raise BadFrame(CLOSE_TRY_AGAIN, "worker_full", "this worker holds its most sockets: reconnect")
            self.holds_slot = True
            query = parse_query(self.scope.get("query_string", b""))
            if settings.CHAT_IDENTITY != "off":
                await self.identify(query.get("token"))
            resume = None
            if self.version == 2 and "history" in self.channel_layer.extensions:
                resume = Resume(query)
            self.presence_query(query)
        except BadFrame as bad:
            await self.accept(subprotocol)
            return await self.refuse(bad, True)
        group = shared(f"chat_{self.room_name}")  # one string per room, not one per socket
        try:
            # Join before the handshake completes, so a connected client misses nothing sent to the room.
            await self.channel_layer.group_add(group, self.channel_name)
        except Exception as exc:  # noqa: BLE001 - the client gets a clear close code instead
            await self.accept(subprotocol)
            return await self.refuse_unavailable("group_add", group, exc, "chat is unavailable, try again")
        self.room_group_name = group
        listed = await self.join_presence()
        found = None
        if resume is not None:
            # The seam is read after joining and before accepting: a message numbered above it arrives
            # live, and one at or below it was sent before this client joined (or is in the replay).
            try:
                found = await self.channel_layer.group_history(group, resume.since, resume.epoch, resume.history)
            except Exception as exc:  # noqa: BLE001 - the client resumes later instead of being silently short
                await self.accept(subprotocol)
                return await self.refuse_unavailable("group_history", group, exc, "room history is unavailable, try again")
        await self.accept(subprotocol)
        self.opened = True
        # Room messages are written once per recipient: past the handshake, skip the header wrapper.
        self.base_send = getattr(self.base_send, "forwarding_to", self.base_send)
        metrics.CONNECTIONS.inc()
        if self.identity is not None:
            loop = asyncio.get_running_loop()
            self.token_timer = loop.call_at(loop.time() + self.identity.expires_at - time.time(), self.token_ended)
        if found is not None:
            await self.replay(resume, found)
        if listed is not None:
            await self.send(text_data=presence.snapshot_frame(listed))

    def presence_query(self, query):
        """``?presence=1`` (v2 only) and an anonymous member's ``member_key``; the member's id."""
        if "presence" not in self.channel_layer.extensions:
            return
        asked = query.get("presence", "0")
        if asked not in ("0", "1"):
            raise BadFrame(CLOSE_BAD_REQUEST, "bad_presence", "presence must be 0 or 1")
        self.watching = asked == "1" and self.version == 2
        key = None
        if self.identity is None:
            key = query.get("member_key")
            if key is not None and not presence.MEMBER_KEY.fullmatch(key):
                raise BadFrame(CLOSE_BAD_REQUEST, "bad_member_key", "member_key must be the 32 hex digits a joined frame gave")
            key = self.member_key = key or presence.new_member_key()
        self.member = presence.member_of(self.identity, key)

    @property
    def member_name(self):
        """The name presence shows for this socket's member: its identity's, or None."""
        return self.identity.name if self.identity is not None else None

    async def join_presence(self):
        """Record this socket in the room's presence; for a watcher, the members listed now (else None)."""
        if self.member is None:
            return None
        name = self.member_name
        layer, group = self.channel_layer, self.room_group_name
        try:
            await layer.presence_join(
                group, self.channel_name, self.member, name, event=presence.join_event(self.channel_name, self.member, name)
            )
            if self.watching:
                listed = await presence.watch(self, layer, group)
                # Its own join may reach the view after this read: a watcher is listed from the start.
                if not any(entry["id"] == self.member for entry in listed):
                    listed.append({"id": self.member, "name": name})
                return listed
        except Exception as exc:  # noqa: BLE001 - the chat goes on; the room's list lacks this socket
            self.layer_failed("presence", group, exc)
            self.watching = False
        return None

    def presence_frame_soon(self, frame):
        """A join or leave frame from the room's view, in order with room messages."""
        self._push({"type": "presence.frame", "text": frame})

    async def presence_frame(self, event):
        if not self.closing:
            await self.send(text_data=event["text"])

    async def leave_presence(self, close_code):
        """Leave the room's presence: at once after a goodbye, else after the grace a resume comes back within."""
        group, channel, member, name = self.room_group_name, self.channel_name, self.member, self.member_name
        # A socket never opened has no client to resume it: it goes at once, as after a goodbye.
        grace = settings.CHAT_PRESENCE_GRACE if self.opened and close_code not in (1000, 1001) else 0
        if grace:
            await asyncio.sleep(grace)
        try:
            await self.channel_layer.presence_leave(group, [channel], event=presence.leave_event(channel, member, name))
        except Exception as exc:  # noqa: BLE001 - the entry then goes with this worker's lease, or the group's expiry
            self.layer_failed("presence", group, exc)

    async def identify(self, token):
        """Check the socket's token, that it names this room, and that its identity is within its limits."""
        identity = tokens.verify(token)
        if not identity.may_join(self.room_name):
            raise BadFrame(CLOSE_FORBIDDEN, "room_forbidden", "the token does not name this room")
        try:
            await IdentityQuota.claim(identity, self.room_name, self.channel_name)
        except BadFrame:
            raise
        except Exception as exc:  # noqa: BLE001 - the client gets a clear close code instead
            self.layer_failed("identity_quota", identity.key, exc)
            raise BadFrame(CLOSE_UNAVAILABLE, "unavailable", "chat is unavailable, try again") from None
        self.identity, self.claimed = identity, True

    def token_ended(self):
        """The socket's token has ended: close it with 4401 (a v2 client resumes with a new token)."""
        self.token_timer = None
        if self.closing:
            return
        self.close_soon(self.refuse(BadFrame(CLOSE_UNAUTHORIZED, "token_expired", "the token has expired: get a new one"), True))

    async def replay(self, resume, found):
        """v2: joined with the room's top, then the missed (or latest) messages, then how a resume went.

        The group was joined before ``found`` was read, so live messages wait behind this and those
        already replayed are dropped by offset: no gap and no duplicate across the seam.
        """
        member = None if self.member is None else {"id": self.member, "name": self.member_name}
        await self.send(text_data=joined_frame(self.room_name, found.offset, found.epoch, member, self.member_key))
        self.member_key = None  # the client holds it now; its resumes bring it back
        await self.send_history(found)
        if resume.since is not None:
            metrics.RESUMES.labels(str(found.recovered).lower()).inc()
            await self.send(text_data=recovered_frame(found.recovered, found.offset, found.epoch))

    async def catch_up(self):
        """v2: a gap in the offsets or a new epoch; send what the room's history has since this client's offset.

        A replay that cannot be exact is said with a ``recovered: false`` frame, so a client is never
        silently short.
        """
        found = await self.read_history(self.offset, self.epoch)
        if found is None:
            return
        metrics.CATCH_UPS.labels(str(found.recovered).lower()).inc()
        await self.send_history(found)
        if not found.recovered:
            await self.send(text_data=recovered_frame(False, found.offset, found.epoch))

    async def read_history(self, since, epoch, last=0):
        """The room's history after ``since``; None (and the socket closing with 4503) when it cannot be read."""
        try:
            return await self.channel_layer.group_history(self.room_group_name, since, epoch, last)
        except Exception as exc:  # noqa: BLE001 - the client resumes later instead of being silently short
            await self.refuse_unavailable("group_history", self.room_group_name, exc, "room history is unavailable, try again")
            return None

    async def send_history(self, found):
        """Send the messages of a history read; the client's offset becomes the room's top."""
        for message in found.messages:
            if self.closing:
                return
            await self.send(text_data=_frame(message, 2, self.room_name, live=False))
        self.offset, self.epoch = found.offset, found.epoch

    async def disconnect(self, close_code):
        if self.holds_slot:
            WorkerSockets.release()
            self.holds_slot = False
        if self.token_timer is not None:
            self.token_timer.cancel()
        if self.claimed:
            self.claimed = False
            try:
                await IdentityQuota.release(self.identity, self.room_name, self.channel_name)
            except Exception as exc:  # noqa: BLE001 - the place then lapses when the token ends
                self.layer_failed("identity_quota", self.identity.key, exc)
        if self.room_group_name is None:
            return
        if self.watching:
            self.watching = False
            presence.unwatch(self, self.room_group_name)
        if self.member is not None:
            # In the background: the grace outlives the connection, and the socket's slot is free already.
            _LEAVING.add(leaving := asyncio.ensure_future(self.leave_presence(close_code)))
            leaving.add_done_callback(_LEAVING.discard)
        if self.opened:
            metrics.CONNECTIONS.dec()
        try:
            await self.channel_layer.group_discard(self.room_group_name, self.channel_name)
        except Exception as exc:  # noqa: BLE001 - membership then lapses with group_expiry
            self.layer_failed("group_discard", self.room_group_name, exc)

    async def receive(self, text_data=None, bytes_data=None):
        # Frames the client sent before it read our close are not answered: one close per socket.
        if self.room_group_name is None or self.closing:
            return
        if self.bucket is None:
            self.bucket = TokenBucket(settings.CHAT_MESSAGES_PER_S, settings.CHAT_MESSAGE_BURST)
        try:
            if not self.bucket.take():  # every frame counts, a bad one too
                raise BadFrame(
                    CLOSE_TOO_MANY,
                    "rate_limited",
                    f"at most {settings.CHAT_MESSAGES_PER_S:g} messages a second (bursts of "
                    f"{settings.CHAT_MESSAGE_BURST:g}): this one was not sent",
                )
            frame = parse_client_frame(text_data, self.version)
        except BadFrame as bad:
            return await self.refuse(bad, self.version == 1)
        event = {"type": "chat.message", "message": frame["message"], "sent_at": time.time(), "sender": worker_id()}
        if self.identity is not None:
            event["name"] = self.identity.name
        options = {}
        if "nonce" in frame:
            event["nonce"] = frame["nonce"]
            if "history" in self.channel_layer.extensions:
                # A client that resends after a resume is published once within the history window.
                options["idempotency_key"] = frame["nonce"]
        try:
            await self.channel_layer.group_send(self.room_group_name, event, **options)
        except Exception as exc:  # noqa: BLE001 - the sender learns its message was not delivered
            return await self.refuse_unavailable(
                "group_send", self.room_group_name, exc, "message not delivered: chat is unavailable", close=self.version == 1
            )
        metrics.MESSAGES_IN.inc()

    async def close(self, code=None, reason=None):
        # Room messages can arrive until the client's disconnect removes this socket from the group.
        self.closing = True
        await super().close(code, reason)

    async def chat_message(self, event):
        """A room message from the channel layer: v1 clients get the tutorial's frame, v2 clients more."""
        if self.closing:
            metrics.DROPPED_CLOSING.inc()
            return
        place = self.place(event)
        if place is SENT:
            return
        if place is GAP:
            await self.catch_up()
            return
        # Channels' send() only wraps this in two more coroutines, paid once per recipient.
        await self.base_send({"type": "websocket.send", "text": _frame(event, self.version, self.room_name)})
        self.written(event)

    def dispatch_now(self, event):
        """A room message the socket takes at once is written here, with no coroutine per recipient."""
        if event["type"] != "chat.message" or self.closing:
            return False
        place = self.place(event)
        if place is SENT:
            return True
        # The server's direct write, where it offers one in the scope (chatsite.worker); else the ASGI send.
        direct = self.scope.get("extensions", _NO_EXTENSIONS).get(DIRECT_WRITE)
        send_text_now = direct["send_text_now"]() if direct is not None else None
        if place is GAP or send_text_now is None or not send_text_now(_frame(event, self.version, self.room_name)):
            return False
        self.written(event)
        return True

    def place(self, event):
        """Where a room message falls in a v2 client's stream: next (None), SENT already, or after a GAP."""
        if self.epoch is None or OFFSET not in event:
            return None
        offset = event[OFFSET]
        if event[EPOCH] != self.epoch or offset > self.offset + 1:
            return GAP  # published before this client's read of the history, or lost with its epoch
        if offset <= self.offset:
            return SENT  # from the room's history
        return None

    def written(self, event):
        """A room message went to the client: its offset is the client's."""
        if self.epoch is not None and OFFSET in event:
            self.offset = event[OFFSET]
        metrics.MESSAGES_OUT.inc()

    def layer_messages_dropped(self, count):
        """Room messages held back behind a suspended write when the socket ended: not written, counted."""
        metrics.DROPPED_CLOSING.inc(count)

    def layer_backlog_full(self):
        """The client reads slower than the room talks: close it with 4408 so it resumes instead of missing messages."""
        if self.closing:
            return
        self.closing = True
        metrics.CLOSED_TOO_SLOW.inc()
        self.close_soon(self.base_send({"type": "websocket.close", "code": CLOSE_TOO_SLOW}))

    def close_soon(self, closing):
        """Run ``closing`` from a callback, holding it until done; a client already gone needs no close."""
        closer = self._closer = asyncio.ensure_future(closing)
        closer.add_done_callback(_ignore_result)

    @staticmethod
    def layer_failed(operation, group, error):
        """A channel layer call failed: counted by operation (chat_layer_errors_total) and logged."""
        metrics.LAYER_ERRORS.labels(operation).inc()
        logger.warning("%s failed for %s: %r", operation, group, error)

    async def refuse_unavailable(self, operation, group, error, detail, close=True):
        """A layer call the client waits on failed: counted, logged, and the client told so (4503)."""
        self.layer_failed(operation, group, error)
        await self.refuse(BadFrame(CLOSE_UNAVAILABLE, "unavailable", detail), close)

    async def refuse(self, bad, close):
        """Tell the client what was wrong: an error frame for v2, and a close code where asked."""
        metrics.REJECTED.labels(bad.reason).inc()
        # Counted by reason in chat_rejected_total; a line per refusal would let a client flood the log.
        logger.debug("refused client frame: %s (%s)", bad.reason, bad.detail)
        if self.version == 2:
            await self.send(text_data=error_frame(bad.reason, bad.detail))
        if close:
            await self.close(code=bad.close_code, reason=bad.detail[:120])


class NotFoundConsumer(AsyncWebsocketConsumer):
    """Any other WebSocket path: refused at the handshake."""

    async def connect(self):
        metrics.REJECTED.labels("no_route").inc()
        await self.close(reason="no such WebSocket endpoint")
