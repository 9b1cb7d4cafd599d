"""ASGI middleware: X-Served-By on every HTTP response and WebSocket handshake response."""

from asgiref.sync import markcoroutinefunction

from .identity import HEADER, worker_id


class ServedByMiddleware:
    """Adds the worker id to responses; a refused WebSocket handshake becomes an HTTP 403 that carries it.

    Like every layer in front of the consumer, it returns the inner app's coroutine instead of awaiting
    it: a coroutine frame kept alive for each open socket costs about 0.3 to 0.5 KiB, more than the
    layer itself holds for the socket. Marked as a coroutine function, as servers and asgiref look
    for one to tell an ASGI 3 app.
    """

    _asgi_single_callable = True

    def __init__(self, app):
        self.app = app
        self.header = (HEADER, worker_id().encode())
        self.header_only = [self.header]

    @markcoroutinefunction
    def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return self.app(scope, receive, send)
        can_deny = "websocket.http.response" in scope.get("extensions", {})
        return self.app(scope, receive, _SendWithHeader(send, self.header, self.header_only, can_deny))


class _SendWithHeader:
    """The ASGI send of one connection, adding the header to its response start or handshake accept.

    A slotted object rather than a closure: one lives as long as each WebSocket, so its size counts.
    """

    __slots__ = ("can_deny", "header", "header_only", "send", "started")

    def __init__(self, send, header, header_only, can_deny):
        self.send, self.header, self.header_only, self.can_deny, self.started = send, header, header_only, can_deny, False

    @property
    def forwarding_to(self):
        """The server's send once the response has started (this wrapper only forwards from then on), else self."""
        return self.send if self.started else self

    async def __call__(self, message):
        if self.started:
            return await self.send(message)
        kind = message["type"]
        if kind in ("http.response.start", "websocket.accept"):
            self.started = True
            headers = message.get("headers")
            # A list shared by the responses that add no header of their own: uvicorn keeps it per socket.
            message = {**message, "headers": [*headers, self.header] if headers else self.header_only}
        elif kind == "websocket.close" and self.can_deny:
            # Refused before accept: answer with a real HTTP status instead of a bare close.
            self.started = True
            body = f"WebSocket refused ({message.get('reason') or 'forbidden'})\n".encode()
            await self.send(
                {
                    "type": "websocket.http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"text/plain"), self.header],
                }
            )
            return await self.send({"type": "websocket.http.response.body", "body": body})
        return await self.send(message)
