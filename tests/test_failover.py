"""Kill the primary that carries a room under traffic: delivery resumes with the same layer objects."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from channels_redis_cluster import RedisClusterChannelLayer

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


async def test_primary_failover_under_traffic(own_cluster):
    hosts = [f"redis://{node}" for node in own_cluster.startup_nodes]
    node_timeout = own_cluster.node_timeout_ms / 1000
    receiver = RedisClusterChannelLayer(hosts=hosts, prefix="fo")
    sender = RedisClusterChannelLayer(hosts=hosts, prefix="fo")
    members = [await receiver.new_channel() for _ in range(3)]
    for channel in members:
        await receiver.group_add("failover-room", channel)
    victim = own_cluster.primary_for(receiver.keys.group_channel("failover-room"))

    sent = {}  # n -> send time, for sends that returned without error
    failed = []
    received = {channel: {} for channel in members}  # channel -> {n: receive time}
    stop = asyncio.Event()

    async def send_loop():
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await sender.group_send("failover-room", {"type": "tick", "n": n})
                sent[n] = time.monotonic()
            except Exception:  # noqa: BLE001 - a reported failure, counted separately from silent loss
                failed.append(n)
            await asyncio.sleep(0.01)

    async def receive_loop(channel):
        while True:
            message = await receiver.receive(channel)
            received[channel][message["n"]] = time.monotonic()

    tasks = [asyncio.ensure_future(send_loop())] + [asyncio.ensure_future(receive_loop(c)) for c in members]
    await asyncio.sleep(1.0)  # steady traffic before the crash
    assert all(len(r) > 20 for r in received.values()), "traffic flows before the failover"
    killed_at = time.monotonic()
    own_cluster.kill(victim)

    bound = node_timeout + 5
    resumed_at = None
    while time.monotonic() - killed_at < bound + 5:
        after = [min((t for n, t in r.items() if sent.get(n, 0) > killed_at), default=None) for r in received.values()]
        if all(after):
            resumed_at = max(after)
            break
        await asyncio.sleep(0.05)
    assert resumed_at is not None, "delivery never resumed"
    # After recovery, nothing is lost: run 2 s more and require every later message everywhere.
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.sleep(0.5)
    for task in tasks:
        task.cancel()
    checkpoint = max(n for n, t in sent.items() if t <= resumed_at) if sent else 0
    later = [n for n in sent if n > checkpoint and sent[n] < time.monotonic() - 0.5]
    for channel in members:
        assert all(n in received[channel] for n in later), "messages after recovery are all delivered"

    window = [n for n in sent if n <= checkpoint]
    lost = {channel: sum(1 for n in window if n not in received[channel]) for channel in members}
    report = {
        "node_timeout_s": node_timeout,
        "resumed_after_s": round(resumed_at - killed_at, 3),
        "bound_s": bound,
        "sent_ok": len(sent),
        "send_errors_reported": len(failed),
        "lost_in_window_per_member": lost,
        "sequence_gaps_counted": receiver.stats["sequence_gaps"],
        "resubscribes": receiver.stats["resubscribes"],
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "failover.json").write_text(json.dumps(report, indent=2))
    print("failover report:", json.dumps(report))
    assert resumed_at - killed_at <= bound
    assert receiver.stats["resubscribes"] >= 1
    # Loss inside the window is reported, never silent: the receiver's sequence check saw it.
    assert receiver.stats["sequence_gaps"] >= max(lost.values())
    await sender.close()
    await receiver.close()


async def test_primary_killed_under_traffic_resuming_members_recover_or_are_told():
    """The make run topology; the primary of a room's slot is killed while the room talks."""
    import redis
    from test_rolling_restart import children, command_line, presence_in_redis, save

    from conftest import UNLIMITED_TYPING, local_stack
    from loadtest.member import Conversation, Member, until

    with local_stack(**UNLIMITED_TYPING) as stack:
        room = await Conversation(stack["ws"], "failover", resuming=12, plain=6).start()
        watcher = await Member(stack["ws"], "failover", presence=True).start()
        sockets = (
            len(room.members) + len(room.plain) + 2
        )  # each its own member: the v2 ones, the v1 ones, the typist, the watcher
        await until(lambda: len(watcher.present) == sockets, 15, "the watcher listing the room")
        await room.typed_more(25)
        node = redis.Redis(port=stack["ports"][1], decode_responses=True)
        slot = node.execute_command("CLUSTER", "KEYSLOT", "{asgi:g:chat_failover}")
        port = next(int(nodes[0][1]) for start, end, *nodes in node.execute_command("CLUSTER", "SLOTS") if start <= slot <= end)
        # The server names itself "redis-server 127.0.0.1:PORT [cluster]" once it runs.
        victim = next(pid for pid in children(stack["process"].pid) if f":{port} " in command_line(pid))
        os.kill(victim, signal.SIGKILL)
        await room.typed_more(100)  # 2 s at 50/s: through the election (node timeout 2 s) and after
        # Presence lives in the killed primary's slot too: after the election the list is still everyone, once.
        v2 = {m.member for m in (*room.members, room.sender, watcher)}
        await until(
            lambda: len(watcher.present) == sockets and v2 <= set(watcher.present), 15, "the room's list after the failover"
        )
        assert len(await presence_in_redis(stack, "chat_failover")) == sockets
        await watcher.stop()
        await room.finish()
    report = room.report()
    save("failover_resume", report)
    assert report["resuming_silently_short"] == 0, "a member short of messages was told so"
    assert report["resuming_recovered_exactly"] + report["resuming_told_not_recovered"] == len(room.members)
    assert report["resuming_duplicates"] == 0
