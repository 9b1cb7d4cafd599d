"""A consumer mixin that takes layer messages pushed by the layer instead of waiting for them in tasks."""

import asyncio
import contextvars
import logging
import sys

from channels.exceptions import StopConsumer
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)


class LayerPushMixin:
    """Dispatches layer messages as the layer's reader hands them over; client events in the connection's task.

    Channels' consumer loop keeps two tasks per connection, one waiting on the client and one on the
    layer, and recreates one of them for every message: memory per idle socket and a few event loop
    round trips per delivered message. Here a layer message is dispatched at once, up to the handler's
    first suspension (a frame write suspends only while the client's socket is not writable). Dispatches
    still run one at a time: a layer message that arrives while another handler is suspended queues
    behind it, up to the channel's capacity, beyond which the layer counts it as overflow. On layers
    without ``attach`` (channels_redis, in-memory) Channels' own loop runs.

    Until its first suspension a handler runs inside the layer's reader, in a context of its own; on
    Python 3.11 ``asyncio.current_task()`` is the reader there (3.12+ runs it as an eager task).
    """

    _backlog = None  # layer messages waiting while another dispatch runs; None when none runs
    _client_waiting = None  # a future the connection's task awaits to dispatch a client event

    async def __call__(self, scope, receive, send):
        layer = get_channel_layer(self.channel_layer_alias)
        if "attach" not in getattr(layer, "extensions", ()):
            return await super().__call__(scope, receive, send)
        self.scope, self.channel_layer, self.base_send = scope, layer, send
        self.channel_name = await layer.new_channel()
        await layer.attach(self.channel_name, self._push)
        try:
            while True:
                message = await receive()
                # One dispatch at a time, as in Channels' loop: a client event waits for a suspended
                # layer handler, and layer messages wait for the client event's handler (connect
                # accepts the socket before the first room message may be sent on it).
                if self._backlog is None:
                    self._backlog = []
                else:
                    self._client_waiting = asyncio.get_running_loop().create_future()
                    try:
                        await self._client_waiting
                    finally:
                        self._client_waiting = None
                await self.dispatch(message)
                backlog, self._backlog = self._backlog, None
                self._dispatch_in_order(backlog)
        except StopConsumer:
            pass
        finally:
            layer.detach(self.channel_name)
            if self._backlog:
                self.layer_messages_dropped(len(self._backlog))
                self._backlog.clear()

    def _push(self, message):
        """Dispatch a layer message now, or queue it behind the running dispatch; False when the queue is full."""
        backlog = self._backlog
        if backlog is None:
            self._dispatch_in_order([message])
        elif len(backlog) < self.channel_layer.get_capacity(self.channel_name):
            backlog.append(message)
        else:
            self.layer_backlog_full()
            return False
        return True

    def dispatch_now(self, message):
        """Handle a layer message without a coroutine if the consumer can; True when it did, else it is dispatched."""
        return False

    def layer_backlog_full(self):
        """Called when a layer message is dropped because the backlog is full; the layer counts it as overflow."""

    def layer_messages_dropped(self, count):
        """Called with the number of layer messages still held back when the connection ended."""

    def _dispatch_in_order(self, messages):
        """Dispatch ``messages`` one after another; one that suspends holds back the rest until it is done."""
        for index, message in enumerate(messages):
            if self.dispatch_now(message):
                continue
            try:
                task = start_eagerly(self.dispatch(message))
            except Exception as exc:  # noqa: BLE001 - handled as Channels would end the connection
                self._handler_failed(exc)
                continue
            if task is not None:
                self._backlog = messages[index + 1 :]
                task.add_done_callback(self._resume)
                return

    def _resume(self, task):
        if not task.cancelled() and task.exception() is not None:
            self._handler_failed(task.exception())
        if self._client_waiting is not None:
            self._client_waiting.set_result(None)  # the client event goes first; the backlog after it
            return
        backlog, self._backlog = self._backlog, None
        self._dispatch_in_order(backlog)

    def _handler_failed(self, exc):
        """A failed handler ends its connection (with 1011), as it would in Channels' loop."""
        if isinstance(exc, OSError):
            return  # the client is gone; receive() reports the disconnect
        logger.error("layer message handler failed", exc_info=exc)
        try:
            start_eagerly(self.base_send({"type": "websocket.close", "code": 1011}))
        except Exception:  # noqa: BLE001 - the socket is already closing
            pass


def start_eagerly(coroutine):
    """Run ``coroutine`` up to its first suspension: None when it finished, else a task finishing it."""
    if sys.version_info >= (3, 12):
        task = asyncio.Task(coroutine, eager_start=True)
        if not task.done():
            return task
        task.result()
        return None
    # As an eager task would: a context of its own, so the caller's context variables stay untouched.
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(coroutine.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_finish(_Suspended(coroutine, waiting_on)), context=context)


async def _finish(rest):
    return await rest


class _Suspended:
    """The rest of a coroutine already run up to a suspension, as an awaitable (PEP 380's delegation)."""

    __slots__ = ("coroutine", "waiting_on")

    def __init__(self, coroutine, waiting_on):
        self.coroutine, self.waiting_on = coroutine, waiting_on

    def __await__(self):
        coroutine, waiting_on = self.coroutine, self.waiting_on
        while True:
            try:
                value = yield waiting_on
            except BaseException as exc:  # noqa: BLE001 - thrown in by the task (cancellation): pass it on
                send, value = coroutine.throw, exc
            else:
                send = coroutine.send
            try:
                waiting_on = send(value)
            except StopIteration as stop:
                return stop.value
