"""The systems the benchmark runs: the chat (gunicorn + uvicorn workers) on each channel layer, the bare
one-process ceiling, and the standalone Redis that channels_redis uses; each with the benchmark's load on it."""

import os
import random
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import redis

from channels_redis_cluster.testing import die_with_parent, free_port, server_binary
from chatsite.worker import WS_DEFAULT
from loadtest.benchload import Load
from localstack.run import start_workers, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {
    "redis-cluster": "this layer (Redis Cluster)",
    "redis-cluster-nohistory": "this layer, room history off",
    "redis-cluster-unreplicated": "this layer, history published before its replicas hold it",
    "redis": "channels_redis core",
    "redis-pubsub": "channels_redis pub/sub",
    "ceiling": "ceiling (one process, no Django, no layer)",
}


@contextmanager
def standalone_redis():
    """A standalone server (for channels_redis) from the same binary as the cluster."""
    port = free_port()
    process = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait()


class Stack:
    """gunicorn with 3 uvicorn workers serving `backend` on a free port."""

    wire = "chat"  # what its sockets speak (loadtest.benchload.WIRES)

    def __init__(self, backend, cluster, redis_port, ws=WS_DEFAULT, loop="uvloop", workers=3, settings=None, log=None):
        """``settings``: more environment of the workers; ``log``: an open file for their output."""
        # The Redis the backend spends: the cluster for this layer, none for the ceiling (the standalone
        # server of channels_redis is shared by its two backends and not counted).
        self.redis_pids = [p.pid for p in cluster.processes.values()] if backend.startswith("redis-cluster") else []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": str(workers),
            "UVICORN_WS": ws,
            "UVICORN_LOOP": loop,
            "PYTHONPATH": f"{ROOT / 'services'}:{ROOT}",
            "LOG_LEVEL": "warning",
            "CHANNEL_LAYER": {
                "ceiling": "memory",
                "redis-cluster-nohistory": "redis-cluster",
                "redis-cluster-unreplicated": "redis-cluster",
            }.get(backend, backend),
            "CHAT_REPLICATE_BEFORE_PUBLISH": "0" if backend == "redis-cluster-unreplicated" else "1",
            "CHAT_HISTORY_SIZE": "0" if backend == "redis-cluster-nohistory" else os.environ.get("CHAT_HISTORY_SIZE", "500"),
            "CHANNEL_LAYER_PREFIX": f"bench{random.randrange(10**6)}",
            # Each step's senders are drawn at random from a room, faster than a person types: the
            # per-socket message limit would measure itself, not the layer.
            "CHAT_MESSAGES_PER_S": "0",
            "REDIS_CLUSTER_NODES": ",".join(cluster.startup_nodes),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            # The bare app has no channel layer to report its sockets through, and one worker: nothing to rebalance.
            **({"CHAT_REBALANCE": "false"} if backend == "ceiling" else {}),
            **(settings or {}),
        }
        app = "loadtest.ceiling:application" if backend == "ceiling" else "chatsite.asgi:application"
        self.process = start_workers(env, app, log)
        wait_ready(self.url, self.process)

    def worker_pids(self):
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def server_pids(self):
        """Every process of the system: gunicorn, its workers and the Redis nodes it uses."""
        return [self.process.pid, *self.worker_pids(), *self.redis_pids]

    def rss_kib(self):
        total = 0
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total

    def metric(self, name):
        """The sum of a Prometheus counter over all workers (0 when absent)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def close(self):
        stop(self.process)


@contextmanager
def loaded(backend, cluster, redis_port, args, **options):
    """A stack serving ``backend`` and the benchmark client on it, both ended on leaving."""
    stack = Stack(backend, cluster, redis_port, **{"ws": args.ws, **options})
    try:
        load = Load(stack, args.client_processes)
        try:
            yield stack, load
        finally:
            load.shutdown()
    finally:
        stack.close()
