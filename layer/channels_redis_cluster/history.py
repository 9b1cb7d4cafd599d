"""Group history: a gapless offset and an epoch per group, its recent messages, and resuming from an offset.

Everything of a group lives in the group's slot: a hash with the top offset, the epoch, the server
process that wrote last and the highest offset published; a list of entries (the oldest first, so an
offset's index is derived from the top); and a sorted set of idempotency keys by offset.

A message is written by one script and published by another, and only once its primary's replicas hold
it (``WAIT`` between the two, see the layer's ``group_send``): a message any member received then
survives a failover, whatever the partition. The publishing script publishes, in offset order, every
entry after the highest one published up to the one asked, so the order on the shard channel is still
the order of offsets when senders on several processes finish their waits out of order. Reads show
entries up to the highest published only: an entry whose replication was never confirmed is never
answered as history, and may vanish with a primary cut off from its replicas.

The epoch changes whenever continuity may be lost: the hash is gone (expired, evicted, a node back
empty), or another server process than the last writer runs a script (failover, restart, resharding).
Each earlier epoch (up to 16) keeps the highest offset that is the same message in the current one, so
a client that stopped at or below it still resumes exactly. On such a change every entry the new server
holds counts as published: members that never got one live see the gap at the next message and read it.
"""

from typing import NamedTuple

# Keys the layer adds to every group message that has an offset; namespaced so no app field is touched.
OFFSET = "__offset__"
EPOCH = "__epoch__"


class Bound(NamedTuple):
    """How much history a group keeps: ``size`` messages (0: none), none older than ``age`` seconds."""

    size: int
    age: float


class HistoryPolicy:
    """The bound of each group: the value of the first pattern of ``group_history`` that matches, else the default.

    ``patterns`` are ``(compiled pattern, value)`` pairs as Channels' ``compile_capacities`` makes them
    from ``group_history``, so a glob there means what it means in ``channel_capacity``. A value is a
    size, or ``{"size", "age"}`` where either may be left to the default.
    """

    CACHE_LIMIT = 10000  # groups whose bound is remembered: group_send asks on every message

    def __init__(self, size, age, patterns):
        self.default = Bound(int(size), float(age))
        self.patterns = [(pattern, self._bound(value)) for pattern, value in patterns]
        self._cache = {}

    def _bound(self, value):
        if isinstance(value, dict):
            return Bound(int(value.get("size", self.default.size)), float(value.get("age", self.default.age)))
        return Bound(int(value), self.default.age)

    def bound(self, group):
        """The ``Bound`` of ``group``."""
        if not self.patterns:
            return self.default
        bound = self._cache.get(group)
        if bound is None:
            bound = next((value for pattern, value in self.patterns if pattern.match(group)), self.default)
            if len(self._cache) >= self.CACHE_LIMIT:
                self._cache.clear()
            self._cache[group] = bound
        return bound


class GroupHistory(NamedTuple):
    """What ``group_history`` found: the messages to replay, the group's top and epoch, and whether it is exact.

    ``recovered`` is False when messages after ``since`` are missing (trimmed, expired, or lost with an
    epoch); ``messages`` then holds what is still there that the caller may not have seen.
    """

    messages: list
    offset: int
    epoch: str
    recovered: bool
