"""The tutorial's async chat consumer, hardened: validated input, clear errors, metrics."""

import json
import logging
import time

from channels.generic.websocket import AsyncWebsocketConsumer
from channels.consumer import get_handler_name

from channels_redis_cluster.consumer import LayerPushMixin
from chatsite.identity import worker_id

from . import metrics
from .protocol import (
    CLOSE_NOT_FOUND,
    CLOSE_UNAVAILABLE,
    ROOM_NAME,
    ROOM_NAME_RULE,
    V2,
    BadFrame,
    error_frame,
    parse_client_frame,
)

logger = logging.getLogger(__name__)


_last_frame = (None, None, None, None)


def _frame(event, version, room):
    """The text frame of a room message, encoded once per worker rather than once per recipient.

    The layer hands every local member a shallow copy of one event, so their ``message`` and
    ``sent_at`` are the same objects: the last encoding is reused while they are. Holding them in
    the cache keeps their ids from being reused by other objects. The fan-out latency is observed
    here too, once per message and worker.
    """
    global _last_frame
    message, sent_at = event["message"], event["sent_at"]
    cached_message, cached_sent_at, cached_key, text = _last_frame
    if cached_message is message and cached_sent_at is sent_at and cached_key == (version, room):
        return text
    metrics.FANOUT_LATENCY.observe(max(0.0, time.time() - sent_at))
    if version == 1:
        text = json.dumps({"message": message})
    else:
        text = json.dumps({"room": room, **event, "type": "message"})
    _last_frame = (message, sent_at, (version, room), text)
    return text


class ChatConsumer(LayerPushMixin, AsyncWebsocketConsumer):
    """Joins the room's group, relays client messages to it and group messages to the client."""

    room_group_name = None
    closing = False
    groups = ()  # the room's group is joined in connect(); a tuple spares each connection an empty list

    async def dispatch(self, message):
        """Channels' dispatch without its per-message close of old database connections.

        That close is a thread-pool round trip for every frame and every room message (most of a
        worker's time under fan-out load); this app has no database, so there is nothing to close.
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self):
        self.room_name = self.scope["url_route"]["kwargs"]["room_name"]
        self.version = 2 if V2 in self.scope.get("subprotocols", ()) else 1
        subprotocol = V2 if self.version == 2 else None
        if not ROOM_NAME.fullmatch(self.room_name):
            await self.accept(subprotocol)
            return await self.refuse(BadFrame(CLOSE_NOT_FOUND, "bad_room", f"invalid room name: {ROOM_NAME_RULE}"), True)
        group = f"chat_{self.room_name}"
        try:
            # Join before the handshake completes, so a connected client misses nothing sent to the room.
            await self.channel_layer.group_add(group, self.channel_name)
        except Exception as exc:  # noqa: BLE001 - the client gets a clear close code instead
            metrics.LAYER_ERRORS.labels("group_add").inc()
            logger.warning("group_add failed for %s: %r", group, exc)
            await self.accept(subprotocol)
            return await self.refuse(BadFrame(CLOSE_UNAVAILABLE, "unavailable", "chat is unavailable, try again"), True)
        self.room_group_name = group
        await self.accept(subprotocol)
        metrics.CONNECTIONS.inc()

    async def disconnect(self, close_code):
        if self.room_group_name is None:
            return
        metrics.CONNECTIONS.dec()
        try:
            await self.channel_layer.group_discard(self.room_group_name, self.channel_name)
        except Exception as exc:  # noqa: BLE001 - membership then lapses with group_expiry
            metrics.LAYER_ERRORS.labels("group_discard").inc()
            logger.warning("group_discard failed for %s: %r", self.room_group_name, exc)

    async def receive(self, text_data=None, bytes_data=None):
        if self.room_group_name is None:
            return
        try:
            frame = parse_client_frame(text_data, self.version)
        except BadFrame as bad:
            return await self.refuse(bad, self.version == 1)
        event = {"type": "chat.message", "message": frame["message"], "sent_at": time.time(), "sender": worker_id()}
        if "nonce" in frame:
            event["nonce"] = frame["nonce"]
        try:
            await self.channel_layer.group_send(self.room_group_name, event)
        except Exception as exc:  # noqa: BLE001 - the sender learns its message was not delivered
            metrics.LAYER_ERRORS.labels("group_send").inc()
            logger.warning("group_send failed for %s: %r", self.room_group_name, exc)
            return await self.refuse(
                BadFrame(CLOSE_UNAVAILABLE, "unavailable", "message not delivered: chat is unavailable"),
                self.version == 1,
            )
        metrics.MESSAGES_IN.inc()

    async def close(self, code=None, reason=None):
        # Room messages can arrive until the client's disconnect removes this socket from the group.
        self.closing = True
        await super().close(code, reason)

    async def chat_message(self, event):
        """A room message from the channel layer: v1 clients get the tutorial's frame, v2 clients more."""
        if self.closing:
            return
        await self.send(text_data=_frame(event, self.version, self.room_name))
        metrics.MESSAGES_OUT.inc()

    async def refuse(self, bad, close):
        """Tell the client what was wrong: an error frame for v2, and a close code where asked."""
        metrics.REJECTED.labels(bad.reason).inc()
        logger.info("refused client frame: %s (%s)", bad.reason, bad.detail)
        if self.version == 2:
            await self.send(text_data=error_frame(bad.reason, bad.detail))
        if close:
            await self.close(code=bad.close_code, reason=bad.detail[:120])


class NotFoundConsumer(AsyncWebsocketConsumer):
    """Any other WebSocket path: refused at the handshake."""

    async def connect(self):
        metrics.REJECTED.labels("no_route").inc()
        await self.close(reason="no such WebSocket endpoint")
