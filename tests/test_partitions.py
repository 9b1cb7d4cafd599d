"""Faults between hosts: the chat across network namespaces (localstack.nethosts), a Redis node per host,
chat workers on two hosts, HAProxy on one and the members on another, while a room talks.

Each event counts what every member was owed and what it got, with some members offline across it:
none may be short without being told ``recovered: false``, none may get a message twice, every typed
message lands (its sender resends what was refused, with the same nonce), and the time the room stays
dark is measured against its bound.
"""

import asyncio
import itertools
import json
import time

import pytest

from conftest import ROOT, UNLIMITED_TYPING
from loadtest.member import Conversation, until
from localstack.nethosts import CHAT_HOSTS, REDIS_HOSTS, REDIS_PORT, PartitionStack

ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def hosts():
    # Rooms keep 2,000 messages: a member offline across a 30 s fault at 50/s is owed 1,500.
    with PartitionStack(env={**UNLIMITED_TYPING, "CHAT_HISTORY_SIZE": "2000"}) as stack:
        yield stack


def slot_key(room):
    """A key in the slot of ``room``'s group, whose primary carries the room."""
    return "{asgi:g:chat_" + room + "}"


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


def arrivals(member):
    """The monotonic times at which ``member``'s messages arrived (the member keeps loop times)."""
    shift = time.monotonic() - asyncio.get_running_loop().time()
    return [at + shift for at in member.arrivals]


def first_after(members, since):
    """The longest any of ``members`` waited after ``since`` (monotonic) for its next message."""
    return max(min((at for at in arrivals(m) if at > since), default=float("inf")) - since for m in members)


def longest_silence(members, start, end):
    """The longest stretch within [start, end] in which one of ``members`` (online throughout) got nothing."""
    longest = 0.0
    for member in members:
        times = [start, *(at for at in arrivals(member) if start < at < end), end]
        longest = max(longest, max(b - a for a, b in itertools.pairwise(times)))
    return longest


OFFLINE = 4  # members offline across each event: the first ones of the room


async def talk_through(hosts, room_name, fault, hold, heal, base=None, measure=None):
    """A room of 20 resuming members (OFFLINE of them offline across the event), 4 v1 members and a typist
    at 50/s, through the ingress at ``base``: ``fault(room)``, ``hold`` seconds, ``heal(room)``, then 50 more
    messages and the offline members back. The report has the room's counts, the longest silence of a
    member online throughout, and what ``measure(room)`` adds once the room is done."""
    base = base or hosts.ws
    room = await Conversation(base, room_name, resuming=20, plain=4, origin=base.replace("ws://", "http://")).start()
    offline = room.members[:OFFLINE]
    await room.typed_more(50)
    for member in offline:
        await member.stop()
    await room.typed_more(25)
    started = time.monotonic()
    await fault(room)
    await asyncio.sleep(hold)  # the fault's length is the event itself, not a wait for something
    await heal(room)
    healed = time.monotonic()
    await asyncio.to_thread(hosts.wait_healthy)
    for host in CHAT_HOSTS:
        await asyncio.to_thread(hosts.wait_chat_ready, host, 30)
    await room.typed_more(50)
    silence = longest_silence(room.members[OFFLINE:], started, time.monotonic())
    for member in offline:
        await member.come_back()
    await room.finish()
    report = room.report()
    report.update(
        node_timeout_s=hosts.node_timeout_ms / 1000,
        fault_s=round(healed - started, 2),
        longest_silence_s=round(silence, 2),
        sender_refusals=room.sender.refusals,
        offline_members=len(offline),
        duplicated=duplicated(room),
    )
    report.update(measure(room) if measure else {})
    return report


def duplicated(room):
    """Per member that got a text twice: each such text with the (offset, epoch) of its copies."""
    found = {}
    for index, member in enumerate((*room.members, room.sender)):
        seen = {}
        for offset, epoch, text in member.messages:
            seen.setdefault(text, []).append((offset, epoch[:6]))
        twice = {text: copies for text, copies in seen.items() if len(copies) > 1}
        if twice:
            found[f"member {index} ({member.served_by}, {member.connections} connections)"] = dict(list(twice.items())[:5])
    return found


def watch_members_move(room, from_host, to_host, within, moved):
    """Note the online members served from ``from_host`` and the time in ``moved``; the returned function,
    called once the fault is made, starts ``moved["waiter"]``: done (``moved["done"]``) when every one of
    them is connected to ``to_host``, failing after ``within`` seconds."""
    members = [m for m in (*room.members[OFFLINE:], room.sender) if m.served_by.startswith(from_host)]
    assert members, f"some members are on {from_host}"
    moved.update(members=members, at=time.monotonic())

    def start():
        moved["waiter"] = asyncio.ensure_future(
            until(
                lambda: all(m.socket is not None and m.served_by.startswith(to_host) for m in members),
                within,
                f"the members on {from_host} to resume on {to_host}",
            )
        )
        moved["waiter"].add_done_callback(lambda _: moved.setdefault("done", time.monotonic()))

    return start


def assert_owed_everything(report):
    assert report["resuming_silently_short"] == 0, "a member short of messages was told so"
    assert report["resuming_duplicates"] == 0
    assert report["lost_for_everyone"] == 0, "every typed message landed once its sender resent it"


def test_room_primary_cut_off_from_its_cluster(hosts):
    """The room's primary loses its cluster bus and its replica for 2.5x the node timeout while the chat
    hosts still reach its client port: it goes on answering them until it sees itself in the minority,
    and its replica is promoted on the other side. Then the cut heals and the old primary rejoins."""
    node_timeout = hosts.node_timeout_ms / 1000
    promoted, cut = {}, {}

    async def fault(room):
        cut["primary"] = primary = hosts.primary_for(slot_key("cutoff"))
        replica = hosts.replica_of(primary)
        cut["watcher"] = asyncio.ensure_future(asyncio.to_thread(watch_role, hosts, replica, promoted))
        cut["at"] = time.monotonic()
        for other in REDIS_HOSTS:
            if other != primary:
                hosts.hosts.cut(primary, other)

    async def heal(room):
        hosts.hosts.heal(cut["primary"])
        await cut["watcher"]
        assert "at" in promoted, "the replica was promoted"

    def measure(room):
        return {
            "promoted_after_cut_s": round(promoted["at"] - cut["at"], 2),
            "dark_after_promotion_s": round(first_after(room.members[OFFLINE:], promoted["at"]), 2),
        }

    report = hosts.hosts.call(
        "client", asyncio.run, talk_through(hosts, "cutoff", fault, 2.5 * node_timeout, heal, measure=measure)
    )
    save("room_primary_cut_off", report)
    assert_owed_everything(report)
    # Live delivery resumes within the node timeout plus 1 s of the promotion.
    assert report["dark_after_promotion_s"] <= node_timeout + 1
    assert errors_logged(hosts) == []


def test_chat_host_cut_off_from_redis(hosts):
    """One chat host loses every Redis node for 10 s: it turns unready and hands its sockets over (1012);
    its members resume on the other host with nothing missed, and the room talks on there. Through the
    ingress frontend that keeps a marked-down server's sessions, so the worker's handover is what acts."""
    cut_host, other_host = CHAT_HOSTS
    moved = {}

    async def fault(room):
        moving = watch_members_move(room, cut_host, other_host, 10, moved)
        for node in REDIS_HOSTS:
            hosts.hosts.cut(cut_host, node)
        moving()

    async def heal(room):
        await moved["waiter"]
        hosts.hosts.heal(cut_host)

    def measure(room):
        return {
            "members_on_cut_host": len(moved["members"]),
            "handed_over_after_s": round(moved["done"] - moved["at"], 2),
            "close_codes": sorted({c for m in moved["members"] for c in m.close_codes if c}),
        }

    report = hosts.hosts.call(
        "client", asyncio.run, talk_through(hosts, "hostcut", fault, 10, heal, base=hosts.ws_keeping_sessions, measure=measure)
    )
    save("chat_host_cut_off", report)
    assert_owed_everything(report)
    assert 1012 in report["close_codes"], "the cut-off host handed its sockets over with 1012"
    # Unready within follow_interval + command_timeout (3 s), handed over 2 s later, over 2 s, plus reconnects.
    assert report["handed_over_after_s"] <= 9
    assert errors_logged(hosts) == []


def test_room_primary_port_blackholed(hosts):
    """The room primary's client port swallows every packet (no reset) for 3x the node timeout; its
    cluster bus still works, so there is no failover: every command and subscription read on it meets its
    deadline, and the room talks again soon after the port answers, with nothing missed."""
    node_timeout = hosts.node_timeout_ms / 1000
    held = {}

    async def fault(room):
        held["primary"] = hosts.primary_for(slot_key("blackhole"))
        hosts.hosts.blackhole(held["primary"], REDIS_PORT)

    async def heal(room):
        hosts.hosts.heal(held["primary"])
        held["at"] = time.monotonic()

    def measure(room):
        return {"dark_after_port_back_s": round(first_after(room.members[OFFLINE:], held["at"]), 2)}

    report = hosts.hosts.call(
        "client", asyncio.run, talk_through(hosts, "blackhole", fault, 3 * node_timeout, heal, measure=measure)
    )
    save("room_primary_port_blackholed", report)
    assert_owed_everything(report)
    # Bounded by one subscription deadline (health_interval + command_timeout, 3 s) and a reconnect.
    assert report["dark_after_port_back_s"] <= 4
    assert errors_logged(hosts) == []


def test_packet_loss_between_chat_and_redis(hosts):
    """1% of the packets between each chat host and every Redis node are dropped for 30 s while the room talks."""

    async def fault(room):
        for host in CHAT_HOSTS:
            hosts.hosts.lose(host, 1, REDIS_HOSTS)

    async def heal(room):
        hosts.hosts.heal(*CHAT_HOSTS)

    report = hosts.hosts.call("client", asyncio.run, talk_through(hosts, "lossy", fault, 30, heal))
    save("packet_loss", report)
    assert_owed_everything(report)
    # TCP retransmits what is lost; a stall past a command deadline (2 s) would show here.
    assert report["longest_silence_s"] <= 2.5
    assert errors_logged(hosts) == []


def test_ingress_cut_from_a_chat_host(hosts):
    """The ingress loses its link to one chat host for 8 s: its checks fail, it marks the host down and
    closes the sockets it carried there (shutdown-sessions); their members resume on the other host."""
    cut_host, other_host = CHAT_HOSTS
    moved = {}

    async def fault(room):
        moving = watch_members_move(room, cut_host, other_host, 8, moved)
        hosts.hosts.cut("ingress", cut_host)
        moving()

    async def heal(room):
        await moved["waiter"]
        hosts.hosts.heal("ingress")

    def measure(room):
        return {"members_behind_cut": len(moved["members"]), "moved_after_s": round(moved["done"] - moved["at"], 2)}

    report = hosts.hosts.call("client", asyncio.run, talk_through(hosts, "ingresscut", fault, 8, heal, measure=measure))
    save("ingress_cut", report)
    assert_owed_everything(report)
    # Marked down after two failed checks (inter 500 ms), then the members' reconnect with backoff.
    assert report["moved_after_s"] <= 5
    assert errors_logged(hosts) == []
