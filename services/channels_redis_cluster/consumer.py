"""A consumer mixin that takes layer messages pushed by the layer instead of waiting for them in tasks."""

import asyncio
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
    first suspension (a frame write suspends only while the client's socket is not writable). A handler
    that suspends finishes in a task and later messages queue behind it, at most ``push_backlog`` of
    them; beyond that the layer counts them as overflow. On layers without ``attach`` (channels_redis,
    in-memory) Channels' own loop runs.

    Until its first suspension a handler runs inside the layer's reader; on Python 3.11 that means
    ``asyncio.current_task()`` is the reader there (3.12+ runs it as an eager task of its own).
    """

    push_backlog = 100

    async def __call__(self, scope, receive, send):
        layer = get_channel_layer(self.channel_layer_alias)
        if not hasattr(layer, "attach"):
            return await super().__call__(scope, receive, send)
        self.scope, self.channel_layer, self.base_send = scope, layer, send
        self.channel_name = await layer.new_channel()
        self._backlog = None  # messages behind a suspended dispatch, else None
        await layer.attach(self.channel_name, self._push)
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            layer.detach(self.channel_name)
            if self._backlog is not None:
                self._backlog.clear()

    def _push(self, message):
        """Dispatch a layer message now; False when this consumer is too far behind to take it."""
        backlog = self._backlog
        if backlog is None:
            self._dispatch_in_order([message])
        elif len(backlog) < self.push_backlog:
            backlog.append(message)
        else:
            return False
        return True

    def _dispatch_in_order(self, messages):
        """Dispatch ``messages`` one after another; one that suspends holds back the rest until it is done."""
        for index, message in enumerate(messages):
            try:
                task = start_eagerly(self.dispatch(message))
            except Exception as exc:  # noqa: BLE001 - handled as Channels would end the connection
                self._handler_failed(exc)
                continue
            if task is not None:
                self._backlog = messages[index + 1:]
                task.add_done_callback(self._resume)
                return

    def _resume(self, task):
        if not task.cancelled() and task.exception() is not None:
            self._handler_failed(task.exception())
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
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_finish(_Suspended(coroutine, waiting_on)))


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
