"""HTTP routes: the chat pages and the operational endpoints."""

from django.urls import include, path
from django.views.generic import RedirectView

from chat.views import nickname_token

from . import health

urlpatterns = [
    path("", RedirectView.as_view(url="/chat/", permanent=False)),
    path("chat/", include("chat.urls")),
    path("auth/token", nickname_token, name="token"),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("metrics", health.metrics),
]
