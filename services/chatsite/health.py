"""Liveness, readiness and Prometheus metrics, and the internal port they are served on."""

import asyncio
import logging
import os

from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from . import environment as env

logger = logging.getLogger(__name__)
READY_TIMEOUT = 2.0
OPS_PATHS = ("/healthz", "/readyz", "/metrics")
draining = False


def ops_port():
    """The internal port of OPS_BIND (host:port), or None when these endpoints share the public port."""
    bind = env.text("OPS_BIND")
    return int(bind.rpartition(":")[2]) if bind else None


class OpsPortSplit:
    """ASGI middleware: with OPS_BIND set, OPS_PATHS answer only on its port and nothing else does there.

    Routes and ingresses reach only the public port, so probes and metrics stay inside the cluster.
    """

    def __init__(self, app, port):
        self.app, self.port = app, port

    def __call__(self, scope, receive, send):
        """The inner app's coroutine, not awaited here: no frame of this one stays alive per socket."""
        if self.port is None or scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        on_ops_port = (scope.get("server") or (None, None))[1] == self.port
        if (scope["path"] in OPS_PATHS) == on_ops_port:
            return self.app(scope, receive, send)
        return self.not_here(scope, send)

    @staticmethod
    async def not_here(scope, send):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": "not on this port"})
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"not found on this port\n"})


def connect_in_background():
    """Start this worker's channel layer at boot, so readiness reflects a connection made then."""
    if not settings.configured:  # an ASGI app without Django (the benchmark's ceiling) has no layer
        return
    layer = get_channel_layer()
    if "ready" in layer.extensions:
        # A failure here is retried by the next readiness probe, which reports it.
        asyncio.ensure_future(layer.ready()).add_done_callback(lambda task: task.cancelled() or task.exception())


def start_draining():
    """Called on SIGTERM: readiness fails from now on so no new sockets arrive."""
    global draining
    draining = True


async def healthz(request):
    """The process serves requests."""
    return HttpResponse("ok\n", content_type="text/plain")


async def layer_ready():
    """None when the channel layer holds the cluster's slot map and heard from the cluster lately, else why not."""
    layer = get_channel_layer()
    if "ready" not in layer.extensions:
        return None
    try:
        await asyncio.wait_for(layer.ready(), READY_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return exc
    return None


async def readyz(request):
    """Ready unless draining, or this process cannot reach the cluster (none of its nodes answered lately).

    Deliberately not a ping of every primary: one primary failing over would then empty the Service of
    every pod at once. Redis trouble shows in the layer's metrics and alerts instead. ``?drain=404``
    answers a drain with 404 instead of 503, for a proxy that tells the two apart: HAProxy's
    ``disable-on-404`` keeps a draining worker's open sockets, which the worker closes itself, spread out.
    """
    if draining:
        status = 404 if request.GET.get("drain") == "404" else 503
        return HttpResponse("draining\n", status=status, content_type="text/plain")
    problem = await layer_ready()
    if problem is not None:
        logger.warning("not ready: channel layer cannot reach Redis: %r", problem)
        return HttpResponse("channel layer not connected\n", status=503, content_type="text/plain")
    return HttpResponse("ready\n", content_type="text/plain")


async def metrics(request):
    """Prometheus text format; summed over the pod's worker processes when they share a directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
