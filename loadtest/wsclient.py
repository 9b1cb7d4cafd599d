"""A lean asyncio WebSocket client for the benchmark: thousands of sockets and tens of thousands of frames
per second from one process, so that the client takes as little of the machine as it can.

Only what the benchmark needs of RFC 6455: the upgrade handshake, unmasked text frames from the server
(handed to a callback as bytes), masked text frames to it, pong for ping, and close.
"""

import asyncio
import base64
import os
import socket as stdsocket
import struct

OPCODE_TEXT, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG = 0x1, 0x8, 0x9, 0xA


def frame(payload, opcode=OPCODE_TEXT):
    """A masked client frame (a zero mask: RFC 6455 requires masking, not a secret key)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return header + b"\x00\x00\x00\x00" + payload


class Socket(asyncio.Protocol):
    """One client socket; `on_text(payload_bytes)` is called for every text frame."""

    def __init__(self, on_text):
        self.on_text = on_text
        self.buffer = bytearray()
        self.handshake = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.transport = None
        self.served_by = None
        self.close_code = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if not self.handshake.done():
            self.handshake.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data):
        self.buffer += data
        if not self.handshake.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = bytes(self.buffer[:end]).decode("latin-1"), self.buffer[end + 4 :]
            status, *lines = head.split("\r\n")
            if " 101 " not in status + " ":
                self.handshake.set_exception(ConnectionError(status))
                self.transport.close()
                return
            headers = dict(line.split(": ", 1) for line in lines if ": " in line)
            self.served_by = next((v for k, v in headers.items() if k.lower() == "x-served-by"), None)
            self.handshake.set_result(self.served_by)
        self.parse()

    def parse(self):
        buffer = self.buffer
        offset = 0
        size = len(buffer)
        while size - offset >= 2:
            opcode = buffer[offset] & 0x0F
            length = buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                if size - offset < 4:
                    break
                length = struct.unpack_from("!H", buffer, start)[0]
                start += 2
            elif length == 127:
                if size - offset < 10:
                    break
                length = struct.unpack_from("!Q", buffer, start)[0]
                start += 8
            if size < start + length:
                break
            payload = bytes(buffer[start : start + length])
            offset = start + length
            if opcode == OPCODE_TEXT:
                self.on_text(payload)
            elif opcode == OPCODE_PING:
                self.transport.write(frame(payload, OPCODE_PONG))
            elif opcode == OPCODE_CLOSE:
                self.close_code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else None
                self.transport.close()
        del buffer[:offset]

    def send_text(self, payload):
        self.transport.write(frame(payload))

    def close(self):
        if self.transport and not self.transport.is_closing():
            self.transport.write(frame(struct.pack("!H", 1000), OPCODE_CLOSE))
            self.transport.close()


def handshake_request(host, port, path, origin=None, subprotocol=None):
    """The bytes of a WebSocket opening handshake for ws://host:port/path."""
    key = base64.b64encode(os.urandom(16)).decode()
    origin = origin or f"http://{host}:{port}"
    protocol = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n{protocol}\r\n"
    ).encode()


# Linux's IP_BIND_ADDRESS_NO_PORT: a socket bound to an address gets its port at connect, unique per
# destination, instead of at bind, unique per address; so one source address reaches 28,000 sockets
# to every server port, not 28,000 in all.
IP_BIND_ADDRESS_NO_PORT = 24


async def connect(host, port, path, on_text, origin=None, subprotocol=None, source=None):
    """An open Socket to ws://host:port/path; its `served_by` is the handshake's X-Served-By.

    ``source``: the local address to connect from (127.0.0.0/8 holds many): one address offers at most the
    28,000 ports of the ephemeral range to one server port, which 100,000 sockets outgrow.
    """
    loop = asyncio.get_running_loop()
    if source is None:
        _, socket = await loop.create_connection(lambda: Socket(on_text), host, port)
    else:
        sock = stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM)
        try:
            sock.setsockopt(stdsocket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        _, socket = await loop.create_connection(lambda: Socket(on_text), sock=sock)
    socket.transport.write(handshake_request(host, port, path, origin, subprotocol))
    await asyncio.wait_for(socket.handshake, 30)
    return socket
