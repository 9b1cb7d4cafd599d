"""Presence: who is in a group, read from any process in one command, gone within a bound when its process dies.

A group's entries are a hash in the group's slot (member channel -> member id and name), written on
join and leave together with an event on the group's presence shard channel, which each process
watching the group subscribes once. Each process that uses presence holds a lease in one sorted set (client prefix ->
lease end), renewed every third of ``presence_timeout``: one command per process per beat, not per
socket. An entry's process is its channel's prefix; a reader hides the entries of processes whose
lease ended, so a member of a SIGKILLed process is gone for every reader within ``presence_timeout``.

Redis may lose writes: a primary that dies before its replica got them, or the node of the leases.
So each process remembers its own entries and writes back those missing when its subscription to a
group's slot moves (a failover there) or when it finds its own lease gone; and one live process
removes the entries of each process whose lease ended (the groups it had entries in are a set beside
the leases), so ended leases can be forgotten without their entries coming back.
"""

import asyncio
import json
import logging
import time

from . import scripts
from .cluster import RETRYABLE

logger = logging.getLogger(__name__)

CLAIM_SECONDS = 60  # how long a process that took a dead one's entries to remove has before another may

renew_lease = scripts.load("presence_renew")
add_entry = scripts.load("presence_join")
remove_entries = scripts.load("presence_leave")
restore_entries = scripts.load("presence_restore")
claim_reaping = scripts.load("presence_claim")
mark_reaped = scripts.load("presence_reaped")
remove_entries_of = scripts.load("presence_reap")


def call(watcher, event):
    """``watcher(event)``; one that raises must not stop the reader that feeds every other subscription."""
    try:
        watcher(event)
    except Exception:
        logger.exception("a presence watcher failed")


def entry(member, name):
    """What a group's hash holds for one member channel."""
    return json.dumps([member, name])


class Leases:
    """This process's lease, its own entries, and what it knows of the other processes' leases."""

    def __init__(self, state, timeout):
        self.state, self.timeout = state, timeout
        self.own = {}  # group -> {channel: entry}: written back if Redis loses them
        self.ended = set()  # client prefixes whose lease ended
        self.reaped = set()  # ended prefixes whose entries are removed
        self.reaping = set()  # ended prefixes being removed here
        self.restoring = 0  # renewals left that write back this process's entries after its lease was lost
        self.held = False  # whether a renewal was tried: before one, this process had no lease to lose
        self.renewing = None
        self.renewed = None  # a future set once the first renewal is back
        self.listeners = []  # callables(prefixes) told of processes whose lease just ended

    async def start(self):
        """Renew this process's lease from now on; returns once the first renewal is back."""
        if self.renewing is None or self.renewing.done():
            self.renewed = asyncio.get_running_loop().create_future()
            self.renewing = asyncio.ensure_future(self._renew())
        await asyncio.shield(self.renewed)

    async def renew(self):
        """One renewal: whether this process's lease had ended or was lost, and the prefixes whose lease ended."""
        layer, now = self.state.layer, int(time.time() * 1000)
        reply = await renew_lease(
            self.state.commands,
            (layer.keys.presence_leases(), layer.keys.presence_reaping()),
            now,
            now + int(2 * self.timeout / 3 * 1000),
            self.state.client_prefix,
            int(layer.group_expiry * 1000),
        )
        return bool(reply[0]), {prefix.decode() for prefix in reply[1:]}

    async def _renew(self):
        layer = self.state.layer
        while True:
            try:
                lost, ended = await self.renew()
            except RETRYABLE as exc:
                layer.stats.inc("errors")
                logger.warning("presence lease not renewed: %r", exc)
            else:
                # Others may have removed this process's entries, and may until they see it renewed. A lease
                # missing at the first renewal is only a new one: restoring every group then cost three full
                # rounds of scripts in a new worker's first seconds, when a reconnect storm fills it.
                if lost and self.held:
                    self.restoring = 3
                if self.restoring and self.own:  # now and on the next two beats
                    self.state.background(self.restore(list(self.own), registered=False))
                self.restoring = max(self.restoring - 1, 0)
                gone, self.ended = ended - self.ended, ended
                self.reaped &= ended
                if gone:
                    for listener in list(self.listeners):
                        listener(gone)
                unreaped = ended - self.reaped - self.reaping
                if unreaped:
                    self.state.background(self.reap(unreaped))
            # Held from the first try on, answered or not: a renewal that failed here may have run in Redis.
            self.held = True
            if not self.renewed.done():
                self.renewed.set_result(None)  # tried once: readers go on with what they know
            await asyncio.sleep(self.timeout / 3)

    def joined(self, group, channel, entry):
        """Remember one of this process's entries; whether it is its first in ``group``."""
        own = self.own.setdefault(group, {})
        own[channel] = entry
        return len(own) == 1

    def left(self, group, channels):
        """Forget entries of this process; whether ``group`` has none of them left."""
        own = self.own.get(group)
        if own is None:
            return False
        for channel in channels:
            own.pop(channel, None)
        if own:
            return False
        del self.own[group]
        return True

    async def note_groups(self, verb, *groups):
        """``SADD`` or ``SREM`` ``groups`` in this process's set of groups with its entries (what a reaper cleans)."""
        key = self.state.layer.keys.presence_groups(self.state.client_prefix)
        return await self.state.commands.execute(key.encode(), verb, key, *groups)

    async def restore(self, groups, registered=True):
        """Write back this process's entries missing from ``groups`` and have their watchers read them again;
        and the groups to this process's set when it may be lost (``registered`` False)."""
        state, layer = self.state, self.state.layer
        groups = [group for group in groups if group in self.own]
        if not registered and groups:
            await self.note_groups("SADD", *groups)
        entries, written = 0, []
        try:
            for group in groups:
                pairs = [value for pair in self.own.get(group, {}).items() for value in pair]
                if not pairs:
                    continue
                key, shard_channel = layer.keys.group_presence(group), layer.keys.presence_channel(group)
                restored = [
                    channel.decode() for channel in await restore_entries(state.commands, key, layer.group_expiry, *pairs)
                ]
                if not restored:
                    continue
                layer.stats.inc("presence_restored", len(restored))
                entries += len(restored)
                written.append(group)
                gone = [channel for channel in restored if channel not in self.own.get(group, {})]
                if gone:  # left while being written back
                    await remove_entries(state.commands, key, shard_channel, b"", *gone)
                await state.ask_reread(shard_channel)  # one frame, not one join each: watchers that read before this read again
        finally:
            # One line for the whole restore: a worker holding 10,000 rooms logged 18,000 lines of one a room.
            if written:
                shown = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
                logger.warning("%d presence entries of %d groups written again (%s)", entries, len(written), shown)

    async def reap(self, prefixes):
        """Remove the entries of processes whose lease ended, those this process is first to claim."""
        state, layer = self.state, self.state.layer
        self.reaping |= prefixes
        try:
            now, reaping = int(time.time() * 1000), layer.keys.presence_reaping()
            leases = layer.keys.presence_leases()
            claimed, done = await claim_reaping(
                state.commands, (reaping, leases), now, now + CLAIM_SECONDS * 1000, *sorted(prefixes)
            )
            self.reaped |= {prefix.decode() for prefix in done}
            for prefix in (prefix.decode() for prefix in claimed):
                groups_key = layer.keys.presence_groups(prefix)
                for group in await state.commands.execute(groups_key.encode(), "SMEMBERS", groups_key):
                    removed = await remove_entries_of(state.commands, layer.keys.group_presence(group.decode()), prefix)
                    layer.stats.inc("presence_reaped", removed)
                if await mark_reaped(state.commands, (reaping, leases, groups_key), int(time.time() * 1000), prefix):
                    self.reaped.add(prefix)
        except RETRYABLE as exc:
            layer.stats.inc("errors")
            logger.warning("entries of ended presence leases not removed: %r", exc)
        finally:
            self.reaping -= prefixes

    def end(self):
        """Stop renewing: the lease ends by itself within the timeout."""
        if self.renewing is not None:
            self.renewing.cancel()


class Presence:
    """Presence for one event loop of the layer: this process's lease and entries, and the groups watched here.

    The layer's ``presence_*`` methods check their arguments and delegate here; the loop hands it the
    events of the presence shard channels and tells it when a subscription moved. It translates the
    processes whose lease ended into their channels, so no caller reads channel names.
    """

    def __init__(self, state, timeout):
        self.state = state
        self.leases = Leases(state, timeout)
        self.watchers = {}  # presence shard channel -> [callback(event, or None after a gap)]
        self.watched = {}  # presence shard channel -> group, for watched groups

    async def join(self, group, channel, member, name, event):
        state, layer = self.state, self.state.layer
        await self.leases.start()
        shard_channel, key = layer.keys.presence_channel(group), layer.keys.group_presence(group)
        value = entry(member, name)
        frame = state.frame(shard_channel, layer.serialize(event)) if event is not None else b""
        commands = [add_entry(state.commands, key, channel, value, layer.group_expiry, shard_channel, frame)]
        if self.leases.joined(group, channel, value):
            commands.append(self.leases.note_groups("SADD", group))
        try:
            await asyncio.gather(*commands)
        except RETRYABLE:
            self.leases.left(group, [channel])
            raise

    async def leave(self, group, channels, event):
        state, layer = self.state, self.state.layer
        shard_channel = layer.keys.presence_channel(group)
        frame = state.frame(shard_channel, layer.serialize(event)) if event is not None else b""
        commands = [remove_entries(state.commands, layer.keys.group_presence(group), shard_channel, frame, *channels)]
        if self.leases.left(group, channels):
            commands.append(self.leases.note_groups("SREM", group))
        return (await asyncio.gather(*commands))[0]

    async def members(self, group):
        state, layer = self.state, self.state.layer
        await self.leases.start()
        key = layer.keys.group_presence(group)
        reply = await state.commands.execute(key.encode(), "HGETALL", key)
        pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2])
        members, stale = {}, []
        for channel, value in pairs:
            channel = channel.decode()
            if layer.owner_of(channel) in self.leases.ended:
                stale.append(channel)
                continue
            member, name = json.loads(value)
            members.setdefault(member, {"id": member, "name": name, "channels": []})["channels"].append(channel)
        if stale:  # entries of a process that died: whoever reads them first removes them
            state.background(layer.presence_leave(group, stale))
        return list(members.values())

    async def watch(self, group, watcher):
        shard_channel = self.state.layer.keys.presence_channel(group)
        self.watchers.setdefault(shard_channel, []).append(watcher)
        self.watched[shard_channel] = group
        try:
            await self.state.subscriber.subscribe(shard_channel)
        except BaseException:
            await self.unwatch(group, watcher)
            raise

    async def unwatch(self, group, watcher):
        shard_channel = self.state.layer.keys.presence_channel(group)
        watchers = self.watchers.get(shard_channel, [])
        if watcher in watchers:
            watchers.remove(watcher)
        if not watchers and self.watchers.pop(shard_channel, None) is not None:
            self.watched.pop(shard_channel, None)
            await self.state.subscriber.unsubscribe(shard_channel)

    async def on_channels_gone(self, listener):
        await self.leases.start()
        owner_of = self.state.layer.owner_of
        self.leases.listeners.append(lambda prefixes: listener(lambda channel: owner_of(channel) in prefixes))

    def watches(self, shard_channel):
        """Whether ``shard_channel`` is the presence shard channel of a group watched here."""
        return shard_channel in self.watchers

    def tell(self, shard_channel, event):
        """Call the watchers of ``shard_channel`` with ``event`` (None: read the members again)."""
        for watcher in list(self.watchers.get(shard_channel, ())):
            call(watcher, event)

    def on_moved(self, shard_channel, group=None):
        """The subscription to ``shard_channel`` (``group``'s messages, or a watched group's presence) was lost
        and is back: write back this process's entries the slot's new primary may lack, and have the
        watchers read the members again, since events may have been missed."""
        group = group or self.watched.get(shard_channel)
        if group in self.leases.own:
            self.state.background(self.leases.restore([group]))
        self.tell(shard_channel, None)

    def close(self):
        """Stop renewing the lease: it ends by itself within the timeout."""
        self.leases.end()
