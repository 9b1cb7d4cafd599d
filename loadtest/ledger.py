"""Who was in which room when, what was sent, what arrived: the facts a fan-out verdict is computed from.

Every Locust process keeps a Ledger. Workers hand their new records to the master with each stats
report (`drain`/`merge`); the master (or a lone local runner) computes the verdict at the end.
A member is expected to receive a message when it joined the room before the message was sent and
stayed at least `leave_grace` seconds after: the server adds a socket to its group before it accepts
the handshake, so a socket that is open when a message is sent must get it. A member that resumes
(chat.v2 `since`/`epoch`) stays the same member across its sockets, so it is owed every message sent
while it was away too.
"""

import csv
import json
import math
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from socket import gethostname

RECORDS = ("joins", "leaves", "sends", "receipts", "recoveries", "cpu", "horizons")
# A generator process this busy delays its own reads: the latencies it measures are its own, not the server's.
SATURATED_CPU_PERCENT = 90.0


class Ledger:
    """Records of one process: joins, leaves, sends and receipts."""

    def __init__(self):
        self.joins = []  # (member, room, joined_at, served_by, generator process)
        self.leaves = []  # (member, left_at)
        self.sends = []  # (nonce, room, sent_at, member)
        self.receipts = []  # (nonce, member, received_at)
        self.recoveries = []  # (member, recovered): how each resume of a member ended
        self.cpu = []  # (generator process, percent of one core): the load generators' own CPU, sampled
        # (generator process, time): when it handed over its records; later ones may never reach the master
        self.horizons = []

    def join(self, member, room, served_by):
        self.joins.append((member, room, time.time(), served_by, generator()))

    def leave(self, member):
        self.leaves.append((member, time.time()))

    def send(self, nonce, room, member, sent_at):
        self.sends.append((nonce, room, sent_at, member))

    def receive(self, nonce, member, received_at):
        self.receipts.append((nonce, member, received_at))

    def recovered(self, member, recovered):
        self.recoveries.append((member, recovered))

    def cpu_sample(self, process, percent):
        self.cpu.append((process, percent))

    def drain(self):
        """The records gathered since the last drain, as plain lists (for the report to the master)."""
        self.horizons.append((generator(), time.time()))
        records = {name: getattr(self, name) for name in RECORDS}
        for name in RECORDS:
            setattr(self, name, [])
        return records

    def merge(self, records):
        """Add a worker's drained records."""
        for name in RECORDS:
            getattr(self, name).extend(tuple(record) for record in records.get(name, ()))


def generator():
    """This load-generating process, as the verdict names it."""
    return f"{gethostname()}:{os.getpid()}"


def percentile(values, fraction):
    """The `fraction` percentile (nearest rank) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)], 3)


def verdict(ledger, leave_grace, max_p99_ms, ended_at=None):
    """The run's outcome: counts, cross-worker share, latency percentiles, and why it failed (if it did)."""
    ended_at = ended_at or time.time()
    left = dict(ledger.leaves)
    # A worker's records after its last hand-over never reached the master (Locust waits 0.5 s for the
    # final reports): its members count as gone then, so nothing is owed that could not be reported.
    horizon = {}
    for process, at in ledger.horizons:
        horizon[process] = max(at, horizon.get(process, at))
    members = {
        member: (room, joined_at, left.get(member, horizon.get(process[0] if process else None, ended_at)), served_by)
        for member, room, joined_at, served_by, *process in ledger.joins
    }
    by_room = defaultdict(list)
    for member, (room, joined_at, left_at, served_by) in members.items():
        by_room[room].append((member, joined_at, left_at, served_by))
    received = defaultdict(dict)
    duplicates = 0
    for nonce, member, received_at in ledger.receipts:
        duplicates += member in received[nonce]
        received[nonce].setdefault(member, received_at)

    expected = delivered = cross = same = 0
    latencies, missing_examples = [], []
    rooms = defaultdict(lambda: {"messages": 0, "expected": 0, "delivered": 0})
    for nonce, room, sent_at, sender in ledger.sends:
        sender_worker = members[sender][3] if sender in members else None
        rooms[room]["messages"] += 1
        for member, joined_at, left_at, served_by in by_room[room]:
            if not joined_at < sent_at < left_at - leave_grace:
                continue
            expected += 1
            rooms[room]["expected"] += 1
            arrived = received[nonce].get(member)
            if arrived is None:
                if len(missing_examples) < 10:
                    missing_examples.append(
                        {
                            "nonce": nonce,
                            "room": room,
                            "member": member,
                            "member_worker": served_by,
                            "sender_worker": sender_worker,
                            "sent_after_join_s": round(sent_at - joined_at, 3),
                            "left_after_send_s": round(left_at - sent_at, 3),
                        }
                    )
                continue
            delivered += 1
            rooms[room]["delivered"] += 1
            latencies.append((arrived - sent_at) * 1000)
            if served_by == sender_worker:
                same += 1
            else:
                cross += 1

    workers = sorted({join[3] for join in ledger.joins})
    p99 = percentile(latencies, 0.99)
    samples = defaultdict(list)
    for process, percent in ledger.cpu:
        samples[process].append(percent)
    generators = {
        process: {
            "samples": len(values),
            "mean_percent": round(statistics.fmean(values), 1),
            "max_percent": round(max(values), 1),
        }
        for process, values in sorted(samples.items())
    }
    saturated = [process for process, cpu in generators.items() if cpu["max_percent"] >= SATURATED_CPU_PERCENT]
    summary = {
        "messages_sent": len(ledger.sends),
        "sockets_joined": len(ledger.joins),
        "workers_serving_sockets": len(workers),
        "deliveries_expected": expected,
        "delivered": delivered,
        "missing": expected - delivered,
        "duplicates": duplicates,
        "resumes": len(ledger.recoveries),
        "resumes_not_recovered": sum(not recovered for _, recovered in ledger.recoveries),
        "same_worker_deliveries": same,
        "cross_worker_deliveries": cross,
        "cross_worker_share": round(cross / delivered, 4) if delivered else 0.0,
        "latency_ms_p50": percentile(latencies, 0.50),
        "latency_ms_p95": percentile(latencies, 0.95),
        "latency_ms_p99": p99,
        "latency_ms_mean": round(statistics.fmean(latencies), 3) if latencies else None,
        "max_p99_ms": max_p99_ms,
        "leave_grace_s": leave_grace,
        "generators": generators,
        "generators_saturated": saturated,
    }
    failures, inconclusive = [], []
    if expected == 0:
        failures.append("no delivery was expected: no message was sent to an open room")
    if summary["missing"]:
        failures.append(f"{summary['missing']} of {expected} expected deliveries are missing")
    if len(workers) >= 2 and cross == 0:
        failures.append(f"{len(workers)} workers served sockets but no delivery crossed workers")
    if p99 is not None and p99 > max_p99_ms:
        reason = f"p99 fan-out latency {p99:.1f} ms is over the {max_p99_ms} ms limit"
        if saturated:
            inconclusive.append(
                f"{reason}, measured by saturated load generators ({', '.join(saturated)} at "
                f">= {SATURATED_CPU_PERCENT:.0f}% CPU): run more generator processes"
            )
        else:
            failures.append(reason)
    summary["outcome"] = "FAIL" if failures else "INCONCLUSIVE" if inconclusive else "PASS"
    summary["passed"] = summary["outcome"] == "PASS"
    summary["failures"] = failures
    summary["inconclusive"] = inconclusive
    summary["missing_examples"] = missing_examples
    summary["rooms"] = {room: counts for room, counts in sorted(rooms.items())}
    summary["workers"] = workers
    return summary


def save(summary, directory):
    """Write verdict.json and verdict.csv (one row per room and a total row) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "verdict.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(directory / "verdict.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["room", "messages", "deliveries_expected", "delivered", "missing"])
        for room, counts in summary["rooms"].items():
            writer.writerow(
                [room, counts["messages"], counts["expected"], counts["delivered"], counts["expected"] - counts["delivered"]]
            )
        writer.writerow(
            ["TOTAL", summary["messages_sent"], summary["deliveries_expected"], summary["delivered"], summary["missing"]]
        )


def describe(summary):
    """The verdict as a few human lines."""

    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    lines = [
        f"fan-out verdict: {summary['outcome']}",
        f"  messages sent {summary['messages_sent']}, sockets {summary['sockets_joined']} on "
        f"{summary['workers_serving_sockets']} workers",
        f"  deliveries expected {summary['deliveries_expected']}, delivered {summary['delivered']}, "
        f"missing {summary['missing']}, duplicates {summary['duplicates']}",
        f"  resumes {summary['resumes']}, not recovered {summary['resumes_not_recovered']}",
        f"  cross-worker {summary['cross_worker_deliveries']} ({summary['cross_worker_share']:.1%}), "
        f"same-worker {summary['same_worker_deliveries']}",
        f"  latency ms p50 {ms(summary['latency_ms_p50'])} p95 {ms(summary['latency_ms_p95'])} "
        f"p99 {ms(summary['latency_ms_p99'])} (limit {summary['max_p99_ms']})",
    ]
    lines += [
        "  load generators' CPU: "
        + ", ".join(
            f"{process} mean {cpu['mean_percent']:.0f}% max {cpu['max_percent']:.0f}%"
            for process, cpu in summary["generators"].items()
        )
        if summary["generators"]
        else "  load generators' CPU: not sampled"
    ]
    lines += [f"  FAIL: {reason}" for reason in summary["failures"]]
    lines += [f"  INCONCLUSIVE: {reason}" for reason in summary["inconclusive"]]
    return "\n".join(lines)
