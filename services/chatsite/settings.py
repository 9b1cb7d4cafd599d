"""Settings of the chat site, all read from the environment (see the README's configuration table)."""

import os
import secrets

from .log_config import json_logging


def env_bool(name, default=False):
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")


def env_list(name, default):
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DJANGO_DEBUG")
# Nothing here signs data that another process must verify, so a per-process random key is a safe default.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)
# A pod is also addressed by its IP (kubelet probes, Prometheus scrapes).
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost") + env_list("POD_IP", "")

INSTALLED_APPS = ["channels", "chat"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "chatsite.urls"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
ASGI_APPLICATION = "chatsite.asgi.application"
DATABASES = {}
USE_TZ = True
TIME_ZONE = "UTC"
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# Chat limits: a larger frame or message gets a clear error, never reaches the room.
CHAT_MAX_MESSAGE_CHARS = int(os.environ.get("CHAT_MAX_MESSAGE_CHARS", "2000"))
CHAT_MAX_FRAME_BYTES = int(os.environ.get("CHAT_MAX_FRAME_BYTES", "16384"))


def channel_layers():
    """CHANNEL_LAYERS for the backend named by CHANNEL_LAYER."""
    kind = os.environ.get("CHANNEL_LAYER", "redis-cluster")
    common = {"prefix": os.environ.get("CHANNEL_LAYER_PREFIX", "asgi"), "capacity": 100, "expiry": 60}
    if kind == "redis-cluster":
        nodes = env_list("REDIS_CLUSTER_NODES", "127.0.0.1:7000")
        password = os.environ.get("REDIS_PASSWORD")
        auth = f":{password}@" if password else ""
        hosts = [f"redis://{auth}{node}" for node in nodes]
        # Room history, for resuming clients and recent messages on open; 0 turns it off.
        history = {"size": int(os.environ.get("CHAT_HISTORY_SIZE", "500")), "age": int(os.environ.get("CHAT_HISTORY_AGE", "300"))}
        config = {"hosts": hosts, "group_history": {"chat_*": history}, **common}
        return {"BACKEND": "channels_redis_cluster.RedisClusterChannelLayer", "CONFIG": config}
    if kind in ("redis", "redis-pubsub"):
        backend = "channels_redis.core.RedisChannelLayer" if kind == "redis" else "channels_redis.pubsub.RedisPubSubChannelLayer"
        config = {"hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")], "prefix": common["prefix"]}
        if kind == "redis":
            config.update(capacity=common["capacity"], expiry=common["expiry"])
        return {"BACKEND": backend, "CONFIG": config}
    if kind == "memory":
        return {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    raise ValueError(f"CHANNEL_LAYER must be redis-cluster, redis, redis-pubsub or memory, not {kind!r}")


CHANNEL_LAYERS = {"default": channel_layers()}

LOGGING = json_logging(os.environ.get("LOG_LEVEL", "INFO"))
