"""WebSocket routing: Channels' origin check, the room route, and a clear refusal for any other path."""

import re
from urllib.parse import urlparse

from channels.security.websocket import AllowedHostsOriginValidator, WebsocketDenier

from . import consumers

ROOM_PATH = re.compile(r"/ws/chat/(?P<room_name>[^/]*)/")


class WebsocketRouter:
    """Checks the Origin against ALLOWED_HOSTS, then runs the chat consumer for its path, in one frame.

    The same rules as ``AllowedHostsOriginValidator(URLRouter([...]))``, which keeps three coroutine
    frames and a larger scope copy alive for each open socket (about 1.3 KiB of the per-socket memory
    the benchmark measures). Room names are validated by the consumer, which can then say why.
    """

    def __init__(self):
        self.origins = AllowedHostsOriginValidator(None)

    async def __call__(self, scope, receive, send):
        if not self.origins.valid_origin(_origin(scope)):
            return await WebsocketDenier()(scope, receive, send)
        route = ROOM_PATH.fullmatch(scope["path"])
        if route is None:
            return await consumers.NotFoundConsumer()(scope, receive, send)
        scope = dict(scope, url_route={"args": (), "kwargs": route.groupdict()})
        return await consumers.ChatConsumer()(scope, receive, send)


def _origin(scope):
    """The parsed Origin header (the first one), or None when absent or unparsable, which is refused."""
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            try:
                return urlparse(value.decode("latin1"))
            except ValueError:  # e.g. an unclosed IPv6 bracket: refused like a missing Origin
                return None
    return None
