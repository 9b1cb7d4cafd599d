"""Locust scenarios that prove cross-worker fan-out: room fan-out, churn and a reconnect storm.

Users speak the chat.v2 WebSocket protocol (websocket-client under gevent). Every delivery of a room
message is a Locust request of type DELIVER, named same-worker or cross-worker by the X-Served-By of
sender and receiver, whose response time is the fan-out latency. At the end the master (or the lone
local runner) prints the verdict, saves it as JSON and CSV and sets the exit status: 1 (FAIL) when an
expected delivery is missing, when no delivery crossed workers although two or more served sockets,
or when p99 passes --max-p99-ms; 2 (INCONCLUSIVE) when p99 passes it while a generating process was
saturated (its own CPU, sampled every 2 s, reached 90%), since its latencies are then its own.
`make loadtest` spreads the users over processes (`--processes`). Pick a scenario by class name: RoomFanoutUser (default),
ChurnUser, ReconnectStormUser. Options (also as LOADTEST_* environment variables) are listed by
`locust -f loadtest/locustfile.py --help`.
"""

import itertools
import json
import logging
import random
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import gevent
import websocket
from locust import User, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ledger import Ledger, describe, generator, save, verdict
from resume import Place

logger = logging.getLogger("loadtest")
EXIT_STATUS = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 2}
ledger = Ledger()
_user_numbers = itertools.count()


@events.init_command_line_parser.add_listener
def add_options(parser):
    group = parser.add_argument_group("chat fan-out")
    group.add_argument("--rooms", type=int, default=5, env_var="LOADTEST_ROOMS", help="rooms the users spread over")
    group.add_argument(
        "--room-distribution",
        choices=["uniform", "zipf"],
        default="uniform",
        env_var="LOADTEST_ROOM_DISTRIBUTION",
        help="room sizes: even, or room k weighted 1/k",
    )
    group.add_argument(
        "--message-interval",
        type=float,
        default=1.0,
        env_var="LOADTEST_MESSAGE_INTERVAL",
        help="seconds between two messages of one user",
    )
    group.add_argument(
        "--max-p99-ms",
        type=float,
        default=1000.0,
        env_var="LOADTEST_MAX_P99_MS",
        help="fail when the p99 fan-out latency is higher",
    )
    group.add_argument(
        "--leave-grace",
        type=float,
        default=1.0,
        env_var="LOADTEST_LEAVE_GRACE",
        help="messages sent this close before a member leaves are not expected to reach it",
    )
    group.add_argument(
        "--churn-messages",
        type=int,
        default=3,
        env_var="LOADTEST_CHURN_MESSAGES",
        help="ChurnUser: messages sent before leaving and joining another room",
    )
    group.add_argument(
        "--storm-interval",
        type=float,
        default=10.0,
        env_var="LOADTEST_STORM_INTERVAL",
        help="ReconnectStormUser: seconds between storms (all users drop at once)",
    )
    group.add_argument(
        "--report-dir", default="artifacts/loadtest", env_var="LOADTEST_REPORT_DIR", help="where verdict.json and verdict.csv go"
    )


@events.test_start.add_listener
def refuse_unbounded(environment, **_):
    options = environment.parsed_options
    if options and options.headless and not options.run_time and not isinstance(environment.runner, WorkerRunner):
        logger.error("refusing an unbounded run: give --run-time")
        environment.runner.quit()


CPU_SAMPLE_SECONDS = 2.0
_sampler = None


@events.test_start.add_listener
def sample_own_cpu(environment, **_):
    """Each generating process samples its own CPU, so the verdict can tell a busy client from a slow server."""
    global _sampler
    if isinstance(environment.runner, MasterRunner) or _sampler is not None:
        return
    name = generator()

    def sample():
        cpu, wall = time.process_time(), time.monotonic()
        while True:
            gevent.sleep(CPU_SAMPLE_SECONDS)
            now_cpu, now_wall = time.process_time(), time.monotonic()
            ledger.cpu_sample(name, 100 * (now_cpu - cpu) / (now_wall - wall))
            cpu, wall = now_cpu, now_wall

    _sampler = gevent.spawn(sample)


@events.test_stop.add_listener
def stop_sampling(environment, **_):
    global _sampler
    if _sampler is not None:
        _sampler.kill(block=False)
        _sampler = None


@events.report_to_master.add_listener
def hand_records_to_master(client_id, data):
    data["fanout"] = ledger.drain()


@events.worker_report.add_listener
def take_records_from_worker(client_id, data):
    ledger.merge(data.get("fanout", {}))


@events.quitting.add_listener
def judge(environment, **_):
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    options = environment.parsed_options
    summary = verdict(ledger, options.leave_grace, options.max_p99_ms)
    save(summary, options.report_dir)
    print(describe(summary), flush=True)
    environment.process_exit_code = EXIT_STATUS[summary["outcome"]]


def close_quietly(socket):
    """The close handshake, two seconds at most; a peer that is gone already is no error."""
    try:
        socket.close(timeout=2)
    except (websocket.WebSocketException, OSError):
        pass


class ChatUser(User):
    """A chat member: one socket in one room at a time, a receiver greenlet, messages with a nonce."""

    abstract = True
    wait_time = constant(0)

    def on_start(self):
        options = self.environment.parsed_options
        number = next(_user_numbers)
        worker = (
            getattr(self.environment.runner, "worker_index", 0) if not isinstance(self.environment.runner, MasterRunner) else 0
        )
        self.random = random.Random(f"{worker}-{number}")
        self.rooms = options.rooms
        self.weights = [1 / (k + 1) for k in range(self.rooms)] if options.room_distribution == "zipf" else None
        self.interval = options.message_interval
        self.socket = self.receiver = self.member = None
        self.place = Place()  # the last room message this member has, for a resume
        self.join(self.pick_room())

    def on_stop(self):
        self.leave()

    def pick_room(self):
        index = self.random.choices(range(self.rooms), weights=self.weights)[0]
        return f"load-{index}"

    def join(self, room, name="join"):
        """Open a socket in `room`; reported as a WSCONNECT request. A "resume" goes on as the same member."""
        target = urlsplit(self.host)
        self.room, started = room, time.perf_counter()
        resuming = name == "resume" and self.place.epoch is not None
        query = f"?{urlencode(self.place.query())}" if resuming else ""
        if not resuming:
            self.place.forget()
        try:
            self.socket = websocket.create_connection(
                f"{'wss' if target.scheme == 'https' else 'ws'}://{target.netloc}/ws/chat/{room}/{query}",
                subprotocols=["chat.v2"],
                origin=f"{target.scheme}://{target.netloc}",
                timeout=15,
            )
        except (websocket.WebSocketException, OSError) as error:
            self.socket = None
            self.report("WSCONNECT", name, started, error)
            return
        self.served_by = self.socket.getheaders().get("x-served-by", "?")
        if not resuming:
            self.member = uuid.uuid4().hex[:16]
            ledger.join(self.member, room, self.served_by)
        self.report("WSCONNECT", name, started)
        self.receiver = gevent.spawn(self.receive, self.socket, self.member)

    def leave(self):
        if self.socket is None:
            return
        ledger.leave(self.member)
        self.drop()

    def drop(self):
        """Close the socket; the member stays in the room for the ledger (it resumes)."""
        if self.socket is None:
            return
        socket, self.socket = self.socket, None
        # The receiver stops reading first, so the close handshake has the socket to itself.
        self.receiver.kill(block=True)
        # websocket-client's close() swallows every exception, a kill too (a user that would never stop): the
        # handshake gets a greenlet of its own, so a stop lands here, in the join.
        gevent.spawn(close_quietly, socket).join()

    def receive(self, socket, member):
        while True:
            try:
                frame = json.loads(socket.recv())
            except (websocket.WebSocketException, OSError, ValueError):
                return
            kind = frame.get("type")
            self.place.on_frame(frame)
            if kind == "recovered":
                ledger.recovered(member, frame["recovered"])
            if kind != "message":
                continue
            if "nonce" not in frame:
                continue
            received_at = time.time()
            sent_at = float(frame["message"].partition(" ")[0])
            kind = "same-worker" if frame.get("sender") == self.served_by else "cross-worker"
            ledger.receive(frame["nonce"], member, received_at)
            self.environment.events.request.fire(
                request_type="DELIVER",
                name=kind,
                response_time=(received_at - sent_at) * 1000,
                response_length=len(frame["message"]),
                exception=None,
                context={},
            )

    def say(self):
        """Send one message; it carries its send time, its nonce is how receipts are matched."""
        if self.socket is None:
            return
        nonce, sent_at = uuid.uuid4().hex, time.time()
        ledger.send(nonce, self.room, self.member, sent_at)
        try:
            self.socket.send(json.dumps({"message": f"{sent_at:.6f} from {self.member}", "nonce": nonce}))
        except (websocket.WebSocketException, OSError) as error:
            self.report("WSSEND", "message", time.perf_counter(), error)
            self.leave()

    def report(self, kind, name, started, error=None):
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=error,
            context={},
        )

    def pause(self):
        gevent.sleep(self.random.uniform(0.5, 1.5) * self.interval)


class RoomFanoutUser(ChatUser):
    """Joins one room and chats in it for the whole run."""

    @task
    def chat(self):
        if self.socket is None:
            self.join(self.pick_room(), name="rejoin")
        self.say()
        self.pause()


class ChurnUser(ChatUser):
    """Joins a room, sends a few messages, leaves and joins another (or the same) room, over and over."""

    @task
    def churn(self):
        for _ in range(self.environment.parsed_options.churn_messages):
            self.say()
            self.pause()
        # Stay long enough for the last messages to be owed to this member, then leave.
        gevent.sleep(self.environment.parsed_options.leave_grace)
        self.leave()
        self.join(self.pick_room(), name="rejoin")


class ReconnectStormUser(ChatUser):
    """Chats in one room; every --storm-interval seconds of wall time all users drop and reconnect at once,
    resuming where they were (chat.v2 since/epoch): owed everything said meanwhile."""

    @task
    def chat_through_storms(self):
        storm = self.environment.parsed_options.storm_interval
        next_storm = (time.time() // storm + 1) * storm
        while time.time() < next_storm:
            self.say()
            gevent.sleep(min(self.random.uniform(0.5, 1.5) * self.interval, max(0.0, next_storm - time.time())))
        self.drop()
        self.join(self.room, name="resume")
