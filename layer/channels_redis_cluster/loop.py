"""What the layer holds per event loop: its connections, subscriptions, local channels and background tasks.

A ``RedisClusterChannelLayer`` is shared by every event loop of a process (a server's, or the fresh one
``async_to_sync`` makes per call); everything bound to a loop lives in that loop's ``LoopState``.
"""

import asyncio
import logging
import secrets
import time

from redis.asyncio.cluster import RedisCluster

from . import history, presence, scripts, wire
from .cluster import (
    RETRYABLE,
    CommandRouter,
    SharedCommandTable,
    Topology,
)
from .local import LocalChannels
from .subscriber import ShardedSubscriber
from .wire import (
    EPOCH_END,
    HEADER_BYTES,
    NUMBERED,
    OFFSET_END,
    PLAIN,
    REREAD,
    SENDER_BYTES,
    SEQ_END,
    SKIPPED,
)

logger = logging.getLogger(__name__)

_push = scripts.load("channel_push")

BLOCK_SECONDS = 1  # BLPOP timeout; far below socket_timeout so the two never race
ECHO_SECONDS = 1.0  # the longest a group_send waits for its own message to reach this process's members
SWEEP_SECONDS = 30.0
ECHO_MISSED = object()  # what an echo's future holds when its timer ran out first


class _Sequences:
    """Per-sender numbering of pub/sub messages, so receivers can count what never arrived.

    Two generations bound the memory: each sweep drops whatever was not touched for a whole generation.
    A sequence that starts again at 1 is a new sequence, not a late message.
    """

    def __init__(self):
        self.current, self.previous = {}, {}

    def get(self, key):
        value = self.current.get(key)
        if value is None:
            value = self.previous.get(key, 0)
        return value

    def set(self, key, value):
        self.current[key] = value

    def age(self):
        self.previous, self.current = self.current, {}


class LoopState:
    """Everything bound to one event loop: connections, subscriptions and local channels."""

    def __init__(self, layer):
        self.layer = layer
        self.loop = asyncio.get_running_loop()
        self.client_prefix = secrets.token_hex(SENDER_BYTES // 2)
        # Names new_channel() makes by default start with this; receive trusts them without a regex.
        self.channel_prefix = f"specific.{self.client_prefix}!"
        self.sender = self.client_prefix.encode()
        nodes, options = layer.startup_nodes, layer.redis_options
        self.cluster = RedisCluster(
            startup_nodes=nodes,
            socket_timeout=layer.socket_timeout,
            socket_connect_timeout=layer.socket_timeout,
            max_connections=layer.max_connections,
            **options,
        )
        self.cluster.commands_parser = SharedCommandTable(layer.command_table)
        self.topology = Topology(self.cluster, layer.slot_map, layer.command_timeout)
        self.commands = CommandRouter(
            self.topology,
            layer.retry_timeout,
            layer.command_timeout,
            layer.replica_timeout,
            layer.stats,
            preload=scripts.LOADED,
        )
        self.subscriber = ShardedSubscriber(
            self.topology,
            self.on_message,
            retry_timeout=layer.retry_timeout,
            health_interval=layer.health_interval,
            command_timeout=layer.command_timeout,
            follow_interval=layer.follow_interval,
            stats=layer.stats,
            on_moved=self.on_moved,
        )
        self.local = LocalChannels(layer.expiry, layer.group_expiry, layer.get_capacity, layer.stats)
        self.inbox = layer.keys.inbox(self.client_prefix)
        self.group_of = {}  # shard channel -> group name, for subscribed groups
        self.delivered = {}  # shard channel -> (epoch, offset) of the last numbered message fanned out here
        self.echoes = {}  # (shard channel, sequence) -> future of a group message sent here, set when it is back
        self.sent = _Sequences()
        self.seen = _Sequences()
        self.poppers = {}
        self.acks = {}  # id -> future of a membership change sent to another process
        self.sweeper = None
        self.tasks = set()  # background tasks (repairs, refreshes, resyncs) running now
        self.presence = presence.Presence(self, layer.presence_timeout)
        self.started = asyncio.ensure_future(self._start())
        self.listening = None

    async def _start(self):
        await self.topology.start()
        self.sweeper = asyncio.ensure_future(self._sweep())

    async def ready(self):
        """Wait until the slot map is loaded; a failed start is tried again on the next call."""
        self.started = _alive(self.started, self._start)
        await asyncio.shield(self.started)

    async def listen(self):
        """Wait until this loop's inbox is subscribed: only a loop that receives needs it.

        A loop that only sends (a view or a task calling ``async_to_sync(group_send)``) never opens it.
        """
        self.listening = _alive(self.listening, lambda: self.subscriber.subscribe(self.inbox))
        await asyncio.shield(self.listening)

    async def _sweep(self):
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.local.sweep()
            self.sent.age()
            self.seen.age()

    # Outgoing pub/sub

    def expect_echo(self, shard_channel):
        """The key of the frame just made for ``shard_channel`` when members here will see it come back, else None.

        Awaiting its return after a group_send means this process's members hold the message (or were
        full and missed it) when group_send returns: capacity applies at send, as in channels_redis.
        """
        if shard_channel not in self.group_of or not self.subscriber.holds(shard_channel):
            return None
        key = (shard_channel, self.sent.get(shard_channel))
        self.echoes[key] = self.loop.create_future()
        return key

    async def await_echo(self, key):
        """Wait for a frame's return; bounded, since a subscription that moved meanwhile never echoes it.

        An echo that never came says the subscription is not where the message went: the slot map is
        read again and subscriptions follow it, so the next sends do not wait for echoes that cannot come.
        """
        future = self.echoes.get(key)
        if future is not None and not future.done():
            # A timer instead of asyncio.wait_for, which costs a task's worth of futures per group_send.
            timer = self.loop.call_later(ECHO_SECONDS, _set_if_pending, future)
            try:
                if await future is ECHO_MISSED:
                    self.background(self.recheck())
            finally:
                timer.cancel()

    def forget_echo(self, key):
        """Stop expecting the frame of ``key``: its group_send returned or failed."""
        self.echoes.pop(key, None)

    async def recheck(self):
        """Read the slot map again and move the subscriptions it moved."""
        await self.topology.refresh()
        self.subscriber.follow()

    def frame(self, shard_channel, body=b"", kind=PLAIN):
        """Prefix ``body`` with this sender's id, its next number on ``shard_channel`` and the frame's kind."""
        seq = self.sent.get(shard_channel) + 1
        self.sent.set(shard_channel, seq)
        return b"".join((self.sender, seq.to_bytes(8, "big"), kind, body))

    async def publish(self, shard_channel, body, kind=PLAIN):
        """SPUBLISH once; returns how many subscribers the shard's primary reached."""
        return await self.commands.execute(shard_channel, "SPUBLISH", shard_channel, self.frame(shard_channel, body, kind))

    async def ask_reread(self, shard_channel):
        """Have the watchers of a presence shard channel, in every process, read the group's members again."""
        return await self.publish(shard_channel, b"", REREAD)

    # Incoming pub/sub

    def on_message(self, shard_channel, data):
        """Called by the subscriber for every shard message, in arrival order."""
        key = (data[:SENDER_BYTES], shard_channel)
        seq = int.from_bytes(data[SENDER_BYTES:SEQ_END], "big")
        last = self.seen.get(key)
        if seq > last + 1 and seq != 1:
            self.layer.stats.inc("sequence_gaps", seq - last - 1)
        elif seq <= last and seq != 1:
            self.layer.stats.inc("out_of_order")
        self.seen.set(key, seq)
        if key[0] == self.sender and self.echoes:
            echo = self.echoes.pop((shard_channel, seq), None)
            if echo is not None and not echo.done():
                # Set now, run after this fan-out: the sender resumes once its members hold the message.
                echo.set_result(None)
        kind = data[SEQ_END:HEADER_BYTES]
        if kind == SKIPPED:
            return
        if kind == REREAD:
            self.presence.tell(shard_channel, None)
            return
        try:
            if kind == NUMBERED:
                message = self.layer.deserialize(data[OFFSET_END:])
                message[history.EPOCH] = data[HEADER_BYTES:EPOCH_END].decode()
                message[history.OFFSET] = int(data[EPOCH_END:OFFSET_END])
            else:
                message = self.layer.deserialize(data[HEADER_BYTES:])
        except Exception:
            logger.exception("undecodable message on %r", shard_channel)
            return
        if shard_channel == self.inbox:
            self.on_inbox(message)
            return
        if self.presence.watches(shard_channel):
            self.presence.tell(shard_channel, message)
            return
        group = self.group_of.get(shard_channel)
        if group is not None:
            if kind == NUMBERED:
                self.delivered[shard_channel] = (message[history.EPOCH], message[history.OFFSET])
            self.local.fan_out(group, message)

    def on_moved(self, shard_channel):
        """A group's subscription was lost and is back: deliver from its history what came meanwhile.

        Without this, messages published while no subscription existed are noticed by a member only
        when a later one arrives with a gap; the last ones before a quiet spell would never be.
        """
        group = self.group_of.get(shard_channel)
        self.presence.on_moved(shard_channel, group)
        if group is not None and shard_channel in self.delivered and self.layer.history.bound(group).size:
            self.background(self.resync(group, shard_channel))

    async def resync(self, group, shard_channel):
        """Fan out the group's history after the last message delivered here, skipping what arrived live since."""
        epoch, offset = self.delivered[shard_channel]
        found = await self.layer.group_history(group, offset, epoch)
        resynced = 0
        for message in found.messages:
            last = self.delivered.get(shard_channel)
            if last is not None and last[0] == message[history.EPOCH] and message[history.OFFSET] <= last[1]:
                continue
            if self.group_of.get(shard_channel) != group:
                return  # everyone here left the group meanwhile
            self.delivered[shard_channel] = (message[history.EPOCH], message[history.OFFSET])
            self.local.fan_out(group, message)
            resynced += 1
        if resynced:
            self.layer.stats.inc("resynced", resynced)

    def on_inbox(self, envelope):
        """Direct messages, remote membership changes and their acknowledgements."""
        if "m" in envelope:
            self.local.put(envelope["c"], envelope["m"])
        elif "ack" in envelope:
            future = self.acks.pop(envelope["ack"], None)
            if future is not None and not future.done():
                future.set_result(None)
        elif "a" in envelope:
            self.background(self.apply_remote(self.join(envelope["a"], envelope["c"]), envelope))
        elif "d" in envelope:
            self.background(self.apply_remote(self.leave(envelope["d"], envelope["c"]), envelope))

    async def apply_remote(self, change, envelope):
        """Apply a membership change asked by another process, then tell it so."""
        await change
        reply = self.layer.serialize({"ack": envelope["id"]})
        await self.publish(self.layer.keys.inbox(envelope["r"]), reply)

    async def ask_owner(self, owner, envelope):
        """Have the owning process apply a membership change; returns once it has (or is gone)."""
        await self.listen()  # the acknowledgement comes to this loop's inbox
        envelope.update(id=secrets.token_hex(8), r=self.client_prefix)
        future = self.acks[envelope["id"]] = asyncio.get_running_loop().create_future()
        try:
            if await self.publish(self.layer.keys.inbox(owner), self.layer.serialize(envelope)):
                await asyncio.wait_for(future, self.layer.retry_timeout)
            else:
                self.layer.stats.inc("undeliverable")
        finally:
            self.acks.pop(envelope["id"], None)

    def background(self, coroutine):
        """Run ``coroutine`` as a task of this loop's, held until it is done and cancelled when the state
        closes: a repair or a refresh still retrying then would reopen connections to a cluster nobody uses."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task):
        self.tasks.discard(task)
        _log_failure(task)

    # Local membership

    async def join(self, group, channel):
        """Make ``channel`` (of this process) a local member of ``group``."""
        shard_channel = self.layer.keys.group_channel(group)
        self.group_of[shard_channel] = group
        self.local.add(group, channel)
        # Every member waits for the confirmed subscription, also when another member's join started
        # it: the caller accepts the socket next, and a message sent after that must reach it.
        try:
            await self.subscriber.subscribe(shard_channel)
        except BaseException:
            self.local.discard(group, channel)
            raise

    async def leave(self, group, channel):
        """Remove a local member; the last one out unsubscribes the group."""
        if self.local.discard(group, channel):
            shard_channel = self.layer.keys.group_channel(group)
            self.group_of.pop(shard_channel, None)
            await self.subscriber.unsubscribe(shard_channel)

    async def forget_groups(self):
        """Leave every group of this loop and drop its local channels (a flush)."""
        for shard_channel in list(self.group_of):
            await self.subscriber.unsubscribe(shard_channel)
        self.group_of.clear()
        self.local.clear()

    # Normal channels

    async def receive_normal(self, channel):
        """Wait for a message of a normal channel; one BLPOP loop per channel feeds every waiter.

        The loop runs apart from the receivers, so a cancelled receive never loses a popped message:
        it stays in the local buffer for the next receive in this process.
        """
        buffer = self.local.buffer(channel)
        popper = self.poppers.get(channel)
        if popper is None or popper.done():
            self.poppers[channel] = asyncio.ensure_future(self._pop(channel, buffer))
        return await buffer.get(self.layer.expiry)

    async def _pop(self, channel, buffer):
        key = self.layer.keys.queue(channel)
        try:
            while True:
                reply = await self.cluster.execute_command("BLPOP", key, BLOCK_SECONDS)
                if reply is not None and int(reply[1][: wire.TIME_CHARS]) > time.time() * 1000:
                    self.local.put(channel, self.layer.deserialize(reply[1][wire.TIME_CHARS :]))
                if not buffer.waiters:
                    return
        finally:
            if self.poppers.get(channel) is asyncio.current_task():
                del self.poppers[channel]

    async def push(self, channel, message, expiry=None):
        """Append to ``channel``'s queue in Redis; False when it is at capacity."""
        layer = self.layer
        expires_ms = int((time.time() + (expiry or layer.expiry)) * 1000)
        entry = wire.entry_time(expires_ms) + layer.serialize(message)
        return await _push(
            self.commands,
            layer.keys.queue(channel),
            int(time.time() * 1000),
            layer.get_capacity(channel),
            int(layer.expiry * 1000),
            entry,
        )

    async def park(self):
        """Move what this loop's own channels still hold into Redis, where another loop of the process receives it."""
        now = time.monotonic()
        for channel, buffer in list(self.local.buffers.items()):
            if channel.startswith(self.channel_prefix):
                for expires_at, message in buffer.items:
                    if expires_at > now:
                        await self.push(channel, message, expires_at - now)
                buffer.items.clear()

    async def close(self):
        if self.listening is not None:
            # Its channels outlive it: a later receive in another loop of this process reads their queues.
            self.layer.remember_closed(self.client_prefix)
            try:
                await self.park()
            except RETRYABLE as exc:
                logger.warning("messages of a closing event loop's channels are lost: %r", exc)
        if self.sweeper is not None:
            self.sweeper.cancel()
        self.presence.close()
        for task in list(self.tasks):
            task.cancel()
        for popper in list(self.poppers.values()):
            popper.cancel()
        self.started.cancel()
        if self.listening is not None:
            self.listening.cancel()
        await self.subscriber.close()
        await self.commands.close()
        await self.topology.close()
        await self.cluster.aclose()
        # aclose() closes nothing while redis-py waits to re-initialise after a failure: close the nodes anyway.
        await self.cluster.nodes_manager.aclose()
        await self.cluster.nodes_manager.aclose("startup_nodes")


def _alive(task, start):
    """``task``, or a new one from ``start()`` when there is none yet or it failed."""
    if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
        task = asyncio.ensure_future(start())
    return task


def _log_failure(task):
    if not task.cancelled() and task.exception() is not None:
        logger.warning("channel layer background task failed: %s", task.exception())


def _set_if_pending(future):
    if not future.done():
        future.set_result(ECHO_MISSED)
