"""HTTP routes: the chat pages and the operational endpoints."""

from django.urls import include, path
from django.views.generic import RedirectView

from . import health

urlpatterns = [
    path("", RedirectView.as_view(url="/chat/", permanent=False)),
    path("chat/", include("chat.urls")),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("metrics", health.metrics),
]
