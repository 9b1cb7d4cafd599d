"""Past this machine: how many pods, Redis shards and how much memory a large chat needs, from measured costs.

The costs come from a `make bench` report (CPU per delivered frame in the workers, idle memory per
socket, Redis CPU per group_send with its subscribers); the workload is stated (sockets, rooms, a
message rate per socket). Rooms spread over slots by the CRC16 of their group's hash tag and slots
over shards in equal ranges, as a Redis Cluster lays them out; the simulation draws room sizes from
a Zipf law and reports each shard's share of the work, and what one hot room does to its shard.

    python -m loadtest.capacity [--report artifacts/bench/report.json] [--sockets 1000000] ...
"""

import argparse
import functools
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

from redis.crc import key_slot

ROOT = Path(__file__).resolve().parent.parent
SLOTS = 16384
MAX_SHARDS = 1000  # past this, a shard count is no plan


def worker_us_per_delivery(step):
    """All workers' CPU µs per frame a step delivered (None when it delivered nothing)."""
    if not step["achieved_per_s"]:
        return None
    return 1e4 * sum(step["server_cpu_percent"]) / step["achieved_per_s"]


def measured_costs(report):
    """The unit costs a report measured: CPU seconds per delivery, KiB per idle socket, Redis µs per send."""
    ours = report["backends"]["redis-cluster"]
    step = ours["sustainable"]
    redis = report.get("redis_cost") or {}
    memory = report["memory"][f"chat/{report['args']['ws']}"]
    return {
        "deliveries_per_s_measured": step["achieved_per_s"],
        "worker_cpu_us_per_delivery": round(worker_us_per_delivery(step), 2),
        "kib_per_socket": memory["kib_per_socket"],
        "redis_us_per_send": redis.get("us_per_send"),
        # The part per subscriber from SPUBLISH measured alone where the run has it: the fit over whole
        # group_sends (the fixed part's source) mixes in costs that do not grow with subscribers, and put it
        # at 5.16 µs against 0.45 µs measured alone, planning 48 Redis cores for a million sockets instead of 6.
        "redis_us_per_subscriber": (report.get("spublish") or {}).get("us_per_subscriber", redis.get("us_per_subscriber")),
        "redis_us_per_subscriber_fitted": redis.get("us_per_subscriber"),
    }


def distinct_pods(room_size, pods):
    """Expected number of pods holding a member of a room, sockets placed at random (no sticky sessions)."""
    return pods * (1 - (1 - 1 / pods) ** room_size)


def zipf_rooms(rooms, sockets, exponent, largest, rng):
    """Room sizes that sum to ``sockets``: room k's weight proportional to 1/k**exponent, none over ``largest``."""
    weights = [1 / (k + 1) ** exponent for k in range(rooms)]
    sizes, left, open_rooms = [0.0] * rooms, float(sockets), list(range(rooms))
    while left > 0.5 and open_rooms:
        total = sum(weights[k] for k in open_rooms)
        share = {k: left * weights[k] / total for k in open_rooms}
        left = 0.0
        for k in list(open_rooms):
            sizes[k] += share[k]
            if sizes[k] >= largest:
                left += sizes[k] - largest
                sizes[k] = largest
                open_rooms.remove(k)
    sizes = [max(1, round(size)) for size in sizes]
    rng.shuffle(sizes)
    return sizes


@functools.lru_cache(maxsize=4)
def room_slots(rooms, prefix):
    """The hash slot of each of ``rooms`` rooms' keys."""
    return tuple(key_slot(f"{{{prefix}:g:chat_room-{index}}}".encode()) for index in range(rooms))


def spread(sizes, shards, prefix="chat"):
    """Each shard's share of messages (rooms' sizes, each member sending at the same rate) and of subscriptions."""
    per_shard = Counter()
    for slot, size in zip(room_slots(len(sizes), prefix), sizes):
        # A shard's Redis work is its rooms' messages, and a room's messages grow with its members.
        per_shard[slot * shards // SLOTS] += size
    loads = [per_shard[s] for s in range(shards)]
    mean = sum(loads) / shards
    return {"max_over_mean": round(max(loads) / mean, 2), "min_over_mean": round(min(loads) / mean, 2)}


def plan(costs, sizes, args):
    """Pods, shards, memory and the first limits for ``sizes`` (members per room), each socket sending alike."""
    sockets, rate = sum(sizes), args.messages_per_socket_per_minute / 60
    messages_per_s = sockets * rate
    deliveries_per_s = rate * sum(size * size for size in sizes)
    worker_cpu = deliveries_per_s * costs["worker_cpu_us_per_delivery"] / 1e6
    pods_for_cpu = math.ceil(worker_cpu / (args.pod_cores * args.cpu_headroom))
    memory_gib = sockets * costs["kib_per_socket"] / 2**20
    pods_for_memory = math.ceil(memory_gib / (args.pod_memory_gib * args.memory_headroom))
    pods_for_sockets = math.ceil(sockets / args.max_sockets_per_pod)
    pods = max(pods_for_cpu, pods_for_memory, pods_for_sockets, 2)
    # Every pod with a member of a room subscribes to it and gets each of its messages once.
    holders = [distinct_pods(size, pods) for size in sizes]
    largest = max(sizes)
    result = {
        "workload": {
            "sockets": sockets,
            "rooms": len(sizes),
            "largest_room": largest,
            "messages_per_s": round(messages_per_s),
            "deliveries_per_s": round(deliveries_per_s),
        },
        "pods": {
            "count": pods,
            "for_cpu": pods_for_cpu,
            "for_memory": pods_for_memory,
            "for_sockets": pods_for_sockets,
            "worker_cores": round(worker_cpu, 1),
            "socket_memory_gib": round(memory_gib, 1),
            "sockets_per_pod": round(sockets / pods),
        },
        "pubsub": {
            "subscriptions": round(sum(holders)),
            "pushes_per_s": round(rate * sum(s * h for s, h in zip(sizes, holders))),
            "connections_per_primary": 2 * pods,
        },
        "hot_room": {
            "members": largest,
            "messages_per_s": round(largest * rate, 1),
            "deliveries_per_s_per_pod": round(largest * largest * rate / pods),
        },
    }
    if costs["redis_us_per_send"] is not None:
        us = [costs["redis_us_per_send"] + costs["redis_us_per_subscriber"] * h for h in holders]
        redis_cores = rate * sum(s * u for s, u in zip(sizes, us)) / 1e6
        # The busiest shard sets the count: its share, simulated for each count tried, until the count holds.
        # More shards spread rooms less evenly, so the count can grow without end where a room's slot
        # alone is too much for a core: it stops at MAX_SHARDS, and the report says it did not converge.
        shards, skew, converged = 3, 1.0, False
        for _ in range(100):
            if shards > MAX_SHARDS:
                break
            skew = spread(sizes, shards)["max_over_mean"]
            needed = max(3, math.ceil(redis_cores * skew / args.redis_core_budget))
            if needed <= shards:
                converged = True
                break
            shards = needed
        hot_us = costs["redis_us_per_send"] + costs["redis_us_per_subscriber"] * distinct_pods(largest, pods)
        result["redis"] = {
            "cores": round(redis_cores, 2),
            "shards": shards,
            "converged": converged,
            "busiest_over_mean": skew,
            "subscriptions_per_primary": round(sum(holders) / shards),
            "hot_room_us_per_message": round(hot_us, 1),
            "one_room_max_messages_per_s": round(args.redis_core_budget * 1e6 / hot_us),
        }
    return result


def markdown(costs, result, skew, args):
    w, p, s, h = result["workload"], result["pods"], result["pubsub"], result["hot_room"]
    lines = [
        "## Capacity model (`python -m loadtest.capacity`)",
        "",
        f"Measured here: {costs['worker_cpu_us_per_delivery']} µs of worker CPU per delivered frame (at "
        f"{costs['deliveries_per_s_measured']:,} deliveries/s), {costs['kib_per_socket']} KiB per idle socket"
        + (
            f", Redis {costs['redis_us_per_send']} µs per group_send plus {costs['redis_us_per_subscriber']} µs per "
            f"subscribed worker"
            if costs["redis_us_per_send"] is not None
            else ""
        )
        + ".",
        "",
        f"Workload: {w['sockets']:,} sockets in {w['rooms']:,} rooms, sizes Zipf (exponent {args.zipf}, at most "
        f"{args.largest_room:,} members), each socket sending {args.messages_per_socket_per_minute:g} messages a minute: "
        f"{w['messages_per_s']:,} messages/s, {w['deliveries_per_s']:,} deliveries/s.",
        "",
        "| resource | need | why |",
        "| --- | --- | --- |",
        f"| pods ({args.pod_cores:g} cores, {args.pod_memory_gib:g} GiB) | **{p['count']}** | CPU {p['for_cpu']} "
        f"({p['worker_cores']} cores at {args.cpu_headroom:.0%} use), memory {p['for_memory']} ({p['socket_memory_gib']} GiB "
        f"of sockets at {args.memory_headroom:.0%}), socket limit {p['for_sockets']} ({args.max_sockets_per_pod:,} per pod): "
        f"{p['sockets_per_pod']:,} sockets each |",
        f"| shard subscriptions | {s['subscriptions']:,} | a room is subscribed once by every pod that holds one of its members |",
        f"| pub/sub pushes | {s['pushes_per_s']:,}/s | one per message and subscribed pod |",
        f"| connections per primary | {s['connections_per_primary']} | a command and a subscriber connection per pod |",
    ]
    if "redis" in result:
        r = result["redis"]
        lines += [
            f"| Redis shards (primaries) | **{r['shards']}**{'' if r['converged'] else ' (no count holds: the busiest shard grows with it)'} | {r['cores']} cores of Redis; the busiest shard has "
            f"{r['busiest_over_mean']}x the mean (simulated) and may use {args.redis_core_budget:.0%} of a core; "
            f"{r['subscriptions_per_primary']:,} subscriptions each |",
            f"| the largest room | {h['members']:,} members, {h['messages_per_s']:,} messages/s | {r['hot_room_us_per_message']} µs "
            f"of its primary per message: one room can send at most {r['one_room_max_messages_per_s']:,} messages/s; "
            f"it owes each pod {h['deliveries_per_s_per_pod']:,} deliveries/s |",
        ]
    lines += [
        "",
        "How rooms spread over shards: each shard's messages (every member sending at the same rate) "
        "against the mean, for rooms of even size and for the Zipf sizes above:",
        "",
        "| shards | even: busiest / mean | even: quietest / mean | Zipf: busiest / mean | Zipf: quietest / mean |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['shards']} | {row['even']['max_over_mean']} | {row['even']['min_over_mean']} | "
        f"{row['zipf']['max_over_mean']} | {row['zipf']['min_over_mean']} |"
        for row in skew
    ]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "artifacts/bench/report.json")
    parser.add_argument("--sockets", type=int, default=1_000_000)
    parser.add_argument("--rooms", type=int, default=100_000)
    parser.add_argument("--messages-per-socket-per-minute", type=float, default=1.0)
    parser.add_argument("--pod-cores", type=float, default=2.0)
    parser.add_argument("--pod-memory-gib", type=float, default=2.0)
    parser.add_argument("--max-sockets-per-pod", type=int, default=20_000, help="CHAT_MAX_SOCKETS_PER_WORKER times workers")
    parser.add_argument("--cpu-headroom", type=float, default=0.6, help="share of a pod's CPU planned for")
    parser.add_argument("--memory-headroom", type=float, default=0.6, help="share of a pod's memory planned for sockets")
    parser.add_argument("--redis-core-budget", type=float, default=0.5, help="share of a core planned per primary")
    parser.add_argument("--zipf", type=float, default=1.0, help="room-size exponent")
    parser.add_argument("--largest-room", type=int, default=5000, help="members of the largest room")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def small_end(costs, report):
    """The model against runs it was not fitted on: worker cores predicted and used, per run of this report."""
    rows = []
    for label, run in (
        ("1,000-member room", report["backends"]["redis-cluster"].get("big_room")),
        *(
            (f"scale curve {curve}, x={p['x']}", p)
            for curve, c in (report.get("curves") or {}).get("redis-cluster", {}).items()
            for p in c["points"]
        ),
    ):
        if run and run.get("server_cpu_percent") and run.get("achieved_per_s"):
            rows.append(
                {
                    "run": label,
                    "deliveries_per_s": run["achieved_per_s"],
                    "predicted_cores": round(run["achieved_per_s"] * costs["worker_cpu_us_per_delivery"] / 1e6, 3),
                    "used_cores": round(sum(run["server_cpu_percent"]) / 100, 3),
                }
            )
    return rows


def spublish_check(report, args=None):
    """The model's Redis cost per subscribed worker against SPUBLISH measured alone (loadtest/spublish_cost.py),
    and the 1,000,000-socket plan's Redis cores and shards under each; None without both measurements."""
    direct = report.get("spublish")
    args = args or parse([])
    costs = measured_costs(report)
    if not direct or costs["redis_us_per_subscriber_fitted"] is None or costs["redis_us_per_send"] is None:
        return None
    sizes = zipf_rooms(args.rooms, args.sockets, args.zipf, args.largest_room, random.Random(args.seed))
    fitted = {**costs, "redis_us_per_subscriber": costs["redis_us_per_subscriber_fitted"]}
    model, checked = plan(fitted, sizes, args)["redis"], plan(costs, sizes, args)["redis"]
    return {
        "model_us_per_subscriber": costs["redis_us_per_subscriber_fitted"],
        "spublish_us_per_subscriber": direct["us_per_subscriber"],
        "spublish_us_per_publish": direct["us_per_publish"],
        "sockets": args.sockets,
        "redis_cores": {"model": model["cores"], "with_spublish": checked["cores"]},
        "shards": {"model": model["shards"], "with_spublish": checked["shards"]},
    }


def spublish_lines(check):
    if not check:
        return []
    return [
        "",
        f"Checked against SPUBLISH measured alone (one shard channel, subscribers that read everything, the node's CPU "
        f"per publish: {', '.join(f'{k} subscribers {v} µs' for k, v in check['spublish_us_per_publish'].items())}): "
        f"{check['spublish_us_per_subscriber']} µs per subscriber, against the model's {check['model_us_per_subscriber']} µs "
        f"per subscribed worker fitted on whole group_sends. For {check['sockets']:,} sockets the fitted figure plans "
        f"{check['redis_cores']['model']} Redis cores on {check['shards']['model']} shards; the direct one, which the plan "
        f"above uses, {check['redis_cores']['with_spublish']} cores on {check['shards']['with_spublish']} shards.",
        "",
    ]


def section(report, args=None):
    """The model for a benchmark report: (its numbers, its markdown)."""
    args = args or parse([])
    costs = measured_costs(report)
    rng = random.Random(args.seed)
    distributions = {
        "even": [args.sockets // args.rooms] * args.rooms,
        "zipf": zipf_rooms(args.rooms, args.sockets, args.zipf, args.largest_room, rng),
    }
    result = plan(costs, distributions["zipf"], args)
    skew = [
        {"shards": shards, **{name: spread(sizes, shards) for name, sizes in distributions.items()}}
        for shards in (3, 6, 12, 24, 48)
    ]
    checks = small_end(costs, report)
    text = markdown(costs, result, skew, args)
    if checks:
        text += (
            "\n".join(
                [
                    "",
                    "Checked at the small end, on this run's other parts (worker cores the model predicts from the "
                    "deliveries, against the cores the workers used):",
                    "",
                    "| run | deliveries/s | predicted cores | used cores |",
                    "| --- | --- | --- | --- |",
                    *(f"| {c['run']} | {c['deliveries_per_s']:,} | {c['predicted_cores']} | {c['used_cores']} |" for c in checks),
                ]
            )
            + "\n"
        )
    check = spublish_check(report, args)
    text += "\n".join(spublish_lines(check))
    return {"costs": costs, **result, "skew": skew, "small_end": checks, "spublish_check": check}, text


def main(argv=None):
    args = parse(argv)
    _, text = section(json.loads(args.report.read_text()), args)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
