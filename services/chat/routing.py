"""WebSocket routes; anything else is closed with a clear code instead of raising in the router."""

from django.urls import re_path

from . import consumers

websocket_urlpatterns = [
    re_path(r"^ws/chat/(?P<room_name>[^/]*)/$", consumers.ChatConsumer.as_asgi()),
    re_path(r"", consumers.NotFoundConsumer.as_asgi()),
]
