"""Readiness of a chat worker: its own state on an internal port, not the health of every primary."""

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import redis
from websockets.asyncio.client import connect

from conftest import free_port, local_stack


def status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def primaries(ports):
    """Ports of the cluster's primaries that serve slots, as the first node sees them."""
    nodes = redis.Redis(port=ports[0]).execute_command("CLUSTER NODES")
    return [
        int(address.split("@")[0].rpartition(":")[2])
        for address, node in nodes.items()
        if "master" in node["flags"] and "fail" not in node["flags"] and node["slots"]
    ]


def pid_listening(port):
    """The pid of the Redis server of `port` (its process title names the port)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if f":{port} ".encode() in cmdline.read().replace(b"\0", b" ") + b" ":
                        return int(entry)
            except OSError:
                continue
    raise LookupError(port)


def test_operational_endpoints_answer_only_on_the_internal_port():
    ops_port = free_port()
    with local_stack(OPS_BIND=f"127.0.0.1:{ops_port}") as stack:
        ops = f"http://127.0.0.1:{ops_port}"
        assert [status(f"{stack['url']}{path}") for path in ("/healthz", "/readyz", "/metrics")] == [404] * 3
        assert status(f"{stack['url']}/chat/") == 200
        assert [status(f"{ops}{path}") for path in ("/healthz", "/readyz", "/metrics")] == [200] * 3
        assert status(f"{ops}/chat/") == 404


def ready_workers(url, workers, timeout=30):
    """Probe until `workers` distinct processes (X-Served-By) answered 200: each one reached the cluster."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"only {seen} became ready"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                seen.add(response.headers["X-Served-By"])
        except urllib.error.HTTPError:
            time.sleep(0.1)
    return seen


async def test_a_primary_down_does_not_make_workers_unready(tmp_path):
    ops_port = free_port()
    with local_stack(OPS_BIND=f"127.0.0.1:{ops_port}") as stack:
        ready = f"http://127.0.0.1:{ops_port}/readyz"
        # Workers that reached the cluster stay ready; one that never did is rightly not (a pod starting
        # while a primary fails over), so every worker connects before the kill.
        ready_workers(ready, workers=3)
        ports = stack["ports"][1:]
        before = primaries(ports)
        victim = before[0]
        survivor = next(port for port in ports if port != victim)
        os.kill(pid_listening(victim), signal.SIGKILL)
        answers = []
        # Every probe from the kill until a replica took over its slots: the window that emptied the Service.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answers.append(await asyncio.to_thread(status, ready))
            promoted = set(primaries([survivor])) - set(before)
            if promoted:
                break
            await asyncio.sleep(0.1)
        assert promoted, "no replica took over the killed primary's slots"
        assert len(answers) >= 5 and set(answers) == {200}, answers
        async with connect(f"{stack['ws']}/ws/chat/after-failover/", origin=stack["url"]) as client:
            await client.send(json.dumps({"message": "still here"}))
            assert json.loads(await asyncio.wait_for(client.recv(), 10))["message"] == "still here"


async def test_a_draining_worker_says_so_on_the_internal_port_until_its_sockets_are_closed():
    """SIGTERM: the public port stops taking connections, the internal one answers 503 (404 for a proxy
    that asks with ?drain=404, so it keeps the open sockets, which the workers close spread out)."""
    from test_rolling_restart import children, command_line

    ops_port = free_port()
    with local_stack(OPS_BIND=f"127.0.0.1:{ops_port}", DRAIN_SECONDS="8") as stack:
        ops = f"http://127.0.0.1:{ops_port}"
        ready_workers(f"{ops}/readyz", workers=3)
        clients, served = [], set()
        while len(served) < 3:
            assert len(clients) < 60, f"sockets reached only {served}"
            client = await connect(f"{stack['ws']}/ws/chat/drain-probe/", origin=stack["url"])
            clients.append(client)
            served.add(client.response.headers["X-Served-By"])
        master = next(pid for pid in children(stack["process"].pid) if "gunicorn" in command_line(pid))
        os.kill(master, signal.SIGTERM)
        seen = set()
        deadline = time.monotonic() + 8
        while {503, 404} - seen and time.monotonic() < deadline:
            seen.add(await asyncio.to_thread(status, f"{ops}/readyz"))
            seen.add(await asyncio.to_thread(status, f"{ops}/readyz?drain=404"))
        assert {503, 404} <= seen, seen
        open_now = sum(1 for client in clients if client.close_code is None)
        assert open_now > 0, "the probes saw the drain while sockets were still being closed"
        for client in clients:
            await client.close()
