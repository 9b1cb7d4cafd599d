"""Abuse limits: messages per socket (token bucket), sockets per worker, rooms and sockets per identity."""

import asyncio
import time
import weakref
from typing import ClassVar

from django.conf import settings
from redis.asyncio.cluster import RedisCluster

from channels_redis_cluster.cluster import parse_hosts

from .protocol import CLOSE_TOO_MANY, BadFrame


class TokenBucket:
    """``rate`` messages a second sustained, ``burst`` at once; a rate of 0 is no limit."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate, burst):
        self.rate, self.burst = rate, max(1.0, burst)
        self.tokens, self.last = self.burst, time.monotonic()

    def take(self):
        """True when a message may pass now (and it is counted), False when it is over the limit."""
        if not self.rate:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class WorkerSockets:
    """The sockets this worker process holds, so a handshake past CHAT_MAX_SOCKETS_PER_WORKER is refused."""

    open = 0

    @classmethod
    def take(cls):
        if settings.CHAT_MAX_SOCKETS_PER_WORKER and cls.open >= settings.CHAT_MAX_SOCKETS_PER_WORKER:
            return False
        cls.open += 1
        return True

    @classmethod
    def release(cls):
        cls.open -= 1


# KEYS[1]: an identity's sockets, members "<room> <channel>" scored by when their token ends (ms).
# ARGV: now (ms), this socket's member, its token's end (ms), its room, most rooms, most sockets.
# Returns 0 when the socket was added, 1 when the identity is in its most rooms, 2 at its most sockets.
_CLAIM = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if #members >= tonumber(ARGV[6]) then return 2 end
local rooms, count = {}, 0
for _, member in ipairs(members) do
  local room = string.match(member, '^(%S+) ')
  if not rooms[room] then rooms[room] = true; count = count + 1 end
end
if not rooms[ARGV[4]] and count >= tonumber(ARGV[5]) then return 1 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 0
"""


class IdentityQuota:
    """Rooms and sockets per identity across every worker, kept in the Redis Cluster the layer uses.

    An entry ends with its token, and sockets are closed when their token ends, so a worker that
    crashed holds an identity's places no longer than its tokens last. Without a Redis Cluster
    layer (CHANNEL_LAYER memory, redis, redis-pubsub) the count is per worker.
    """

    _clients: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()  # event loop -> RedisCluster
    _local: ClassVar[dict] = {}  # without a cluster: key -> {member: ends}

    @staticmethod
    def key(identity):
        return f"chat:{{id:{identity.key}}}:sockets"

    @staticmethod
    def member(room, channel):
        """One socket's entry: its room first, which the claim script and _claim_here read back."""
        return f"{room} {channel}"

    @classmethod
    async def claim(cls, identity, room, channel):
        """Hold a place for this socket, or raise BadFrame (4429) when the identity is at a limit."""
        args = (
            int(time.time() * 1000),
            cls.member(room, channel),
            int(identity.expires_at * 1000),
            room,
            settings.CHAT_MAX_ROOMS_PER_IDENTITY,
            settings.CHAT_MAX_SOCKETS_PER_IDENTITY,
        )
        client = cls._client()
        if client is None:
            verdict = cls._claim_here(cls.key(identity), *args)
        else:
            verdict = await client.eval(_CLAIM, 1, cls.key(identity), *args)
        if verdict == 1:
            raise BadFrame(
                CLOSE_TOO_MANY, "too_many_rooms", f"one identity may be in {settings.CHAT_MAX_ROOMS_PER_IDENTITY} rooms at once"
            )
        if verdict == 2:
            raise BadFrame(
                CLOSE_TOO_MANY,
                "too_many_sockets",
                f"one identity may hold {settings.CHAT_MAX_SOCKETS_PER_IDENTITY} sockets at once",
            )

    @classmethod
    async def release(cls, identity, room, channel):
        """Give this socket's place back."""
        client = cls._client()
        if client is None:
            cls._local.get(cls.key(identity), {}).pop(cls.member(room, channel), None)
        else:
            await client.zrem(cls.key(identity), cls.member(room, channel))

    @classmethod
    def _claim_here(cls, key, now, member, ends, room, most_rooms, most_sockets):
        members = cls._local.setdefault(key, {})
        for old in [m for m, end in members.items() if end <= now]:
            del members[old]
        if len(members) >= most_sockets:
            return 2
        rooms = {m.split(" ", 1)[0] for m in members}
        if room not in rooms and len(rooms) >= most_rooms:
            return 1
        members[member] = ends
        return 0

    @classmethod
    def _client(cls):
        """This loop's client of the layer's cluster (its hosts, password and TLS), or None without one."""
        layer = settings.CHANNEL_LAYERS["default"]
        if layer["BACKEND"] != "channels_redis_cluster.RedisClusterChannelLayer":
            return None
        loop = asyncio.get_running_loop()
        client = cls._clients.get(loop)
        if client is None:
            nodes, options = parse_hosts(layer["CONFIG"]["hosts"])
            client = cls._clients[loop] = RedisCluster(startup_nodes=nodes, **options)
        return client
