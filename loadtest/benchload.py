"""The benchmark's load: rooms of sockets spread over client processes, numbered timed messages, counted.

The client is split over processes so that it is not what limits a run: each process holds its share
of every room's sockets, sends its share of each step's messages from them, and counts what its
sockets receive; the coordinator (`Load`, in the benchmark's process) adds it up. Every process reads
the same system-wide monotonic clock, so a latency is the receipt time minus the send time whichever
processes sent and received. Each step also reports the CPU each client process and each server
worker used while it sent, so a report can show which side was saturated.
"""

import asyncio
import gc
import json
import multiprocessing
import random
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlencode

import uvloop

from chat.protocol import CLOSE_TOO_SLOW
from loadtest import wsclient
from loadtest.ledger import percentile
from loadtest.resume import DUPLICATE, Place

RESUME_ATTEMPTS = 8  # handshakes a member closed as too slow tries before it counts as gone


class ChatWire:
    """The chat's tutorial (v1) frames: ``{"message": text}`` both ways."""

    PREFIX = b'{"message": "'

    @staticmethod
    def path(room):
        return f"/ws/chat/{room}/"

    @staticmethod
    def encode(text):
        return json.dumps({"message": text}).encode()

    V2_MESSAGE = b'{"type": "message"'

    @classmethod
    def message(cls, payload):
        """The room message a frame carries (v1, or a v2 member's message frame in a mixed room), or None."""
        if payload.startswith(cls.PREFIX):
            return payload[len(cls.PREFIX) : -2]
        if payload.startswith(cls.V2_MESSAGE):
            return json.loads(payload)["message"].encode()
        return None

    @staticmethod
    async def join(socket, receive):
        """The accepted handshake is the join: the consumer adds the socket to its room before accepting."""


class SocketIOWire:
    """Socket.IO 4 over its WebSocket transport (Engine.IO 4): ``42["message", text]`` events, pings answered."""

    EVENT = b'42["message","'
    JOINED = b'42["joined"'

    @staticmethod
    def path(room):
        return f"/socket.io/?EIO=4&transport=websocket&room={room}"

    @classmethod
    def encode(cls, text):
        return cls.EVENT + text.encode() + b'"]'

    @classmethod
    def message(cls, payload):
        return payload[len(cls.EVENT) : -2] if payload.startswith(cls.EVENT) else None

    @classmethod
    async def join(cls, socket, receive):
        """Connect to the main namespace and wait for the server's "joined" event (its room subscribed)."""
        joined = asyncio.get_running_loop().create_future()

        def on_text(payload):
            if payload == b"2":  # Engine.IO ping: a client that does not answer is closed after pingTimeout
                socket.send_text(b"3")
            elif payload.startswith(cls.JOINED) and not joined.done():
                joined.set_result(None)
            else:
                receive(payload)

        socket.on_text = on_text
        socket.send_text(b"40")
        await asyncio.wait_for(joined, 30)


class NchanWire:
    """nchan's pub/sub WebSocket: a text frame is the message itself, both ways."""

    @staticmethod
    def path(room):
        return f"/chat/{room}"

    @staticmethod
    def encode(text):
        return text.encode()

    @staticmethod
    def message(payload):
        return payload

    @staticmethod
    async def join(socket, receive):
        """The accepted handshake is the join."""


WIRES = {"chat": ChatWire, "socketio": SocketIOWire, "nchan": NchanWire}


def cpu_seconds(pid):
    """CPU seconds (user plus system) that the live threads of process ``pid`` have run so far.

    Read from each thread's ``schedstat``, which counts nanoseconds; ``/proc/<pid>/stat`` counts
    10 ms ticks, and a Redis node that serves a one-second smoke for a few milliseconds read as 0 there.
    Every process measured here (servers, Redis nodes, load clients) keeps its threads for its whole life.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended while we read
            continue
    return total / 1e9


class _Client:
    """One client process: its sockets of each room, what it sent and what they received."""

    def __init__(self, index, port, wire="chat", source=None):
        self.index, self.port, self.wire, self.source = index, port, WIRES[wire], source
        self.held = {}  # room -> sockets, of the rooms opened by hold(): idle, no step sends to them
        self.rooms = defaultdict(list)  # room -> [Socket]
        self.room_of = {}  # Socket -> room
        self.closed_at = {}  # Socket -> monotonic time its close was seen
        self.resuming = {}  # Socket -> Place, for sockets that resume when closed as too slow
        self.received = defaultdict(Counter)  # step -> message id -> receipts
        self.latencies = defaultdict(list)  # step -> [ms]
        self.sends = defaultdict(list)  # step -> [(message id, room, sent_at, sender)]
        self.seq = 0
        self.tasks = set()  # resumes under way, kept until done: the loop holds tasks only weakly
        self.resumes = self.resumes_refused = self.not_recovered = self.duplicates = 0

    def on_text(self, payload):
        text = self.wire.message(payload)
        if text is not None:
            self.on_message(text)

    def on_message(self, text):
        """A room message ``<id> <sent_at>`` received: counted for its step, with its latency."""
        message, _, sent_at = text.partition(b" ")
        step = message.partition(b".")[0]
        self.received[step][message] += 1
        self.latencies[step].append((time.perf_counter() - float(sent_at)) * 1000)

    def resuming_receiver(self, member):
        """A chat.v2 socket's frames: room messages counted once each, their offset kept for a resume."""

        def on_text(payload):
            frame = json.loads(payload)
            seen = member.on_frame(frame)
            if seen is DUPLICATE:
                self.duplicates += 1
            elif frame.get("type") == "message":
                self.on_message(frame["message"].encode())
            elif frame.get("type") == "recovered" and not frame["recovered"]:
                self.not_recovered += 1

        return on_text

    def track(self, socket, room):
        """Hold ``socket`` as a member of ``room``, noting when the server closes it."""
        self.rooms[room].append(socket)
        self.room_of[socket] = room
        socket.closed.add_done_callback(lambda _: self._closed(socket))

    def _closed(self, socket):
        if socket not in self.room_of:
            return  # one this process closed itself
        member = self.resuming.pop(socket, None)
        if member is not None and socket.close_code == CLOSE_TOO_SLOW:
            # As a chat.v2 client does: the same member comes back from where it was, owed all it missed.
            resuming = asyncio.ensure_future(self._resume(socket, member))
            self.tasks.add(resuming)
            resuming.add_done_callback(self.tasks.discard)
            return
        self.closed_at.setdefault(socket, time.perf_counter())

    async def _resume(self, socket, member):
        room = self.room_of[socket]
        # As a chat.v2 client does (docs/resume.md): an overloaded server may refuse a handshake, so it
        # tries again with exponential backoff and full jitter; bounded here, then it counts as gone.
        for attempt in range(RESUME_ATTEMPTS):
            try:
                resumed = await wsclient.connect(
                    "127.0.0.1",
                    self.port,
                    f"/ws/chat/{room}/?{urlencode(member.query())}",
                    self.resuming_receiver(member),
                    subprotocol="chat.v2",
                )
                break
            except (TimeoutError, OSError):
                self.resumes_refused += 1
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))
        else:
            self.closed_at.setdefault(socket, time.perf_counter())
            return
        self.resumes += 1
        self.rooms[room][self.rooms[room].index(socket)] = resumed
        del self.room_of[socket]
        self.room_of[resumed] = room
        self.resuming[resumed] = member
        resumed.closed.add_done_callback(lambda _: self._closed(resumed))

    async def connect(self, rooms, subprotocol=None, batch=200, resume=False):
        """Connect ``(room, count)`` pairs, ``batch`` handshakes at a time (None: all at once); served_by per room.

        With ``resume``, sockets speak chat.v2 and one the server closes as too slow (4408) resumes. The
        subprotocol "mixed" makes every second socket of a room a chat.v2 one, the others v1.
        """
        wanted = [room for room, count in rooms for _ in range(count)]
        batch = batch or max(1, len(wanted))
        for start in range(0, len(wanted), batch):
            part = wanted[start : start + batch]
            members = [Place() if resume else None for _ in part]
            protocols = [
                "chat.v2"
                if resume or (subprotocol == "mixed" and (start + n) % 2)
                else None
                if subprotocol == "mixed"
                else subprotocol
                for n in range(len(part))
            ]
            sockets = await asyncio.gather(
                *(
                    self._join(room, self.resuming_receiver(member) if resume else self.on_text, protocol)
                    for room, member, protocol in zip(part, members, protocols)
                )
            )
            for room, socket, member in zip(part, sockets, members):
                if resume:
                    self.resuming[socket] = member
                self.track(socket, room)
        return {room: [socket.served_by for socket in self.rooms[room]] for room, _ in rooms}

    async def hold(self, rooms, concurrency):
        """Open idle ``(room, count)`` sockets with at most ``concurrency`` handshakes in flight; a refused or
        failed handshake is counted by its error, not raised. Handshakes/s over the whole opening."""
        gate, refused, opened = asyncio.Semaphore(concurrency), Counter(), 0

        async def one(room):
            nonlocal opened
            async with gate:
                try:
                    socket = await self._join(room, self.on_text, None)
                except (OSError, TimeoutError) as error:  # refused, reset, an HTTP answer other than 101, no answer
                    refused[str(error)[:80] or type(error).__name__] += 1
                    return
            self.track(socket, room)
            self.held[room] = self.held.get(room, 0) + 1
            opened += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(room) for room, count in rooms for _ in range(count)))
        seconds = time.perf_counter() - started
        return {"opened": opened, "refused": dict(refused), "seconds": round(seconds, 3)}

    async def rehold(self, concurrency):
        """Every socket of hold() closes at once and connects again: a reconnect storm."""
        rooms = list(self.held.items())
        for room, _ in rooms:
            for socket in self.rooms.pop(room, []):
                del self.room_of[socket]
                socket.close()
        self.held.clear()
        return await self.hold(rooms, concurrency)

    def held_closed(self):
        """Sockets of hold() that the server has closed since they opened."""
        return sum(1 for room in self.held for socket in self.rooms[room] if socket.closed.done())

    async def _join(self, room, receive, subprotocol):
        socket = await wsclient.connect(
            "127.0.0.1", self.port, self.wire.path(room), receive, subprotocol=subprotocol, source=self.source
        )
        await self.wire.join(socket, receive)
        return socket

    def say(self, step, room, sender):
        """Send one numbered, timed message of ``step`` from ``sender`` and note it."""
        self.seq += 1
        message, now = f"{step}.{self.index}.{self.seq}", time.perf_counter()
        self.sends[step].append((message, room, now, sender))
        sender.send_text(self.wire.encode(f"{message} {now:.6f}"))

    def report(self, step, cpu_percent):
        """The sends of ``step`` and the closes seen so far, for the coordinator."""
        return {
            "sends": [(message, room, sent_at) for message, room, sent_at, _ in self.sends[step]],
            "closes": [(self.room_of[socket], at) for socket, at in self.closed_at.items()],
            "cpu_percent": cpu_percent,
        }

    def resumed(self):
        """Resumes after a 4408 so far, how many said they could not recover everything, duplicates seen."""
        return {
            "resumes": self.resumes,
            "resumes_refused": self.resumes_refused,
            "not_recovered": self.not_recovered,
            "duplicates": self.duplicates,
        }

    def say_once(self, step):
        """One message in each room, from one of this process's open sockets there; the step's sends."""
        for room, sockets in self.rooms.items():
            members = [s for s in sockets if not s.closed.done()]
            if members:
                self.say(step, room, members[0])
        return self.report(step, 0.0)

    async def run_step(self, step, messages_per_s, seconds, rooms):
        """Send ``messages_per_s`` from random open sockets of random ``rooms`` for ``seconds``; the step's sends."""
        cpu, started = time.process_time(), time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(int(messages_per_s * elapsed) - sent):
                room = random.choice(rooms)
                sent += 1
                # A random member, drawn again among the open ones only when it is closed: filtering
                # a room of 1,000 on every send would cost the client more than the send.
                sockets = self.rooms[room]
                sender = random.choice(sockets) if sockets else None
                if sender is not None and sender.closed.done():
                    members = [s for s in sockets if not s.closed.done()]
                    sender = random.choice(members) if members else None
                if sender is not None:
                    self.say(step, room, sender)
            await asyncio.sleep(0.002)
        return self.report(step, round(100 * (time.process_time() - cpu) / (time.perf_counter() - started), 1))

    def count(self, step):
        return sum(self.received[step.encode()].values())

    def collect(self, step):
        """What this process's sockets received of ``step``, and which of its sends' senders were closed by the server."""
        key = step.encode()
        refused = [message for message, _, _, sender in self.sends.pop(step, []) if sender.close_code is not None]
        return {
            "received": {message.decode(): n for message, n in self.received.pop(key, {}).items()},
            "latencies": self.latencies.pop(key, []),
            "sender_closed": refused,
        }

    def close(self):
        self.held.clear()
        for sockets in self.rooms.values():
            for socket in sockets:
                socket.close()
        self.rooms.clear()
        self.room_of.clear()
        self.closed_at.clear()
        self.resuming.clear()
        self.resumes = self.resumes_refused = self.not_recovered = self.duplicates = 0


def _serve(index, port, wire, connection, source=None):
    """A client process: run commands from the coordinator until it says stop."""

    async def main():
        client = _Client(index, port, wire, source)
        loop = asyncio.get_running_loop()
        while True:
            command, *arguments = await loop.run_in_executor(None, connection.recv)
            if command == "stop":
                client.close()
                await asyncio.sleep(0.1)
                connection.send(("ok", None))
                return
            try:
                result = getattr(client, command)(*arguments)
                if asyncio.iscoroutine(result):
                    result = await result
            except Exception:  # noqa: BLE001 - the coordinator raises it, with this process's traceback
                connection.send(("error", traceback.format_exc()))
            else:
                connection.send(("ok", result))
            # What a command leaves (its sockets, their futures) is frozen, so a collection scans only what
            # the next one makes. Unfrozen, every client process holding 16,700 idle sockets ran full
            # collections of 0.6 to 1.4 s, three each, in the 8 s of the talking step beside them: a message
            # that arrived then was timed late by the client's own pause. The price: sockets closed later
            # (a storm's) stay in memory with any cycle they are in until the process ends.
            gc.freeze()

    # uvloop, as the servers run: measured here, it takes 7% off the client's CPU per frame received.
    uvloop.run(main())


def _answer(reply):
    """A client process's result, or its failure raised here."""
    status, value = reply
    if status == "error":
        raise RuntimeError(f"benchmark client process failed:\n{value}")
    return value


class Load:
    """Rooms of sockets on a stack, held by ``processes`` client processes; steps of offered load, counted."""

    def __init__(self, stack, processes=2, own_source_addresses=False):
        """``own_source_addresses``: each client process connects from its own 127.0.0.x, for more sockets than
        one address has ports (see wsclient.connect)."""
        self.stack = stack
        context = multiprocessing.get_context("spawn")
        self.connections, self.processes = [], []
        for index in range(processes):
            ours, theirs = context.Pipe()
            source = f"127.0.0.{10 + index}" if own_source_addresses else None
            process = context.Process(target=_serve, args=(index, stack.port, stack.wire, theirs, source), daemon=True)
            process.start()
            self.connections.append(ours)
            self.processes.append(process)
        self.members = {}  # room -> [served_by]
        self.idle = set()  # rooms that only hold sockets: no step sends to them
        self.steps = 0

    async def _all(self, command, *per_process):
        """Send ``command`` to every client (with its own arguments) and gather their answers."""
        for connection, arguments in zip(self.connections, per_process or [()] * len(self.connections)):
            connection.send((command, *arguments))
        return [_answer(a) for a in await asyncio.gather(*(asyncio.to_thread(c.recv) for c in self.connections))]

    async def _one(self, index, command, *arguments):
        """Send ``command`` to one client and wait for its answer."""
        self.connections[index].send((command, *arguments))
        return _answer(await asyncio.to_thread(self.connections[index].recv))

    async def add_room(self, name, size, **options):
        await self.add_rooms([(name, size)], **options)

    def sockets_per_worker(self):
        """Open sockets by the worker id that accepted them."""
        return Counter(worker for members in self.members.values() for worker in members)

    def close(self):
        """Close every socket; the client processes stay for the next rooms."""
        for connection in self.connections:
            connection.send(("close",))
        for connection in self.connections:
            _answer(connection.recv())
        self.members = {}
        self.idle = set()

    def shutdown(self):
        """Close every socket and end the client processes."""
        for connection in self.connections:
            try:
                connection.send(("stop",))
                connection.recv()
            except (OSError, EOFError):
                pass  # that process has ended already
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()

    async def add_rooms(self, rooms, settle=0.5, subprotocol=None, idle=False, resume=False):
        """``(name, size)`` rooms, each split over the client processes; ``resume``: chat.v2 members that resume."""
        n = len(self.connections)
        per_process = [[(name, size // n + (i < size % n)) for name, size in rooms] for i in range(n)]
        served = await self._all("connect", *[(part, subprotocol, 200, resume) for part in per_process])
        for name, _ in rooms:
            self.members[name] = [worker for part in served for worker in part[name]]
            if idle:
                self.idle.add(name)
        await asyncio.sleep(settle)  # joins settle before traffic

    async def resumed(self):
        """Resumes after a 4408 over every client process, those not recovered, duplicates seen."""
        total = Counter()
        for part in await self._all("resumed"):
            total.update(part)
        return dict(total)

    async def storm(self, rooms, size):
        """``rooms`` rooms of ``size`` sockets connecting all at once, then one message in each: joins/s and delivery."""
        names = [f"storm-{index}" for index in range(rooms)]
        shares = [size // len(self.connections) + (i < size % len(self.connections)) for i in range(len(self.connections))]
        started = time.perf_counter()
        served = await self._all("connect", *[([(name, share) for name in names], None, None) for share in shares])
        seconds = time.perf_counter() - started
        for name in names:
            self.members[name] = [worker for part in served for worker in part[name]]
        self.steps += 1
        step = str(self.steps)
        # Right after the storm: one message per room, from the first client process, owed to every member.
        reports = [await self._one(0, "say_once", step)]
        result = await self._settle(step, reports, 1.0, drain=10.0)
        # A socket the server closed after its handshake (its join failed: 1013, 4503) is owed the message too.
        closed = sum(len(report["closes"]) for report in reports)
        expected = rooms * size
        # A join the server refused (closed after the handshake) is no join: joins/s counts the sockets that stayed.
        return {
            "sockets": expected,
            "rooms": rooms,
            "seconds": round(seconds, 3),
            "joins_per_s": round((expected - closed) / seconds),
            "closed_by_server": closed,
            "expected": expected,
            "delivered": result["delivered"],
            "delivered_ratio": round(result["delivered"] / expected, 5),
            "p99_ms": result["p99_ms"],
        }

    async def run_step(self, label, deliveries_per_s, seconds, drain=3.0):
        """Offer ``deliveries_per_s`` for ``seconds``: delivered ratio, achieved rate, latency and both sides' CPU."""
        self.steps += 1
        step = str(self.steps)
        rooms = [room for room in self.members if room not in self.idle]
        room_size = sum(len(self.members[room]) for room in rooms) / len(rooms)
        share = deliveries_per_s / room_size / len(self.connections)
        pids = self.stack.worker_pids()
        server_cpu = {pid: cpu_seconds(pid) for pid in pids}
        # Everything the system spends (its server processes and its Redis nodes) and what the client
        # spends, from the first send until the last delivery is counted.
        system_pids, client_pids = self.stack.server_pids(), [process.pid for process in self.processes]
        redis_pids = self.stack.redis_pids
        system_cpu, client_cpu = sum(map(cpu_seconds, system_pids)), sum(map(cpu_seconds, client_pids))
        redis_cpu = sum(map(cpu_seconds, redis_pids))
        started = time.perf_counter()
        reports = await self._all("run_step", *[(step, share, seconds, rooms)] * len(self.connections))
        elapsed = time.perf_counter() - started
        server_cpu = sorted(round(100 * (cpu_seconds(pid) - server_cpu[pid]) / elapsed, 1) for pid in pids)
        result = await self._settle(step, reports, seconds, drain)
        system_cpu = sum(map(cpu_seconds, system_pids)) - system_cpu
        client_cpu = sum(map(cpu_seconds, client_pids)) - client_cpu
        redis_cpu = sum(map(cpu_seconds, redis_pids)) - redis_cpu
        window = time.perf_counter() - started

        def per_delivery(cpu):
            return round(1e6 * cpu / result["delivered"], 1) if result["delivered"] else None

        result.update(
            offered_per_s=deliveries_per_s,
            client_cpu_percent=[report["cpu_percent"] for report in reports],
            server_cpu_percent=server_cpu,
            sockets_closed_by_server=sum(len(r["closes"]) for r in reports),
            system_us_per_delivery=per_delivery(system_cpu),
            redis_us_per_delivery=per_delivery(redis_cpu),
            client_us_per_delivery=per_delivery(client_cpu),
            system_cpu_seconds=round(system_cpu, 4),
            window_seconds=round(window, 4),
        )
        return result

    async def idle_cpu_percent(self, seconds):
        """The system's CPU with its sockets open and nobody talking, in % of a core: what it costs at rest."""
        pids = self.stack.server_pids()
        before, started = sum(map(cpu_seconds, pids)), time.perf_counter()
        await asyncio.sleep(seconds)
        return round(100 * (sum(map(cpu_seconds, pids)) - before) / (time.perf_counter() - started), 1)

    async def _settle(self, step, reports, seconds, drain):
        """Wait (up to ``drain`` s) for what ``step``'s sends owe, then count it: delivered ratio and latency."""
        closes = defaultdict(list)
        for report in reports:
            for room, closed_at in report["closes"]:
                closes[room].append(closed_at)
        # A socket the server closed (4408: too slow) is owed nothing sent after its close.
        expected = {
            message: len(self.members[room]) - sum(at <= sent_at for at in closes[room])
            for report in reports
            for message, room, sent_at in report["sends"]
        }
        owed = sum(expected.values())
        deadline = time.perf_counter() + drain
        while sum(await self._all("count", *[(step,)] * len(self.connections))) < owed and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        collected = await self._all("collect", *[(step,)] * len(self.connections))
        received, latencies, sender_closed = Counter(), [], set()
        for part in collected:
            received.update(part["received"])
            latencies += part["latencies"]
            sender_closed.update(part["sender_closed"])
        # A message typed on a socket the server was closing (4408) that reached nobody was never
        # accepted: it is owed to no one (the sender knows from the close code).
        refused = {m for m in expected if not received[m] and m in sender_closed}
        owed = sum(n for m, n in expected.items() if m not in refused)
        delivered = sum(min(received[m], n) for m, n in expected.items() if m not in refused)
        return {
            "messages": len(expected) - len(refused),
            "not_accepted": len(refused),
            "expected": owed,
            "delivered": delivered,
            "delivered_ratio": round(delivered / owed, 5) if owed else 0.0,
            "achieved_per_s": round(delivered / seconds),
            "p50_ms": percentile(latencies, 0.50),
            "p99_ms": percentile(latencies, 0.99),
            "max_ms": percentile(latencies, 1.0),
        }
