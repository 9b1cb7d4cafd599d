"""`make bench`: the fan-out benchmark, side by side in one run on this machine, all on 127.0.0.1.

Backends, each the same gunicorn + 3 uvicorn workers serving the same sockets: the chat on this layer
(local Redis Cluster) with room history on, as deployed, and off, the chat on channels_redis core and on channels_redis pub/sub (a standalone
server from the same binary), and a ceiling: an ASGI app that broadcasts in process with no layer
(each message reaches only the sender's worker). Measured: sustainable fan-out (the highest offered
deliveries/s with 100% delivery and p99 <= 100 ms, found by stepping the load), overload at 2x that,
one 1,000-member room over 3 workers, Redis commands per group_send against room size and worker count,
idle memory per socket (chat against the bare app, per WebSocket implementation), and a py-spy
profile of a worker. First of all, the chat against Socket.IO and nchan per room shape
(`loadtest.comparison`). Writes artifacts/bench/report.{md,json} and PNG plots.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import redis

from channels_redis_cluster.testing import LocalCluster
from chatsite.worker import WS_DEFAULT
from loadtest import capacity, comparison, many_sockets, spublish_cost
from loadtest.ledger import percentile
from loadtest.profiling import profile
from loadtest.stacks import BACKENDS, loaded, standalone_redis

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "artifacts" / "bench"
P99_LIMIT_MS = 100.0
# What MONITOR sees that is no command of the operation measured (commands_per_send, presence_cost).
BACKGROUND_COMMANDS = ("replconf", "hello", "client", "auth", "select", "cluster", "ping", "info", "script")
RESUMING = {"redis-cluster"}  # backends whose rooms keep a history a member resumes from


def passes(result):
    return result["delivered_ratio"] == 1.0 and result["p99_ms"] is not None and result["p99_ms"] <= P99_LIMIT_MS


async def step_up(load, label, args, repeats):
    """Steps of rising offered load until one fails: (every step, the last that passed or None)."""
    steps, sustainable = [], None
    for number, rate in enumerate(args.steps):
        # Each step runs `repeats` times; its verdict and numbers are the median run's.
        runs = [await load.run_step(f"{number}.{n}", rate, args.step_seconds) for n in range(repeats)]
        runs.sort(key=lambda run: (passes(run), -(run["p99_ms"] or float("inf"))), reverse=True)
        step = dict(runs[len(runs) // 2], runs_passed=sum(passes(run) for run in runs), runs=len(runs))
        steps.append(step)
        print(f"  {label} offered {rate}/s: {step}", flush=True)
        if not passes(step):
            break
        sustainable = step
    return steps, sustainable


async def history_cost(cluster, redis_port, args, backends):
    """Room history against none: does the layer with history sustain 90% of the rate it sustains without?

    The steps are coarse (12,000 to 15,000 is 80%), so when the steps leave it open, that rate is run as a
    step of its own (the median of ``repeats`` runs).
    """
    off = (backends["redis-cluster-nohistory"].get("sustainable") or {}).get("offered_per_s")
    on = (backends["redis-cluster"].get("sustainable") or {}).get("offered_per_s")
    if not off:
        return None
    rate = int(off * 0.9)
    if on and on >= rate:
        return {"offered_per_s": rate, "passed": True, "measured_in": "the steps"}
    with loaded("redis-cluster", cluster, redis_port, args) as (_stack, load):
        await add_rooms(load, args)
        steps, sustainable = await step_up(
            load,
            "redis-cluster (history) at 90% of history off",
            argparse.Namespace(**{**vars(args), "steps": [rate]}),
            args.repeats,
        )
    return {"offered_per_s": rate, "passed": sustainable is not None, "measured_in": "a step of its own", "step": steps[0]}


async def add_rooms(load, args, resume=False):
    """The throughput rooms; sockets per worker."""
    for index in range(args.rooms):
        await load.add_room(f"bench-{index}", args.room_size, resume=resume)
    return sorted(load.sockets_per_worker().values())


async def bench_backend(backend, cluster, redis_port, args):
    """Sustainable rate, overload and the big room for one backend."""
    # The ceiling is one process holding every socket: what one core can push with no layer at all.
    result = {"label": BACKENDS[backend]}
    with loaded(backend, cluster, redis_port, args, workers=1 if backend == "ceiling" else 3) as (stack, load):
        result["sockets_per_worker"] = await add_rooms(load, args)
        result["steps"], sustainable = await step_up(load, backend, args, args.repeats)
        result["sustainable"] = sustainable
        if sustainable and backend == "redis-cluster" and args.profile:
            # The worker holding the most sockets: the one the load weighs on most.
            served_by = load.sockets_per_worker().most_common(1)[0][0]
            pid = int(served_by.rpartition(":")[2])
            profiling = asyncio.get_running_loop().run_in_executor(None, profile, pid, args.step_seconds, OUT)
            await load.run_step("profile", sustainable["offered_per_s"], args.step_seconds)
            result["profile"] = await profiling
        if sustainable and args.overload:
            resume = backend in RESUMING
            if resume:
                # Members as chat.v2 clients are: one closed as too slow (4408) resumes from its last offset,
                # so it is owed every message of the step. A v1 socket is owed nothing sent after the
                # server removed it from the room, a moment the client cannot see: its count could not be exact.
                load.close()
                await add_rooms(load, args, resume=True)
            counted = (
                "channels_layer_overflow_total",
                "channels_layer_sequence_gaps_total",
                "chat_messages_dropped_closing_total",
                "chat_closed_too_slow_total",
            )
            before = [stack.metric(name) for name in counted] if backend.startswith("redis-cluster") else []
            overload = await load.run_step("overload", 2 * sustainable["offered_per_s"], args.step_seconds, drain=10)
            if backend.startswith("redis-cluster"):
                # Overflow and messages a closing socket did not write count lost deliveries; a sequence gap
                # counts a lost message (all its local members).
                overflow, overload["sequence_gaps"], unsent, overload["closed_too_slow"] = (
                    int(stack.metric(name) - value) for name, value in zip(counted, before)
                )
                overload["counted_drops"] = overflow + unsent
            if resume:
                overload.update(await load.resumed())
            result["overload"] = overload
            print(f"  {backend} overload: {overload}", flush=True)
        load.close()
        await asyncio.sleep(1)
        await load.add_room("big-room", args.big_room)
        result["big_room"] = await load.run_step("big", args.big_room * args.big_room_messages_per_s, args.step_seconds)
        result["big_room"]["workers"] = len(load.sockets_per_worker())
        print(f"  {backend} {args.big_room}-member room: {result['big_room']}", flush=True)
    return result


class CommandLog(threading.Thread):
    """MONITOR of one node until it sees ``ECHO <END>``: the commands clients sent, and those scripts called."""

    END = "bench-monitor-end"

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client, self.sent, self.in_scripts = client, Counter(), Counter()
        self.listening = threading.Event()
        # Connected before MONITOR starts, so its handshake is not among the layer's commands.
        address = client.connection_pool.connection_kwargs
        self.ender = redis.Redis(host=address["host"], port=address["port"])
        self.ender.ping()

    def run(self):
        with self.client.monitor() as monitor:
            self.listening.set()
            while (command := monitor.next_command())["command"] != f"ECHO {self.END}":
                name = command["command"].split(" ", 1)[0].lower()
                (self.in_scripts if command["client_type"] == "lua" else self.sent)[name] += 1

    def end(self):
        self.ender.echo(self.END)
        self.join(10)
        self.ender.close()


def script_usec(primaries):
    """(calls, microseconds) of EVALSHA so far, over ``primaries``."""
    calls = usec = 0
    for node in primaries:
        stats = node.info("commandstats").get("cmdstat_evalsha") or {}
        calls, usec = calls + stats.get("calls", 0), usec + stats.get("usec", 0)
    return calls, usec


def redis_cost(commands, layer="redis-cluster"):
    """Redis µs per group_send: a fixed part and a part per subscribed worker, fitted over the worker counts."""
    rows = [r for r in commands.values() if r["layer"] == layer and r.get("redis_us_per_send") is not None]
    if len({r["workers"] for r in rows}) < 2:
        return None
    xs, ys = [r["workers"] for r in rows], [r["redis_us_per_send"] for r in rows]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return {
        "us_per_send": round(mean_y - slope * mean_x, 2),
        "us_per_subscriber": round(max(slope, 0.0), 2),
        "measured": {f"room {r['room_size']}, {r['workers']} workers": r["redis_us_per_send"] for r in rows},
    }


async def presence_cost(cluster, args):
    """Presence on this layer against room size: Redis commands (MONITOR) and median latency per join and per
    leave (each with its event), per read of the room's members, and per lease renewal (a worker's heartbeat)."""
    from channels_redis_cluster import RedisClusterChannelLayer

    primaries = [redis.Redis(port=int(node.rsplit(":", 1)[1])) for node in cluster.startup_nodes]
    primaries = [c for c in primaries if c.info("replication")["role"] == "master"]
    layer = RedisClusterChannelLayer(
        hosts=[f"redis://{n}" for n in cluster.startup_nodes], prefix=f"pres{random.randrange(10**6)}"
    )
    timed = args.presence_calls

    async def median_us(calls):
        times = []
        for call in calls:
            started = time.perf_counter()
            await call
            times.append((time.perf_counter() - started) * 1e6)
        return round(statistics.median(times), 1)

    results = {}
    try:
        state = await layer._state()
        for size in args.presence_room_sizes:
            group = f"presence-{size}"
            channels = [await layer.new_channel() for _ in range(size + timed)]
            for start in range(0, size, 500):
                await asyncio.gather(
                    *(layer.presence_join(group, c, f"m{i}", None) for i, c in enumerate(channels[start:size], start))
                )
            fresh = channels[size:]
            logs = [CommandLog(node) for node in primaries]
            for log in logs:
                log.start()
                log.listening.wait(10)
            join_us = await median_us(
                layer.presence_join(group, c, f"n{i}", "N", event={"type": "presence.join"}) for i, c in enumerate(fresh)
            )
            leave_us = await median_us(layer.presence_leave(group, [c], event={"type": "presence.leave"}) for c in fresh)
            calls = Counter()
            for log in logs:
                await asyncio.to_thread(log.end)
                calls.update(log.sent)
            for command in BACKGROUND_COMMANDS:
                calls.pop(command, None)
            read_us = await median_us(layer.presence(group) for _ in range(20))
            results[str(size)] = {
                "room_size": size,
                "commands_per_join_and_leave": round(sum(calls.values()) / (2 * timed), 2),
                "by_command": dict(calls),
                "join_us": join_us,
                "leave_us": leave_us,
                "read_us": read_us,
            }
            print(f"  presence room {size}: {results[str(size)]}", flush=True)
        renew_us = await median_us(state.presence.leases.renew() for _ in range(timed))
    finally:
        await layer.flush()
        await layer.close()
    return {"rooms": results, "renew_us": renew_us, "renewals_per_worker_per_s": round(3 / layer.presence_timeout, 2)}


async def commands_per_send(cluster, redis_port, args):
    """Redis commands per group_send (sent by the layer, and called inside its scripts), by layer, room size
    and worker (layer instance) count: MONITOR of every primary, which tells the two apart."""
    from channels_redis.core import RedisChannelLayer
    from channels_redis.pubsub import RedisPubSubChannelLayer

    from channels_redis_cluster import RedisClusterChannelLayer

    standalone = [redis.Redis(port=redis_port)]
    primaries = [redis.Redis(port=int(node.rsplit(":", 1)[1])) for node in cluster.startup_nodes]
    primaries = [c for c in primaries if c.info("replication")["role"] == "master"]
    hosts = [f"redis://{n}" for n in cluster.startup_nodes]
    history = {"room": {"size": 500, "age": 300}}  # as the chat keeps its rooms
    layers = {
        "redis-cluster": (lambda p: RedisClusterChannelLayer(hosts=hosts, prefix=p, group_history=history), primaries),
        "redis-cluster-nohistory": (lambda p: RedisClusterChannelLayer(hosts=hosts, prefix=p), primaries),
        "redis-cluster-unreplicated": (
            lambda p: RedisClusterChannelLayer(hosts=hosts, prefix=p, group_history=history, replicate_before_publish=False),
            primaries,
        ),
        "redis": (lambda p: RedisChannelLayer(hosts=[f"redis://127.0.0.1:{redis_port}"], prefix=p), standalone),
        "redis-pubsub": (lambda p: RedisPubSubChannelLayer(hosts=[f"redis://127.0.0.1:{redis_port}"], prefix=p), standalone),
    }
    results = {}
    for name, (make, nodes) in layers.items():
        for size in args.command_room_sizes:
            for workers in args.command_workers:
                prefix = f"cmd{random.randrange(10**6)}"
                instances = [make(prefix) for _ in range(workers + 1)]
                sender, receivers = instances[0], instances[1:]
                for index in range(size):
                    layer = receivers[index % workers]
                    await layer.group_add("room", await layer.new_channel())
                # Warm up on the same group, so the sender's connection to its node exists already.
                await sender.group_send("room", {"type": "warm.up"})
                await asyncio.sleep(0.2)
                logs = [CommandLog(node) for node in nodes]
                for log in logs:
                    log.start()
                    log.listening.wait(10)
                sends = 20
                for _ in range(sends):
                    await sender.group_send("room", {"type": "chat.message", "message": "x"})
                await asyncio.sleep(0.2)
                calls, in_scripts = Counter(), Counter()
                for log in logs:
                    await asyncio.to_thread(log.end)
                    calls.update(log.sent)
                    in_scripts.update(log.in_scripts)
                # Replicas' acknowledgements, connection handshakes and the layer's own background reads (the
                # slot map's CLUSTER NODES, the shard readers' PING, once a second each) are no command of a
                # group_send: on a slow machine the 20 sends outlast a second and would count them.
                for command in BACKGROUND_COMMANDS:
                    calls.pop(command, None)
                results[f"{name}/{size}/{workers}"] = {
                    "layer": name,
                    "room_size": size,
                    "workers": workers,
                    "commands_per_send": round(sum(calls.values()) / sends, 2),
                    "by_command": {c: round(n / sends, 2) for c, n in calls.most_common()},
                    "calls_in_scripts_per_send": round(sum(in_scripts.values()) / sends, 2),
                }
                if name.startswith("redis-cluster"):
                    # Redis CPU per group_send, out of MONITOR's way: the script's time includes its SPUBLISH.
                    before = script_usec(primaries)
                    for _ in range(args.cost_sends):
                        await sender.group_send("room", {"type": "chat.message", "message": "x"})
                    calls, usec = (a - b for a, b in zip(script_usec(primaries), before))
                    results[f"{name}/{size}/{workers}"]["redis_us_per_send"] = round(usec / calls, 2) if calls else None
                print(f"  commands {name} room {size} workers {workers}: {results[f'{name}/{size}/{workers}']}", flush=True)
                for layer in instances:
                    for method in ("close", "close_pools", "flush"):
                        if hasattr(layer, method):
                            await getattr(layer, method)()
                            break
    return results


def sync_calls(layer, calls, warm):
    """``calls`` group_sends from plain synchronous code (``async_to_sync``: a fresh loop per call), as a
    view, management command or task sends: median and p99 ms per call, and descriptors and RSS after
    ``warm`` calls and at the end."""
    from asgiref.sync import async_to_sync

    def resources():
        rss = next(
            int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:")
        )
        return len(os.listdir("/proc/self/fd")), rss

    times, marks = [], {}
    for n in range(calls):
        if n == warm:
            marks["warm"] = resources()
        started = time.perf_counter()
        async_to_sync(layer.group_send)("sync-room", {"type": "chat.message", "n": n})
        times.append((time.perf_counter() - started) * 1000)
    marks["end"] = resources()
    return {
        "calls": calls,
        "median_ms": percentile(times, 0.5),
        "p99_ms": percentile(times, 0.99),
        "descriptors_growth": marks["end"][0] - marks["warm"][0],
        "rss_growth_kib": marks["end"][1] - marks["warm"][1],
    }


async def sync_callers(cluster, redis_port, args):
    """This layer and channels_redis core called from synchronous code, alternating, in this process."""
    from channels_redis.core import RedisChannelLayer

    from channels_redis_cluster import RedisClusterChannelLayer

    layers = {
        "redis-cluster": RedisClusterChannelLayer(hosts=[f"redis://{n}" for n in cluster.startup_nodes], prefix="sync"),
        "redis": RedisChannelLayer(hosts=[f"redis://127.0.0.1:{redis_port}"], prefix="sync"),
    }
    runs = {name: [] for name in layers}
    for _ in range(args.sync_repeats):
        for name, layer in layers.items():
            runs[name].append(await asyncio.to_thread(sync_calls, layer, args.sync_calls, args.sync_calls // 10))
    results = {}
    for name, measured in runs.items():
        median_run = sorted(measured, key=lambda r: r["median_ms"])[len(measured) // 2]
        results[name] = {
            **median_run,
            "median_ms_per_run": [r["median_ms"] for r in measured],
            "descriptors_growth_max": max(r["descriptors_growth"] for r in measured),
            "rss_growth_kib_max": max(r["rss_growth_kib"] for r in measured),
        }
        print(f"  sync group_send {name}: {results[name]}", flush=True)
    return results


async def server_settings(cluster, redis_port, args):
    """This layer's sustainable rate for each uvicorn WebSocket implementation and event loop (one run per step)."""
    results = {}
    for ws in args.ws_implementations:
        for loop in args.loops:
            with loaded("redis-cluster", cluster, redis_port, args, ws=ws, loop=loop) as (_stack, load):
                await add_rooms(load, args)
                steps, sustainable = await step_up(load, f"{ws}/{loop}", args, 1)
            results[f"{ws}/{loop}"] = {"ws": ws, "loop": loop, "sustainable": sustainable, "failed_step": steps[-1]}
    return results


CURVES = {
    # name: (x axis, [(x, [(rooms, size)] with traffic, idle sockets)], backends)
    "rooms": ("rooms (of 2 members)", lambda a: [(n, (n, 2), 0) for n in a.curve_rooms], ("redis-cluster", "redis")),
    # The ceiling too: its costs per recipient and per message against this layer's say where the gap is.
    "room_size": (
        "members per room (5,000 sockets)",
        lambda a: [(n, (max(1, 5000 // n), n), 0) for n in a.curve_room_sizes],
        ("redis-cluster", "redis", "ceiling"),
    ),
    "idle_sockets": (
        "idle sockets besides 10 active rooms of 50",
        lambda a: [(n, (10, 50), n) for n in a.curve_idle_sockets],
        ("redis-cluster", "redis"),
    ),
}


async def scale_curves(cluster, redis_port, args):
    """Worker CPU per delivery and latency at one offered rate as the work's shape grows: rooms, room size, idle
    sockets; this layer against channels_redis core (and the ceiling for room size), each point on a fresh stack."""
    results = {}
    for curve, (axis, points, backends) in CURVES.items():
        for backend in backends:
            rows = []
            for x, (rooms, size), idle in points(args):
                with loaded(backend, cluster, redis_port, args, workers=1 if backend == "ceiling" else 3) as (_stack, load):
                    if idle:
                        await load.add_rooms([(f"idle-{i}", 50) for i in range(idle // 50)], idle=True)
                    await load.add_rooms([(f"curve-{i}", size) for i in range(rooms)])
                    step = await load.run_step("curve", args.curve_rate, args.step_seconds)
                cost = capacity.worker_us_per_delivery(step)
                rows.append(
                    {
                        "x": x,
                        "rooms": rooms,
                        "room_size": size,
                        "idle": idle,
                        "cpu_us_per_delivery": round(cost, 1) if cost is not None else None,
                        **{
                            k: step[k]
                            for k in (
                                "delivered_ratio",
                                "achieved_per_s",
                                "p50_ms",
                                "p99_ms",
                                "server_cpu_percent",
                                "sockets_closed_by_server",
                            )
                        },
                    }
                )
                print(f"  curve {curve} {backend} x={x}: {rows[-1]}", flush=True)
            results.setdefault(backend, {})[curve] = {"axis": axis, "points": rows}
    return results


def cost_split(points):
    """Worker CPU per delivery as ``per_recipient + per_message / members`` over a room-size curve (µs).

    Least squares of the relative error: the small rooms' costs are ten times the large ones', and an
    absolute fit would let them set the per-recipient cost too.
    """
    import numpy

    points = [p for p in points if p["cpu_us_per_delivery"]]
    if len(points) < 2:
        return None
    costs = [p["cpu_us_per_delivery"] for p in points]
    # polyfit weighs each residual by w: 1 / cost makes it the relative error.
    slope, intercept = numpy.polyfit([1 / p["room_size"] for p in points], costs, 1, w=[1 / cost for cost in costs])
    return {"per_recipient_us": round(float(intercept), 1), "per_message_us": round(float(slope), 1)}


def at_top_step(result):
    """Worker CPU µs per delivery and client CPU at a backend's highest sustainable step."""
    step = result.get("sustainable")
    if not step:
        return None
    return {
        "offered_per_s": step["offered_per_s"],
        "worker_us_per_delivery": round(capacity.worker_us_per_delivery(step), 1),
        "client_cpu_percent": step["client_cpu_percent"],
        "server_cpu_percent": step["server_cpu_percent"],
    }


def gap(report):
    """Why this layer's sustainable rate is what it is against the ceiling's: costs at the top steps and per room-size fit."""
    backends, curves = report["backends"], report.get("curves") or {}
    found = {
        name: {
            "top": at_top_step(backends[name]) if name in backends else None,
            "split": cost_split(curves[name]["room_size"]["points"]) if "room_size" in curves.get(name, {}) else None,
        }
        for name in ("redis-cluster", "ceiling")
    }
    ours, ceiling = found["redis-cluster"]["split"], found["ceiling"]["split"]
    if ours and ceiling:
        size = report["args"]["room_size"]
        found["at_room_size"] = {
            "members": size,
            **{
                name: round(split["per_recipient_us"] + split["per_message_us"] / size, 1)
                for name, split in (("redis-cluster", ours), ("ceiling", ceiling))
            },
        }
    return found


async def join_storms(cluster, redis_port, args):
    """Sockets of many rooms connecting at once (a stack taking back its clients after a deploy), this layer
    against channels_redis core, alternating; each run's joins/s, and whether a message sent right after reached all."""
    runs = {"redis-cluster": [], "redis": []}
    for _ in range(args.storm_repeats):
        for backend in runs:
            with loaded(backend, cluster, redis_port, args) as (_stack, load):
                runs[backend].append(await load.storm(args.storm_rooms, args.storm_room_size))
                print(f"  join storm {backend}: {runs[backend][-1]}", flush=True)
    return {
        backend: {
            **sorted(measured, key=lambda r: r["joins_per_s"])[len(measured) // 2],
            "joins_per_s_per_run": [r["joins_per_s"] for r in measured],
            "all_delivered": all(r["delivered_ratio"] == 1.0 for r in measured),
        }
        for backend, measured in runs.items()
    }


async def idle_memory(cluster, redis_port, args):
    """RSS growth per idle socket of the chat and of the bare app, per uvicorn WebSocket implementation.

    Each pair is measured --idle-repeats times, alternating, and the median is reported: RSS moves in
    allocator-sized steps, so single runs scatter by a KiB or two per socket.
    """
    results = {}
    for ws in args.ws_implementations:
        samples = {"bare": [], "chat": []}
        for _ in range(args.idle_repeats):
            for app, backend in (("bare", "ceiling"), ("chat", "redis-cluster")):
                with loaded(backend, cluster, redis_port, args, ws=ws) as (stack, load):
                    # Every worker's first sockets pay for its one-off setup (layer connections, caches).
                    await load.add_room("warm-up", 150)
                    load.close()
                    await asyncio.sleep(1)
                    before = stack.rss_kib()
                    # Rooms one after another: thousands of handshakes at once would measure their peak.
                    for index in range(0, args.idle_sockets, 50):
                        # The chat's sockets speak v2 with room history: each holds its place for a resume.
                        await load.add_room(
                            f"idle-{index // 50}",
                            min(50, args.idle_sockets - index),
                            settle=0,
                            subprotocol="chat.v2" if app == "chat" else None,
                        )
                    await asyncio.sleep(3)
                    samples[app].append(round((stack.rss_kib() - before) / args.idle_sockets, 2))
        for app, values in samples.items():
            results[f"{app}/{ws}"] = {
                "app": app,
                "ws": ws,
                "sockets": args.idle_sockets,
                "kib_per_socket": percentile(values, 0.5),
                "samples": values,
            }
            print(f"  idle memory {app} {ws}: {results[f'{app}/{ws}']}", flush=True)
    return results


def plots(report):
    """latency_vs_load.png and commands_per_send.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for result in report["backends"].values():
        steps = [s for s in result["steps"] if s["p99_ms"] is not None]
        axis.plot([s["offered_per_s"] for s in steps], [s["p99_ms"] for s in steps], marker="o", label=f"{result['label']} p99")
    axis.axhline(P99_LIMIT_MS, color="grey", linestyle="--", linewidth=1)
    axis.set(
        xlabel="offered deliveries/s",
        ylabel="p99 fan-out latency (ms)",
        yscale="log",
        title=f"Fan-out latency against load (rooms of {report['args']['room_size']}, 3 workers)",
    )
    axis.legend()
    figure.savefig(OUT / "latency_vs_load.png", dpi=110, bbox_inches="tight")
    plt.close(figure)

    if report.get("curves"):
        figure, axes = plt.subplots(1, len(CURVES), figsize=(15, 4.5))
        for axis, curve in zip(axes, CURVES):
            for backend, curves in report["curves"].items():
                if curve not in curves:
                    continue
                points = [p for p in curves[curve]["points"] if p["cpu_us_per_delivery"] is not None]
                axis.plot(
                    [max(p["x"], 1) for p in points],
                    [p["cpu_us_per_delivery"] for p in points],
                    marker="o",
                    label=BACKENDS[backend],
                )
            axis.set(
                xlabel=report["curves"]["redis-cluster"][curve]["axis"],
                ylabel="worker CPU µs per delivery",
                xscale="log",
                title=f"at {report['args']['curve_rate']:,} deliveries/s offered",
            )
            axis.legend()
        figure.savefig(OUT / "scale_curves.png", dpi=110, bbox_inches="tight")
        plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 5))
    workers = max(report["args"]["command_workers"])
    for layer in ("redis-cluster", "redis", "redis-pubsub"):
        rows = [r for r in report["commands"].values() if r["layer"] == layer and r["workers"] == workers]
        axis.plot([r["room_size"] for r in rows], [r["commands_per_send"] for r in rows], marker="o", label=BACKENDS[layer])
    axis.set(
        xlabel="room size",
        ylabel="Redis commands per group_send",
        xscale="log",
        yscale="log",
        title=f"Commands per group_send ({workers} workers)",
    )
    axis.legend()
    figure.savefig(OUT / "commands_per_send.png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def targets(report):
    """The benchmark's targets against this run: [{target, measured, met}]."""
    backends, args = report["backends"], report["args"]

    def rate(backend):
        return ((backends.get(backend) or {}).get("sustainable") or {}).get("offered_per_s")

    ours, core, ceiling = rate("redis-cluster"), rate("redis"), rate("ceiling")
    at_top = " (the highest step offered)" if ours == max(args["steps"]) else ""
    why = report.get("gap") or {}
    tops = [(why.get(name) or {}).get("top") for name in ("redis-cluster", "ceiling")]
    because = (
        f"; worker CPU per delivery at those steps {tops[0]['worker_us_per_delivery']} µs against "
        f"{tops[1]['worker_us_per_delivery']} µs (why: below)"
        if all(tops)
        else ""
    )
    rows = [
        {
            "target": "sustainable fan-out with room history at least 0.8x the one-process bare app's (same run, same client)",
            "measured": (
                f"{ours}/s{at_top} against {ceiling}/s: {ours / ceiling:.2f}x{because}"
                if ours and ceiling
                else f"{ours} against {ceiling}"
            ),
            "met": bool(ours and ceiling and ours >= 0.8 * ceiling),
        },
        {
            "target": "sustainable fan-out with room history at least 8x channels_redis core's",
            "measured": f"{ours}/s against {core}/s: {ours / core:.1f}x" if ours and core else f"{ours} against {core}",
            "met": bool(ours and core and ours >= 8 * core),
        },
    ]
    limit = (backends.get("ceiling") or {}).get("steps", [None])[-1]
    if limit:
        rows.append(
            {
                "target": "the client is not the bottleneck: at the ceiling's last step every client process stays under 90% of a core",
                "measured": f"at {limit['offered_per_s']}/s: client processes {limit['client_cpu_percent']}% of a core, "
                f"the server process {limit['server_cpu_percent']}%",
                "met": max(limit["client_cpu_percent"]) < 90,
            }
        )
    overload = (backends.get("redis-cluster") or {}).get("overload")
    if overload:
        missing = overload["expected"] - overload["delivered"]
        rows.append(
            {
                "target": "no silent drop at 2x overload",
                "measured": f"{overload['delivered_ratio']:.2%} delivered at {overload['offered_per_s']}/s to chat.v2 members; "
                f"{overload.get('closed_too_slow')} sockets closed as too slow (4408), {overload.get('resumes')} resumes "
                f"({overload.get('resumes_refused', 0)} handshakes refused and tried again), "
                f"{overload.get('not_recovered')} of them not recovered, {overload.get('duplicates')} duplicates; "
                f"{missing} missing, {overload.get('counted_drops')} not written and counted, "
                f"{overload.get('sequence_gaps')} messages counted as sequence gaps",
                # A member closed as too slow resumes: it is owed everything and gets it, with no duplicate. A
                # resume that could not be exact says so (recovered: false); then what is missing must be counted.
                "met": overload.get("duplicates") == 0
                and (missing == 0 or (overload.get("not_recovered", 0) > 0 and missing <= (overload.get("counted_drops") or 0))),
            }
        )
    without, check = rate("redis-cluster-nohistory"), report.get("history_cost") or {}
    rows.append(
        {
            "target": "room history on costs at most 10% of the sustainable rate with it off",
            "measured": f"{ours}/s with history against {without}/s without in the steps; at 90% of it "
            f"({check.get('offered_per_s')}/s, measured in {check.get('measured_in')}) it "
            f"{'passes' if check.get('passed') else 'fails'}"
            if without
            else f"{ours} against {without}",
            "met": bool(check.get("passed")),
        }
    )
    unreplicated = rate("redis-cluster-unreplicated")
    if unreplicated:
        steps = {
            b: {st["offered_per_s"]: st for st in backends[b]["steps"]} for b in ("redis-cluster", "redis-cluster-unreplicated")
        }
        common = max(
            set(steps["redis-cluster"]) & set(steps["redis-cluster-unreplicated"]) & {ours or 0, unreplicated}, default=None
        )
        at = (
            f"; at {common}/s p50 / p99 {steps['redis-cluster'][common]['p50_ms']} / {steps['redis-cluster'][common]['p99_ms']} ms "
            f"against {steps['redis-cluster-unreplicated'][common]['p50_ms']} / {steps['redis-cluster-unreplicated'][common]['p99_ms']} ms"
            if common
            else ""
        )
        rows.append(
            {
                "target": "publishing a room message only once its replicas hold it (the default) costs at most 10% of the "
                "sustainable rate of publishing it as written",
                "measured": f"{ours}/s against {unreplicated}/s{at}",
                "met": bool(ours and ours >= 0.9 * unreplicated),
            }
        )
    per_layer = {
        layer: [r["commands_per_send"] for r in report["commands"].values() if r["layer"] == layer]
        for layer in ("redis-cluster", "redis-cluster-unreplicated", "redis-cluster-nohistory")
    }
    per_layer = {layer: counts for layer, counts in per_layer.items() if counts}
    rows.append(
        {
            # Published as written: one script. Published once replicated: the write, a WAIT (one per pipeline
            # batch, so one per send when sends come one at a time, as here) and the publish.
            "target": "a fixed number of Redis commands per group_send whatever the room size: 1 without waiting "
            "for replicas, at most 3 with (write, WAIT, publish)",
            "measured": "; ".join(f"{BACKENDS[layer]}: {min(c)} to {max(c)}" for layer, c in per_layer.items()),
            "met": all(max(c) - min(c) < 0.05 for c in per_layer.values())
            and max(per_layer.get("redis-cluster", [3])) <= 3
            and max(per_layer.get("redis-cluster-unreplicated", [1])) <= 1,
        }
    )
    if report.get("comparison"):
        rows += comparison.targets(report["comparison"])
    sync = report["sync"]
    ours, core = sync["redis-cluster"], sync["redis"]
    rows.append(
        {
            "target": "group_send from synchronous code (async_to_sync) at most 2x channels_redis core's time per call",
            "measured": f"median {ours['median_ms']} ms against {core['median_ms']} ms per call: {ours['median_ms'] / core['median_ms']:.2f}x",
            "met": ours["median_ms"] <= 2 * core["median_ms"],
        }
    )
    rows.append(
        {
            "target": f"{ours['calls']:,} synchronous calls leave descriptors and memory flat",
            "measured": f"after the first {ours['calls'] // 10:,} calls: {ours['descriptors_growth_max']} more descriptors, "
            f"{ours['rss_growth_kib_max']} KiB more RSS at most (channels_redis core: {core['descriptors_growth_max']}, "
            f"{core['rss_growth_kib_max']} KiB)",
            "met": ours["descriptors_growth_max"] == 0 and ours["rss_growth_kib_max"] <= 2048,
        }
    )
    storms = report.get("storms")
    if storms:
        ours, core = storms["redis-cluster"], storms["redis"]
        rows.append(
            {
                "target": "join storm at least 2x channels_redis core's joins/s, every member receiving a message sent right after",
                "measured": f"{ours['sockets']:,} sockets into {ours['rooms']} rooms: {ours['joins_per_s']:,} joins/s against "
                f"{core['joins_per_s']:,}/s (sockets the server closed after the handshake are no joins: "
                f"{ours['closed_by_server']} against {core['closed_by_server']}) "
                f"({ours['joins_per_s'] / core['joins_per_s']:.1f}x; runs {ours['joins_per_s_per_run']} "
                f"against {core['joins_per_s_per_run']}); every member reached: {ours['all_delivered']}",
                "met": ours["joins_per_s"] >= 2 * core["joins_per_s"] and ours["all_delivered"],
            }
        )
    memory = report["memory"]
    bare, chat = memory[f"bare/{args['ws']}"]["kib_per_socket"], memory[f"chat/{args['ws']}"]["kib_per_socket"]
    rows.append(
        {
            "target": f"idle memory at most 20 KiB per socket (v2, room history on) and within 10% of the bare app ({args['ws']}, the default)",
            # A short run can see no RSS growth at all for the bare app.
            "measured": f"{chat} KiB against {bare} KiB" + (f": {(chat / bare - 1) * 100:+.0f}%" if bare else ""),
            "met": chat <= 20 and chat <= 1.10 * bare,
        }
    )
    if report.get("many_sockets"):
        rows += many_sockets.targets(
            report["many_sockets"], sockets_target=args.get("many_sockets") or 0, p99_limit_ms=P99_LIMIT_MS
        )
    return rows


def markdown(report):
    backends, args = report["backends"], report["args"]
    core = (backends.get("redis", {}).get("sustainable") or {}).get("offered_per_s")

    def ratio(value):
        return f"{value / core:.1f}x" if core and value else "-"

    lines = [
        "# Fan-out benchmark",
        "",
        f"One run on this machine ({os.cpu_count()} cores): gunicorn + 3 uvicorn workers (the ceiling: one), {args['rooms']} rooms of "
        f"{args['room_size']}, the client in {args['client_processes']} processes on 127.0.0.1. Sustainable = highest offered step with 100% "
        f"delivery and p99 <= {P99_LIMIT_MS:.0f} ms; each step runs {args['repeats']} times for {args['step_seconds']} s "
        f"and the median run decides.",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
        *(f"| {row['target']} | {row['measured']} | {'yes' if row['met'] else 'NO'} |" for row in report["targets"]),
        "",
        *gap_lines(report),
        *(comparison.lines(report["comparison"], args["peer_repeats"], args["step_seconds"]) if report.get("comparison") else []),
        "| backend | sustainable deliveries/s (offered) | delivered/s | vs core | p50 ms | p99 ms | at 2x: delivered | at 2x: p99 ms | at 2x: counted drops | 1,000-member room p50 / p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backend, r in backends.items():
        s, o, b = r.get("sustainable") or {}, r.get("overload") or {}, r.get("big_room") or {}
        overload_ratio = f"{o['delivered_ratio']:.2%}" if o else "-"
        drops = o.get("counted_drops", "not counted" if o and backend != "ceiling" else "-")
        lines.append(
            f"| {r['label']} | {s.get('offered_per_s', 'none')} | {s.get('achieved_per_s', '-')} | {ratio(s.get('offered_per_s'))} | {s.get('p50_ms', '-')} | "
            f"{s.get('p99_ms', '-')} | {overload_ratio} | {o.get('p99_ms', '-')} | {drops} | "
            f"{b.get('p50_ms', '-')} / {b.get('p99_ms', '-')} |"
        )
    lines += [
        "",
        "Every step (offered deliveries/s: delivered, p50 / p99 ms of the median run, CPU in % of a core of "
        "each client process / each server worker; sockets per worker):",
        "",
    ]
    for r in backends.values():
        cells = [
            f"{s['offered_per_s']}: {s['delivered_ratio']:.2%}, {s['p50_ms']} / {s['p99_ms']}, "
            f"CPU {'+'.join(f'{c:.0f}' for c in s['client_cpu_percent'])} / {'+'.join(f'{c:.0f}' for c in s['server_cpu_percent'])}"
            for s in r["steps"]
        ]
        lines.append(f"- {r['label']} {r.get('sockets_per_worker')}: " + "; ".join(cells))
    lines += [
        "",
        "## Redis commands per group_send (INFO commandstats)",
        "",
        "| layer | "
        + " | ".join(f"room {size}, {w} workers" for size in args["command_room_sizes"] for w in args["command_workers"])
        + " |",
        "| --- |" + " --- |" * (len(args["command_room_sizes"]) * len(args["command_workers"])),
    ]
    for layer in ("redis-cluster", "redis-cluster-unreplicated", "redis-cluster-nohistory", "redis", "redis-pubsub"):
        row = [
            report["commands"][f"{layer}/{size}/{w}"]["commands_per_send"]
            for size in args["command_room_sizes"]
            for w in args["command_workers"]
        ]
        lines.append(f"| {BACKENDS[layer]} | " + " | ".join(str(v) for v in row) + " |")
    lines += [
        "",
        f"## group_send from synchronous code ({args['sync_calls']:,} async_to_sync calls per run, {args['sync_repeats']} runs, the median run shown)",
        "",
        "| layer | median ms per call | p99 ms | descriptors after the first tenth | RSS KiB after the first tenth |",
        "| --- | --- | --- | --- | --- |",
    ]
    for layer, r in report["sync"].items():
        lines.append(
            f"| {BACKENDS[layer]} | {r['median_ms']} | {r['p99_ms']} | {r['descriptors_growth']:+d} | {r['rss_growth_kib']:+d} |"
        )
    if report.get("curves"):
        lines += [
            "",
            f"## Costs as the work grows ({args['curve_rate']:,} deliveries/s offered at every point, a fresh stack each)",
            "",
            "Worker CPU µs per delivery (all workers' CPU over what was delivered), delivered share and p99 ms:",
            "",
        ]
        for curve in CURVES:
            axis = report["curves"]["redis-cluster"][curve]["axis"]
            measured = [b for b in report["curves"] if curve in report["curves"][b]]
            lines += [f"| {axis} | " + " | ".join(BACKENDS[b] for b in measured) + " |", "| --- |" + " --- |" * len(measured)]
            for index, point in enumerate(report["curves"]["redis-cluster"][curve]["points"]):
                cells = []
                for backend in measured:
                    p = report["curves"][backend][curve]["points"][index]
                    refused = p["sockets_closed_by_server"]
                    cells.append(
                        f"{p['cpu_us_per_delivery']} µs, {p['delivered_ratio']:.2%}, p99 {p['p99_ms']}"
                        + (f", **{refused:,} sockets closed by the server**" if refused else "")
                    )
                lines.append(f"| {point['x']:,} | " + " | ".join(cells) + " |")
            lines.append("")
        lines.append("![scale curves](scale_curves.png)")
    if report.get("storms"):
        lines += [
            "",
            f"## Join storm ({args['storm_rooms']} rooms of {args['storm_room_size']} connecting at once, "
            f"{args['storm_repeats']} runs each, alternating; the median run)",
            "",
            "| layer | joins/s | seconds | runs (joins/s) | sockets closed by the server | one message per room right after: delivered | p99 ms |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for backend, r in report["storms"].items():
            lines.append(
                f"| {BACKENDS[backend]} | {r['joins_per_s']:,} | {r['seconds']} | {r['joins_per_s_per_run']} | "
                f"{r['closed_by_server']} | {r['delivered']} of {r['expected']} | {r['p99_ms']} |"
            )
    if report.get("presence"):
        pres = report["presence"]
        lines += [
            "",
            f"## Presence cost against room size ({args['presence_calls']} joins and leaves each, with their event; "
            "MONITOR of every primary; median latency from the caller)",
            "",
            "| members in the room | Redis commands per join or leave | join µs | leave µs | read of the members µs |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in pres["rooms"].values():
            lines.append(
                f"| {r['room_size']:,} | {r['commands_per_join_and_leave']} ({', '.join(f'{k} {v}' for k, v in r['by_command'].items())}) "
                f"| {r['join_us']} | {r['leave_us']} | {r['read_us']} |"
            )
        lines += [
            "",
            f"A worker's heartbeat (its presence lease): one command every third of `presence_timeout` "
            f"({pres['renewals_per_worker_per_s']} per second at the default), {pres['renew_us']} µs each, whatever its sockets.",
        ]
    if report.get("redis_cost"):
        cost = report["redis_cost"]
        lines += [
            "",
            "## Redis CPU per group_send (INFO commandstats, history on)",
            "",
            f"{cost['us_per_send']} µs per group_send plus {cost['us_per_subscriber']} µs per subscribed worker "
            "(least squares over: " + ", ".join(f"{k}: {v} µs" for k, v in cost["measured"].items()) + ").",
        ]
    lines += [
        "",
        "## Idle memory per socket (RSS growth of the workers / sockets)",
        "",
        "| WebSocket implementation | bare ASGI app KiB | chat KiB | chat vs bare |",
        "| --- | --- | --- | --- |",
    ]
    for ws in args["ws_implementations"]:
        bare, chat = report["memory"][f"bare/{ws}"]["kib_per_socket"], report["memory"][f"chat/{ws}"]["kib_per_socket"]
        lines.append(f"| {ws} | {bare} | {chat} | {'+' if chat >= bare else ''}{(chat / bare - 1) * 100 if bare else 0:.0f}% |")
    if report.get("many_sockets"):
        lines += ["", *many_sockets.lines(report["many_sockets"])]
    if report.get("server_settings"):
        lines += [
            "",
            "## Server settings (this layer, one run per step)",
            "",
            "| WebSocket implementation | event loop | sustainable deliveries/s | p99 ms | first failed step |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in report["server_settings"].values():
            s, failed = r["sustainable"] or {}, r["failed_step"]
            failed_cell = (
                "-"
                if passes(failed)
                else f"{failed['offered_per_s']}: {failed['delivered_ratio']:.2%}, p99 {failed['p99_ms']} ms"
            )
            lines.append(
                f"| {r['ws']} | {r['loop']} | {s.get('offered_per_s', 'none')} | {s.get('p99_ms', '-')} | {failed_cell} |"
            )
    prof = backends.get("redis-cluster", {}).get("profile")
    if prof and "packages" in prof:
        lines += [
            "",
            f"## Where a worker's time goes (py-spy, {prof['samples']} samples at the sustainable rate)",
            "",
            "By package (innermost project or library frame): " + ", ".join(f"{n} {p}%" for n, p in prof["packages"]),
            "",
            "Top leaf functions: " + ", ".join(f"`{n}` {p}%" for n, p in prof["leaf_functions"][:8]),
        ]
    lines += ["", "![latency against load](latency_vs_load.png) ![commands per group_send](commands_per_send.png)", ""]
    return "\n".join(lines)


def gap_lines(report):
    """The section that says where this layer's cost per delivery differs from the ceiling's, from this run's numbers."""
    why, args = report.get("gap") or {}, report["args"]
    ours, ceiling = why.get("redis-cluster") or {}, why.get("ceiling") or {}
    lines = []
    if ours.get("top") and ceiling.get("top"):
        top, bare = ours["top"], ceiling["top"]
        lines += [
            "## Why this layer stops short of the ceiling",
            "",
            f"- At their highest sustainable steps the workers spend **{top['worker_us_per_delivery']} µs** of CPU per delivery "
            f"(3 workers: {'+'.join(f'{c:.0f}' for c in top['server_cpu_percent'])}% of a core at {top['offered_per_s']:,}/s) "
            f"against the ceiling's **{bare['worker_us_per_delivery']} µs** (one process: {bare['server_cpu_percent'][0]:.0f}% at "
            f"{bare['offered_per_s']:,}/s). The client processes take {'+'.join(f'{c:.0f}' for c in top['client_cpu_percent'])}% "
            f"of a core there, and Redis its share: on {os.cpu_count()} cores, what the server may use per delivery is what the "
            "client and Redis leave.",
        ]
    at = why.get("at_room_size")
    if ours.get("split") and ceiling.get("split") and at:
        a, c = ours["split"], ceiling["split"]
        lines += [
            f"- Fitted over the room-size curve below (worker CPU per delivery = per recipient + per message / members, at "
            f"{args['curve_rate']:,}/s): this layer **{a['per_recipient_us']} µs + {a['per_message_us']} µs / members**, the "
            f"ceiling **{c['per_recipient_us']} µs + {c['per_message_us']} µs / members**. Per recipient both write one "
            "frame to one socket (this layer frames a room message once per worker and writes it without a coroutine per "
            "recipient); the kernel's write is most of it. Per message this layer pays what a shared room costs: the "
            "sender's worker numbers and keeps it in Redis and publishes it (one EVALSHA) and awaits its echo, and every "
            "worker holding members reads it from its shard subscription and encodes it once; the ceiling parses and "
            f"encodes it once in its only process. At rooms of {at['members']} that is {at['redis-cluster']} µs against "
            f"{at['ceiling']} µs per delivery at this low rate (a busy loop batches more), so the per-message cost, "
            "paid by three workers and Redis on the same two cores, is the gap; it shrinks as rooms grow.",
            "",
        ]
    elif lines:
        lines.append("")
    return lines


def render(report):
    """Targets, capacity model, plots and report.md from a report's measurements."""
    report["gap"] = gap(report)
    report["targets"] = targets(report)
    capacity_text = ""
    if (report["backends"].get("redis-cluster") or {}).get("sustainable"):
        report["capacity"], capacity_text = capacity.section(report)
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots(report)
    text = markdown(report) + "\n" + capacity_text
    (OUT / "report.md").write_text(text)
    return text


async def main(args):
    OUT.mkdir(parents=True, exist_ok=True)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    report = {"args": vars(args), "backends": {}}
    started = time.monotonic()
    with LocalCluster() as cluster, standalone_redis() as redis_port:
        if args.peers:
            print("against Socket.IO and nchan:", flush=True)
            report["comparison"] = await comparison.compare(
                cluster, redis_port, args, args.peer_shapes, args.peer_repeats, P99_LIMIT_MS, OUT
            )
        for backend in args.backends:
            print(f"{BACKENDS[backend]}:", flush=True)
            report["backends"][backend] = await bench_backend(backend, cluster, redis_port, args)
        if {"redis-cluster", "redis-cluster-nohistory"} <= set(args.backends):
            print("history cost:", flush=True)
            report["history_cost"] = await history_cost(cluster, redis_port, args, report["backends"])
        print("commands per group_send:", flush=True)
        report["commands"] = await commands_per_send(cluster, redis_port, args)
        report["redis_cost"] = redis_cost(report["commands"])
        print("group_send from synchronous code:", flush=True)
        report["sync"] = await sync_callers(cluster, redis_port, args)
        if args.server_settings:
            print("server settings:", flush=True)
            report["server_settings"] = await server_settings(cluster, redis_port, args)
        if args.curves:
            print("scale curves:", flush=True)
            report["curves"] = await scale_curves(cluster, redis_port, args)
        print("presence:", flush=True)
        report["presence"] = await presence_cost(cluster, args)
        print("join storms:", flush=True)
        report["storms"] = await join_storms(cluster, redis_port, args)
        print("idle memory:", flush=True)
        report["memory"] = await idle_memory(cluster, redis_port, args)
        print("SPUBLISH per subscriber:", flush=True)
        report["spublish"] = await spublish_cost.measure(cluster, args.spublish_subscribers, args.spublish_messages)
        if args.many_sockets:
            print(f"{args.many_sockets:,} sockets:", flush=True)
            report["many_sockets"] = await many_sockets.measure(
                cluster, redis_port, args.many_sockets, args.many_rooms, args.many_step_seconds
            )
    report["seconds"] = round(time.monotonic() - started)
    print(render(report))
    return 0


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--rooms", type=int, default=10, help="rooms for the throughput steps")
    parser.add_argument("--client-processes", type=int, default=2, help="processes the benchmark client is spread over")
    parser.add_argument("--room-size", type=int, default=50)
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        help="offered deliveries/s, ascending",
        default=[
            2000,
            4000,
            6000,
            8000,
            10000,
            12000,
            15000,
            18000,
            21000,
            25000,
            30000,
            35000,
            40000,
            45000,
            50000,
            55000,
            60000,
            70000,
            80000,
            90000,
            100000,
            120000,
        ],
    )
    parser.add_argument("--step-seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per step; the median run decides")
    parser.add_argument("--big-room", type=int, default=1000, help="members of the one big room")
    parser.add_argument("--big-room-messages-per-s", type=float, default=4.0)
    parser.add_argument("--command-room-sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--command-workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cost-sends", type=int, default=1000, help="group_sends timed by Redis per room size and worker count")
    parser.add_argument("--sync-calls", type=int, default=10000, help="async_to_sync group_sends per layer and run")
    parser.add_argument("--sync-repeats", type=int, default=3, help="runs per layer, alternating; the median run is reported")
    parser.add_argument("--curve-rate", type=int, default=5000, help="offered deliveries/s of every scale-curve point")
    parser.add_argument("--curve-rooms", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--curve-room-sizes", type=int, nargs="+", default=[2, 10, 100, 1000, 5000])
    parser.add_argument("--curve-idle-sockets", type=int, nargs="+", default=[0, 5000, 20000])
    parser.add_argument("--no-curves", dest="curves", action="store_false", help="skip the scale curves")
    parser.add_argument("--presence-room-sizes", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--presence-calls", type=int, default=200, help="joins, leaves and lease renewals timed per room size")
    parser.add_argument("--storm-rooms", type=int, default=300, help="rooms of the join storm")
    parser.add_argument("--storm-room-size", type=int, default=10, help="sockets per room of the join storm")
    parser.add_argument("--storm-repeats", type=int, default=3, help="storms per backend, alternating; the median is reported")
    parser.add_argument("--idle-sockets", type=int, default=2000)
    parser.add_argument("--idle-repeats", type=int, default=3, help="measurements per app; the median is reported")
    parser.add_argument("--ws", default=WS_DEFAULT, help="uvicorn WebSocket implementation for the fan-out steps")
    parser.add_argument(
        "--ws-implementations",
        nargs="+",
        default=["wsproto", "websockets-sansio"],
        help="implementations compared for idle memory and for this layer's sustainable rate",
    )
    parser.add_argument("--loops", nargs="+", default=["uvloop", "asyncio"], help="event loops compared")
    parser.add_argument(
        "--no-server-settings",
        dest="server_settings",
        action="store_false",
        help="skip comparing WebSocket implementations and event loops",
    )
    parser.add_argument("--no-overload", dest="overload", action="store_false")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip the comparison with Socket.IO and nchan")
    parser.add_argument("--peer-repeats", type=int, default=3, help="cost runs per system and room shape, alternating")
    parser.add_argument(
        "--many-sockets", type=int, default=100_000, help="concurrent sockets of the machine-capacity part (0: skip it)"
    )
    parser.add_argument("--many-rooms", type=int, default=10_000, help="rooms they are in")
    parser.add_argument("--many-step-seconds", type=float, default=10.0, help="seconds the rooms beside them talk")
    parser.add_argument("--spublish-subscribers", type=int, nargs="+", default=[0, 10, 50, 100])
    parser.add_argument("--spublish-messages", type=int, default=2000, help="SPUBLISH per subscriber count and run")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every part, for CI")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="REPORT_JSON",
        help="measure nothing: write report.md, the targets and plots again from a report.json",
    )
    args = parser.parse_args(argv)
    args.peer_shapes = comparison.SHAPES
    if args.smoke:
        args.peer_shapes, args.peer_repeats = comparison.smoke_shapes(), 1
        args.rooms, args.room_size, args.steps, args.step_seconds, args.repeats = 1, 6, [300], 1.0, 1
        args.big_room, args.command_room_sizes, args.command_workers, args.cost_sends = 12, [10], [1, 2], 50
        args.sync_calls, args.sync_repeats = 100, 1
        args.storm_rooms, args.storm_room_size, args.storm_repeats = 20, 4, 1
        args.presence_room_sizes, args.presence_calls = [10, 100], 20
        args.curve_rate, args.curve_rooms, args.curve_room_sizes, args.curve_idle_sockets = 300, [2, 20], [2, 10], [0, 100]
        args.idle_sockets, args.idle_repeats, args.ws_implementations, args.profile = 60, 1, [WS_DEFAULT], False
        args.loops = ["uvloop"]
        args.many_sockets, args.many_rooms, args.many_step_seconds = 600, 60, 1.0
        args.spublish_subscribers, args.spublish_messages = [0, 5], 200
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
