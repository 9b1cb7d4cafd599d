"""RedisClusterChannelLayer: the Channels layer API on a Redis Cluster."""

import asyncio
import collections
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

from . import history, scripts, wire
from .cluster import (
    LAST_IN_WRITE,
    REPLICAS,
    RETRYABLE,
    WRITER,
    NotReplicated,
    SharedSlotMap,
    parse_hosts,
)
from .keys import KeyScheme, shared
from .loop import LoopState
from .metrics import LayerStats
from .wire import (
    NUMBERED,
    SEQ_END,
    SKIPPED,
)

logger = logging.getLogger(__name__)

_add_member = scripts.load("group_add")
_discard_member = scripts.load("group_discard")
_publish_group = scripts.load("group_publish")
_send_numbered = scripts.load("history_send")
_publish_numbered = scripts.load("history_publish")
_publish_confirmed = scripts.load("history_publish_confirmed")
_read_history = scripts.load("history_read")


def _published(reply):
    """Whether a history_publish_confirmed reply says it published (how many, 0 or more): not an error,
    not sent (None), not a refusal (-1: the replicas had not acknowledged; -2: the entry was not found)."""
    return type(reply) is int and reply >= 0


class RedisClusterChannelLayer(BaseChannelLayer):
    """Channel layer on Redis Cluster: sharded pub/sub for groups and process channels, lists for the rest."""

    # What callers may test for ("history" in layer.extensions) instead of probing for methods.
    extensions: ClassVar[list[str]] = ["groups", "flush", "attach", "history", "presence", "ready", "scripts"]

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
        self.history = history.HistoryPolicy(history_size, history_age, self.compile_capacities(group_history or {}))
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
            state = self._states[loop] = LoopState(self)
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
                except Exception as exc:  # noqa: BLE001 - the loop closes either way
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
            pushed = await state.push(channel, message)
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
            state.commands,
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
        await _discard_member(state.commands, (self.keys.group_members(group), self.keys.group_queues(group)), channel)
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
                queued = await _publish_group(state.commands, self.keys.group_queues(group), channel, frame, cutoff)
            else:
                frame = state.frame(channel, kind=NUMBERED)
                echo = state.expect_echo(channel)
                offset, epoch, queued = await self._send_with_history(
                    state, group, channel, bound, frame, message, idempotency_key, cutoff
                )
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
                state.forget_echo(echo)
        return offset

    async def _send_with_history(self, state, group, channel, bound, frame, message, idempotency_key, cutoff):
        """Number, keep and publish a group message with history; returns its offset, epoch and normal channels.

        With ``replicate_before_publish`` it is published once its primary's replicas hold it. On Valkey 8
        and later that takes one round trip: the write, the WAIT and a script that publishes only if the
        replicas acknowledged the write go out together. Elsewhere, and when that script could not publish
        (a duplicate, a script not loaded yet), a second round trip publishes it by offset.
        """
        keys, args = self.keys.group_history(group), self._history_args(bound)
        replicated = self.replicate_before_publish
        publish_after_wait = None
        if replicated:
            # The publishing script finds the entry by how it starts (its expiry time, then the frame's
            # header): unique even where a sender's numbers started again after a quiet spell.
            _, _, now, age, _ = args
            entry_start = wire.entry_time(now + age) + frame
            publish_after_wait = _publish_confirmed.later(keys[:2], channel, REPLICAS, entry_start, LAST_IN_WRITE)
        try:
            reply = await _send_numbered(
                state.commands,
                [*keys, self.keys.group_queues(group)],
                *args,
                bound.size,
                channel,
                frame,
                self.serialize(message),
                idempotency_key or "",
                cutoff,
                "0" if replicated else "1",
                replicated=replicated,
                retry_timeout=self.send_retry_timeout,
                then=publish_after_wait,
            )
            if replicated:
                reply, confirmed, published = reply
                if not confirmed and not _published(published):
                    raise NotReplicated(f"the replicas of {group!r}'s primary did not confirm its message in time")
            offset, epoch, rotated, duplicate, queued = reply
        except NotReplicated:
            self.stats.inc("not_replicated")  # the router is reading the slot map again: the slot may have a new primary
            raise
        if replicated and _published(published):
            self.stats.inc("published_in_one_round_trip")
        elif replicated:
            # Now that its replicas hold it: this and any entry before it not published yet go out, in order.
            skipped = frame[:SEQ_END] + SKIPPED if duplicate else b""
            await _publish_numbered(state.commands, keys, *args, channel, offset, skipped, retry_timeout=self.send_retry_timeout)
        if rotated:
            self.stats.inc("epoch_rotations")
        if duplicate:
            self.stats.inc("duplicates_suppressed")
        return offset, epoch, queued

    async def _push_members(self, state, channels, message):
        """Push a group message to the group's normal channels; a full one misses it, as in channels_redis."""
        pushed = await asyncio.gather(*(state.push(channel.decode(), message) for channel in channels))
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
        try:
            await state.presence.join(group, channel, member, name, event)
        except RETRYABLE:
            self.stats.inc("errors")
            raise

    async def presence_leave(self, group, channels, event=None):
        """Remove ``channels`` from ``group``'s presence; ``event`` goes to the group when one was there. How many were."""
        if not channels:
            return 0
        state = await self._state()
        try:
            return await state.presence.leave(group, channels, event)
        except RETRYABLE:
            self.stats.inc("errors")
            raise

    async def presence(self, group):
        """``group``'s members now, ``[{"id", "name", "channels"}]``: one per id, none of a process whose lease ended."""
        self.require_valid_group_name(group)
        state = await self._state()
        try:
            return await state.presence.members(group)
        except RETRYABLE:
            self.stats.inc("errors")
            raise

    async def presence_watch(self, group, watcher):
        """Call ``watcher(event)`` in this loop for ``group``'s presence events, ``watcher(None)`` when it must
        read the members again (after a subscription gap, or entries written back); one subscription per process."""
        self.require_valid_group_name(group)
        await (await self._state()).presence.watch(group, watcher)

    async def presence_unwatch(self, group, watcher):
        """Stop calling ``watcher``; the last one out unsubscribes."""
        await (await self._state()).presence.unwatch(group, watcher)

    async def on_channels_gone(self, listener):
        """Have ``listener(gone)`` called in this loop when processes die without leaving (their leases end);
        ``gone(channel)`` is true for each channel that was theirs, so no caller reads channel names."""
        await (await self._state()).presence.on_channels_gone(listener)

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
                state.commands,
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
        members = await state.commands.execute(key.encode(), "ZRANGEBYSCORE", key, cutoff, "+inf")
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

    async def run_script(self, script, keys, *args):
        """Run ``script`` (a ``Script``) on the primary of its keys' slot, on this layer's connections: for an
        application's own state kept beside the layer's, changed in one command. ``keys`` share one slot."""
        state = await self._state()
        return await script(state.commands, keys, *args)

    async def flush(self):
        """Delete every key of this prefix in the cluster and forget local channels and groups."""
        state = await self._state()
        await state.forget_groups()
        keys = [
            key
            async for key in state.cluster.scan_iter(match=self.keys.pattern(), count=1000, target_nodes=RedisCluster.PRIMARIES)
        ]
        for key in keys:
            await state.commands.execute(key, "UNLINK", key)

    async def close_pools(self):
        """channels_redis's name for ``close``, so code written for it runs unchanged."""
        await self.close()

    async def close(self):
        """Close the connections of the current event loop."""
        loop = asyncio.get_running_loop()
        state = self._states.pop(loop, None)
        if state is not None:
            await state.close()
