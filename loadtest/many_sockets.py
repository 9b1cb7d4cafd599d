"""What one machine holds: 100,000 concurrent sockets over 10,000 rooms, with rooms that talk beside them.

The chat as shipped (history and presence on) with enough workers for this machine's limit of 20,000
descriptors a process, and the load client spread over processes that each connect from their own
127.0.0.x (one source address has 28,000 ports to a server port). Measured, in order:

1. opening every socket, at most ``CONCURRENCY`` handshakes in flight per client process: how many opened,
   how many were refused (by error), handshakes a second, and the workers' RSS per socket;
2. 10 rooms of 50 talking at 10,000 deliveries/s beside them: delivered ratio and p99;
3. a reconnect storm: every idle socket closes at once and connects again; handshakes a second;
4. every line the workers logged at ERROR or above (none is the target).
"""

import math
import tempfile
import time
from pathlib import Path

from loadtest.benchload import Load
from loadtest.stacks import Stack

# Sockets per worker and per client process, under the 20,000 descriptors a process may hold here with
# room for the worker's Redis connections (one per node and its subscriptions) and the client's pipes.
SOCKETS_PER_WORKER = 14000
SOCKETS_PER_CLIENT = 16000
# Handshakes in flight per client process: with 7 of them, 1,400 at once, below gunicorn's listen backlog
# of 2,048, so no SYN waits a second to be sent again.
CONCURRENCY = 200
TALKING = [(f"talk-{index}", 50) for index in range(10)]
TALKING_DELIVERIES_PER_S = 10000


def fd_count(pid):
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _opening(results):
    """One figure from every client process's hold()/rehold(): all processes run at once."""
    opened = sum(r["opened"] for r in results)
    refused = {}
    for result in results:
        for error, count in result["refused"].items():
            refused[error] = refused.get(error, 0) + count
    seconds = max(r["seconds"] for r in results)
    return {"opened": opened, "refused": refused, "seconds": seconds, "handshakes_per_s": round(opened / seconds)}


def _errors(log_path):
    return [
        line
        for line in Path(log_path).read_text(errors="replace").splitlines()
        if '"level": "ERROR"' in line or '"level": "CRITICAL"' in line
    ]


async def measure(cluster, redis_port, sockets, rooms, step_seconds):
    """The four measurements above for ``sockets`` idle sockets in ``rooms`` rooms."""
    workers = max(2, math.ceil(sockets / SOCKETS_PER_WORKER))
    clients = max(2, math.ceil(sockets / SOCKETS_PER_CLIENT))
    size = sockets // rooms
    with tempfile.NamedTemporaryFile("w+", prefix="many-sockets-", suffix=".log") as log:
        stack = Stack(
            "redis-cluster",
            cluster,
            redis_port,
            workers=workers,
            # The shipped limit (10,000 a worker) would refuse the last ones on workers this full.
            settings={"CHAT_MAX_SOCKETS_PER_WORKER": str(SOCKETS_PER_WORKER + 2000)},
            log=log,
        )
        load = None
        try:
            load = Load(stack, clients, own_source_addresses=True)
            rss_before = stack.rss_kib()
            plan = [([(f"idle-{room}", size) for room in range(index, rooms, clients)], CONCURRENCY) for index in range(clients)]
            opening = _opening(await load._all("hold", *plan))
            rss_per_socket = round((stack.rss_kib() - rss_before) / max(1, opening["opened"]), 2)
            descriptors = sorted(fd_count(pid) for pid in stack.worker_pids())
            await load.add_rooms(TALKING)
            talking = await load.run_step("beside-idle", TALKING_DELIVERIES_PER_S, step_seconds)
            started = time.perf_counter()
            storm = _opening(await load._all("rehold", *[(CONCURRENCY,)] * clients))
            storm["seconds_to_all_open"] = round(time.perf_counter() - started, 3)
            closed_since = sum(await load._all("held_closed"))
            return {
                "sockets": sockets,
                "rooms": rooms,
                "workers": workers,
                "client_processes": clients,
                "opening": opening,
                "rss_kib_per_socket": rss_per_socket,
                "descriptors_per_worker": descriptors,
                "talking": {
                    "rooms": len(TALKING),
                    "members": TALKING[0][1],
                    "offered_per_s": TALKING_DELIVERIES_PER_S,
                    "delivered_ratio": talking["delivered_ratio"],
                    "achieved_per_s": talking.get("achieved_per_s"),
                    "p99_ms": talking["p99_ms"],
                },
                "storm": storm,
                "closed_by_server_after_storm": closed_since,
                "errors_logged": _errors(log.name)[:20],
            }
        finally:
            if load is not None:
                load.shutdown()
            stack.close()


def targets(found, sockets_target=100000, storm_target=1500, p99_limit_ms=100):
    """The targets of this part, each met or not, with what was measured."""
    opening, talking, storm = found["opening"], found["talking"], found["storm"]
    return [
        {
            "target": f"{sockets_target:,} concurrent sockets on this machine, all opened, none refused",
            "met": found["sockets"] >= sockets_target and opening["opened"] == found["sockets"] and not opening["refused"],
            "measured": f"{opening['opened']:,} of {found['sockets']:,} opened, refused {opening['refused'] or 0}",
        },
        {
            "target": f"beside them, 10 rooms of 50 at 10,000 deliveries/s: 100% delivered, p99 <= {p99_limit_ms} ms",
            "met": talking["delivered_ratio"] == 1.0 and talking["p99_ms"] is not None and talking["p99_ms"] <= p99_limit_ms,
            "measured": f"{100 * talking['delivered_ratio']:.3f}% delivered, p99 {talking['p99_ms']} ms",
        },
        {
            "target": f"a reconnect storm of all of them at >= {storm_target:,} handshakes/s, none refused",
            "met": storm["handshakes_per_s"] >= storm_target and storm["opened"] == found["sockets"] and not storm["refused"],
            "measured": f"{storm['handshakes_per_s']:,}/s ({storm['opened']:,} in {storm['seconds']} s), refused {storm['refused'] or 0}",
        },
        {
            "target": "nothing logged at ERROR",
            "met": not found["errors_logged"],
            "measured": f"{len(found['errors_logged'])} lines",
        },
    ]


def lines(found):
    """The report's section."""
    opening, talking, storm = found["opening"], found["talking"], found["storm"]
    return [
        f"## {found['sockets']:,} sockets on one machine ({found['rooms']:,} rooms of {found['sockets'] // found['rooms']}, "
        f"{found['workers']} workers, {found['client_processes']} client processes)",
        "",
        "| measured | value |",
        "| --- | --- |",
        f"| opened / refused | {opening['opened']:,} / {sum(opening['refused'].values()):,} |",
        f"| opening: handshakes/s | {opening['handshakes_per_s']:,} ({opening['seconds']} s) |",
        f"| worker RSS per socket | {found['rss_kib_per_socket']} KiB |",
        f"| descriptors per worker | {', '.join(f'{n:,}' for n in found['descriptors_per_worker'])} |",
        f"| beside them: 10 rooms of 50 at {talking['offered_per_s']:,} deliveries/s | "
        f"{100 * talking['delivered_ratio']:.3f}% delivered, p99 {talking['p99_ms']} ms |",
        f"| reconnect storm of all: handshakes/s | {storm['handshakes_per_s']:,} ({storm['opened']:,} in {storm['seconds']} s, "
        f"refused {sum(storm['refused'].values()):,}) |",
        f"| closed by the server after the storm | {found['closed_by_server_after_storm']:,} |",
        f"| lines logged at ERROR | {len(found['errors_logged'])} |",
        "",
    ]
