"""Every setting the chat reads from its environment, declared once: its name, default and meaning.

settings.py, the gunicorn configuration, the worker and the probes read them through this module, and
nowhere else; the table of docs/configuration.md is made from this list (``python -m
chatsite.environment`` prints it, a test checks the page), and tests check the chart's ConfigMap, the
image and compose against the defaults here. A deployment that sets another default says why, in
``elsewhere``. An empty value means the default. Importable without Django: gunicorn reads it first.
"""

import os
import sys
from typing import NamedTuple

DEPLOYMENT = "(the deployment's own)"


class Setting(NamedTuple):
    name: str
    default: str | None  # None: unset unless given
    meaning: str
    # Where a deployment sets a default of its own, and why: {"image" | "chart" | "compose": (value, reason)};
    # DEPLOYMENT as the value: one the deployment derives from itself (its own node names, its hosts).
    elsewhere: dict | None = None
    # Set only by `make bench`, to measure the chat against what it would be without a choice it makes:
    # no deployment sets it (a test holds the chart and compose to that).
    bench_only: bool = False


SETTINGS = (
    Setting(
        "CHANNEL_LAYER",
        "redis-cluster",
        "`redis-cluster` (this layer); for `make bench`'s comparisons and tests only: `redis` (channels_redis core "
        "on `REDIS_URL`), `redis-pubsub` (channels_redis pub/sub on `REDIS_URL`), `memory` (one process only: groups "
        "are not shared)",
    ),
    Setting(
        "REDIS_CLUSTER_NODES",
        "127.0.0.1:7000",
        "comma-separated `host:port` startup nodes; the rest of the cluster is discovered",
        {"compose": (DEPLOYMENT, "its six nodes"), "chart": (DEPLOYMENT, "the release's nodes or `redis.externalNodes`")},
    ),
    Setting(
        "REDIS_PASSWORD",
        None,
        "password for the cluster nodes; this and the other secrets may also come from a file named by `<NAME>_FILE`",
    ),
    Setting(
        "REDIS_TLS_CA",
        None,
        "CA file of the nodes' certificates: every connection to the cluster is then TLS (`rediss://`), names verified",
        {"compose": (DEPLOYMENT, "the CA it makes"), "chart": (DEPLOYMENT, "the CA of its TLS Secret")},
    ),
    Setting("REDIS_URL", "redis://127.0.0.1:6379/0", "standalone Redis for `redis` / `redis-pubsub`", bench_only=True),
    Setting("CHANNEL_LAYER_PREFIX", "asgi", "key prefix, so several deployments can share a cluster"),
    Setting(
        "DJANGO_SECRET_KEY",
        None,
        "random per process when unset: nothing Django signs is checked by another process "
        "(tokens use `CHAT_TOKEN_SECRET`), so that is safe; set it if you add sessions",
    ),
    Setting(
        "DJANGO_ALLOWED_HOSTS",
        "127.0.0.1,localhost",
        "also the allowed WebSocket `Origin` hosts",
        {
            "compose": (
                "127.0.0.1,localhost,ingress",
                "the ingress forwards the Host it was asked for, and the Locust workers address it by its service name",
            ),
            "chart": (DEPLOYMENT, "the hosts of its HTTPRoute or Ingress and its Service"),
        },
    ),
    Setting("DJANGO_DEBUG", "false", "Django's debug mode"),
    Setting("BIND", "0.0.0.0:8000", "where gunicorn serves the chat"),
    Setting(
        "OPS_BIND",
        None,
        "where `/healthz`, `/readyz` and `/metrics` answer (404 on the public port); unset, on the public port too",
        {
            "image": ("0.0.0.0:9000", "probes and scrapes reach a container on a port the ingress never forwards"),
            "chart": ("0.0.0.0:9000", "as the image"),
        },
    ),
    Setting(
        "WEB_CONCURRENCY",
        "3",
        "uvicorn worker processes per container or local stack",
        {
            "image": ("2", "a container is one of several replicas (three in compose, on these two cores)"),
            "compose": ("2", "as the image"),
            "chart": (
                "1",
                "Kubernetes scales pods, each with its own CPU request; one worker per pod spreads sockets by the Service",
            ),
        },
    ),
    Setting(
        "ACCEPT_BALANCE",
        "true",
        "`true`: the workers of a container take turns accepting, so a burst of handshakes spreads evenly over them "
        "([operations](operations.md#how-load-spreads)); `false`: whichever worker wakes first takes every queued one",
    ),
    Setting(
        "CHAT_REBALANCE",
        "true",
        "a worker holding more than its share of the deployment's sockets closes the excess (1012) little by little, "
        "so they resume on replicas added later ([operations](operations.md#how-load-spreads))",
    ),
    Setting(
        "CHAT_REBALANCE_TOLERANCE",
        "0.2",
        "a worker sheds sockets only above the deployment's mean per worker times 1 + this",
    ),
    Setting("CHAT_REBALANCE_CLOSES_PER_S", "5", "at most this many sockets a worker closes per second to rebalance"),
    Setting("WORKER_TMP_DIR", None, "gunicorn's heartbeat files; unset, the system's temporary directory"),
    Setting("CHAT_MAX_MESSAGE_CHARS", "2000", "longest accepted `message`"),
    Setting(
        "CHAT_MAX_FRAME_BYTES", "16384", "largest accepted client frame; uvicorn itself drops frames over 4x this (close 1009)"
    ),
    Setting("CHAT_MESSAGES_PER_S", "5", "messages a socket may send per second (0: no limit); see [Security](security.md)"),
    Setting("CHAT_MESSAGE_BURST", "30", "messages a socket may send at once"),
    Setting("CHAT_MAX_SOCKETS_PER_WORKER", "10000", "sockets per worker process; more are refused at the handshake with 1013"),
    Setting(
        "CHAT_IDENTITY",
        "off",
        "`off` (anyone posts, as in the tutorial), `nickname` (this site signs a token for a typed "
        "name) or `token` (your app mints tokens): [security](security.md)",
    ),
    Setting(
        "CHAT_TOKEN_SECRET", None, "HS256 key of the tokens, 32+ characters, the same in every worker; required with identity on"
    ),
    Setting("CHAT_TOKEN_TTL", "900", "seconds a nickname token minted here lasts"),
    Setting("CHAT_TOKEN_AUDIENCE", "chat", "the `aud` every token must carry"),
    Setting("CHAT_TOKEN_LEEWAY", "5", "seconds of clock skew forgiven"),
    Setting("CHAT_MAX_ROOMS_PER_IDENTITY", "10", "rooms an identity may be in at once, across all workers (identity on)"),
    Setting("CHAT_MAX_SOCKETS_PER_IDENTITY", "20", "sockets an identity may hold at once, across all workers (identity on)"),
    Setting("DJANGO_BEHIND_TLS", "false", "the ingress terminates TLS: trust `X-Forwarded-Proto`"),
    Setting("SECURE_HSTS_SECONDS", "0", "HSTS max-age sent behind TLS (0: none)"),
    Setting("GRACEFUL_TIMEOUT", "25", "seconds open sockets get to close after SIGTERM"),
    Setting(
        "DRAIN_SECONDS",
        "10",
        "after SIGTERM, WebSockets are closed (1012) spread over this many seconds; below `GRACEFUL_TIMEOUT`",
    ),
    Setting(
        "CHAT_HANDOVER_AFTER",
        "2",
        "seconds a worker that cannot reach Redis stays unready before it closes its WebSockets "
        "(1012) so their clients resume on a worker that can ([failures](failures.md))",
    ),
    Setting(
        "CHAT_REPLICATE_BEFORE_PUBLISH",
        "1",
        "a room message is published only once its primary's replica holds it, so no "
        "member receives one a failover takes back; `0` publishes as written (its cost is in `make bench`)",
        bench_only=True,
    ),
    Setting("CHAT_HISTORY_SIZE", "500", "room messages kept per room for resuming v2 clients (0: room history off)"),
    Setting("CHAT_HISTORY_AGE", "300", "seconds a room message is kept"),
    Setting(
        "CHAT_PRESENCE_TIMEOUT",
        "10",
        "a member of a worker that died without a goodbye leaves every list within this (the "
        "layer's `presence_timeout`: one lease renewal per worker every third of it)",
    ),
    Setting(
        "CHAT_PRESENCE_GRACE",
        "5",
        "a socket that ended without a goodbye (1000, 1001) stays listed this long, so a resume shows no leave and join",
    ),
    Setting(
        "UVICORN_WS",
        "wsproto",
        "uvicorn's WebSocket implementation (`wsproto`, `websockets`, `websockets-sansio`); wsproto "
        "holds an idle socket in the least memory and fans out fastest, room messages being written to its sockets "
        "directly (`make bench` compares them)",
    ),
    Setting("UVICORN_LOOP", "uvloop", "uvicorn's event loop (`uvloop`, `asyncio`)"),
    Setting("POD_NAME", None, "the host part of `X-Served-By`; unset, the host name"),
    Setting("POD_IP", None, "added to the allowed hosts, for probes and scrapes that address a pod by IP (the chart sets it)"),
    Setting("LOG_LEVEL", "info", "`debug`, `info`, `warning` or `error`; logs are JSON lines on stdout"),
)
BY_NAME = {setting.name: setting for setting in SETTINGS}


def text(name):
    """The setting's value, or its default (None when it has none) when unset or empty."""
    return os.environ.get(name) or BY_NAME[name].default


def integer(name):
    return int(text(name))


def number(name):
    return float(text(name))


def flag(name):
    return text(name).strip().lower() in ("1", "true", "yes", "on")


def items(name):
    """A comma-separated list."""
    return [item.strip() for item in (text(name) or "").split(",") if item.strip()]


def secret(name):
    """A secret from NAME, or from the file NAME_FILE names (compose's generated secrets, mounted Secrets)."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if path:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    return ""


def table():
    """The Markdown table of docs/configuration.md."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default is not None else "none"
        meaning = setting.meaning
        for where, (value, reason) in (setting.elsewhere or {}).items():
            if value != setting.default:
                meaning += f"; `{value}` in the {where}: {reason}"
        if setting.bench_only:
            meaning = f"**bench only**, for comparisons; a deployment leaves it unset: {meaning}"
        rows.append(f"| `{setting.name}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
