"""The Redis nodes' own scripts (the chart's, run by compose) repair the cluster after real events.

Each test does to a node what a Kubernetes cluster does to a pod (recreate it with an empty volume,
restart a primary that lost its data, stop a primary, stop a replica) and waits until the cluster is
whole again: six nodes, three primaries with one replica each, no id left over. The room goes on.
"""

import time

import pytest
from test_compose_stack import everyone_gets_everything, join_until
from test_rolling_restart import save

from conftest import ComposeStack

NODES = [f"redis-{n}" for n in range(6)]
REPAIR_TIMEOUT_S = 90
# Seconds from each event until the cluster was whole again, and what survived: artifacts/redis_repair.json.
REPORT = {}


def record(event, started, **facts):
    REPORT[event] = {"seconds_to_whole": round(time.monotonic() - started, 1), **facts}
    save("redis_repair", REPORT)


# The nodes' password and CA live in the compose `secrets` volume, not in their environment.
AUTH = 'export REDISCLI_AUTH="$(cat /run/chat-secrets/redis-password)"; '
REDIS_CLI = "redis-cli --tls --cacert /run/chat-secrets/ca.crt"


def cli(stack, node, *args):
    """redis-cli ARGS in `node`'s container, over TLS with the password; its standard output."""
    return stack.run("exec", "-T", node, "sh", "-c", AUTH + f'exec {REDIS_CLI} "$@"', "redis-cli", *args).stdout


def cluster_nodes(stack, via):
    """CLUSTER NODES as node `via` sees it: a list of dicts (id, host, flags, master, slots)."""
    out = cli(stack, via, "cluster", "nodes")
    table = []
    for line in out.splitlines():
        fields = line.split()
        table.append(
            {
                "id": fields[0],
                "host": fields[1].partition(",")[2],
                "flags": set(fields[2].split(",")),
                "master": fields[3],
                "slots": fields[8:],
            }
        )
    return table


def whole(stack, via="redis-0"):
    """The cluster as `via` sees it when it is whole (and every node agrees it is ok); else None."""
    try:
        table = cluster_nodes(stack, via)
        states = [cli(stack, node, "cluster", "info") for node in NODES]
    except AssertionError:
        return None
    healthy = [n for n in table if not n["flags"] & {"fail", "fail?", "noaddr", "handshake"}]
    primaries = [n for n in healthy if "master" in n["flags"] and n["slots"]]
    replicas = [n for n in healthy if "slave" in n["flags"]]
    if (
        len(table) == 6
        and sorted(n["host"] for n in table) == NODES
        and len(primaries) == 3
        and sorted(r["master"] for r in replicas) == sorted(p["id"] for p in primaries)
        and all("cluster_state:ok" in state for state in states)
    ):
        return {n["host"]: n for n in table}
    return None


def until_whole(stack, via="redis-0", timeout=REPAIR_TIMEOUT_S, settled=lambda nodes: True):
    """Wait for the cluster to be whole again with `settled(nodes)` true; its nodes by host name.

    `settled` tells the repaired cluster from the one before the event, which looks whole until the
    other nodes notice what happened.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = whole(stack, via)
        if nodes and settled(nodes):
            return nodes
        time.sleep(0.5)
    raise AssertionError(f"cluster not whole after {timeout} s:\n{cli(stack, via, 'cluster', 'nodes')}")


def role(nodes, kind):
    return sorted(host for host, node in nodes.items() if kind in node["flags"])


def write_keys(stack, count, via="redis-0"):
    """COUNT keys over every slot, through a cluster client in a node container."""
    script = AUTH + f'for i in $(seq 1 {count}); do {REDIS_CLI} -c set "repair:$i" "value-$i" >/dev/null || exit 1; done'
    stack.run("exec", "-T", via, "sh", "-c", script)


def read_keys(stack, count, via):
    """How many of the COUNT keys read back with their own value."""
    script = AUTH + f'for i in $(seq 1 {count}); do [ "$({REDIS_CLI} -c get "repair:$i")" = "value-$i" ] && echo ok; done'
    return stack.run("exec", "-T", via, "sh", "-c", script).stdout.split().count("ok")


async def room_works(stack, tag):
    joined = await join_until(stack, f"repair-{tag}", lambda seen: len(seen) >= 2, limit=20)
    try:
        await everyone_gets_everything([client for client, _ in joined], tag)
    finally:
        for client, _ in joined:
            await client.close()


async def test_a_node_recreated_with_an_empty_volume_rejoins_and_its_old_id_is_forgotten(compose_stack):
    before = until_whole(compose_stack)
    replica = role(before, "slave")[0]
    started = time.monotonic()
    compose_stack.run("up", "--detach", "--no-deps", "--force-recreate", "--renew-anon-volumes", replica)
    # An empty volume means a new node id.
    until_whole(compose_stack, settled=lambda nodes: nodes[replica]["id"] != before[replica]["id"])
    record("node recreated with an empty volume", started, node=replica)
    for node in NODES:
        ids = {n["id"] for n in cluster_nodes(compose_stack, node)}
        assert before[replica]["id"] not in ids, f"{node} still knows the dead id"
    assert "met the cluster" in compose_stack.run("logs", replica).stdout
    await room_works(compose_stack, "empty-volume")


async def test_a_primary_restarted_without_its_data_does_not_wipe_its_replica(compose_stack):
    before = until_whole(compose_stack)
    primary = role(before, "master")[0]
    survivor = next(node for node in NODES if node != primary)
    keys = 300
    write_keys(compose_stack, keys, via=survivor)
    held = int(cli(compose_stack, primary, "dbsize"))
    assert held > 0, "some keys live on the primary about to lose its data"
    # Its data set is gone; it comes back within the node timeout, before any failover could start.
    compose_stack.run("exec", "-T", primary, "sh", "-c", "rm -rf /data/appendonlydir")
    started = time.monotonic()
    compose_stack.run("restart", "--timeout", "0", primary)
    # A node without its data must not come back as a primary.
    until_whole(compose_stack, via=survivor, settled=lambda nodes: "slave" in nodes[primary]["flags"])
    assert "lost its data set" in compose_stack.run("logs", primary).stdout
    kept = read_keys(compose_stack, keys, via=survivor)
    record(
        "primary restarted without its data",
        started,
        node=primary,
        keys_written=keys,
        keys_on_that_primary=held,
        keys_read_back=kept,
    )
    assert kept == keys, "the replica kept every key"
    await room_works(compose_stack, "lost-data")


async def test_a_stopped_primary_fails_over_and_comes_back_as_a_replica(compose_stack):
    before = until_whole(compose_stack)
    primary = role(before, "master")[0]
    survivor = next(node for node in NODES if node != primary)
    write_keys(compose_stack, 100, via=survivor)
    started = time.monotonic()
    compose_stack.run("stop", "--timeout", "0", primary)
    deadline = time.monotonic() + REPAIR_TIMEOUT_S
    while time.monotonic() < deadline:
        table = {n["host"]: n for n in cluster_nodes(compose_stack, survivor)}
        if "fail" in table[primary]["flags"] and not table[primary]["slots"]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the stopped primary's slots were not taken over")
    await room_works(compose_stack, "primary-down")
    compose_stack.run("start", primary)
    after = until_whole(compose_stack, via=survivor, settled=lambda nodes: "slave" in nodes[primary]["flags"])
    assert after[primary]["id"] == before[primary]["id"], "with its data kept, the node keeps its id"
    kept = read_keys(compose_stack, 100, via=primary)
    record("primary stopped, failed over, started again", started, node=primary, keys_written=100, keys_read_back=kept)
    assert kept == 100


async def test_a_stopped_replica_leaves_the_cluster_serving_and_rejoins(compose_stack):
    before = until_whole(compose_stack)
    replica = role(before, "slave")[0]
    started = time.monotonic()
    compose_stack.run("stop", "--timeout", "0", replica)
    survivor = next(node for node in NODES if node != replica)
    deadline = time.monotonic() + REPAIR_TIMEOUT_S
    while "fail" not in {n["host"]: n for n in cluster_nodes(compose_stack, survivor)}[replica]["flags"]:
        assert time.monotonic() < deadline, "the stopped replica was never marked failed"
        time.sleep(0.5)
    assert "cluster_state:ok" in cli(compose_stack, survivor, "cluster", "info")
    await room_works(compose_stack, "replica-down")
    compose_stack.run("start", replica)
    assert until_whole(compose_stack, via=survivor)[replica]["id"] == before[replica]["id"]
    record("replica stopped and started again", started, node=replica)


@pytest.fixture
def placed_cluster(chat_images, tmp_path):
    """The six Redis nodes alone, told they run on three hosts: each primary shares a host with one node."""
    stack = ComposeStack(chat_images, tmp_path)
    override = tmp_path / "placement.yaml"
    hosts = {
        "redis-0": "host-a",
        "redis-1": "host-b",
        "redis-2": "host-c",
        "redis-3": "host-a",
        "redis-4": "host-b",
        "redis-5": "host-c",
    }
    override.write_text(
        "services:\n"
        + "".join(
            f"  {node}:\n    environment:\n      NODE_NAME: {host}\n      REPAIR_INTERVAL_S: '1'\n"
            for node, host in hosts.items()
        )
    )
    stack.compose.compose_file_name = ["compose.yaml", str(override)]
    try:
        stack.run("up", "--detach", "--wait", *NODES)
        yield stack, hosts
    finally:
        stack.run("down", "--volumes", "--timeout", "0", check=False)


def test_no_replica_runs_where_its_primary_runs(placed_cluster):
    stack, hosts = placed_cluster

    def apart(nodes):
        by_id = {node["id"]: host for host, node in nodes.items()}
        return all(hosts[host] != hosts[by_id[node["master"]]] for host, node in nodes.items() if "slave" in node["flags"])

    started = time.monotonic()
    nodes = until_whole(stack, settled=apart)
    record("placement: formed with every replica apart from its primary", started)
    # Checked after creation, not assumed: recreate a replica empty and the pairing holds again.
    replica = role(nodes, "slave")[0]
    started = time.monotonic()
    stack.run("up", "--detach", "--no-deps", "--force-recreate", "--renew-anon-volumes", replica)
    until_whole(stack, settled=lambda after: after[replica]["id"] != nodes[replica]["id"] and apart(after))
    record("placement: replica recreated empty, paired apart again", started, node=replica)
