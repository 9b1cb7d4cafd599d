"""The benchmark's ceiling and bare baseline: an ASGI app with no Django and no channel layer.

It accepts sockets on any path (the path is the room), and broadcasts each text frame it receives to
the room's sockets in its own process, encoded once. Served by the same gunicorn + uvicorn settings
as the chat, it shows what the server itself can push (ceiling) and hold (idle memory per socket).
"""

import json
from collections import defaultdict

from chatsite.identity import worker_id

HEADERS = [(b"x-served-by", worker_id().encode())]
rooms = defaultdict(set)


async def application(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"), *HEADERS]})
        await send({"type": "http.response.body", "body": b"ok\n"})
        return
    if scope["type"] != "websocket":
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept", "headers": HEADERS})
    members = rooms[scope["path"]]
    members.add(send)
    try:
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            if event.get("text"):
                frame = json.dumps({"message": json.loads(event["text"])["message"]})
                for member in list(members):
                    await member({"type": "websocket.send", "text": frame})
    finally:
        members.discard(send)
