"""What one machine holds: 100,000 concurrent sockets over 10,000 rooms, with rooms that talk beside them.

The chat as shipped (history and presence on) with enough workers for this machine's limit of 20,000
descriptors a process, and the load client spread over processes that each connect from their own
127.0.0.x (one source address has 28,000 ports to a server port). Measured, in order:

1. opening every socket, at most ``CONCURRENCY`` handshakes in flight per client process: how many opened,
   how many were refused (by error), handshakes a second, and the workers' RSS per socket;
2. 10 rooms of 50 talking at 10,000 deliveries/s beside them: delivered ratio and p99;
3. a reconnect storm: every idle socket closes at once and connects again; handshakes a second;
4. every line the workers logged at ERROR or above, their stop at the end included, and workers gunicorn
   replaced (none is the target);
   the workers' whole log is kept in the temporary directory (``workers_log``);
5. the opening and the storm again with the bare app on the same workers and load client: what the machine
   itself allows, so a rate the chat misses is told apart from one no server here reaches.
"""

import asyncio
import math
import tempfile
import time
from pathlib import Path

from loadtest.benchload import Load, cpu_seconds
from loadtest.stacks import Stack

# Sockets per worker and per client process, under the 20,000 descriptors a process may hold here with
# room for the worker's Redis connections (one per node and its subscriptions) and the client's pipes.
# As few processes as that allows: on 2 cores, 40,000 sockets opened at 1,067 handshakes/s on 3 workers
# and at 850/s on 8, and the rooms beside them had p99 34 ms against 61 ms.
SOCKETS_PER_WORKER = 17000
SOCKETS_PER_CLIENT = 18000
# Handshakes in flight per client process: with 6 of them, 1,200 at once, below gunicorn's listen backlog
# of 2,048, so no SYN waits a second to be sent again.
CONCURRENCY = 200
# The workers at rest with 100,000 sockets open (pings every 20 s, lease renewals) use about this much.
SETTLED_BELOW_PERCENT = 40
# The shipped limit (10,000 a worker) would refuse the last ones on workers this full.
SETTINGS = {"CHAT_MAX_SOCKETS_PER_WORKER": str(SOCKETS_PER_WORKER + 2000), "ACCEPT_BALANCE": "true"}
TALKING = [(f"talk-{index}", 50) for index in range(10)]
TALKING_DELIVERIES_PER_S = 10000


def fd_count(pid):
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class Spent:
    """CPU spent from now on by the workers, the Redis nodes and the load client, per handshake."""

    def __init__(self, stack, load):
        self.parts = {
            "workers": [stack.process.pid, *stack.worker_pids()],
            "redis": stack.redis_pids,
            "client": [process.pid for process in load.processes],
        }
        self.before = {part: sum(map(cpu_seconds, pids)) for part, pids in self.parts.items()}

    def per(self, handshakes):
        return {
            f"{part}_us_per_handshake": round(1e6 * (sum(map(_cpu_if_alive, pids)) - self.before[part]) / max(1, handshakes))
            for part, pids in self.parts.items()
        }


def _cpu_if_alive(pid):
    """A process's CPU seconds; 0 for one that has ended (a replaced worker, reported as such)."""
    try:
        return cpu_seconds(pid)
    except FileNotFoundError:
        return 0.0


async def settle(stack, busy_percent=SETTLED_BELOW_PERCENT, limit=60.0):
    """Wait until the workers' CPU over a second is below ``busy_percent`` of a core in all (what the opening
    left them to do: subscriptions, collections); the seconds it took, or ``limit`` when it never was."""
    pids, started = stack.worker_pids(), time.perf_counter()
    while time.perf_counter() - started < limit:
        before, window = sum(map(cpu_seconds, pids)), time.perf_counter()
        await asyncio.sleep(1.0)  # the window the CPU is measured over
        if 100 * (sum(map(cpu_seconds, pids)) - before) / (time.perf_counter() - window) < busy_percent:
            break
    return round(time.perf_counter() - started, 1)


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


def _plan(sockets, rooms, clients):
    """Each client process's idle rooms, and the handshakes it keeps in flight."""
    size = sockets // rooms
    return [([(f"idle-{room}", size) for room in range(index, rooms, clients)], CONCURRENCY) for index in range(clients)]


async def _open(stack, load, sockets, rooms, clients):
    """Every idle socket opened: how many, refused by error, handshakes a second, with what they cost."""
    spent = Spent(stack, load)
    opening = _opening(await load._all("hold", *_plan(sockets, rooms, clients)))
    opening.update(spent.per(opening["opened"]))
    return opening


async def _storm(stack, load, clients):
    """Every idle socket closes at once and connects again: handshakes a second, with what they cost."""
    started, spent = time.perf_counter(), Spent(stack, load)
    storm = _opening(await load._all("rehold", *[(CONCURRENCY,)] * clients))
    storm.update(spent.per(storm["opened"]))
    storm["seconds_to_all_open"] = round(time.perf_counter() - started, 3)
    return storm


def _processes(sockets):
    """Workers and client processes for ``sockets``: as few as the descriptor limit allows, at least 2 of each."""
    return max(2, math.ceil(sockets / SOCKETS_PER_WORKER)), max(2, math.ceil(sockets / SOCKETS_PER_CLIENT))


async def measure(cluster, redis_port, sockets, rooms, step_seconds):
    """The five measurements above for ``sockets`` idle sockets in ``rooms`` rooms."""
    workers, clients = _processes(sockets)
    with tempfile.NamedTemporaryFile("w+", prefix="many-sockets-", suffix=".log", delete=False) as log:
        stack = Stack(
            "redis-cluster",
            cluster,
            redis_port,
            workers=workers,
            settings=SETTINGS,
            log=log,
        )
        load = None
        try:
            load = Load(stack, clients, own_source_addresses=True)
            rss_before, first_workers = stack.rss_kib(), set(stack.worker_pids())
            opening = await _open(stack, load, sockets, rooms, clients)
            rss_per_socket = round((stack.rss_kib() - rss_before) / max(1, opening["opened"]), 2)
            descriptors = sorted(fd_count(pid) for pid in stack.worker_pids())
            await load.add_rooms(TALKING)
            settled_after = await settle(stack)
            talking = await load.run_step("beside-idle", TALKING_DELIVERIES_PER_S, step_seconds)
            storm = await _storm(stack, load, clients)
            closed_since = sum(await load._all("held_closed"))
            found = {
                "sockets": sockets,
                "rooms": rooms,
                "workers": workers,
                "client_processes": clients,
                "opening": opening,
                "rss_kib_per_socket": rss_per_socket,
                "descriptors_per_worker": descriptors,
                "seconds_to_settle": settled_after,
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
                "workers_replaced": len(first_workers - set(stack.worker_pids())),
                "workers_log": log.name,
            }
        finally:
            if load is not None:
                load.shutdown()
            stack.close()
    # Read once the workers have stopped: a stop that cannot finish its clean-ups is where errors showed.
    errors = _errors(log.name)
    found["error_lines"], found["errors_logged"] = len(errors), errors[:20]
    found["bare"] = await measure_bare(cluster, redis_port, sockets, rooms)
    return found


async def measure_bare(cluster, redis_port, sockets, rooms):
    """The opening and the storm again with the bare app (``loadtest.ceiling``: no Django, no channel layer,
    no Redis) on the same workers and the same load client: what this machine gives a server that does
    nothing with a socket, the bound on what the chat can reach here. No rooms talk beside them (the bare app
    fans out within one process only), so its storm follows its opening at once."""
    workers, clients = _processes(sockets)
    stack = Stack("ceiling", cluster, redis_port, workers=workers, settings=SETTINGS)
    load = None
    try:
        load = Load(stack, clients, own_source_addresses=True)
        opening = await _open(stack, load, sockets, rooms, clients)
        return {"opening": opening, "storm": await _storm(stack, load, clients)}
    finally:
        if load is not None:
            load.shutdown()
        stack.close()


def targets(found, sockets_target=100000, storm_target=1500, p99_limit_ms=100):
    """The targets of this part, each met or not, with what was measured."""
    opening, talking, storm, bare = found["opening"], found["talking"], found["storm"], found.get("bare")
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
            "measured": f"{storm['handshakes_per_s']:,}/s ({storm['opened']:,} in {storm['seconds']} s), refused {storm['refused'] or 0}"
            + (f"; the bare app on the same workers and client: {bare['storm']['handshakes_per_s']:,}/s" if bare else ""),
        },
        {
            "target": "nothing logged at ERROR, no worker replaced",
            "met": not found["error_lines"] and not found["workers_replaced"],
            "measured": f"{found['error_lines']:,} lines, {found['workers_replaced']} workers replaced",
        },
    ]


def lines(found):
    """The report's section."""
    opening, talking, storm, bare = found["opening"], found["talking"], found["storm"], found.get("bare")
    return [
        f"## {found['sockets']:,} sockets on one machine ({found['rooms']:,} rooms of {found['sockets'] // found['rooms']}, "
        f"{found['workers']} workers, {found['client_processes']} client processes)",
        "",
        "| measured | value |",
        "| --- | --- |",
        f"| opened / refused | {opening['opened']:,} / {sum(opening['refused'].values()):,} |",
        f"| opening: handshakes/s | {opening['handshakes_per_s']:,} ({opening['seconds']} s) |",
        f"| opening: CPU µs per handshake, workers / Redis / load client | {_spent(opening)} |",
        f"| worker RSS per socket | {found['rss_kib_per_socket']} KiB |",
        f"| descriptors per worker | {', '.join(f'{n:,}' for n in found['descriptors_per_worker'])} |",
        f"| beside them: 10 rooms of 50 at {talking['offered_per_s']:,} deliveries/s | "
        f"{100 * talking['delivered_ratio']:.3f}% delivered, p99 {talking['p99_ms']} ms |",
        f"| reconnect storm of all: handshakes/s | {storm['handshakes_per_s']:,} ({storm['opened']:,} in {storm['seconds']} s, "
        f"refused {sum(storm['refused'].values()):,}) |",
        f"| storm: CPU µs per handshake (its closes included), workers / Redis / load client | {_spent(storm)} |",
        f"| closed by the server after the storm | {found['closed_by_server_after_storm']:,} |",
        *(_bare_lines(opening, storm, bare) if bare else []),
        f"| lines logged at ERROR / workers replaced | {found['error_lines']:,} / {found['workers_replaced']} |",
        "",
    ]


def _bare_lines(opening, storm, bare):
    """Rows of the bare app's opening and storm (reports from before it was measured have none)."""
    return [
        f"| the bare app (no Django, no layer, no Redis) on the same workers and client: opening / storm handshakes/s | "
        f"{bare['opening']['handshakes_per_s']:,} / {bare['storm']['handshakes_per_s']:,} "
        f"(the chat: {_share(opening, bare['opening'])} / {_share(storm, bare['storm'])}) |",
        f"| the bare app's CPU µs per handshake, workers / load client: opening / storm | "
        f"{bare['opening']['workers_us_per_handshake']:,} / {bare['opening']['client_us_per_handshake']:,}; "
        f"{bare['storm']['workers_us_per_handshake']:,} / {bare['storm']['client_us_per_handshake']:,} |",
    ]


def _share(chat, bare):
    return f"{100 * chat['handshakes_per_s'] / max(1, bare['handshakes_per_s']):.0f}%"


def _spent(phase):
    return " / ".join(f"{phase[f'{part}_us_per_handshake']:,}" for part in ("workers", "redis", "client"))
