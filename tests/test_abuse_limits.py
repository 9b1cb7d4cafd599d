"""Abuse limits through the whole ASGI app: messages per socket, sockets per worker, per identity."""

import asyncio
import json
import time

from channels.testing import WebsocketCommunicator
from django.test import override_settings
from prometheus_client import REGISTRY

from chat.limits import IdentityQuota, TokenBucket, WorkerSockets
from chat.tokens import Identity, mint
from conftest import ORIGIN, join
from loadtest.member import Member, until
from loadtest.wsclient import handshake_request

SECRET = "s" * 40
IDENTITY_ON = {
    "ALLOWED_HOSTS": ["testserver", "127.0.0.1"],
    "CHAT_IDENTITY": "nickname",
    "CHAT_TOKEN_SECRET": SECRET,
    "CHAT_TOKEN_AUDIENCE": "chat",
    "CHAT_TOKEN_TTL": 600,
    "CHAT_TOKEN_LEEWAY": 0,
}


def rejected(reason):
    return REGISTRY.get_sample_value("chat_rejected_total", {"reason": reason}) or 0


async def refused(application, room, code, query="", v2=False):
    """Connect and expect the handshake to be accepted and closed with ``code``; the v2 error frame if v2."""
    client = WebsocketCommunicator(
        application, f"/ws/chat/{room}/{query}", headers=ORIGIN, subprotocols=["chat.v2"] if v2 else None
    )
    connected, _ = await client.connect(timeout=5)
    assert connected, "refused after accept, so the client can read why"
    error = await client.receive_json_from(timeout=3) if v2 else None
    closed = await client.receive_output(timeout=3)
    assert closed == {"type": "websocket.close", "code": code, "reason": closed.get("reason")}, closed
    await client.disconnect()
    return error


def test_token_bucket_passes_a_burst_then_the_sustained_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    bucket = TokenBucket(rate=2, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one message's worth at 2 a second
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] += 60  # refills only up to the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert all(TokenBucket(rate=0, burst=1).take() for _ in range(1000)), "a rate of 0 is no limit"


async def test_v2_flood_gets_rate_limited_frames_and_the_room_gets_only_the_burst(application):
    with override_settings(CHAT_MESSAGES_PER_S=0.001, CHAT_MESSAGE_BURST=5):
        flooder, bystander = await join(application, "flood2", v2=True), await join(application, "flood2", v2=True)
        before = rejected("rate_limited")
        for n in range(15):
            await flooder.send_to(text_data=json.dumps({"message": f"m{n}", "nonce": f"n{n}"}))
        frames = [await flooder.receive_json_from(timeout=3) for _ in range(15)]
        assert [f["message"] for f in frames if f["type"] == "message"] == [f"m{n}" for n in range(5)]
        errors = [f for f in frames if f["type"] == "error"]
        assert len(errors) == 10 and {e["error"] for e in errors} == {"rate_limited"} and "5" in errors[0]["detail"]
        assert [(await bystander.receive_json_from(timeout=3))["message"] for _ in range(5)] == [f"m{n}" for n in range(5)]
        assert await bystander.receive_nothing(timeout=0.3)
        assert rejected("rate_limited") - before == 10
        assert await flooder.receive_nothing(timeout=0.1), "a v2 socket stays open: its next message may pass later"
        await flooder.disconnect()
        await bystander.disconnect()


async def test_v1_flood_is_closed_with_4429_after_the_burst(application):
    with override_settings(CHAT_MESSAGES_PER_S=0.001, CHAT_MESSAGE_BURST=3):
        flooder, bystander = await join(application, "flood1"), await join(application, "flood1")
        for n in range(10):
            await flooder.send_to(text_data=json.dumps({"message": f"m{n}"}))
        assert [(await bystander.receive_json_from(timeout=3))["message"] for _ in range(3)] == ["m0", "m1", "m2"]
        outputs = [await flooder.receive_output(timeout=3) for _ in range(4)]
        assert [json.loads(o["text"])["message"] for o in outputs[:3]] == ["m0", "m1", "m2"]
        assert outputs[3]["type"] == "websocket.close" and outputs[3]["code"] == 4429
        assert await flooder.receive_nothing(timeout=0.3), "one close, nothing after it"
        assert await bystander.receive_nothing(timeout=0.3)
        await bystander.disconnect()


async def test_sockets_past_the_worker_limit_are_refused_with_1013_until_one_leaves(application):
    with override_settings(CHAT_MAX_SOCKETS_PER_WORKER=WorkerSockets.open + 2):
        first, second = await join(application, "full"), await join(application, "full", v2=True)
        before = rejected("worker_full")
        await refused(application, "full", 1013)
        error = await refused(application, "full", 1013, v2=True)
        assert error["error"] == "worker_full"
        assert rejected("worker_full") - before == 2
        await first.disconnect()
        third = await join(application, "full")  # its place was given back
        await third.send_to(text_data=json.dumps({"message": "in"}))
        assert (await second.receive_json_from(timeout=3))["message"] == "in"
        await second.disconnect()
        await third.disconnect()


async def test_an_identity_is_held_to_its_rooms_across_the_cluster(application):
    with override_settings(**IDENTITY_ON, CHAT_MAX_ROOMS_PER_IDENTITY=2, CHAT_MAX_SOCKETS_PER_IDENTITY=10):
        token = f"?token={mint('quota-user', 'Quota')}"
        a, b = await join(application, "qa", query=token), await join(application, "qb", query=token)
        again = await join(application, "qa", query=token)  # a room it is in already
        before = rejected("too_many_rooms")
        error = await refused(application, "qc", 4429, token, v2=True)
        assert error["error"] == "too_many_rooms" and "2 rooms" in error["detail"]
        assert rejected("too_many_rooms") - before == 1
        await b.disconnect()
        c = await join(application, "qc", query=token)
        other = await join(application, "qd", query=f"?token={mint('someone-else', 'Else')}")
        for socket in (a, again, c, other):
            await socket.disconnect()


async def test_an_identity_is_held_to_its_sockets(application):
    with override_settings(**IDENTITY_ON, CHAT_MAX_ROOMS_PER_IDENTITY=10, CHAT_MAX_SOCKETS_PER_IDENTITY=2):
        token = f"?token={mint('socket-user', 'Sockets')}"
        held = [await join(application, "qs", query=token) for _ in range(2)]
        error = await refused(application, "qs", 4429, token, v2=True)
        assert error["error"] == "too_many_sockets"
        await held[0].disconnect()
        held[0] = await join(application, "qs", query=token)
        for socket in held:
            await socket.disconnect()


async def test_a_crashed_workers_places_lapse_when_their_token_ends(application):
    with override_settings(**IDENTITY_ON, CHAT_MAX_ROOMS_PER_IDENTITY=1, CHAT_MAX_SOCKETS_PER_IDENTITY=10):
        ended = Identity("crash-user", "Crash", ("*",), time.time() - 1)
        live = Identity("crash-user", "Crash", ("*",), time.time() + 60)
        await IdentityQuota.claim(ended, "old-room", "specific.gone!1")  # never released: its worker died
        await IdentityQuota.claim(live, "new-room", "specific.here!1")  # the ended place does not count
        await IdentityQuota.release(live, "new-room", "specific.here!1")


async def stack_socket(stack, room, token=None):
    """A v2 socket on the stack: ("joined", worker id) or ("refused", close code, error)."""
    from websockets.asyncio.client import connect

    query = f"?token={token}" if token else ""
    socket = await connect(f"{stack['ws']}/ws/chat/{room}/{query}", origin=stack["url"], subprotocols=["chat.v2"])
    frame = json.loads(await socket.recv())
    if frame["type"] == "joined":
        return socket, socket.response.headers["X-Served-By"]
    await socket.wait_closed()
    return None, (socket.close_code, frame["error"])


async def fill_workers(stack, rooms, token=None, workers=3, most=3):
    """Open sockets until every worker holds its ``most`` and refuses one more; asserts that, returns the sockets."""
    held, refused = [], []
    for n in range(200):  # the kernel spreads handshakes over the workers unevenly: until all are full
        socket, said = await stack_socket(stack, rooms[n % len(rooms)], token)
        (held.append((socket, said)) if socket else refused.append(said))
        if len(held) == workers * most and refused:
            break
    per_worker = {}
    for _, worker in held:
        per_worker[worker] = per_worker.get(worker, 0) + 1
    assert len(held) == workers * most and set(per_worker.values()) == {most}, per_worker
    assert refused and set(refused) == {(1013, "worker_full")}
    return held


async def drop_handshake(stack, path, delay):
    """Send a WebSocket handshake for ``path`` and drop the connection ``delay`` seconds later, unanswered."""
    host, port = stack["url"].removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(handshake_request(host, port, path, subprotocol="chat.v2"))
    await writer.drain()
    await asyncio.sleep(delay)
    writer.transport.abort()


async def test_on_the_stack_handshakes_dropped_mid_connect_give_back_presence_and_every_place():
    """A client gone while its connect runs (a page navigating away): listed nowhere, holding no place."""
    from conftest import local_stack

    env = {
        **{k: str(v) for k, v in IDENTITY_ON.items() if k.startswith("CHAT_")},
        "CHAT_MAX_SOCKETS_PER_WORKER": "3",
        "CHAT_MAX_SOCKETS_PER_IDENTITY": "12",
        "CHAT_PRESENCE_GRACE": "1",
    }
    with local_stack(**env) as stack:
        with override_settings(**IDENTITY_ON):
            watching, dropping = mint("watcher", "Watcher"), mint("dropper", "Dropper")
        watcher = await Member(stack["ws"], "dropped", token=watching, presence=True).start()
        # Spread over 40 ms: the drops land before, during and just after the consumers' connect.
        await asyncio.gather(
            *(drop_handshake(stack, f"/ws/chat/dropped/?presence=1&token={dropping}", n / 1000) for n in range(40))
        )

        def joined():
            return [m for kind, m in watcher.presence_frames if kind == "join" and m != watcher.member]

        await until(
            lambda: joined() and watcher.present.keys() == {watcher.member},
            20,
            "the dropped handshakes' member to have come and gone",
        )
        tracebacks = [line for line in stack["log"] if "Traceback" in line]
        assert not tracebacks, tracebacks
        await watcher.stop()
        # Had the 40 kept their places, each worker would be full and the identity past its 12 sockets.
        held = await fill_workers(stack, ("dropped",), dropping)
        for socket, _ in held:
            await socket.close()


async def test_on_the_stack_each_worker_holds_its_most_sockets_and_an_identity_its_rooms_on_any_worker():
    from conftest import local_stack

    env = {
        **{k: str(v) for k, v in IDENTITY_ON.items() if k.startswith("CHAT_")},
        "CHAT_MAX_SOCKETS_PER_WORKER": "3",
        "CHAT_MAX_ROOMS_PER_IDENTITY": "2",
        "CHAT_MAX_SOCKETS_PER_IDENTITY": "50",
    }
    with local_stack(**env) as stack:
        with override_settings(**IDENTITY_ON):
            token = mint("stack-user", "Stacked")
        held = await fill_workers(stack, ("sa", "sb"), token)
        await held.pop()[0].close()  # one place free, on one worker
        for _ in range(200):  # until a handshake lands on the worker with the free place
            outcome = await stack_socket(stack, "sc", token)
            if outcome != (None, (1013, "worker_full")):
                break
        assert outcome == (None, (4429, "too_many_rooms")), "the rooms are counted across every worker"
        for socket, _ in held:
            await socket.close()
