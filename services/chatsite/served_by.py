"""ASGI middleware: X-Served-By on every HTTP response and WebSocket handshake response."""

from .identity import HEADER, worker_id


class ServedByMiddleware:
    """Adds the worker id to responses; a refused WebSocket handshake becomes an HTTP 403 that carries it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        served_by = (HEADER, worker_id().encode())
        can_deny = "websocket.http.response" in scope.get("extensions", {})
        accepted = False

        async def send_with_header(message):
            nonlocal accepted
            kind = message["type"]
            if kind in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), served_by]}
                accepted = True
            elif kind == "websocket.close" and not accepted and can_deny:
                # Refused before accept: answer with a real HTTP status instead of a bare close.
                accepted = True
                body = f"WebSocket refused ({message.get('reason') or 'forbidden'})\n".encode()
                await send({"type": "websocket.http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain"), served_by]})
                return await send({"type": "websocket.http.response.body", "body": body})
            return await send(message)

        return await self.app(scope, receive, send_with_header)
