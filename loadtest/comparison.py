"""The chat against what a team would pick instead, side by side in one run: Socket.IO and nchan.

Every system gets 3 server processes and a 6-node Redis Cluster of its own (the bare one-process app
none: it is the floor, what one process pays with no layer), the same rooms and the same load client.
Per room shape it measures:

- **server CPU per delivery** at one fixed offered load: the CPU of every process of the system (its
  server processes and its Redis nodes) from the first send to the last delivery counted, over the
  frames delivered; each system ``repeats`` times, the systems alternating, the median run reported.
  The load client's own CPU per delivery is measured the same way, so a reader sees it is not the
  bottleneck.
- **the sustainable rate**: steps of rising offered load, each step run ``repeats`` times on every
  system still passing, alternating, before the next step (so no system gets a quieter machine), the
  median run deciding, until each fails (100% delivered and p99 <= 100 ms to pass).

The chat runs as shipped: room history and presence on, v1 members; at 50 members also a room whose
v1 and v2 members alternate, to show the mixed room costs what a plain one does. Its cost is measured with
room history off too (cost runs only, no steps): Socket.IO's adapter keeps no room messages, and nchan
keeps them (500 for 5 minutes here, as the chat) but publishes without waiting for a replica, so the
difference is what the chat's history costs and the rest what its own path costs against theirs.
"""

import asyncio
from contextlib import ExitStack

from channels_redis_cluster.testing import LocalCluster
from loadtest.benchload import Load
from loadtest.peers import NchanStack, SocketIOStack, install
from loadtest.profiling import profile
from loadtest.stacks import Stack

# (rooms, members, offered deliveries/s for the cost, steps of offered deliveries/s for the sustainable rate).
# The cost's load is one every system keeps up with while all of them are up on these 2 cores (their 18
# Redis nodes alone take about a third of a core at rest): a saturated machine would measure its queues.
SHAPES = [
    (500, 2, 1000, [250, 500, 1000, 1500, 2000, 3000, 4000, 6000]),
    (100, 5, 2000, [500, 1000, 2000, 3000, 4000, 6000, 8000, 10000]),
    (10, 50, 10000, [2000, 5000, 10000, 15000, 20000, 30000, 40000, 60000]),
    # A message to 1,000 members is 1,000 writes by one process and 1,000 reads by the client: its
    # p99 is that burst, so the steps start at one message a second.
    (1, 1000, 10000, [1000, 2000, 5000, 10000, 20000, 40000]),
]
IDLE_SECONDS = 3.0  # how long each system's CPU at rest is measured, its rooms joined
SYSTEMS = {
    "chat": "this chat (history, presence on)",
    "chat-mixed": "this chat, v1 and v2 members alternating",
    "chat-nohistory": "this chat, room history off",
    "socketio": SocketIOStack.label,
    "nchan": NchanStack.label,
    "ceiling": "bare one-process app",
}
MIXED_AT = 50  # the room size at which the mixed room is measured too
COST_ONLY = {"chat-nohistory"}  # measured for the cost, not stepped to a sustainable rate


def smoke_shapes():
    """A second of every system, for CI."""
    return [(4, 2, 200, [200]), (1, 50, 500, [500])]


def systems_for(members):
    return [name for name in SYSTEMS if name != "chat-mixed" or members == MIXED_AT]


def _start(name, clusters, redis_port, args):
    """The stack of system ``name``."""
    if name == "socketio":
        return SocketIOStack(clusters["socketio"])
    if name == "nchan":
        return NchanStack(clusters["nchan"])
    if name == "ceiling":
        return Stack("ceiling", clusters["chat"], redis_port, ws=args.ws, workers=1)
    if name == "chat-nohistory":
        return Stack("redis-cluster-nohistory", clusters["chat"], redis_port, ws=args.ws)
    return Stack("redis-cluster", clusters["chat"], redis_port, ws=args.ws)


def _passes(step, limit_ms):
    return step["delivered_ratio"] == 1.0 and step["p99_ms"] is not None and step["p99_ms"] <= limit_ms


def _cell(step):
    keep = (
        "offered_per_s",
        "delivered_ratio",
        "achieved_per_s",
        "p50_ms",
        "p99_ms",
        "system_us_per_delivery",
        "redis_us_per_delivery",
        "client_us_per_delivery",
        "server_cpu_percent",
        "client_cpu_percent",
    )
    return {key: step[key] for key in keep}


async def compare(chat_cluster, redis_port, args, shapes, repeats, limit_ms, out_dir):
    """Every shape on every system: {"<rooms>x<members>": {system: {cost, steps, sustainable}}}."""
    install()
    results = {}
    with LocalCluster() as socketio_cluster, LocalCluster() as nchan_cluster:
        clusters = {"chat": chat_cluster, "socketio": socketio_cluster, "nchan": nchan_cluster}
        for rooms, members, cost_rate, steps in shapes:
            names = systems_for(members)
            shape = results[f"{rooms}x{members}"] = {
                "rooms": rooms,
                "members": members,
                "cost_rate": cost_rate,
                "p99_limit_ms": limit_ms,
                "systems": {},
            }
            with ExitStack() as running:
                loads = {}
                for name in names:
                    stack = _start(name, clusters, redis_port, args)
                    running.callback(stack.close)
                    load = loads[name] = Load(stack, args.client_processes)
                    running.callback(load.shutdown)
                    subprotocol = "mixed" if name == "chat-mixed" else None
                    # Rooms named by shape: nchan keeps a room's messages in the cluster across shapes.
                    await load.add_rooms(
                        [(f"cmp{rooms}x{members}-{index}", members) for index in range(rooms)], subprotocol=subprotocol
                    )
                for name in names:
                    shape["systems"][name] = {
                        "idle_cpu_percent": await loads[name].idle_cpu_percent(args.step_seconds if args.smoke else IDLE_SECONDS),
                        "steps": [],
                        "sustainable": None,
                    }
                runs = {name: [] for name in names}
                for _ in range(repeats):
                    for name in names:
                        runs[name].append(await loads[name].run_step("cost", cost_rate, args.step_seconds))
                for name in names:
                    found = shape["systems"][name]
                    measured = sorted(runs[name], key=lambda run: run["system_us_per_delivery"] or float("inf"))
                    median_run = measured[len(measured) // 2]
                    found["cost"] = _cell(median_run)
                    # What the messages cost beyond the system's CPU at rest over the same time.
                    above_idle = median_run["system_cpu_seconds"] - found["idle_cpu_percent"] / 100 * median_run["window_seconds"]
                    found["cost"]["above_idle_us_per_delivery"] = (
                        round(1e6 * above_idle / median_run["delivered"], 1) if median_run["delivered"] else None
                    )
                    found["cost_runs"] = [run["system_us_per_delivery"] for run in runs[name]]
                    print(f"  {rooms}x{members} {name} at {cost_rate}/s: {found['cost']}", flush=True)
                if args.profile:
                    # Where the chat's CPU goes at this shape: py-spy on its busiest worker through one more run.
                    busiest = int(loads["chat"].sockets_per_worker().most_common(1)[0][0].rpartition(":")[2])
                    profiling = asyncio.get_running_loop().run_in_executor(None, profile, busiest, args.step_seconds, out_dir)
                    await loads["chat"].run_step("profile", cost_rate, args.step_seconds)
                    shape["systems"]["chat"]["profile"] = await profiling
                stepping = [name for name in names if name not in COST_ONLY]
                for rate in steps:
                    # Each step ``repeats`` times on every system still passing, alternating; the median run
                    # decides, as in the sustainable steps of the rest of the benchmark (one run's p99 is noisy).
                    tries = {name: [] for name in stepping}
                    for _ in range(repeats):
                        for name in stepping:
                            tries[name].append(_cell(await loads[name].run_step("step", rate, args.step_seconds)))
                    for name in list(stepping):
                        ordered = sorted(tries[name], key=lambda run: (_passes(run, limit_ms), -(run["p99_ms"] or float("inf"))))
                        step = dict(ordered[len(ordered) // 2], runs_passed=sum(_passes(run, limit_ms) for run in ordered))
                        found = shape["systems"][name]
                        found["steps"].append(step)
                        print(f"  {rooms}x{members} {name} step {rate}/s: {step}", flush=True)
                        if _passes(step, limit_ms):
                            found["sustainable"] = step
                        else:
                            stepping.remove(name)
                    if not stepping:
                        break
                for name in names:
                    print(f"  {rooms}x{members} {name} sustainable: {shape['systems'][name]['sustainable']}", flush=True)
    return results


def _ratio(ours, theirs):
    return round(ours / theirs, 2) if ours and theirs else None


def targets(comparison):
    """CPU per delivery at or below Socket.IO's on every shape, at most 1.5x nchan's at 50 members and 2x at 2;
    the load client cheaper per delivery than every server."""
    rows = []
    costs = {
        key: {name: found["cost"]["system_us_per_delivery"] for name, found in shape["systems"].items()}
        for key, shape in comparison.items()
    }
    against_socketio = {key: _ratio(cost.get("chat"), cost.get("socketio")) for key, cost in costs.items()}

    def history_off(cost, peer):
        # What the chat costs without its history, which Socket.IO does not keep and nchan keeps without waiting
        # for a replica: the measured reason a ratio is above its target, or not.
        plain = cost.get("chat-nohistory")
        return f"; room history off: {plain} µs, {_ratio(plain, cost.get(peer))}x" if plain else ""

    rows.append(
        {
            "target": "server CPU per delivery (all server processes and Redis) at or below Socket.IO's on every room shape",
            "measured": "; ".join(
                f"{key}: {cost.get('chat')} µs against {cost.get('socketio')} µs ({against_socketio[key]}x"
                f"{history_off(cost, 'socketio')})"
                for key, cost in costs.items()
            ),
            "met": all(ratio is not None and ratio <= 1.0 for ratio in against_socketio.values()),
        }
    )
    for members, limit in ((50, 1.5), (2, 2.0)):
        keys = [key for key, shape in comparison.items() if shape["members"] == members]
        for key in keys:
            ratio = _ratio(costs[key].get("chat"), costs[key].get("nchan"))
            rows.append(
                {
                    "target": f"server CPU per delivery at most {limit}x nchan's in rooms of {members}",
                    "measured": f"{key}: {costs[key].get('chat')} µs against {costs[key].get('nchan')} µs ({ratio}x"
                    f"{history_off(costs[key], 'nchan')})",
                    "met": ratio is not None and ratio <= limit,
                }
            )
    # The bare app is the floor, one process broadcasting in memory, not a system a team would pick.
    client = {
        (key, name): (found["cost"]["client_us_per_delivery"], found["cost"]["system_us_per_delivery"])
        for key, shape in comparison.items()
        for name, found in shape["systems"].items()
        if name != "ceiling"
    }
    worst = max(client.items(), key=lambda item: (item[1][0] or 0) / (item[1][1] or float("inf")))
    rows.append(
        {
            "target": "the load client costs less CPU per delivery than each system compared (the bare app aside), every shape",
            "measured": f"closest: {worst[0][0]} {SYSTEMS[worst[0][1]]}: client {worst[1][0]} µs against the system's {worst[1][1]} µs",
            "met": all(c is not None and s is not None and c < s for c, s in client.values()),
        }
    )
    # A step a system failed while a client process was near a full core may have failed for the client.
    failed = [
        (key, name, step)
        for key, shape in comparison.items()
        for name, found in shape["systems"].items()
        for step in found["steps"]
        if not _passes(step, shape["p99_limit_ms"])
    ]
    busiest = (
        max((max(step["client_cpu_percent"]), key, name, step["offered_per_s"]) for key, name, step in failed) if failed else None
    )
    rows.append(
        {
            "target": "the load client is not what fails a step: at every failed step each client process under 90% of a core",
            "measured": (
                f"busiest client process at a failed step: {busiest[0]}% of a core ({busiest[1]} {SYSTEMS[busiest[2]]} at "
                f"{busiest[3]:,}/s)"
                if busiest
                else "no step failed"
            ),
            "met": busiest is None or busiest[0] < 90,
        }
    )
    mixed = [(key, costs[key].get("chat-mixed"), costs[key].get("chat")) for key in costs if costs[key].get("chat-mixed")]
    for key, mixed_cost, plain_cost in mixed:
        rows.append(
            {
                "target": "a room of alternating v1 and v2 members costs about what a plain one does (within 1.25x)",
                "measured": f"{key}: {mixed_cost} µs against {plain_cost} µs per delivery ({_ratio(mixed_cost, plain_cost)}x)",
                "met": bool(plain_cost and mixed_cost <= 1.25 * plain_cost),
            }
        )
    return rows


def lines(comparison, repeats, step_seconds):
    """The report's section: per shape, each system's cost and sustainable rate."""
    out = [
        "## Against the systems people pick instead (one run, steps alternating between systems)",
        "",
        f"Each system: 3 server processes and its own 6-node Redis Cluster (the bare app: one process, no Redis). "
        f"Server CPU per delivery counts every server process and every Redis node, from the first send to the "
        f"last delivery, at the shape's fixed offered load ({repeats} run(s) of {step_seconds} s per system, alternating, "
        "the median run). Sustainable: the highest step whose median run delivered 100% with p99 <= 100 ms.",
        "",
        "| rooms x members @ offered/s | " + " | ".join(SYSTEMS.values()) + " |",
        "| --- |" + " --- |" * len(SYSTEMS),
    ]
    for key, shape in comparison.items():
        cells = []
        for name in SYSTEMS:
            found = shape["systems"].get(name)
            if not found:
                cells.append("-")
                continue
            cost, top = found["cost"], found["sustainable"] or {}
            cells.append(
                f"**{cost['system_us_per_delivery']} µs** ({cost['above_idle_us_per_delivery']} above its "
                f"{found['idle_cpu_percent']}% at rest; client {cost['client_us_per_delivery']} µs), "
                f"p50/p99 {cost['p50_ms']}/{cost['p99_ms']} ms, {cost['delivered_ratio']:.2%}; "
                + ("cost only, not stepped" if name in COST_ONLY else f"sustainable {top.get('offered_per_s', 'none')}/s")
            )
        out.append(f"| {key} @ {shape['cost_rate']:,} | " + " | ".join(cells) + " |")
    out += ["", "Where each system's CPU per delivery went at the fixed load: its server processes + its Redis nodes (µs):", ""]
    for key, shape in comparison.items():
        parts = [
            f"{SYSTEMS[name]} {split[0]:.0f} + {split[1]:.0f}"
            for name, found in shape["systems"].items()
            if (split := _servers_and_redis(found)) is not None
        ]
        out.append(f"- {key}: " + "; ".join(parts))
        prof = shape["systems"].get("chat", {}).get("profile") or {}
        if prof.get("inclusive"):
            out.append(
                f"  - the chat's busiest worker (py-spy, {prof['samples']} samples): with each function on the stack "
                + ", ".join(f"`{name}` {share}%" for name, share in prof["inclusive"][:8])
                + "; leaf functions "
                + ", ".join(f"`{name}` {share}%" for name, share in prof["leaf_functions"][:5])
            )
    history = list(history_cost_lines(comparison))
    if history:
        out += [
            "",
            "What room history costs (this chat with it on, as shipped, minus the same chat with it off): the write, "
            "the wait for the replica and the publish after it. Socket.IO's adapter keeps no room messages; nchan keeps "
            "them, publishing without waiting for a replica. Workers + Redis, µs per delivery:",
            "",
            *history,
        ]
    per_message = fit_per_message(comparison)
    if per_message:
        out += [
            "",
            "Server CPU per delivery fitted as per recipient + per message / members (least squares over the "
            "shapes, relative error): "
            + "; ".join(
                f"{SYSTEMS[name]} {fit['per_recipient_us']} µs + {fit['per_message_us']} µs / members"
                for name, fit in per_message.items()
            ),
        ]
    return [*out, ""]


def _servers_and_redis(found):
    """A system's CPU per delivery at the fixed load as (its server processes, its Redis nodes) in µs; None for
    a run that delivered nothing."""
    cost = found["cost"]
    if cost["system_us_per_delivery"] is None or cost["redis_us_per_delivery"] is None:
        return None
    return cost["system_us_per_delivery"] - cost["redis_us_per_delivery"], cost["redis_us_per_delivery"]


def history_cost_lines(comparison):
    """Per shape: the chat's cost with room history less its cost without, split into workers and Redis."""
    for key, shape in comparison.items():
        systems = shape["systems"]
        if not {"chat", "chat-nohistory"} <= set(systems):
            continue
        shipped, plain = _servers_and_redis(systems["chat"]), _servers_and_redis(systems["chat-nohistory"])
        if shipped is None or plain is None:
            continue
        (workers, redis), (plain_workers, plain_redis) = shipped, plain
        yield (
            f"- {key}: {workers - plain_workers:.1f} + {redis - plain_redis:.1f} "
            f"({(workers + redis - plain_workers - plain_redis) / (workers + redis):.0%} of the chat's cost)"
        )


def fit_per_message(comparison):
    """Per system: CPU per delivery split into a part per recipient and a part per message (µs)."""
    import numpy

    fits = {}
    for name in SYSTEMS:
        points = [
            (shape["members"], shape["systems"][name]["cost"]["system_us_per_delivery"])
            for shape in comparison.values()
            if name in shape["systems"]
        ]
        points = [(members, cost) for members, cost in points if cost]
        if len({members for members, _ in points}) < 2:
            continue
        costs = [cost for _, cost in points]
        slope, intercept = numpy.polyfit([1 / members for members, _ in points], costs, 1, w=[1 / c for c in costs])
        fits[name] = {"per_recipient_us": round(float(intercept), 1), "per_message_us": round(float(slope), 1)}
    return fits
