"""Fixtures for tests on a real local Redis Cluster: ``pytest -p channels_redis_cluster.pytest_plugin``.

Not registered by installing the package: a project asks for it, so no fixture name appears in a test
session that did not. The layer's own suite (``layer/tests``) runs with it, and so does the blueprint's.
"""

import os
import uuid

import pytest

from .testing import LocalCluster


def pytest_configure(config):
    """Channels reads Django's settings: a suite without a Django project of its own gets empty ones."""
    from django.conf import settings

    if not settings.configured and "DJANGO_SETTINGS_MODULE" not in os.environ:
        settings.configure()


@pytest.fixture(scope="session")
def redis_cluster():
    """A local cluster of 3 primaries and 3 replicas, shared by the tests that only read and write keys."""
    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture
def own_cluster():
    """A cluster of the test's own, for tests that kill nodes or move slots."""
    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture
def cluster_hosts(redis_cluster):
    """The shared cluster's startup nodes, as the layer's ``hosts`` option takes them."""
    return [f"redis://{node}" for node in redis_cluster.startup_nodes]


@pytest.fixture
async def make_layer(cluster_hosts):
    """Factory of RedisClusterChannelLayer instances with a prefix of their own, flushed and closed after the test."""
    from . import RedisClusterChannelLayer

    prefix = f"t{uuid.uuid4().hex[:8]}"
    layers = []

    def make(**config):
        config.setdefault("prefix", prefix)
        layer = RedisClusterChannelLayer(hosts=cluster_hosts, **config)
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        await layer.flush()
        await layer.close()
