"""A Channels layer for Redis Cluster: sharded pub/sub fan-out, one slot per command."""

from .layer import RedisClusterChannelLayer

__all__ = ["RedisClusterChannelLayer"]
