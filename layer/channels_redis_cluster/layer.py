"""RedisClusterChannelLayer: the Channels layer API on a Redis Cluster."""

import asyncio
import collections
import json
import logging
import os
import secrets
import time
import weakref
from typing import ClassVar

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer
from channels_redis.serializers import registry
from redis.asyncio.cluster import RedisCluster

from . import history, presence, scripts, wire
from .cluster import (
    RETRYABLE,
    WRITER,
    NotReplicated,
    Publisher,
    SharedCommandTable,
    SharedSlotMap,
    Topology,
    parse_hosts,
)
from .keys import KeyScheme, shared
from .local import LocalChannels
from .metrics import LayerStats
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

BLOCK_SECONDS = 1  # BLPOP timeout; far below socket_timeout so the two never race
ECHO_SECONDS = 1.0  # the longest a group_send waits for its own message to reach this process's members
SWEEP_SECONDS = 30.0


_push = scripts.load("channel_push")
_add_member = scripts.load("group_add")
_discard_member = scripts.load("group_discard")
_publish_group = scripts.load("group_publish")
_send_numbered = scripts.load("history_send")
_publish_numbered = scripts.load("history_publish")
_read_history = scripts.load("history_read")


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


class _LoopState:
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
        self.publisher = Publisher(self.topology, layer.retry_timeout, layer.command_timeout, layer.replica_timeout, layer.stats)
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
        self.presence_watchers = {}  # presence shard channel -> [callback(event, or None after a gap)]
        self.watched = {}  # presence shard channel -> group, for watched groups
        self.delivered = {}  # shard channel -> (epoch, offset) of the last numbered message fanned out here
        self.echoes = {}  # (shard channel, sequence) -> future of a group message sent here, set when it is back
        self.sent = _Sequences()
        self.seen = _Sequences()
        self.poppers = {}
        self.acks = {}  # id -> future of a membership change sent to another process
        self.sweeper = None
        self.leases = presence.Leases(self, layer.presence_timeout)
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
        return await self.publisher.execute(shard_channel, "SPUBLISH", shard_channel, self.frame(shard_channel, body, kind))

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
            self.tell_watchers(shard_channel, None)
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
        if shard_channel in self.presence_watchers:
            self.tell_watchers(shard_channel, message)
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
        present = group or self.watched.get(shard_channel)  # the group of a group or presence shard channel
        if present in self.leases.own:  # the slot's new primary may lack entries written here
            self.background(self.leases.restore([present]))
        self.tell_watchers(shard_channel, None)  # events may have been missed: read the members again
        if group is not None and shard_channel in self.delivered and self.layer.history.bound(group).size:
            self.background(self.resync(group, shard_channel))

    def tell_watchers(self, shard_channel, event):
        """Call the presence watchers of ``shard_channel`` with ``event`` (None: read the members again)."""
        for watcher in list(self.presence_watchers.get(shard_channel, ())):
            presence.call(watcher, event)

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
        task = asyncio.ensure_future(coroutine)
        task.add_done_callback(_log_failure)

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

    async def park(self):
        """Move what this loop's own channels still hold into Redis, where another loop of the process receives it."""
        now = time.monotonic()
        for channel, buffer in list(self.local.buffers.items()):
            if channel.startswith(self.channel_prefix):
                for expires_at, message in buffer.items:
                    if expires_at > now:
                        await self.layer.push(self, channel, message, expires_at - now)
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
        self.leases.end()
        for popper in list(self.poppers.values()):
            popper.cancel()
        self.started.cancel()
        if self.listening is not None:
            self.listening.cancel()
        await self.subscriber.close()
        await self.publisher.close()
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


class RedisClusterChannelLayer(BaseChannelLayer):
    """Channel layer on Redis Cluster: sharded pub/sub for groups and process channels, lists for the rest."""

    # What callers may test for ("history" in layer.extensions) instead of probing for methods.
    extensions: ClassVar[list[str]] = ["groups", "flush", "attach", "history", "presence", "ready"]

    def __init__(
        self,
        hosts=None,
        prefix="asgi",
        expiry=60,
        group_expiry=86400,
        capacity=100,
        channel_capacity=None,
        symmetric_encryption_keys=None,
        serializer_format="msgpack",
        retry_timeout=20.0,
        send_retry_timeout=None,
        socket_timeout=5.0,
        max_connections=100,
        health_interval=1.0,
        command_timeout=2.0,
        follow_interval=1.0,
        replicate_before_publish=True,
        replica_timeout=0.5,
        history_size=0,
        history_age=300,
        group_history=None,
        presence_timeout=10.0,
    ):
        super().__init__(expiry=expiry, capacity=capacity)
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.group_expiry = group_expiry
        self.history = history.HistoryPolicy(history_size, history_age, group_history)
        self.keys = KeyScheme(prefix)
        self.startup_nodes, self.redis_options = parse_hosts(hosts)
        self.retry_timeout = retry_timeout
        self.send_retry_timeout = retry_timeout if send_retry_timeout is None else send_retry_timeout
        self.socket_timeout = socket_timeout
        self.max_connections = max_connections
        self.health_interval = health_interval
        self.command_timeout = command_timeout
        self.follow_interval = follow_interval
        self.replicate_before_publish = replicate_before_publish
        self.replica_timeout = replica_timeout
        self.presence_timeout = presence_timeout
        self.stats = LayerStats()
        self._serializer = registry.get_serializer(
            serializer_format,
            symmetric_encryption_keys=symmetric_encryption_keys,
            random_prefix_length=0,
            expiry=expiry,
        )
        self._forget_loops()
        self.command_table = {}  # the server's COMMAND reply, shared by every loop's cluster client
        self.slot_map = SharedSlotMap()

    def _forget_loops(self):
        """Start with no event loop's state: at construction, and in a forked child, whose parent's
        connections are not its own to use or to close."""
        self._states = weakref.WeakKeyDictionary()
        self._listeners = weakref.WeakValueDictionary()  # client prefix -> the live loop state that receives
        self._closed = collections.OrderedDict()  # client prefixes of this process's closed loops, newest last
        self._wrapped = weakref.WeakSet()  # loops whose close() already closes this layer's state
        self._pid = os.getpid()

    def serialize(self, message):
        """Message to bytes (msgpack, optionally encrypted), as channels_redis does."""
        return self._serializer.serialize(message)

    def deserialize(self, data):
        """Bytes back to a message."""
        return self._serializer.deserialize(data)

    async def _state(self):
        if self._pid != os.getpid():
            self._forget_loops()
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = self._states[loop] = _LoopState(self)
            self._close_with(loop)
        await state.ready()
        return state

    def _close_with(self, loop):
        """Release a loop's connections and tasks when the loop closes, as channels_redis does.

        ``async_to_sync`` runs each call in a fresh loop that it closes afterwards; without this every
        call would leave its sockets open and its tasks pending.
        """
        if loop in self._wrapped:  # a state made again after close() in the same loop
            return
        original = loop.close

        def close():
            state = self._states.pop(loop, None)
            if state is not None and not loop.is_closed() and not loop.is_running():
                try:
                    loop.run_until_complete(state.close())
                except Exception as exc:
                    logger.debug("closing the layer with its loop failed: %r", exc)
            original()

        try:
            loop.close = close
            self._wrapped.add(loop)
        except AttributeError:  # a loop type without instance attributes (uvloop) lives as long as its server
            pass

    CLOSED_LIMIT = 10000

    def remember_closed(self, client_prefix):
        """Record a closed loop's prefix: its channels are received from their queues from now on."""
        self._closed[client_prefix] = None
        if len(self._closed) > self.CLOSED_LIMIT:
            self._closed.popitem(last=False)

    async def push(self, state, channel, message, expiry=None):
        """Append to ``channel``'s queue in Redis; False when it is at capacity."""
        expires_ms = int((time.time() + (expiry or self.expiry)) * 1000)
        entry = b"%0*d" % (wire.TIME_CHARS, expires_ms) + self.serialize(message)
        return await _push(
            state.publisher,
            self.keys.queue(channel),
            int(time.time() * 1000),
            self.get_capacity(channel),
            int(self.expiry * 1000),
            entry,
        )

    @staticmethod
    def owner_of(channel):
        """The client prefix of the process that owns a process-specific channel, else None."""
        bang = channel.find("!")
        if bang < 0:
            return None
        return channel[:bang].rsplit(".", 1)[-1]

    # Channel layer API

    async def send(self, channel, message):
        """Send ``message`` to ``channel``; ChannelFull when it is at capacity."""
        if not isinstance(message, dict):
            raise TypeError("message must be a dict")
        self.require_valid_channel_name(channel)
        state = await self._state()
        owner = self.owner_of(channel)
        if owner == state.client_prefix:
            if not state.local.put(channel, message):
                raise ChannelFull(channel)
            return
        try:
            if owner is not None:
                body = self.serialize({"c": channel, "m": message})
                if await state.publish(self.keys.inbox(owner), body):
                    return
                # No loop listens for it now: its queue keeps it for a later receive in the owning process.
                self.stats.inc("parked")
            pushed = await self.push(state, channel, message)
        except RETRYABLE:
            self.stats.inc("errors")
            raise
        if not pushed:
            raise ChannelFull(channel)

    async def receive(self, channel):
        """The next message on ``channel``, waiting for one."""
        state = await self._state()
        # Hot path: a channel this process made with new_channel is valid by construction.
        if isinstance(channel, str) and channel.startswith(state.channel_prefix):
            return await state.local.get(channel)
        self.require_valid_channel_name(channel)
        owner = self.owner_of(channel)
        if owner is None or owner in self._closed:
            return await state.receive_normal(channel)
        if owner == state.client_prefix:
            return await state.local.get(channel)
        other = self._listeners.get(owner)
        if other is None or not other.loop.is_running():
            raise ValueError(f"{channel!r} belongs to another process")
        # Made by a loop that runs in another thread of this process: that loop's buffer holds its messages.
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(other.local.get(channel), other.loop))

    async def new_channel(self, prefix="specific"):
        """A new process-specific channel name that this process receives on."""
        state = await self._state()
        await state.listen()
        self._listeners[state.client_prefix] = state
        return f"{prefix}.{state.client_prefix}!{secrets.token_hex(12)}"

    async def attach(self, channel, deliver):
        """Have this process's ``channel`` call ``deliver(message)`` on arrival instead of being received on.

        ``deliver`` runs in the layer's reader, so it must not block; it returns False when it cannot
        take the message, which is then counted as overflow. ``detach`` ends it.
        """
        state = await self._state()
        if self.owner_of(channel) != state.client_prefix:
            raise ValueError(f"{channel!r} is not a channel of this process and event loop")
        state.local.attach(channel, deliver)

    def detach(self, channel):
        """Stop calling the receiver attached to ``channel``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a consumer finalised after its event loop stopped: nothing is left to detach
            return
        state = self._states.get(loop)
        if state is not None:
            state.local.detach(channel)

    async def group_add(self, group, channel):
        """Add ``channel`` to ``group``, whichever process owns the channel."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        state = await self._state()
        owner = self.owner_of(channel)
        await _add_member(
            state.publisher,
            (self.keys.group_members(group), self.keys.group_queues(group)),
            time.time(),
            channel,
            self.group_expiry,
            int(owner is None),
        )
        if owner == state.client_prefix:
            await state.join(group, channel)
        elif owner is not None:
            await state.ask_owner(owner, {"a": group, "c": channel})

    async def group_discard(self, group, channel):
        """Remove ``channel`` from ``group``."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        state = await self._state()
        await _discard_member(state.publisher, (self.keys.group_members(group), self.keys.group_queues(group)), channel)
        owner = self.owner_of(channel)
        if owner == state.client_prefix:
            await state.leave(group, channel)
        elif owner is not None:
            await state.ask_owner(owner, {"d": group, "c": channel})

    async def group_send(self, group, message, *, idempotency_key=None):
        """Send ``message`` to every member of ``group``: one command, whatever the group's size.

        With history on for the group, that command numbers the message, keeps it and publishes it;
        a message whose ``idempotency_key`` was sent within the history window is not sent again.
        Returns the message's offset, or None without history.
        """
        if not isinstance(message, dict):
            raise TypeError("message must be a dict")
        self.require_valid_group_name(group)
        state = await self._state()
        channel = self.keys.group_channel(group)
        bound = self.history.bound(group)
        cutoff = time.time() - self.group_expiry
        echo = None
        try:
            if not bound.size:
                offset = None
                frame = state.frame(channel, self.serialize(message))
                echo = state.expect_echo(channel)
                queued = await _publish_group(state.publisher, self.keys.group_queues(group), channel, frame, cutoff)
            else:
                body = self.serialize(message)
                frame = state.frame(channel, kind=NUMBERED)
                echo = state.expect_echo(channel)
                keys, args = self.keys.group_history(group), self._history_args(bound)
                replicated = self.replicate_before_publish
                try:
                    offset, epoch, rotated, duplicate, queued = await _send_numbered(
                        state.publisher,
                        [*keys, self.keys.group_queues(group)],
                        *args,
                        bound.size,
                        channel,
                        frame,
                        body,
                        idempotency_key or "",
                        cutoff,
                        "0" if replicated else "1",
                        replicated=replicated,
                        retry_timeout=self.send_retry_timeout,
                    )
                except NotReplicated:
                    self.stats.inc("not_replicated")
                    state.background(state.topology.refresh())  # the slot may have a new primary by now
                    raise
                if replicated:
                    # Now that its replicas hold it: this and any entry before it not published yet go out, in order.
                    skipped = frame[:SEQ_END] + SKIPPED if duplicate else b""
                    await _publish_numbered(
                        state.publisher, keys, *args, channel, offset, skipped, retry_timeout=self.send_retry_timeout
                    )
                if rotated:
                    self.stats.inc("epoch_rotations")
                if duplicate:
                    self.stats.inc("duplicates_suppressed")
                if queued:  # normal channels get the offset and epoch that live members get
                    message = {**message, history.OFFSET: offset, history.EPOCH: epoch.decode()}
            if queued:
                await self._push_members(state, queued, message)
            if echo is not None:
                await state.await_echo(echo)
        except RETRYABLE:
            self.stats.inc("errors")
            raise
        finally:
            if echo is not None:
                state.echoes.pop(echo, None)
        return offset

    async def _push_members(self, state, channels, message):
        """Push a group message to the group's normal channels; a full one misses it, as in channels_redis."""
        pushed = await asyncio.gather(*(self.push(state, channel.decode(), message) for channel in channels))
        full = pushed.count(0)
        if full:
            self.stats.inc("overflow", full)

    async def presence_join(self, group, channel, member, name=None, event=None):
        """Show ``channel`` in ``group``'s presence as ``member`` (``name`` or None); ``event`` goes to the group too.

        One command (two for this process's first entry in ``group``). A member is its id: several
        channels (tabs, or a resume on another process before the old socket's leave) are one member.
        """
        self.require_valid_group_name(group)
        state = await self._state()
        await state.leases.start()
        shard_channel, key = self.keys.presence_channel(group), self.keys.group_presence(group)
        value = presence.entry(member, name)
        frame = state.frame(shard_channel, self.serialize(event)) if event is not None else b""
        commands = [presence.join(state.publisher, key, channel, value, self.group_expiry, shard_channel, frame)]
        if state.leases.joined(group, channel, value):
            commands.append(state.leases.note_groups("SADD", group))
        try:
            await asyncio.gather(*commands)
        except RETRYABLE:
            state.leases.left(group, [channel])
            self.stats.inc("errors")
            raise

    async def presence_leave(self, group, channels, event=None):
        """Remove ``channels`` from ``group``'s presence; ``event`` goes to the group when one was there. How many were."""
        if not channels:
            return 0
        state = await self._state()
        shard_channel = self.keys.presence_channel(group)
        frame = state.frame(shard_channel, self.serialize(event)) if event is not None else b""
        commands = [presence.leave(state.publisher, self.keys.group_presence(group), shard_channel, frame, *channels)]
        if state.leases.left(group, channels):
            commands.append(state.leases.note_groups("SREM", group))
        try:
            return (await asyncio.gather(*commands))[0]
        except RETRYABLE:
            self.stats.inc("errors")
            raise

    async def presence(self, group):
        """``group``'s members now, ``[{"id", "name", "channels"}]``: one per id, none of a process whose lease ended."""
        self.require_valid_group_name(group)
        state = await self._state()
        await state.leases.start()
        key = self.keys.group_presence(group)
        try:
            reply = await state.publisher.execute(key.encode(), "HGETALL", key)
        except RETRYABLE:
            self.stats.inc("errors")
            raise
        pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2])
        members, stale = {}, []
        for channel, value in pairs:
            channel = channel.decode()
            if self.owner_of(channel) in state.leases.ended:
                stale.append(channel)
                continue
            member, name = json.loads(value)
            members.setdefault(member, {"id": member, "name": name, "channels": []})["channels"].append(channel)
        if stale:  # entries of a process that died: whoever reads them first removes them
            state.background(self.presence_leave(group, stale))
        return list(members.values())

    async def presence_watch(self, group, watcher):
        """Call ``watcher(event)`` in this loop for ``group``'s presence events, ``watcher(None)`` when it must
        read the members again (after a subscription gap, or entries written back); one subscription per process."""
        self.require_valid_group_name(group)
        state = await self._state()
        shard_channel = self.keys.presence_channel(group)
        watchers = state.presence_watchers.setdefault(shard_channel, [])
        state.watched[shard_channel] = group
        watchers.append(watcher)
        try:
            await state.subscriber.subscribe(shard_channel)
        except BaseException:
            await self.presence_unwatch(group, watcher)
            raise

    async def presence_unwatch(self, group, watcher):
        """Stop calling ``watcher``; the last one out unsubscribes."""
        state = await self._state()
        shard_channel = self.keys.presence_channel(group)
        watchers = state.presence_watchers.get(shard_channel, [])
        if watcher in watchers:
            watchers.remove(watcher)
        if not watchers and state.presence_watchers.pop(shard_channel, None) is not None:
            state.watched.pop(shard_channel, None)
            await state.subscriber.unsubscribe(shard_channel)

    async def on_processes_gone(self, listener):
        """Have ``listener(prefixes)`` called in this loop when processes' leases end (they died without leaving)."""
        state = await self._state()
        await state.leases.start()
        state.leases.listeners.append(listener)

    async def group_history(self, group, since=None, epoch=None, last=0):
        """The messages of ``group`` after offset ``since`` of ``epoch`` (or its ``last`` ones), as ``GroupHistory``.

        Each message carries its offset and epoch, as live ones do; the group's top offset and epoch
        come back even when it has no history yet, so a caller can resume from there later.
        """
        self.require_valid_group_name(group)
        state = await self._state()
        bound = self.history.bound(group)
        try:
            top, current, first, recovered, rotated, entries = await _read_history(
                state.publisher,
                self.keys.group_history(group),
                *self._history_args(bound),
                "" if since is None else int(since),
                epoch or "",
                int(last),
            )
        except RETRYABLE:
            self.stats.inc("errors")
            raise
        if rotated:
            self.stats.inc("epoch_rotations")
        current = shared(current.decode())  # callers keep it per channel: one string per epoch
        messages = []
        for offset, entry in enumerate(entries, first):
            message = self.deserialize(entry[wire.ENTRY_BODY :])
            message[history.OFFSET], message[history.EPOCH] = offset, current
            messages.append(message)
        return history.GroupHistory(messages, top, current, bool(recovered))

    def _history_args(self, bound):
        """The arguments every history script starts with: writer, a new epoch if one is needed, now, the
        age bound, and how long the top and epoch outlive the last write (so a client that missed
        nothing resumes exactly after a quiet spell)."""
        age = int(bound.age * 1000)
        return (
            WRITER,
            secrets.token_hex(wire.EPOCH_CHARS // 2),
            int(time.time() * 1000),
            age,
            max(age, int(self.group_expiry * 1000)),
        )

    # Extensions

    async def group_channels(self, group):
        """The channels recorded as members of ``group`` in the cluster, from any process."""
        self.require_valid_group_name(group)
        state = await self._state()
        key = self.keys.group_members(group)
        cutoff = time.time() - self.group_expiry
        members = await state.publisher.execute(key.encode(), "ZRANGEBYSCORE", key, cutoff, "+inf")
        return [member.decode() for member in members]

    async def ready(self):
        """Raise unless this process holds the cluster's slot map and the last reading of it was answered by
        a node of the cluster (each asked for at most ``command_timeout``); each primary's health is not asked."""
        state = await self._state()
        topology = state.topology
        if topology.reached_at is None:
            await topology.refresh()
        elif state.loop.time() - topology.reached_at > self.follow_interval:
            # Judged by what is known now: a probe is not held up by nodes that do not answer.
            state.background(topology.refresh())
        if topology.reached_at is None or topology.unreachable_since is not None:
            raise ConnectionError("no node of the Redis Cluster answered")

    async def flush(self):
        """Delete every key of this prefix in the cluster and forget local channels and groups."""
        state = await self._state()
        for shard_channel in list(state.group_of):
            await state.subscriber.unsubscribe(shard_channel)
        state.group_of.clear()
        state.local.clear()
        keys = [
            key
            async for key in state.cluster.scan_iter(match=self.keys.pattern(), count=1000, target_nodes=RedisCluster.PRIMARIES)
        ]
        for key in keys:
            await state.publisher.execute(key, "UNLINK", key)

    async def close_pools(self):
        """channels_redis's name for ``close``, so code written for it runs unchanged."""
        await self.close()

    async def close(self):
        """Close the connections of the current event loop."""
        loop = asyncio.get_running_loop()
        state = self._states.pop(loop, None)
        if state is not None:
            await state.close()


ECHO_MISSED = object()  # what an echo's future holds when its timer ran out first


def _set_if_pending(future):
    if not future.done():
        future.set_result(ECHO_MISSED)
