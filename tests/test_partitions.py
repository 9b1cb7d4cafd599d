"""Faults between hosts: the chat across network namespaces (localstack.nethosts), a Redis node per host,
chat workers on two hosts, HAProxy on one and the members on another, while a room talks.

Each event counts what every member was owed and what it got, with some members offline across it:
none may be short without being told ``recovered: false``, none may get a message twice, and the
time the room stays dark is measured against its bound.
"""

import asyncio
import json
import time

import pytest

from conftest import ROOT, UNLIMITED_TYPING
from localstack.nethosts import REDIS_HOSTS, PartitionStack
from loadtest.member import Conversation, until

ARTIFACTS = ROOT / "artifacts"
ROOM = "partition"
ROOM_SLOT_KEY = "{asgi:g:chat_partition}"


@pytest.fixture(scope="module")
def hosts():
    with PartitionStack(env=UNLIMITED_TYPING) as stack:
        yield stack


def save(name, report):
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"partition_{name}.json").write_text(json.dumps(report, indent=2))
    print(f"{name}:", json.dumps(report))


def errors_logged(stack):
    """Lines the chat hosts logged at ERROR or above, or with a traceback."""
    lines = []
    for host in stack.chat:
        for line in stack.log(host).read_text(errors="replace").splitlines():
            if '"level": "ERROR"' in line or '"level": "CRITICAL"' in line or "Traceback" in line:
                lines.append(f"{host}: {line}")
    return lines


def watch_role(stack, host, became, role="master"):
    """Poll ``host``'s role from its own host until it is ``role``; sets ``became["at"]`` (monotonic)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if stack.role(host) == role:
                became["at"] = time.monotonic()
                return
        except Exception:  # noqa: BLE001 - not answering yet
            pass
        time.sleep(0.02)


def dark_after(members, since):
    """The longest any of ``members`` waited after ``since`` (monotonic) for its next live message."""
    waits = []
    for member in members:
        loop_offset = time.monotonic() - asyncio.get_running_loop().time()
        later = [at + loop_offset for at in member.arrivals if at + loop_offset > since]
        waits.append(min(later) - since if later else float("inf"))
    return max(waits)


def test_room_primary_cut_off_from_its_cluster(hosts):
    """The room's primary loses its cluster bus and its replica for 2.5x the node timeout while the chat
    hosts still reach its client port: it goes on answering them until it sees itself in the minority,
    and its replica is promoted on the other side. Then the cut heals and the old primary rejoins empty."""
    node_timeout = hosts.node_timeout_ms / 1000

    async def scenario():
        room = await Conversation(hosts.ws, ROOM, resuming=20, plain=4, origin=hosts.url).start()
        online, offline = room.members[4:], room.members[:4]
        await room.typed_more(50)
        for member in offline:
            await member.stop()
        await room.typed_more(25)
        primary = hosts.primary_for(ROOM_SLOT_KEY)
        replica = hosts.replica_of(primary)
        promoted = {}
        watcher = asyncio.ensure_future(asyncio.to_thread(watch_role, hosts, replica, promoted))
        cut_at = time.monotonic()
        for other in REDIS_HOSTS:
            if other != primary:
                hosts.hosts.cut(primary, other)
        await asyncio.sleep(2.5 * node_timeout)  # the fault's length is the event itself, not a wait for one
        hosts.hosts.heal(primary)
        healed_at = time.monotonic()
        await watcher
        assert "at" in promoted, "the replica was promoted"
        await asyncio.to_thread(hosts.wait_healthy)
        await room.typed_more(50)
        dark = dark_after(online, promoted["at"])
        for member in offline:
            await member.come_back()
        await room.finish()
        report = room.report()
        report.update(
            node_timeout_s=node_timeout, cut_s=round(healed_at - cut_at, 2),
            promoted_after_cut_s=round(promoted["at"] - cut_at, 2), dark_after_promotion_s=round(dark, 2),
            sender_refusals=room.sender.refusals, offline_members=len(offline),
            offline_recovered=[all(m.recoveries) for m in offline],
        )
        return report

    report = hosts.hosts.call("client", asyncio.run, scenario())
    save("room_primary_cut_off", report)
    assert report["resuming_silently_short"] == 0, "a member short of messages was told so"
    assert report["resuming_duplicates"] == 0
    assert report["lost_for_everyone"] == 0, "every typed message landed once its sender resent it"
    assert report["dark_after_promotion_s"] <= report["node_timeout_s"] + 1
    assert errors_logged(hosts) == []
