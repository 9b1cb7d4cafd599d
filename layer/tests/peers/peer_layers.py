"""The peers' layer classes as their test suites build them, made this layer on the local cluster."""

from channels.exceptions import ChannelFull
from channels_redis_cluster import RedisClusterChannelLayer

__all__ = ["ChannelFull", "InMemoryChannelLayer", "RedisChannelLayer", "RedisPubSubChannelLayer"]

HOSTS = []  # the session cluster's nodes; layer/tests/peers/conftest.py fills it


class RedisChannelLayer(RedisClusterChannelLayer):
    """Takes channels_redis's arguments; whatever hosts a test names, the layer runs on the local cluster."""

    def __init__(self, hosts=None, **config):
        assert HOSTS, "the local cluster is not up"
        super().__init__(hosts=list(HOSTS), **config)


RedisPubSubChannelLayer = InMemoryChannelLayer = RedisChannelLayer
