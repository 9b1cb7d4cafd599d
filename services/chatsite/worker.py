"""The gunicorn worker class: uvicorn, with draining on SIGTERM and limits from settings."""

import asyncio
import functools
import gc
import itertools
import logging
import sys
import time
import weakref
from typing import ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Pong
from wsproto.frame_protocol import FrameProtocol

from . import balance, health, rebalance
from . import environment as env

# wsproto holds an idle socket in less memory than websockets-sansio and, with room messages written
# through ChatWSProtocol.send_text_now, fans out faster; both are measured side by side by `make bench`.
WS_DEFAULT = env.BY_NAME["UVICORN_WS"].default
# The ASGI scope extension by which ChatWSProtocol offers the app its direct write: {"send_text_now": a
# weak reference to the method}, weak so that a socket's scope does not hold its protocol in a cycle.
DIRECT_WRITE = "chat.send_text_now"
# The server refuses frames far beyond the app's own limit; the app answers smaller oversize frames clearly.
WS_MAX_SIZE = 4 * env.integer("CHAT_MAX_FRAME_BYTES")


logger = logging.getLogger(__name__)
# Seconds over which a stopping worker closes its WebSockets (1012), so their clients do not all
# reconnect in the same instant; below GRACEFUL_TIMEOUT, which ends the worker.
DRAIN_SECONDS = env.number("DRAIN_SECONDS")
# A worker that cannot reach Redis is unready at once (within the layer's follow_interval + command_timeout,
# 3 s); its WebSockets, which would receive nothing, are closed with 1012 after this many seconds more
# (time for the ingress to stop sending it new ones) over HANDOVER_SPREAD_SECONDS, so their clients resume
# on workers that can.
HANDOVER_AFTER_SECONDS = env.number("CHAT_HANDOVER_AFTER")
HANDOVER_SPREAD_SECONDS = 2.0  # at most; at least 100 sockets a second
HANDOVER_CHECK_SECONDS = 0.5
WS_PROTOCOLS = "uvicorn.protocols.websockets."
# A stopping worker lets handshakes it accepted before the stop finish for at most this long.
HANDSHAKES_FINISH_SECONDS = 2.0


class DrainingServer(Server):
    """Fails /readyz as soon as the stop signal arrives, then closes WebSockets spread over DRAIN_SECONDS;
    hands its WebSockets over while it cannot reach Redis."""

    def handle_exit(self, sig, frame):
        health.start_draining()
        for listener in self.listeners:
            listener.close()  # what is queued goes to the pod's other workers
        super().handle_exit(sig, frame)

    accept_row = None  # this worker's row of balance.TABLE, when the pod's workers take turns accepting
    listeners = ()  # its balance.BalancedListeners, also in uvicorn's self.servers
    handing_over = None  # the task that hands sockets over while Redis is out of reach, once started
    rebalancer = None  # the rebalance.Rebalancer, when CHAT_REBALANCE is on and the server started

    async def startup(self, sockets=None):
        """uvicorn's startup; the public port is accepted from in turns with the pod's other workers."""
        ops = health.ops_port()
        balanced = [] if self.accept_row is None else [sock for sock in sockets or [] if _port_of(sock) != ops]
        await super().startup(sockets=[sock for sock in sockets or [] if sock not in balanced])
        self.listeners = [
            balance.BalancedListener(sock, self.create_protocol, balance.TABLE, self.accept_row, self.server_state.connections)
            for sock in balanced
        ]
        self.servers.extend(self.listeners)
        self.handing_over = asyncio.ensure_future(self.hand_over_while_cut_off())
        self.rebalancer = rebalance.Rebalancer(self) if env.flag("CHAT_REBALANCE") else None
        if self.rebalancer is not None:
            self.rebalancing = asyncio.ensure_future(self.rebalancer.run())

    def create_protocol(self, _loop=None):
        return self.config.http_protocol_class(
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop
        )

    async def on_tick(self, counter):
        for listener in self.listeners:
            listener.beat()
        return await super().on_tick(counter)

    def websockets(self):
        """The open connections that are WebSockets (uvicorn keeps HTTP and WebSocket ones in one set)."""
        return [c for c in self.server_state.connections if _is_websocket(type(c))]

    async def hand_over_while_cut_off(self):
        """Every HANDOVER_CHECK_SECONDS, ask the layer whether it reaches Redis; once it has not for HANDOVER_AFTER_SECONDS,
        close the WebSockets held here (1012, as a drain does), and any that arrive while it stays cut off."""
        from chat import metrics  # made in the worker, where the metrics directory exists

        loop = asyncio.get_running_loop()
        cut_off_since = None
        while not self.should_exit and not health.draining:
            await asyncio.sleep(HANDOVER_CHECK_SECONDS)
            problem = await health.layer_ready()
            if problem is None:
                if cut_off_since is not None:
                    logger.warning("Redis reached again after %.1f s: ready", loop.time() - cut_off_since)
                cut_off_since = None
                continue
            if cut_off_since is None:
                cut_off_since = loop.time()
                logger.warning("cannot reach Redis (%r): not ready", problem)
            if loop.time() - cut_off_since < HANDOVER_AFTER_SECONDS or health.draining:
                continue
            websockets = self.websockets()
            if not websockets:
                continue
            logger.warning(
                "cut off from Redis for %.1f s: handing %d WebSockets over (1012)", loop.time() - cut_off_since, len(websockets)
            )
            metrics.HANDED_OVER.inc(len(websockets))
            step = min(HANDOVER_SPREAD_SECONDS / len(websockets), 0.01)
            for connection in websockets:
                if connection in self.server_state.connections and not health.draining:
                    connection.shutdown()  # close code 1012 (service restart): the client resumes elsewhere
                    await asyncio.sleep(step)

    async def shutdown(self, sockets=None):
        if self.handing_over is not None:
            self.handing_over.cancel()
        if self.rebalancer is not None:
            self.rebalancing.cancel()
            await self.rebalancer.leave()
        # The public port stops taking connections; the internal one (OPS_BIND) answers until the end, so
        # probes see the drain (503, or 404 for ?drain=404) rather than a refused connection.
        ops = health.ops_port()
        keep_servers = [ops is not None and any(_port_of(sock) == ops for sock in server.sockets) for server in self.servers]
        keep_sockets = [ops is not None and _port_of(sock) == ops for sock in sockets or []]
        for server, keep in zip(self.servers, keep_servers):
            if not keep:
                server.close()
        for sock, keep in zip(sockets or [], keep_sockets):
            if not keep:
                sock.close()
        await self.finish_handshakes()
        websockets = self.websockets()
        logger.info("draining %d WebSockets over %.1f s", len(websockets), DRAIN_SECONDS)
        step = DRAIN_SECONDS / max(len(websockets), 1)
        for connection in websockets:
            if connection in self.server_state.connections:
                connection.shutdown()  # close code 1012 (service restart): the client reconnects elsewhere
                await asyncio.sleep(step)
        await super().shutdown()

    async def finish_handshakes(self):
        """Wait (at most HANDSHAKES_FINISH_SECONDS) for the connections accepted before the stop to become
        WebSockets: uvicorn would answer a handshake under way with 500, and close a connection whose request
        has not arrived yet without an answer. Once open, they are closed with 1012 like the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDSHAKES_FINISH_SECONDS
        while loop.time() < deadline and any(_still_handshaking(c) for c in self.server_state.connections):
            await asyncio.sleep(0.02)


def _still_handshaking(connection):
    if isinstance(connection, HttpToolsProtocol):
        return connection.cycle is None and not connection.transport.is_closing()  # its request not read yet
    return not connection.handshake_complete and not connection.transport.is_closing()


@functools.cache
def _is_websocket(kind):
    """Whether a protocol class is one of uvicorn's WebSocket ones: asked per connection every 2 s by the
    rebalancing, so answered once per class."""
    return any(base.__module__.startswith(WS_PROTOCOLS) for base in kind.__mro__)


def _port_of(sock):
    try:
        return sock.getsockname()[1]
    except (OSError, IndexError, TypeError, AttributeError):  # a socket closed already
        return None


# Keepalive ping payloads: a number from the worker's count tells a socket's pong to the ping in flight from a
# stale one, as uvicorn's random payload does.
PING_NUMBERS = itertools.count()


class ChatHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, freed as soon as it hands its connection to a WebSocket protocol.

    Its parser refers back to it; uvicorn breaks that cycle when an HTTP connection ends, not when it is
    upgraded, so every WebSocket left its HTTP protocol (and, once closed, its transport) to the cyclic
    garbage collector: about 30 objects per socket, collected only by the full collections whose pauses
    grow with the sockets a worker holds.
    """

    def handle_websocket_upgrade(self):
        super().handle_websocket_upgrade()
        self.parser = None


class RemembersWhenOpened:
    """Notes when its connection was made: rebalancing moves the sockets open longest first."""

    opened_at = 0.0

    def connection_made(self, transport):
        self.opened_at = asyncio.get_running_loop().time()
        super().connection_made(transport)


class SaysClientGoneOnAccept:
    """Accepting a handshake whose client already dropped it raises ClientDisconnected, as any later send does.

    uvicorn (wsproto and websockets-sansio) accepts nothing on a transport that is closing and fails the
    app's next send with a RuntimeError: a traceback, and a consumer that ends without its disconnect,
    keeping what its connect took.
    """

    async def send(self, message):
        if message["type"] == "websocket.accept" and not self.handshake_complete and self.transport.is_closing():
            raise ClientDisconnected()
        await super().send(message)


class TakesASecondCloseAsDone:
    """A close the app sends once the socket is closed already is done, not an error.

    The server closes sockets itself (a drain, a hand-over while Redis is out of reach, rebalancing), and
    a consumer waiting on the layer meanwhile may close the same socket when its call fails: uvicorn
    refuses that with a RuntimeError, a traceback at ERROR for an app that asked for what has happened
    (seen when every Redis node stalled for seconds under 100,000 sockets).
    """

    async def send(self, message):
        if message["type"] == "websocket.close" and self.handshake_complete and (self.close_sent or self.transport.is_closing()):
            return
        await super().send(message)


class ChatSansIOProtocol(RemembersWhenOpened, TakesASecondCloseAsDone, SaysClientGoneOnAccept, WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, which says when a handshake's client is gone."""


class ChatWSProtocol(RemembersWhenOpened, TakesASecondCloseAsDone, SaysClientGoneOnAccept, WSProtocol):
    """uvicorn's wsproto protocol, which says why it closes, says when a handshake's client is gone and
    writes room messages without a coroutine.

    wsproto reports a frame it cannot parse (a text frame that is no UTF-8: 1007; a bad frame: 1002) as
    if the client had closed with that code, and uvicorn then drops the connection with no close frame
    at all: this one answers with the close code.
    """

    # Server frames are unmasked and carry no extension here (no per-message deflate), so a text goes
    # out as the same bytes on every socket: a room message is framed once per worker, not per member.
    _framed_text = _frame_bytes = None
    _framer = FrameProtocol(client=False, extensions=[])

    def handle_connect(self, event):
        super().handle_connect(event)
        self.scope["extensions"][DIRECT_WRITE] = {"send_text_now": weakref.WeakMethod(self.send_text_now)}

    def handle_close(self, event):
        if not self.close_sent and self.conn.state == ConnectionState.OPEN:
            self.transport.write(self.conn.send(CloseConnection(code=event.code, reason=event.reason[:120])))
        super().handle_close(event)

    # A keepalive ping and its pong are framed and read here rather than through wsproto's events. A worker
    # holding 16,700 idle sockets pings 835 of them a second (uvicorn pings each every 20 s), and py-spy at rest
    # put a ping and its pong at about 100 µs of a worker, 40 of them in wsproto's framing and parsing.
    def send_keepalive_ping(self):
        """uvicorn's keepalive ping, as 6 bytes: FIN and opcode 0x9, an unmasked length of 4, the payload."""
        self.ping_timer = None
        if self.close_sent or self.transport.is_closing() or self.conn.state is not ConnectionState.OPEN:
            return
        self.pending_ping_payload = payload = (next(PING_NUMBERS) & 0xFFFFFFFF).to_bytes(4, "big")
        self.ping_sent_at = self.loop.time()
        self.transport.write(b"\x89\x04" + payload)
        if self.ping_timeout is not None:
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
        else:
            self.schedule_ping()

    def data_received(self, data):
        """A read that is one whole pong (FIN and opcode 0xA, a masked length of 4, the mask, the payload), while
        wsproto holds no part of another frame, is answered here; anything else goes through wsproto."""
        if len(data) == 10 and data[0] == 0x8A and data[1] == 0x84 and self.pending_ping_payload is not None:
            connection = self.conn.connection  # wsproto's, once the handshake is done
            decoder = connection._proto._frame_decoder if connection is not None else None  # pinned by uv.lock, tested
            if (
                decoder is not None
                and decoder.header is None
                and not len(decoder.buffer)
                and connection.state is ConnectionState.OPEN
            ):
                payload = (int.from_bytes(data[2:6], "big") ^ int.from_bytes(data[6:10], "big")).to_bytes(4, "big")
                self.handle_pong(Pong(payload=payload))
                return
        super().data_received(data)

    def send_text_now(self, text):
        """Write a text frame at once if the socket takes it without waiting; False: use the ASGI send."""
        if not (
            self.writable.is_set()
            and self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and not self.response_started
            and self.conn.state is ConnectionState.OPEN
            and not self.transport.is_closing()
        ):
            return False
        protocol = ChatWSProtocol
        if text is not protocol._framed_text:
            protocol._frame_bytes = protocol._framer.send_data(text, True)
            protocol._framed_text = text
        self.transport.write(protocol._frame_bytes)
        return True


class FreezeAfterFullCollections:
    """A gc callback: what survives a full collection is frozen, so the next one scans only what came since.

    CPython's full collection visits every tracked object, about 80 per open socket here, and runs each
    time they grow by a quarter: pauses of hundreds of milliseconds while a worker takes back thousands
    of sockets. Frozen objects are still freed by reference counting; only cycles among them wait, for a
    full collection that scans everything, at most every ``scan_everything_every`` seconds.

    That scan stops the worker for as long as it takes: 4.0 to 5.3 s on each of 6 workers holding 16,700
    sockets (1.1 million objects) on 2 busy cores, long enough for a worker to miss its presence lease
    (renewed every 3.3 s, kept 6.7 s) and write 10,000 rooms' entries back. Done every eighth full
    collection, that was every minute or two while sockets opened; no socket leaves a cycle
    (``ChatHttpToolsProtocol``), and each of those scans collected nothing. Ten minutes bounds what a cycle
    that does form can hold.
    """

    def __init__(self, scan_everything_every=600.0, clock=time.monotonic):
        self.scan_everything_every, self.clock = scan_everything_every, clock
        self.scanned_everything_at = clock()

    def __call__(self, phase, info):
        if info["generation"] != 2:
            return
        if phase == "start":
            if self.clock() - self.scanned_everything_at >= self.scan_everything_every:
                self.scanned_everything_at = self.clock()
                gc.unfreeze()
        else:
            gc.freeze()


def _ws_protocol(name):
    return {"wsproto": ChatWSProtocol, "websockets-sansio": ChatSansIOProtocol}.get(name, name)


class ChatUvicornWorker(UvicornWorker):
    """uvicorn with uvloop and httptools, no lifespan (Django has none) and a bounded frame size."""

    CONFIG_KWARGS: ClassVar[dict] = {
        "loop": env.text("UVICORN_LOOP"),
        "http": ChatHttpToolsProtocol,
        "ws": _ws_protocol(env.text("UVICORN_WS")),
        "lifespan": "off",
        "ws_max_size": WS_MAX_SIZE,
        "ws_per_message_deflate": False,
    }

    accept_row = None  # given by the arbiter's pre_fork when the pod's workers take turns accepting

    async def _serve(self):
        gc.callbacks.append(FreezeAfterFullCollections())
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        server.accept_row = self.accept_row
        self._install_sigquit_handler()
        health.connect_in_background()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
