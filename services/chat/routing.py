"""WebSocket routing: Channels' origin check, the room route, and a clear refusal for any other path."""

import functools
import re
from urllib.parse import urlparse

from channels.security.websocket import AllowedHostsOriginValidator, WebsocketDenier

from . import consumers
from .protocol import ROOM_NAME

ROOM_PATH = re.compile(r"/ws/chat/(?P<room_name>[^/]*)/")


class WebsocketRouter:
    """Checks the Origin against ALLOWED_HOSTS, then runs the chat consumer for its path.

    The same rules as ``AllowedHostsOriginValidator(URLRouter([...]))``, which keeps three coroutine
    frames and a larger scope copy alive for each open socket (about 1.3 KiB of the per-socket memory
    the benchmark measures); this keeps none. Room names are validated by the consumer, which can
    then say why.
    """

    def __init__(self):
        self.origins = AllowedHostsOriginValidator(None)

    def __call__(self, scope, receive, send):
        """The consumer's coroutine, not awaited here: no frame of the router stays alive per socket."""
        if not self.origins.valid_origin(_origin(scope)):
            return WebsocketDenier()(scope, receive, send)
        route = ROOM_PATH.fullmatch(scope["path"])
        if route is None:
            return consumers.NotFoundConsumer()(scope, receive, send)
        # Set in the server's scope rather than a copy (0.2 KiB per open socket), to a route shared by
        # the room's sockets (0.45 KiB more): nothing outside this app reads either, nor changes them.
        room_name = route["room_name"]
        # Only valid names are cached: junk paths must not fill the cache or push rooms out of it.
        scope["url_route"] = _url_route(room_name) if ROOM_NAME.fullmatch(room_name) else _route(room_name)
        return consumers.ChatConsumer()(scope, receive, send)


def _route(room_name):
    """``scope["url_route"]`` of a room, as URLRouter makes it."""
    return {"args": (), "kwargs": {"room_name": room_name}}


_url_route = functools.lru_cache(maxsize=10_000)(_route)


def _origin(scope):
    """The parsed Origin header (the first one), or None when absent or unparsable, which is refused."""
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            try:
                return urlparse(value.decode("latin1"))
            except ValueError:  # e.g. an unclosed IPv6 bracket: refused like a missing Origin
                return None
    return None
