"""The tutorial's async chat consumer, hardened: validated input, clear errors, metrics."""

import json
import logging
import time

from channels.generic.websocket import AsyncWebsocketConsumer

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


class ChatConsumer(AsyncWebsocketConsumer):
    """Joins the room's group, relays client messages to it and group messages to the client."""

    room_group_name = None

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

    async def chat_message(self, event):
        """A room message from the channel layer: v1 clients get the tutorial's frame, v2 clients more."""
        metrics.FANOUT_LATENCY.observe(max(0.0, time.time() - event["sent_at"]))
        if self.version == 1:
            payload = {"message": event["message"]}
        else:
            payload = {"type": "message", "room": self.room_name, **event}
            payload["type"] = "message"
        await self.send(text_data=json.dumps(payload))
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
