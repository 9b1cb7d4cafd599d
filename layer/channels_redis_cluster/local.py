"""The channels that live in this process: bounded buffers or attached receivers, and local group members."""

import asyncio
import logging
import time

logger = logging.getLogger(__name__)


class ChannelBuffer:
    """Messages waiting for one channel, at most ``capacity`` of them, each with its expiry time.

    Plain lists, not deques: there is one buffer per open socket, an empty deque costs ten times an
    empty list, and these stay short (one waiter, at most ``capacity`` items).
    """

    __slots__ = ("capacity", "idle_since", "items", "waiters")

    def __init__(self, capacity):
        self.items = []
        self.waiters = []
        self.capacity = capacity
        self.idle_since = time.monotonic()

    def put(self, message, expires_at):
        """Hand ``message`` to a waiting receiver or keep it; False when the buffer is full."""
        waiters = self.waiters
        while waiters:
            future = waiters.pop(0)
            if not future.done():
                future.set_result(message)
                return True
        items = self.items
        if len(items) >= self.capacity:
            now = time.monotonic()
            while items and items[0][0] <= now:
                del items[0]
            if len(items) >= self.capacity:
                return False
        items.append((expires_at, message))
        return True

    async def get(self, expiry):
        """The oldest unexpired message, waiting for one if there is none."""
        now = time.monotonic()
        items = self.items
        while items:
            expires_at, message = items.pop(0)
            if expires_at > now:
                return message
        future = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # The message arrived as we were cancelled: keep it for the next receive.
                items.insert(0, (time.monotonic() + expiry, future.result()))
            else:
                try:
                    self.waiters.remove(future)
                except ValueError:
                    pass
            raise
        finally:
            self.idle_since = time.monotonic()

    def abandoned(self, cutoff):
        """True when nobody waits, nothing unexpired is left and it has been idle since before ``cutoff``."""
        if self.waiters or self.idle_since > cutoff:
            return False
        now = time.monotonic()
        return all(expires_at <= now for expires_at, _ in self.items)


class LocalChannels:
    """Per-process channel buffers and group membership, fed by the layer's readers."""

    def __init__(self, expiry, group_expiry, capacity_for, stats):
        self.expiry = expiry
        self.group_expiry = group_expiry
        self.capacity_for = capacity_for
        self.stats = stats
        self.buffers = {}
        self.sinks = {}  # channel -> deliver(message), for channels attached instead of received on
        # group -> {channel: wall-clock join time}; wall clock because group_expiry is shared with Redis
        self.groups = {}

    def buffer(self, channel):
        """The buffer of ``channel``, created on first use."""
        buffer = self.buffers.get(channel)
        if buffer is None:
            buffer = self.buffers[channel] = ChannelBuffer(self.capacity_for(channel))
        return buffer

    def put(self, channel, message):
        """Deliver to one local channel; False (and counted) when its buffer or receiver is full."""
        sink = self.sinks.get(channel)
        if sink is not None:
            accepted = _call(sink, message)
        else:
            accepted = self.buffer(channel).put(message, time.monotonic() + self.expiry)
        if not accepted:
            self.stats.inc("overflow")
        return accepted

    def attach(self, channel, deliver):
        """Hand ``channel``'s messages to ``deliver`` as they arrive, instead of buffering them."""
        self.sinks[channel] = deliver
        buffer = self.buffers.pop(channel, None)
        if buffer is not None:
            for _, message in buffer.items:
                self.put(channel, message)

    def detach(self, channel):
        """Stop handing ``channel``'s messages to its receiver."""
        self.sinks.pop(channel, None)

    async def get(self, channel):
        """Wait for the next message of a local channel."""
        return await self.buffer(channel).get(self.expiry)

    def add(self, group, channel):
        """Record a local member; True when it is the group's first local member."""
        members = self.groups.get(group)
        first = members is None
        if first:
            members = self.groups[group] = {}
        members[channel] = time.time()
        return first

    def discard(self, group, channel):
        """Forget a local member; True when the group has no local members left."""
        members = self.groups.get(group)
        if members is None:
            return False
        members.pop(channel, None)
        if members:
            return False
        del self.groups[group]
        return True

    def fan_out(self, group, message):
        """Give every live local member of ``group`` its own shallow copy of ``message``."""
        members = self.groups.get(group)
        if not members:
            return
        cutoff = time.time() - self.group_expiry
        expires_at = time.monotonic() + self.expiry
        buffers, sinks = self.buffers, self.sinks
        expired = []
        attached = []
        delivered = dropped = 0
        for channel, joined in members.items():
            if joined < cutoff:
                expired.append(channel)
            elif (sink := sinks.get(channel)) is not None:
                attached.append(sink)
            elif (buffers.get(channel) or self.buffer(channel)).put(dict(message), expires_at):
                delivered += 1
            else:
                dropped += 1
        for channel in expired:
            del members[channel]
        # Called once the members are walked: a receiver may join or leave groups as it handles a message.
        for sink in attached:
            if _call(sink, dict(message)):
                delivered += 1
            else:
                dropped += 1
        self.stats.inc("delivered", delivered)
        if dropped:
            self.stats.inc("overflow", dropped)

    def sweep(self):
        """Drop buffers nobody has read for longer than the expiry: their messages are dead anyway."""
        cutoff = time.monotonic() - self.expiry
        dead = [name for name, buffer in self.buffers.items() if buffer.abandoned(cutoff)]
        for name in dead:
            del self.buffers[name]
        return len(dead)

    def clear(self):
        """Forget everything, as flush does."""
        self.buffers.clear()
        self.sinks.clear()
        self.groups.clear()


def _call(deliver, message):
    """``deliver(message)``; a receiver that raises must not stop the reader that feeds every other one."""
    try:
        return deliver(message)
    except Exception:
        logger.exception("an attached receiver failed on a message")
        return False
