"""Settings of the chat site, all read from the environment (docs/configuration.md lists them)."""

import secrets
from urllib.parse import quote

from csp.constants import NONCE, NONE, SELF
from django.core.exceptions import ImproperlyConfigured

from . import environment as env
from .log_config import json_logging

DEBUG = env.flag("DJANGO_DEBUG")
# Nothing here signs data that another process must verify, so a per-process random key is a safe default.
SECRET_KEY = env.secret("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)
# A pod is also addressed by its IP (kubelet probes, Prometheus scrapes).
ALLOWED_HOSTS = env.items("DJANGO_ALLOWED_HOSTS") + env.items("POD_IP")

INSTALLED_APPS = ["channels", "chat"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "chatsite.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["csp.context_processors.nonce"]},
    }
]
ASGI_APPLICATION = "chatsite.asgi.application"
DATABASES = {}
USE_TZ = True
TIME_ZONE = "UTC"

# Security headers on every page (docs/security.md): SecurityMiddleware's nosniff, Referrer-Policy and
# Cross-Origin-Opener-Policy defaults, no framing, and a Content-Security-Policy under which only this
# site's own scripts (the pages' inline ones by nonce) run and sockets go only to this host.
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "connect-src": [SELF],
        "img-src": [SELF],
        "style-src": [SELF],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
        "object-src": [NONE],
    }
}
# Set where the ingress terminates TLS: HSTS for that many seconds, and X-Forwarded-Proto trusted.
SECURE_HSTS_SECONDS = env.integer("SECURE_HSTS_SECONDS")
if env.flag("DJANGO_BEHIND_TLS"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Chat limits: a larger frame or message gets a clear error, never reaches the room.
CHAT_MAX_MESSAGE_CHARS = env.integer("CHAT_MAX_MESSAGE_CHARS")
CHAT_MAX_FRAME_BYTES = env.integer("CHAT_MAX_FRAME_BYTES")
# Abuse limits (0 turns one off): messages per socket as a token bucket, sockets per worker process,
# and with identity on, rooms and sockets per identity across all workers.
CHAT_MESSAGES_PER_S = env.number("CHAT_MESSAGES_PER_S")
CHAT_MESSAGE_BURST = env.number("CHAT_MESSAGE_BURST")
CHAT_MAX_SOCKETS_PER_WORKER = env.integer("CHAT_MAX_SOCKETS_PER_WORKER")
CHAT_MAX_ROOMS_PER_IDENTITY = env.integer("CHAT_MAX_ROOMS_PER_IDENTITY")
CHAT_MAX_SOCKETS_PER_IDENTITY = env.integer("CHAT_MAX_SOCKETS_PER_IDENTITY")
# Presence: a member whose socket ended without a goodbye (1000 or 1001) stays listed this long, so a
# resume is not seen as a leave and a join; a dead worker's members go within CHAT_PRESENCE_TIMEOUT.
CHAT_PRESENCE_GRACE = env.number("CHAT_PRESENCE_GRACE")
CHAT_PRESENCE_TIMEOUT = env.number("CHAT_PRESENCE_TIMEOUT")

# Identity: off (anyone may post, as in the tutorial), nickname (this site signs a token for a name typed
# into its form) or token (tokens come from your app, see docs/security.md). With either of the last two,
# a socket needs a token (HS256 JWT) signed with CHAT_TOKEN_SECRET, checked by any worker on its own.
CHAT_IDENTITY = env.text("CHAT_IDENTITY")
if CHAT_IDENTITY not in ("off", "nickname", "token"):
    raise ImproperlyConfigured(f"CHAT_IDENTITY must be off, nickname or token, not {CHAT_IDENTITY!r}")
CHAT_TOKEN_SECRET = env.secret("CHAT_TOKEN_SECRET")
if CHAT_IDENTITY != "off" and len(CHAT_TOKEN_SECRET) < 32:
    raise ImproperlyConfigured(
        "CHAT_IDENTITY needs CHAT_TOKEN_SECRET (or CHAT_TOKEN_SECRET_FILE): 32 characters or more, the same in every worker"
    )
CHAT_TOKEN_AUDIENCE = env.text("CHAT_TOKEN_AUDIENCE")
CHAT_TOKEN_TTL = env.integer("CHAT_TOKEN_TTL")  # seconds a token minted here lasts
CHAT_TOKEN_LEEWAY = env.integer("CHAT_TOKEN_LEEWAY")  # seconds of clock skew forgiven


def channel_layers():
    """CHANNEL_LAYERS for the backend named by CHANNEL_LAYER."""
    kind = env.text("CHANNEL_LAYER")
    common = {"prefix": env.text("CHANNEL_LAYER_PREFIX"), "capacity": 100, "expiry": 60}
    if kind == "redis-cluster":
        nodes = env.items("REDIS_CLUSTER_NODES")
        password = env.secret("REDIS_PASSWORD")
        auth = f":{quote(password, safe='')}@" if password else ""
        # With REDIS_TLS_CA (the CA that signed the nodes' certificates) every connection is TLS.
        tls_ca = env.text("REDIS_TLS_CA")
        hosts = [f"{'rediss' if tls_ca else 'redis'}://{auth}{node}" for node in nodes]
        if tls_ca:
            hosts = [{"address": host, "ssl_ca_certs": tls_ca} for host in hosts]
        # Room history, for resuming clients and recent messages on open; 0 turns it off.
        history = {
            "size": env.integer("CHAT_HISTORY_SIZE"),
            "age": env.integer("CHAT_HISTORY_AGE"),
        }
        config = {
            "hosts": hosts,
            "group_history": {"chat_*": history},
            "presence_timeout": CHAT_PRESENCE_TIMEOUT,
            # A room message is published once the replicas of its primary hold it (docs/failures.md);
            # off, it is published as it is written: faster, and lost with a primary cut off from its replica.
            "replicate_before_publish": env.flag("CHAT_REPLICATE_BEFORE_PUBLISH"),
            # A sender told "unavailable" resends with its nonce; a send retried longer could land after
            # the room wrote more than its history holds, past the window that keeps a resend from
            # landing twice (500 messages: 10 s at 50/s). A send held up longer, by a failover too, is
            # refused and resent instead.
            "send_retry_timeout": 5.0,
            **common,
        }
        return {"BACKEND": "channels_redis_cluster.RedisClusterChannelLayer", "CONFIG": config}
    if kind in ("redis", "redis-pubsub"):
        backend = "channels_redis.core.RedisChannelLayer" if kind == "redis" else "channels_redis.pubsub.RedisPubSubChannelLayer"
        config = {"hosts": [env.text("REDIS_URL")], "prefix": common["prefix"]}
        if kind == "redis":
            config.update(capacity=common["capacity"], expiry=common["expiry"])
        return {"BACKEND": backend, "CONFIG": config}
    if kind == "memory":
        return {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    raise ValueError(f"CHANNEL_LAYER must be redis-cluster, redis, redis-pubsub or memory, not {kind!r}")


CHANNEL_LAYERS = {"default": channel_layers()}

LOGGING = json_logging(env.text("LOG_LEVEL"))
