"""Layer instances in separate processes share groups, direct sends and membership through the cluster."""

import asyncio
import json
import subprocess
import sys
import textwrap
import uuid

# Each worker joins its channels to the room, prints them, then prints every message it receives.
WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from channels_redis_cluster import RedisClusterChannelLayer

    async def main(hosts, prefix, sockets):
        layer = RedisClusterChannelLayer(hosts=hosts, prefix=prefix)
        channels = [await layer.new_channel() for _ in range(sockets)]
        for channel in channels:
            await layer.group_add("room", channel)
        print(json.dumps({"channels": channels}), flush=True)

        async def drain(channel):
            while True:
                message = await layer.receive(channel)
                print(json.dumps({"channel": channel, "message": message}), flush=True)
                if message["type"] == "stop":
                    return

        await asyncio.wait_for(asyncio.gather(*(drain(c) for c in channels)), 60)
        await layer.close()

    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
    """
)


async def start_worker(hosts, prefix, sockets):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        json.dumps(hosts),
        prefix,
        str(sockets),
        stdout=subprocess.PIPE,
        env={"PATH": ""},
    )
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    return process, json.loads(line)["channels"]


async def read_messages(process, count):
    """The next ``count`` messages a worker printed."""
    return [json.loads(await asyncio.wait_for(process.stdout.readline(), 30)) for _ in range(count)]


async def test_group_send_reaches_members_in_every_process(cluster_hosts):
    from channels_redis_cluster import RedisClusterChannelLayer

    prefix = f"mp{uuid.uuid4().hex[:6]}"
    sockets = 5
    workers = [await start_worker(cluster_hosts, prefix, sockets) for _ in range(3)]
    sender = RedisClusterChannelLayer(hosts=cluster_hosts, prefix=prefix)
    try:
        all_channels = [c for _, channels in workers for c in channels]
        assert sorted(await sender.group_channels("room")) == sorted(all_channels)
        for n in range(20):
            await sender.group_send("room", {"type": "chat", "n": n})
        # A direct send from this process to one channel in each worker process.
        for _, channels in workers:
            await sender.send(channels[0], {"type": "direct"})
        # Messages on different shard channels have no order between them: read everything first.
        for process, channels in workers:
            received = await read_messages(process, 20 * sockets + 1)
            per_channel = {
                c: [r["message"].get("n") for r in received if r["channel"] == c and r["message"]["type"] == "chat"]
                for c in channels
            }
            assert per_channel == {c: list(range(20)) for c in channels}, "every member gets every message, in order"
            directs = [r["channel"] for r in received if r["message"]["type"] == "direct"]
            assert directs == [channels[0]]
        await sender.group_send("room", {"type": "stop"})
        for process, _ in workers:
            assert len(await read_messages(process, sockets)) == sockets
            assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        for process, _ in workers:
            if process.returncode is None:
                process.kill()
        await sender.flush()
        await sender.close()
