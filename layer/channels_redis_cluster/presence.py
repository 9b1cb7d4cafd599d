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
join = scripts.load("presence_join")
leave = scripts.load("presence_leave")
restore = scripts.load("presence_restore")
claim = scripts.load("presence_claim")
reaped = scripts.load("presence_reaped")
reap = scripts.load("presence_reap")


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
            self.state.publisher,
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
                if lost:  # others may have removed this process's entries, and may until they see it renewed
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
        return await self.state.publisher.execute(key.encode(), verb, key, *groups)

    async def restore(self, groups, registered=True):
        """Write back this process's entries missing from ``groups`` and have their watchers read them again;
        and the groups to this process's set when it may be lost (``registered`` False)."""
        state, layer = self.state, self.state.layer
        groups = [group for group in groups if group in self.own]
        if not registered and groups:
            await self.note_groups("SADD", *groups)
        for group in groups:
            pairs = [value for pair in self.own.get(group, {}).items() for value in pair]
            if not pairs:
                continue
            key, shard_channel = layer.keys.group_presence(group), layer.keys.presence_channel(group)
            restored = [channel.decode() for channel in await restore(state.publisher, key, layer.group_expiry, *pairs)]
            if not restored:
                continue
            layer.stats.inc("presence_restored", len(restored))
            logger.warning("%d presence entries of %s written again", len(restored), group)
            gone = [channel for channel in restored if channel not in self.own.get(group, {})]
            if gone:  # left while being written back
                await leave(state.publisher, key, shard_channel, b"", *gone)
            await state.ask_reread(shard_channel)  # one frame, not one join each: watchers that read before this read again

    async def reap(self, prefixes):
        """Remove the entries of processes whose lease ended, those this process is first to claim."""
        state, layer = self.state, self.state.layer
        self.reaping |= prefixes
        try:
            now, reaping = int(time.time() * 1000), layer.keys.presence_reaping()
            leases = layer.keys.presence_leases()
            claimed, done = await claim(state.publisher, (reaping, leases), now, now + CLAIM_SECONDS * 1000, *sorted(prefixes))
            self.reaped |= {prefix.decode() for prefix in done}
            for prefix in (prefix.decode() for prefix in claimed):
                groups_key = layer.keys.presence_groups(prefix)
                for group in await state.publisher.execute(groups_key.encode(), "SMEMBERS", groups_key):
                    removed = await reap(state.publisher, layer.keys.group_presence(group.decode()), prefix)
                    layer.stats.inc("presence_reaped", removed)
                if await reaped(state.publisher, (reaping, leases, groups_key), int(time.time() * 1000), prefix):
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
