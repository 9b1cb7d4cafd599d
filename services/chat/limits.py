"""Abuse limits: messages per socket (token bucket), sockets per worker, rooms and sockets per identity."""

import time
from pathlib import Path
from typing import ClassVar

from channels.layers import get_channel_layer
from django.conf import settings

from channels_redis_cluster import Script

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


# On the layer's own connections (its "scripts" extension): the identity's sockets live in the cluster the
# layer uses, one key per identity, each change one script.
_CLAIM = Script((Path(__file__).parent / "lua" / "identity_claim.lua").read_text())
_RELEASE = Script((Path(__file__).parent / "lua" / "identity_release.lua").read_text())


class IdentityQuota:
    """Rooms and sockets per identity across every worker, kept in the Redis Cluster the layer uses.

    An entry ends with its token, and sockets are closed when their token ends, so a worker that
    crashed holds an identity's places no longer than its tokens last. Without a layer that runs
    scripts on its cluster (CHANNEL_LAYER memory, redis, redis-pubsub) the count is per worker, in
    ``_claim_here``, the same rule in Python.
    """

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
        layer = get_channel_layer()
        if "scripts" in layer.extensions:
            verdict = await layer.run_script(_CLAIM, cls.key(identity), *args)
        else:
            verdict = cls._claim_here(cls.key(identity), *args)
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
        layer = get_channel_layer()
        if "scripts" in layer.extensions:
            await layer.run_script(_RELEASE, cls.key(identity), cls.member(room, channel))
        else:
            cls._local.get(cls.key(identity), {}).pop(cls.member(room, channel), None)

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
