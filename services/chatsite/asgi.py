"""ASGI entry point: Django for HTTP, the chat consumer for WebSockets."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter

from chat.routing import WebsocketRouter
from chatsite.health import OpsPortSplit, ops_port
from chatsite.served_by import ServedByMiddleware


class ProtocolRouter(ProtocolTypeRouter):
    """Channels' ProtocolTypeRouter, returning the protocol's app coroutine rather than awaiting it: one
    coroutine frame fewer kept alive per open socket."""

    def __call__(self, scope, receive, send):
        application = self.application_mapping.get(scope["type"])
        if application is None:
            raise ValueError(f"No application configured for scope type {scope['type']!r}")
        return application(scope, receive, send)


application = ServedByMiddleware(
    OpsPortSplit(ProtocolRouter({"http": django_asgi_app, "websocket": WebsocketRouter()}), ops_port())
)
