"""The layer on a cluster run as managed services run theirs: TLS with client certificates, the default
user off, an ACL user that may touch only the layer's prefix, one configuration endpoint as the only
host, and nodes that announce a host name. On the TLS builds of Debian's Redis 7.0 and Valkey 8.0."""

import asyncio
import re
import shutil
import uuid
from pathlib import Path

import pytest
import redis
import trustme
from asgiref.sync import async_to_sync

from channels_redis_cluster import RedisClusterChannelLayer
from channels_redis_cluster.testing import LocalCluster, Secured, server_version

LAYER = Path(__file__).resolve().parent.parent
PASSWORD = "layer-" + uuid.uuid4().hex
SERVERS = ["redis-server", "valkey-server"]


def acl_rule(prefix):
    """The layer's ACL user exactly as the package README documents it (less "user"), for ``prefix``."""
    rule = re.search(r"^user (channels on .*)$", (LAYER / "README.md").read_text(), re.M).group(1)
    return rule.replace("PASSWORD", PASSWORD).replace("{asgi:", "{" + prefix + ":")


@pytest.fixture(scope="module", params=SERVERS)
def managed(request, tmp_path_factory):
    """A TLS cluster of Debian's ``redis-server`` or ``valkey-server`` with the layer's user for prefix "chat"."""
    binary = shutil.which(request.param)
    assert binary, f"{request.param} is not installed: `make test` installs it as root (docker/host-setup.sh)"
    files = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    authority.cert_pem.write_to_path(files / "ca.pem")
    server = authority.issue_cert("localhost", "127.0.0.1", "::1")
    server.private_key_and_cert_chain_pem.write_to_path(files / "server.pem")
    client = authority.issue_cert("channels-layer")
    client.private_key_pem.write_to_path(files / "client.key")
    client.cert_chain_pems[0].write_to_path(files / "client.pem")
    secured = Secured(
        ca=files / "ca.pem",
        cert=files / "server.pem",
        key=files / "server.pem",
        admin_password=uuid.uuid4().hex,
        users=(acl_rule("chat"),),
    )
    with LocalCluster(binary=binary, secured=secured) as cluster:
        cluster.name, cluster.version = server_version(binary)
        cluster.files = files
        yield cluster


def layer_config(cluster, prefix="chat", **config):
    """What a user puts in CHANNEL_LAYERS for a managed cluster: its one endpoint, the CA, a client cert."""
    endpoint = {
        "address": f"rediss://channels:{PASSWORD}@localhost:{cluster.ports[0]}",
        "ssl_ca_certs": str(cluster.files / "ca.pem"),
        "ssl_certfile": str(cluster.files / "client.pem"),
        "ssl_keyfile": str(cluster.files / "client.key"),
    }
    return {"hosts": [endpoint], "prefix": prefix, **config}


def test_the_servers_are_the_ones_named(managed):
    assert (managed.name, managed.version.split(".")[0]) in {("redis", "7"), ("valkey", "8")}
    shards = managed.client(managed.ports[0]).execute_command("CLUSTER", "SHARDS")
    endpoints = {node["endpoint"] for shard in shards for node in shard["nodes"]}
    assert endpoints == {"localhost"}, "nodes announce their host name, as managed services do"


async def test_every_operation_works_through_one_endpoint_with_tls_and_the_acl_user(managed):
    sender = RedisClusterChannelLayer(**layer_config(managed, group_history={"history-*": 10}))
    receiver = RedisClusterChannelLayer(**layer_config(managed))
    try:
        members = [await receiver.new_channel() for _ in range(3)]
        for group in ("plain", "history-room"):
            for member in members:
                await receiver.group_add(group, member)
            await receiver.group_add(group, "worker-queue")
            await sender.group_send(group, {"type": "m", "group": group})
            for member in [*members, "worker-queue"]:
                got = await asyncio.wait_for(receiver.receive(member), 10)
                assert got["group"] == group
        await sender.send(members[0], {"type": "direct"})
        assert (await asyncio.wait_for(receiver.receive(members[0]), 10))["type"] == "direct"
        history = await sender.group_history("history-room", last=1)
        assert history.offset == 1 and history.messages[0]["group"] == "history-room"
        assert sorted(await sender.group_channels("plain")) == sorted([*members, "worker-queue"])
        # What the layer's user may run covers a process's last layer call too.
        await sender.flush()
        assert await sender.group_channels("plain") == []
    finally:
        await sender.close()
        await receiver.close()


def test_sync_callers_work_on_the_managed_cluster(managed):
    layer = RedisClusterChannelLayer(**layer_config(managed))
    async_to_sync(layer.group_add)("jobs", "background")
    for n in range(5):
        async_to_sync(layer.group_send)("jobs", {"type": "job", "n": n})
    received = [async_to_sync(asyncio.wait_for)(layer.receive("background"), 10)["n"] for _ in range(5)]
    assert received == list(range(5))
    async_to_sync(layer.flush)()


async def test_the_acl_keeps_the_layer_user_inside_its_prefix(managed):
    """A layer on another prefix fails at once with the server's permission error; nothing is retried."""
    outside = RedisClusterChannelLayer(**layer_config(managed, prefix="other", retry_timeout=2))
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(redis.exceptions.NoPermissionError):
            await outside.group_send("room", {"type": "m"})
        assert asyncio.get_running_loop().time() - started < 1.5, "a permission error is not a failover"
        with pytest.raises(redis.exceptions.NoPermissionError):
            await outside.send("queue", {"type": "m"})
    finally:
        await outside.close()


async def test_a_primary_killed_under_tls_fails_over_and_the_room_goes_on(managed):
    sender = RedisClusterChannelLayer(**layer_config(managed, prefix="chat"))
    receiver = RedisClusterChannelLayer(**layer_config(managed, prefix="chat"))
    try:
        member = await receiver.new_channel()
        await receiver.group_add("failover", member)
        await sender.group_send("failover", {"type": "m", "n": 0})
        assert (await asyncio.wait_for(receiver.receive(member), 10))["n"] == 0
        managed.kill(managed.primary_for(sender.keys.group_channel("failover")))
        # The send retries across the election (retry_timeout); the member is resubscribed on the new primary.
        deadline = asyncio.get_running_loop().time() + 30
        n = 0
        while True:
            n += 1
            await sender.group_send("failover", {"type": "m", "n": n})
            try:
                got = await asyncio.wait_for(receiver.receive(member), 1)
                break
            except TimeoutError:
                assert asyncio.get_running_loop().time() < deadline, "delivery did not resume after the failover"
        assert got["n"] <= n
        assert receiver.stats["resubscribes"] >= 1
    finally:
        await sender.close()
        await receiver.close()
