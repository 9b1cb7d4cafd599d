"""Presence: who is in a group, read from any process in one command, gone within a bound when its process dies.

A group's entries are a hash in the group's slot (member channel -> member id and name), written on
join and leave together with an event on the group's presence shard channel, which each process
watching the group subscribes once. Each process that uses presence holds a lease in one sorted set (client prefix ->
lease end), renewed every third of ``presence_timeout``: one command per process per beat, not per
socket. An entry's process is its channel's prefix; a reader hides the entries of processes whose
lease ended, so a member of a SIGKILLed process is gone for every reader within ``presence_timeout``.
"""

import asyncio
import json
import logging
import time

logger = logging.getLogger(__name__)

# KEYS[1] the leases; ARGV: now (ms), this process's lease end (ms), its prefix, how long an ended lease is kept (ms).
# Returns the processes whose lease ended: their entries are hidden, and removed where a reader meets them.
RENEW_SCRIPT = """
local now = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""

# KEYS[1] the group's entries; ARGV: channel, entry, expiry (s), shard channel, frame (or ''). The join and its event in one command.
JOIN_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[5] ~= '' then redis.call('SPUBLISH', ARGV[4], ARGV[5]) end
return 1
"""

# KEYS[1] the group's entries; ARGV: shard channel, frame, then the channels to remove. Publishes only what it removed.
LEAVE_SCRIPT = """
local removed = 0
for i = 3, #ARGV do removed = removed + redis.call('HDEL', KEYS[1], ARGV[i]) end
if removed > 0 and ARGV[2] ~= '' then redis.call('SPUBLISH', ARGV[1], ARGV[2]) end
return removed
"""


def call(watcher, event):
    """``watcher(event)``; one that raises must not stop the reader that feeds every other subscription."""
    try:
        watcher(event)
    except Exception:  # noqa: BLE001
        logger.exception("a presence watcher failed")


def entry(member, name):
    """What a group's hash holds for one member channel."""
    return json.dumps([member, name])


class Leases:
    """This process's lease and what it knows of the others': renewed in the background while presence is used."""

    def __init__(self, state, timeout):
        self.state, self.timeout = state, timeout
        self.ended = set()  # client prefixes whose lease ended
        self.renewing = None
        self.renewed = None  # a future set once the first renewal is back
        self.listeners = []  # callables(prefixes) told of processes whose lease just ended

    async def start(self):
        """Renew this process's lease from now on; returns once the first renewal is back."""
        if self.renewing is None or self.renewing.done():
            self.renewed = asyncio.get_running_loop().create_future()
            self.renewing = asyncio.ensure_future(self._renew())
        await asyncio.shield(self.renewed)

    async def _renew(self):
        from .layer import RETRYABLE, _renew_lease

        layer = self.state.layer
        beat = self.timeout / 3
        while True:
            now = int(time.time() * 1000)
            try:
                ended = await _renew_lease(
                    self.state.publisher, layer.keys.presence_leases(), now, now + int(2 * beat * 1000),
                    self.state.client_prefix, int(layer.group_expiry * 1000),
                )
            except RETRYABLE as exc:
                layer.stats.inc("errors")
                logger.warning("presence lease not renewed: %r", exc)
            else:
                ended = {prefix.decode() for prefix in ended}
                gone, self.ended = ended - self.ended, ended
                if gone:
                    for listener in list(self.listeners):
                        listener(gone)
            if not self.renewed.done():
                self.renewed.set_result(None)  # tried once: readers go on with what they know
            await asyncio.sleep(beat)

    def end(self):
        """Stop renewing: the lease ends by itself within the timeout."""
        if self.renewing is not None:
            self.renewing.cancel()
