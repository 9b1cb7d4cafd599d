"""The worker's uvicorn protocols on a real socket (what uvicorn leaves unsaid or uncollected), and its gc callback."""

import asyncio
import contextlib
import gc
import weakref

import pytest
from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.server import ServerState

from chatsite.worker import ChatHttpToolsProtocol, ChatSansIOProtocol, ChatWSProtocol, FreezeAfterFullCollections
from loadtest.wsclient import handshake_request


async def test_the_http_protocol_of_an_upgraded_connection_is_freed_without_the_cyclic_collector():
    """uvicorn leaves it in a cycle with its parser: 30 objects per socket for the full collections to find."""
    accepted, protocols = asyncio.Event(), []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        await receive()  # until the client goes

    config = Config(app=app, lifespan="off", http=ChatHttpToolsProtocol, ws=ChatWSProtocol)
    config.load()
    state = ServerState()

    def made():
        protocols.append(weakref.ref(protocol := ChatHttpToolsProtocol(config, state, {})))
        return protocol

    server = await asyncio.get_running_loop().create_server(made, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gc.disable()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake_request("127.0.0.1", port, "/ws/"))
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
        await asyncio.wait_for(accepted.wait(), 5)
        assert protocols and protocols[0]() is None, "the upgraded connection's HTTP protocol outlived its hand-over"
        writer.close()
    finally:
        gc.enable()
        server.close()
        await server.wait_closed()


def test_full_collections_freeze_their_survivors_and_one_past_the_interval_scans_everything():
    class Node:
        pass

    now = [0.0]  # the freezer's clock, moved by hand: the collections themselves are real
    freezer = FreezeAfterFullCollections(scan_everything_every=600.0, clock=lambda: now[0])
    gc.collect()
    gc.callbacks.append(freezer)
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle, alive through the first full collection
        gone = weakref.ref(a)
        gc.collect()
        assert gc.get_freeze_count() > 0, "a full collection froze what survived it"
        del a, b
        now[0] = 599.0
        gc.collect()
        assert gone() is not None, "a frozen cycle is not scanned by a full collection within the interval"
        now[0] = 600.0
        gc.collect()  # the interval has passed: everything unfrozen and scanned
        assert gone() is None
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        gc.collect()
        del a, b
        now[0] = 1199.0
        gc.collect()
        assert gone() is not None, "the interval counts from the last scan of everything"
    finally:
        gc.callbacks.remove(freezer)
        gc.unfreeze()


@contextlib.asynccontextmanager
async def one_socket(protocol_class, app, protocols):
    """A server of ``protocol_class`` running ``app`` (its protocols appended to ``protocols``), and a client
    that has sent it a handshake: the client's reader and writer."""
    config = Config(app=app, lifespan="off")
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: protocols.append(protocol_class(config, state, {})) or protocols[-1], "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake_request("127.0.0.1", port, "/ws/"))
    try:
        yield reader, writer
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("protocol_class", [ChatWSProtocol, ChatSansIOProtocol])
async def test_accepting_a_handshake_whose_client_is_gone_says_so(protocol_class):
    """uvicorn would accept nothing and fail the next send with a RuntimeError; the consumer's disconnect never ran."""
    outcome, protocols = asyncio.get_running_loop().create_future(), []

    async def app(scope, receive, send):
        assert (await receive())["type"] == "websocket.connect"
        # The client drops the socket: the transport is closing and connection_lost comes a turn later.
        protocols[0].transport.close()
        try:
            await send({"type": "websocket.accept"})
        except ClientDisconnected:
            outcome.set_result("client gone")
        else:
            outcome.set_result("accepted")

    async with one_socket(protocol_class, app, protocols) as (reader, _):
        assert await asyncio.wait_for(outcome, 5) == "client gone"
        assert await asyncio.wait_for(reader.read(), 5) == b"", "nothing written to a socket being closed"


@pytest.mark.parametrize("first_close", ["server", "app"])
@pytest.mark.parametrize("protocol_class", [ChatWSProtocol, ChatSansIOProtocol])
async def test_a_close_after_the_socket_was_closed_is_done_not_an_error(protocol_class, first_close):
    """The server closes a socket itself (as a hand-over does, 1012), or a closing path of the app did, while
    the app waits on the layer; its close afterwards returns quietly, where uvicorn raised RuntimeError
    ("after sending 'websocket.close'", a traceback at ERROR) or ClientDisconnected."""
    outcome, protocols = asyncio.get_running_loop().create_future(), []

    async def app(scope, receive, send):
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        if first_close == "server":
            protocols[0].shutdown()  # what the worker's hand-over and drain call
        else:
            await send({"type": "websocket.close", "code": 1012})
        try:
            await send({"type": "websocket.close", "code": 4503})
        except Exception as error:  # noqa: BLE001 - the test reports what the send raised
            outcome.set_result(repr(error))
        else:
            outcome.set_result("closed")

    async with one_socket(protocol_class, app, protocols) as (reader, writer):
        assert await asyncio.wait_for(outcome, 5) == "closed"
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
        # The client gets the first close (1012), answers it, and nothing else comes before the end.
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x88\x02\x03\xf4"
        writer.write(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # a masked close (1000), mask zero
        assert await asyncio.wait_for(reader.read(), 5) == b"", "a second close reached the client"


async def test_the_wsproto_protocol_offers_its_direct_write_in_the_scope_and_it_writes_one_frame():
    """The chat writes room messages through this extension; without it every delivery would take the ASGI send."""
    from chatsite.worker import DIRECT_WRITE

    offered = asyncio.get_running_loop().create_future()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        direct = scope["extensions"].get(DIRECT_WRITE)
        offered.set_result(direct is not None and direct["send_text_now"]()("room message"))
        await receive()  # until the client goes

    config = Config(app=app, lifespan="off", http=ChatHttpToolsProtocol, ws=ChatWSProtocol)
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(lambda: ChatHttpToolsProtocol(config, state, {}), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake_request("127.0.0.1", port, "/ws/"))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert await asyncio.wait_for(offered, 5) is True
        # An unmasked text frame of the message, written at once.
        assert await asyncio.wait_for(reader.readexactly(2 + len("room message")), 5) == b"\x81\x0croom message"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def _masked(opcode, payload, mask=b"\x01\x02\x03\x04"):
    """A client frame: FIN, ``opcode``, a masked length under 126, the mask, the masked payload. Not the load
    client's ``wsclient.frame``: its mask is zero, which would leave the worker's unmasking untested."""
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


@contextlib.asynccontextmanager
async def _pinging_server(app, ping_timeout=5.0):
    """A server of the chat's wsproto protocol that pings every 20 ms; its port."""
    config = Config(
        app=app,
        lifespan="off",
        http=ChatHttpToolsProtocol,
        ws=ChatWSProtocol,
        ws_ping_interval=0.02,
        ws_ping_timeout=ping_timeout,
    )
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(lambda: ChatHttpToolsProtocol(config, state, {}), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("pong_arrives", ["whole", "in two writes", "after a text frame in one write"])
async def test_answered_keepalive_pings_keep_the_socket_open_however_the_pong_arrives(pong_arrives):
    """The worker frames its pings and reads a whole pong itself; a pong in parts, or behind another frame, is
    wsproto's to read. Every way, the next ping follows an answered one and the app gets every message."""
    messages = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        while (event := await receive())["type"] != "websocket.disconnect":
            messages.append(event["text"])

    async with _pinging_server(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake_request("127.0.0.1", port, "/ws/"))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        payloads = set()
        for turn in range(4):
            ping = await asyncio.wait_for(reader.readexactly(6), 5)
            assert ping[:2] == b"\x89\x04", ping  # a ping, not a close: the pong before it was taken
            payloads.add(ping[2:])
            pong = _masked(0xA, ping[2:])
            if pong_arrives == "whole":
                writer.write(pong)
            elif pong_arrives == "in two writes":
                writer.write(pong[:3])
                await writer.drain()
                writer.write(pong[3:])
            else:
                writer.write(_masked(0x1, f"message {turn}".encode()) + pong)
            await writer.drain()
        assert len(payloads) == 4, "a ping payload repeated: a stale pong could pass for a new one"
        if pong_arrives.startswith("after"):
            assert messages[:3] == ["message 0", "message 1", "message 2"]
        writer.close()


async def test_a_pong_to_another_ping_is_no_answer_and_the_socket_closes_as_uvicorn_does():
    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        await receive()

    async with _pinging_server(app, ping_timeout=0.2) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(handshake_request("127.0.0.1", port, "/ws/"))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        ping = await asyncio.wait_for(reader.readexactly(6), 5)
        stale = bytes(byte ^ 0xFF for byte in ping[2:])
        writer.write(_masked(0xA, stale))
        await writer.drain()
        # No other ping: the keepalive's close (1011, "keepalive ping timeout") once the pong is overdue.
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x88\x18\x03\xf3"
        writer.close()
