"""Layer fan-out micro-benchmark: the same room on three layers, side by side, in one run.

Three layer instances stand for three workers (in one process here, so this measures the layers, not
the servers); a fourth sends. Each message carries its send time; a delivery is counted when a member's
receive returns it. Bounded: a fixed number of messages at a fixed offered rate, on 127.0.0.1 only.
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from localstack.cluster import LocalCluster, die_with_parent, free_base_port, server_binary

OUT = Path(__file__).resolve().parent.parent / "artifacts" / "bench"


def layer_configs(cluster, redis_url):
    return {
        "redis-cluster (this)": ("channels_redis_cluster.RedisClusterChannelLayer", {"hosts": [f"redis://{n}" for n in cluster.startup_nodes]}),
        "channels_redis core": ("channels_redis.core.RedisChannelLayer", {"hosts": [redis_url]}),
        "channels_redis pubsub": ("channels_redis.pubsub.RedisPubSubChannelLayer", {"hosts": [redis_url]}),
    }


def make(path, config, prefix):
    module, name = path.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    return cls(prefix=prefix, **config)


async def close(layer):
    """Each layer names its shutdown differently."""
    for name in ("close", "close_pools", "flush"):
        method = getattr(type(layer), name, None)
        if method is not None:
            return await method(layer)


async def run_one(path, config, members, workers, messages, rate):
    prefix = f"b{time.monotonic_ns() % 10**8}"
    receivers = [make(path, config, prefix) for _ in range(workers)]
    sender = make(path, config, prefix)
    channels = []
    for index in range(members):
        layer = receivers[index % workers]
        channel = await layer.new_channel()
        await layer.group_add("bench", channel)
        channels.append((layer, channel))
    latencies = []

    async def drain(layer, channel):
        while True:
            message = await layer.receive(channel)
            latencies.append(time.perf_counter() - message["t"])

    tasks = [asyncio.ensure_future(drain(layer, channel)) for layer, channel in channels]
    await asyncio.sleep(0.2)
    started = time.perf_counter()
    for n in range(messages):
        due = started + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await sender.group_send("bench", {"type": "m", "t": time.perf_counter()})
    expected = messages * members
    deadline = time.perf_counter() + 10
    while len(latencies) < expected and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    for layer in (*receivers, sender):
        await close(layer)
    ordered = sorted(latencies) or [float("nan")]
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {
        "offered_deliveries_per_s": rate * members,
        "delivered_ratio": round(len(latencies) / expected, 4),
        "deliveries_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(pick(0.50), 2), "p99_ms": round(pick(0.99), 2),
        "median_ms": round(statistics.median(ordered) * 1000, 2),
    }


async def main(args):
    port = free_base_port(1, 39000, 40000)
    standalone = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )
    results = {}
    try:
        with LocalCluster() as cluster:
            time.sleep(0.5)
            for name, (path, config) in layer_configs(cluster, f"redis://127.0.0.1:{port}/0").items():
                results[name] = await run_one(path, config, args.members, args.workers, args.messages, args.rate)
                print(name, results[name], flush=True)
    finally:
        standalone.terminate()
        standalone.wait()
    base = results["channels_redis core"]["deliveries_per_s"] or 1
    lines = [
        f"# Layer fan-out micro-benchmark\n",
        f"room of {args.members} members over {args.workers} layer instances, {args.messages} messages at {args.rate}/s offered\n",
        "| layer | delivered | deliveries/s | vs core | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['delivered_ratio']:.2%} | {r['deliveries_per_s']} | {r['deliveries_per_s'] / base:.2f}x | {r['p50_ms']} | {r['p99_ms']} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "layer_fanout.md").write_text("\n".join(lines) + "\n")
    (OUT / "layer_fanout.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print("\n".join(lines))
    return 0 if all(r["delivered_ratio"] > 0 for r in results.values()) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rate", type=int, default=100, help="messages per second offered")
    sys.exit(asyncio.run(main(parser.parse_args())))
