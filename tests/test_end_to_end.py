"""The `make run` topology for real: a local cluster, gunicorn with 3 uvicorn workers, WebSocket clients."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import ROOT


def listening(port):
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def test_http_endpoints_carry_served_by(stack):
    status, headers, body = get(f"{stack['url']}/chat/")
    assert status == 200 and 'id="room-name-input"' in body and 'id="room-name-submit"' in body
    assert headers["x-served-by"].count(":") == 1
    status, _, body = get(f"{stack['url']}/chat/lobby/")
    assert status == 200 and all(f'id="{i}"' in body for i in ("chat-log", "chat-message-input", "chat-message-submit"))
    assert get(f"{stack['url']}/chat/bad%20room/")[0] == 400
    assert get(f"{stack['url']}/healthz")[0] == 200
    assert get(f"{stack['url']}/readyz")[0] == 200
    status, headers, _ = get(f"{stack['url']}/nope")
    assert status == 404 and "x-served-by" in {k.lower() for k in headers}
    with urllib.request.urlopen(f"{stack['url']}/", timeout=5) as response:
        assert response.url.endswith("/chat/")


async def test_room_spans_workers_and_everyone_gets_everything(stack):
    per_socket = 3
    origin = stack["url"]
    clients, workers = [], set()
    # gunicorn's workers share one listening socket and the kernel picks who accepts: open at least 12
    # sockets, more (up to 60) if they have not yet spread over two workers.
    while len(clients) < 12 or (len(workers) < 2 and len(clients) < 60):
        client = await connect(f"{stack['ws']}/ws/chat/e2e-room/", origin=origin, open_timeout=10)
        clients.append(client)
        workers.add(client.response.headers["X-Served-By"])
    assert len(workers) >= 2, f"{len(clients)} sockets all landed on {workers}"
    sockets = len(clients)
    for index, client in enumerate(clients):
        for n in range(per_socket):
            await client.send(json.dumps({"message": f"{index}-{n}"}))
    expected = {f"{i}-{n}" for i in range(sockets) for n in range(per_socket)}

    async def collect(client):
        got = set()
        while got != expected:
            got.add(json.loads(await asyncio.wait_for(client.recv(), 10))["message"])
        return got

    results = await asyncio.gather(*(collect(client) for client in clients))
    assert all(result == expected for result in results)
    for client in clients:
        await client.close()
    _, _, metrics = get(f"{stack['url']}/metrics")
    assert "chat_messages_in_total" in metrics and "chat_fanout_latency_seconds_bucket" in metrics


async def test_refused_handshake_is_an_http_error_with_served_by(stack):
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{stack['ws']}/ws/chat/lobby/", origin="http://evil.example", open_timeout=10)
    assert refused.value.response.status_code == 403
    assert "X-Served-By" in refused.value.response.headers


async def test_bad_input_closes_only_that_socket(stack):
    origin = stack["url"]
    good = await connect(f"{stack['ws']}/ws/chat/e2e-bad/", origin=origin)
    bad = await connect(f"{stack['ws']}/ws/chat/e2e-bad/", origin=origin)
    await bad.send("{not json")
    await asyncio.wait_for(bad.wait_closed(), 10)
    assert bad.close_code == 4400
    await good.send(json.dumps({"message": "fine"}))
    assert json.loads(await asyncio.wait_for(good.recv(), 10)) == {"message": "fine"}
    await good.close()


def test_helm_test_script_passes_against_the_local_stack(stack):
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy/helm/files/fanout_check.py"), "--url", stack["url"], "--by", "process"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.startswith("OK:"), result.stdout + result.stderr


def test_ctrl_c_stops_everything(stack):
    process = stack["process"]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 15
    while any(listening(port) for port in stack["ports"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [port for port in stack["ports"] if listening(port)], "a server outlived make run"
