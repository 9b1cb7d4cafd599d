"""Room fan-out: Locust users that chat in shared rooms over the chat.v2 WebSocket protocol.

Each delivery of a room message is reported as a Locust request of type DELIVER whose response time is
the fan-out latency (receive time minus the server's send time). Settings come from the environment:
ROOMS (room count, default 5), MESSAGE_INTERVAL_S (seconds between a user's messages, default 1).
"""

import itertools
import json
import os
import time
import uuid
from urllib.parse import urlsplit

import gevent
import websocket
from locust import User, between, events, task

ROOMS = int(os.environ.get("ROOMS", "5"))
MESSAGE_INTERVAL_S = float(os.environ.get("MESSAGE_INTERVAL_S", "1"))
_user_numbers = itertools.count()


class RoomUser(User):
    """Joins one room, sends a message every MESSAGE_INTERVAL_S and receives everyone's."""

    wait_time = between(MESSAGE_INTERVAL_S * 0.5, MESSAGE_INTERVAL_S * 1.5)

    def on_start(self):
        target = urlsplit(self.host)
        scheme = "wss" if target.scheme == "https" else "ws"
        self.room = f"load-{next(_user_numbers) % ROOMS}"
        started = time.perf_counter()
        self.socket, self.receiver, error = None, None, None
        try:
            self.socket = websocket.create_connection(
                f"{scheme}://{target.netloc}/ws/chat/{self.room}/", subprotocols=["chat.v2"],
                origin=f"{target.scheme}://{target.netloc}", timeout=10,
            )
        except (websocket.WebSocketException, OSError) as refused:
            error = refused
        self.served_by = self.socket.getheaders().get("x-served-by", "") if self.socket else ""
        events.request.fire(request_type="WSCONNECT", name="join", response_time=(time.perf_counter() - started) * 1000,
                            response_length=0, exception=error, context={"served_by": self.served_by})
        if error:
            self.stop()
        self.receiver = gevent.spawn(self.receive)

    def on_stop(self):
        if self.receiver:
            self.receiver.kill(block=False)
        if self.socket:
            self.socket.close()

    def receive(self):
        while True:
            try:
                frame = json.loads(self.socket.recv())
            except (websocket.WebSocketException, OSError, ValueError) as error:
                events.request.fire(request_type="DELIVER", name="receive", response_time=0, response_length=0,
                                    exception=error, context={})
                return
            if frame.get("type") == "message":
                events.request.fire(
                    request_type="DELIVER", name="room", response_time=(time.time() - frame["sent_at"]) * 1000,
                    response_length=len(frame["message"]), exception=None, context={"sender": frame.get("sender")},
                )

    @task
    def send(self):
        self.socket.send(json.dumps({"message": f"hello from {self.served_by}", "nonce": uuid.uuid4().hex}))
