"""Shared fixtures: one real 6-node Redis Cluster per session, and layers on it."""

import os
import uuid

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

import django  # noqa: E402

from localstack.cluster import LocalCluster  # noqa: E402

django.setup()


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
    return [f"redis://{node}" for node in redis_cluster.startup_nodes]


@pytest.fixture
async def make_layer(cluster_hosts):
    """Factory of RedisClusterChannelLayer instances with a prefix of their own, closed after the test."""
    from channels_redis_cluster import RedisClusterChannelLayer

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


def pytest_sessionfinish(session, exitstatus):
    """In CI a skipped test is a failure: every suite must really run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped and session.exitstatus == 0:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; a skip is a failure here", red=True)
        session.exitstatus = 1
