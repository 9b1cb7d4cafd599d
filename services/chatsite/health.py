"""Liveness, readiness and Prometheus metrics."""

import asyncio
import logging
import os

from channels.layers import get_channel_layer
from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import REGISTRY, multiprocess

logger = logging.getLogger(__name__)
READY_TIMEOUT = 2.0
draining = False


def start_draining():
    """Called on SIGTERM: readiness fails from now on so no new sockets arrive."""
    global draining
    draining = True


async def healthz(request):
    """The process serves requests."""
    return HttpResponse("ok\n", content_type="text/plain")


async def readyz(request):
    """Ready unless draining or the channel layer is unreachable."""
    if draining:
        return HttpResponse("draining\n", status=503, content_type="text/plain")
    layer = get_channel_layer()
    ping = getattr(layer, "ping", None)
    if ping is not None:
        try:
            await asyncio.wait_for(ping(), READY_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            logger.warning("not ready: channel layer unreachable: %r", exc)
            return HttpResponse("channel layer unreachable\n", status=503, content_type="text/plain")
    return HttpResponse("ready\n", content_type="text/plain")


async def metrics(request):
    """Prometheus text format; summed over the pod's worker processes when they share a directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
