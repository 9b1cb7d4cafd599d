"""A Channels layer for Redis Cluster: sharded pub/sub fan-out, one slot per command.

What an application uses: the layer, the keys of a history message (``OFFSET``, ``EPOCH``), what
``group_history`` returns (``GroupHistory``), the push consumer mixin (``LayerPushMixin``), and
``shared`` for group names held by many sockets, and ``Script`` for ``run_script``, an application's
own Lua run on the layer's connections.
"""

from .cluster import Script
from .consumer import LayerPushMixin
from .history import EPOCH, OFFSET, GroupHistory
from .keys import shared
from .layer import RedisClusterChannelLayer

__all__ = ["EPOCH", "OFFSET", "GroupHistory", "LayerPushMixin", "RedisClusterChannelLayer", "Script", "shared"]
