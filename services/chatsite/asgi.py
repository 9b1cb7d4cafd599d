"""ASGI entry point: Django for HTTP, the chat consumer for WebSockets."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from chat.routing import WebsocketRouter  # noqa: E402
from chatsite.health import OpsPortSplit, ops_port  # noqa: E402
from chatsite.served_by import ServedByMiddleware  # noqa: E402



class ProtocolRouter(ProtocolTypeRouter):
    """Channels' ProtocolTypeRouter, returning the protocol's app coroutine rather than awaiting it: one
    coroutine frame fewer kept alive per open socket."""

    def __call__(self, scope, receive, send):
        application = self.application_mapping.get(scope["type"])
        if application is None:
            raise ValueError("No application configured for scope type %r" % scope["type"])
        return application(scope, receive, send)


application = ServedByMiddleware(
    OpsPortSplit(ProtocolRouter({"http": django_asgi_app, "websocket": WebsocketRouter()}), ops_port())
)
