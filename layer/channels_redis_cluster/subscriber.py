"""Sharded pub/sub: one SSUBSCRIBE connection and one reader per primary, moved after failover or resharding.

A subscription follows its slot's owner in the slot map, refreshed every ``follow_interval``: a primary
cut off from its cluster keeps answering and keeps the subscription open, so a lost connection alone
would leave a room dark until the cut heals. A connection that answers nothing (not even the PING sent
every ``health_interval``) for ``health_interval + command_timeout`` is dropped and its channels move.
"""

import asyncio
import collections
import logging

from redis.exceptions import ResponseError

from .cluster import RETRYABLE, Deadline, Topology, dedicated_connection, mark_retrieved

logger = logging.getLogger(__name__)


class _NodeReader:
    """Owns one subscriber connection to one primary and reads every push that arrives on it."""

    def __init__(self, owner, node):
        self.owner = owner
        self.node = node
        self.channels = set()
        # Replies to SSUBSCRIBE/SUNSUBSCRIBE come back in the order the commands went out.
        self.replies = collections.deque()
        self.connection = dedicated_connection(node, owner.command_timeout)
        self.closed = False
        self.deadline = None  # of the silence after which the connection is dropped; every read moves it
        self.tasks = []
        self.forgetting = set()  # SUNSUBSCRIBEs sent for channels that moved, not waited for
        # Set when the connection went silent: the reader is cancelled then, and its channels must move.
        self.silent = False

    async def start(self):
        await self.connection.connect()
        self.tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._watch())]

    async def command(self, verb, channel):
        """Send SSUBSCRIBE or SUNSUBSCRIBE for one channel and wait for the server's answer."""
        if self.closed:
            raise ConnectionError(f"subscriber for {self.node.name} is closed")
        future = asyncio.get_running_loop().create_future()
        self.replies.append((verb, channel, future))
        await self.connection.send_command(verb, channel, check_health=False)
        await future

    def forget(self, channel):
        """Stop reading ``channel`` here at once; the server is told, but nothing waits for its answer
        (a node that no longer owns the slot may not answer at all)."""
        self.channels.discard(channel)
        if not self.closed:
            unsubscribed = asyncio.ensure_future(self.command(b"SUNSUBSCRIBE", channel))
            self.forgetting.add(unsubscribed)  # kept until done: the loop holds tasks only weakly
            unsubscribed.add_done_callback(self.forgetting.discard)
            unsubscribed.add_done_callback(mark_retrieved)

    async def _read(self):
        error = ConnectionError(f"subscriber for {self.node.name} closed")
        on_message = self.owner.on_message
        # Made here, not in start(): a reader cancelled before its first step leaves no deadline behind.
        self.deadline = Deadline(self.owner.health_interval + self.owner.command_timeout, self._silent)
        try:
            while True:
                try:
                    reply = await self.connection.read_response(push_request=True)
                except ResponseError as exc:
                    self._answer(None, exc)
                    continue
                self.deadline.progress()
                kind = reply[0]
                if kind == b"smessage":
                    if reply[1] in self.channels:  # not a channel that moved to another node meanwhile
                        on_message(reply[1], reply[2])
                elif kind == b"ssubscribe":
                    self.channels.add(reply[1])
                    self._answer(b"SSUBSCRIBE", None)
                elif kind == b"sunsubscribe":
                    if self.replies and self.replies[0][:2] == (b"SUNSUBSCRIBE", reply[1]):
                        self.channels.discard(reply[1])
                        self._answer(b"SUNSUBSCRIBE", None)
                    else:
                        # The server dropped us because the slot moved to another primary.
                        self.channels.discard(reply[1])
                        self.owner.relocate([reply[1]])
        except asyncio.CancelledError:
            if not self.silent:
                # Closed by its owner (the layer closing, or its event loop ending): nothing moved.
                self.channels.clear()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends this connection; the owner moves on
            error = exc
            logger.warning("shard subscriber for %s lost: %s", self.node.name, exc)
        finally:
            self.closed = True
            self.deadline.cancel()
            while self.replies:
                future = self.replies.popleft()[2]
                if not future.done():
                    future.set_exception(ConnectionError(str(error)))
            self.owner.reader_lost(self)

    def _answer(self, verb, exc):
        if not self.replies:
            return
        _, _, future = self.replies.popleft()
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(verb)

    def _silent(self):
        """Nothing read for ``health_interval + command_timeout`` of a loop free to read: a half-open
        connection. The reader is cancelled, and its channels move."""
        logger.warning("shard subscriber for %s silent, reconnecting", self.node.name)
        self.owner.stats.inc("command_deadlines")
        self.silent = True
        self.tasks[0].cancel()

    async def _watch(self):
        """PING every ``health_interval``: a connection that is alive answers, and its answer is a read."""
        while True:
            await asyncio.sleep(self.owner.health_interval)
            if self.closed:
                return
            try:
                await self.connection.send_command("PING", check_health=False)
            except Exception:  # noqa: BLE001 - the reader sees the same failure and handles it
                return

    async def close(self):
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping: what it read is dropped anyway
                pass
        try:
            await self.connection.disconnect(nowait=True)
        except Exception:  # noqa: BLE001 - a connection that broke on its own is closed either way
            pass


class ShardedSubscriber:
    """Keeps a set of shard channels subscribed on whichever primary owns each one's slot."""

    def __init__(
        self,
        topology: Topology,
        on_message,
        *,
        retry_timeout,
        health_interval,
        command_timeout,
        follow_interval,
        stats,
        on_moved=None,
    ):
        self.topology = topology
        self.on_message = on_message
        self.on_moved = on_moved  # called with a channel once it is subscribed again after a loss
        self.retry_timeout = retry_timeout
        self.health_interval = health_interval
        self.command_timeout = command_timeout
        self.follow_interval = follow_interval
        self.stats = stats
        self._follower = None
        self._followed = None  # the topology's change count the subscriptions were last checked against
        self.wanted = set()
        self.readers = {}
        self._reader_locks = collections.defaultdict(asyncio.Lock)
        self._channel_locks = collections.defaultdict(asyncio.Lock)
        self._moving = set()
        self._mover = None
        self.closed = False

    def holds(self, channel: bytes):
        """True when ``channel`` is subscribed on a live connection to the primary the slot map names."""
        try:
            owner = self.topology.primary_for(channel).name
        except RETRYABLE:
            return False
        reader = self.readers.get(owner)
        return reader is not None and channel in reader.channels and not reader.closed

    async def _follow(self):
        """Refresh the slot map every ``follow_interval`` and move what it moved."""
        while not self.closed:
            await asyncio.sleep(self.follow_interval)
            await self.topology.refresh()
            self.follow()

    def follow(self):
        """Move every subscription held on another node than its slot's primary in the slot map."""
        if self._followed == self.topology.changes:
            return
        self._followed = self.topology.changes
        moved = []
        for reader in list(self.readers.values()):
            for channel in list(reader.channels):
                try:
                    owner = self.topology.primary_for(channel).name
                except RETRYABLE:
                    continue
                if owner != reader.node.name:
                    moved.append(channel)
        if moved:
            logger.info("%d shard subscriptions follow their slots to new primaries", len(moved))
            self.stats.inc("subscriptions_followed", len(moved))
            self.relocate(moved)

    async def subscribe(self, channel: bytes):
        """Subscribe ``channel``; returns once the owning primary confirmed it."""
        self.wanted.add(channel)
        await self._reconcile(channel, self.retry_timeout)

    async def unsubscribe(self, channel: bytes):
        """Drop ``channel``; a failure to tell the server only costs unwanted traffic, which is ignored."""
        self.wanted.discard(channel)
        try:
            await self._reconcile(channel, 0)
        except RETRYABLE as exc:
            logger.debug("sunsubscribe %r failed: %s", channel, exc)

    async def _reconcile(self, channel, timeout):
        """Bring one channel's subscription in line with ``wanted``, retrying until ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.02
        lock = self._channel_locks[channel]
        async with lock:
            try:
                while not self.closed:
                    try:
                        return await self._apply(channel)
                    except RETRYABLE:
                        if loop.time() + delay > deadline:
                            raise
                    await self.topology.refresh()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
            finally:
                if not lock._waiters:
                    self._channel_locks.pop(channel, None)

    async def _apply(self, channel):
        holder = next((r for r in self.readers.values() if channel in r.channels), None)
        if channel not in self.wanted:
            if holder is not None and not holder.closed:
                await holder.command(b"SUNSUBSCRIBE", channel)
            return
        node = self.topology.primary_for(channel)
        if holder is not None and holder.node.name == node.name and not holder.closed:
            return
        if holder is not None and not holder.closed:
            holder.forget(channel)
        reader = await self._reader(node)
        await reader.command(b"SSUBSCRIBE", channel)

    async def _reader(self, node):
        reader = self.readers.get(node.name)
        if reader is not None and not reader.closed:
            return reader
        async with self._reader_locks[node.name]:
            reader = self.readers.get(node.name)
            if reader is None or reader.closed:
                reader = _NodeReader(self, node)
                await reader.start()
                self.readers[node.name] = reader
                if self._follower is None or self._follower.done():
                    self._follower = asyncio.ensure_future(self._follow())
        return reader

    def reader_lost(self, reader):
        """Called by a reader whose connection ended: its channels move to the current owners."""
        if self.readers.get(reader.node.name) is reader:
            del self.readers[reader.node.name]
        if reader.channels and not self.closed:
            self.stats.inc("resubscribes")
            self.relocate(list(reader.channels))
        reader.channels.clear()

    def relocate(self, channels):
        """Resubscribe ``channels`` in the background until each is placed or no longer wanted."""
        if self.closed:
            return
        self._moving.update(c for c in channels if c in self.wanted)
        if self._mover is None or self._mover.done():
            self._mover = asyncio.ensure_future(self._move())

    async def _move(self):
        # Short steps: every moment without a subscription loses the room's messages.
        delay = 0.02
        while self._moving and not self.closed:
            await self.topology.refresh()
            for channel in list(self._moving):
                try:
                    await self._reconcile(channel, 0)
                except RETRYABLE as exc:
                    logger.info("resubscribe %r pending: %s", channel, exc)
                    break
                self._moving.discard(channel)
                if self.on_moved is not None and channel in self.wanted:
                    self.on_moved(channel)
            else:
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def close(self):
        """Close every subscriber connection."""
        self.closed = True
        for task in (self._mover, self._follower):
            if task is not None:
                task.cancel()
        readers, self.readers = list(self.readers.values()), {}
        for reader in readers:
            await reader.close()
