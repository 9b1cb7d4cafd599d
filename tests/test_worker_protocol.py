"""The worker's uvicorn WebSocket protocols, on a real socket: what uvicorn itself leaves unsaid."""

import asyncio
import base64
import os

import pytest
from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.server import ServerState

from chatsite.worker import ChatSansIOProtocol, ChatWSProtocol


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

    config = Config(app=app, lifespan="off")
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: protocols.append(protocol_class(config, state, {})) or protocols[-1], "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    try:
        assert await asyncio.wait_for(outcome, 5) == "client gone"
        assert await asyncio.wait_for(reader.read(), 5) == b"", "nothing written to a socket being closed"
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
