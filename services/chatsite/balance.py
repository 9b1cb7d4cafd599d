"""Workers of one pod take turns accepting connections, so a burst of handshakes spreads evenly.

gunicorn's workers share one listening socket. The kernel wakes every worker for a queued connection,
and uvicorn's event loop accepts every queued connection at once, so a burst piled onto whichever
worker woke first: 300 concurrent handshakes landed 149/132/19 on 3 workers, and once 30 sockets went
all to one. Here each worker accepts one connection per turn of its event loop, and only while it holds
no more connections than the least loaded live worker of the pod plus a small slack; otherwise it
leaves the connection queued for the others and looks again a moment later.

The workers learn each other's load from a table in memory shared across the fork: the arbiter makes
it before it starts any worker and gives each worker a row (``pre_fork``); a worker writes its open
connections and a heartbeat into its row at every accept and ten times a second. A row whose heartbeat
is older than ``STALE_SECONDS`` (a worker stuck or starved of CPU) or that says it does not accept
(a worker draining after SIGTERM) is left out, so such a worker never holds the others back: what it
leaves queued is accepted by the rest, which is also why a draining worker drops nothing that is queued.

SO_REUSEPORT (a listening socket per worker) was the other choice: the kernel spreads by a hash of the
connection's addresses, blind to load, and a worker that closes its socket drops the connections queued
on it unless the host enables ``net.ipv4.tcp_migrate_req``, which a container cannot count on.
"""

import asyncio
import errno
import logging
import mmap
import os
import socket
import time

logger = logging.getLogger(__name__)

# A row: pid, open connections, heartbeat (CLOCK_MONOTONIC in ms, the same clock in every process of
# the host), accepting (1 or 0). Aligned 8-byte words, so a reader never sees half a write.
FIELDS = 4
PID, LOAD, BEAT, ACCEPTING = range(FIELDS)
ROWS = 256  # more workers than any pod runs
# A worker may hold this many more connections than the least loaded one before it lets them pass:
# enough that workers rarely wait on each other, little beside the 1.25x of a 300-handshake burst.
SLACK = 2
# A worker that has not written its row for this long is left out of the comparison.
STALE_SECONDS = 0.5
# How long a worker ahead of the others waits before it looks at the queue again.
PAUSE_SECONDS = 0.002
# After EMFILE/ENFILE (out of descriptors), accepting waits this long, as asyncio's own server does.
OUT_OF_DESCRIPTORS_PAUSE_SECONDS = 1.0


TABLE = None  # the pod's WorkerTable, made by the arbiter (gunicorn_conf) when its workers take turns


def _now_ms():
    return int(time.monotonic() * 1000)


class WorkerTable:
    """Rows of the pod's workers in anonymous shared memory, made by the arbiter before it forks."""

    def __init__(self, rows=ROWS):
        self.rows = rows
        self.memory = mmap.mmap(-1, rows * FIELDS * 8)  # MAP_SHARED: every forked worker sees the same pages
        self.words = memoryview(self.memory).cast("q")

    def claim(self, taken):
        """A free row for a new worker (called by the arbiter), cleared; ``taken`` are the rows in use."""
        row = next(index for index in range(self.rows) if index not in taken)
        self.clear(row)
        return row

    def clear(self, row):
        for field in range(FIELDS):
            self.words[row * FIELDS + field] = 0

    def write(self, row, load, accepting=True):
        base = row * FIELDS
        self.words[base + PID] = os.getpid()
        self.words[base + LOAD] = load
        self.words[base + ACCEPTING] = 1 if accepting else 0
        self.words[base + BEAT] = _now_ms()

    def may_accept(self, row, load):
        """Whether the worker of ``row``, holding ``load`` connections, takes the next queued one."""
        fewest, now, stale = load, _now_ms(), STALE_SECONDS * 1000
        words = self.words
        for other in range(self.rows):
            base = other * FIELDS
            if words[base + PID] and other != row and words[base + ACCEPTING] and now - words[base + BEAT] < stale:
                fewest = min(fewest, words[base + LOAD])
        return load <= fewest + SLACK

    def loads(self):
        """{pid: open connections} of the live rows; for tests and logs."""
        now = _now_ms()
        return {
            self.words[r * FIELDS + PID]: self.words[r * FIELDS + LOAD]
            for r in range(self.rows)
            if self.words[r * FIELDS + PID] and now - self.words[r * FIELDS + BEAT] < STALE_SECONDS * 1000
        }


class BalancedListener:
    """Accepts connections from a shared listening socket, one per loop turn, while this worker's turn.

    Stands where uvicorn keeps an ``asyncio.Server``: it has ``sockets`` and ``close()``.
    """

    def __init__(self, sock, protocol_factory, table, row, connections):
        self.sock, self.protocol_factory, self.table, self.row = sock, protocol_factory, table, row
        self.connections = connections  # uvicorn's set of open connections of this worker
        self.sockets = [sock]
        self.pending = 0  # accepted, not yet handed to a protocol
        self.loop = asyncio.get_running_loop()
        self.reading = self.closed = False
        self.tasks = set()
        sock.setblocking(False)
        self.beat()
        self._read()

    def load(self):
        return len(self.connections) + self.pending

    def beat(self):
        """Write this worker's row: its load, and whether it accepts."""
        self.table.write(self.row, self.load(), accepting=not self.closed)

    def close(self):
        """Stop accepting; what is queued is left to the other workers."""
        self.closed = True
        self._pause()
        self.beat()

    async def wait_closed(self):
        """Nothing to wait for: the connections accepted here are uvicorn's to close."""

    def _read(self):
        if not self.reading and not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._readable)
            self.reading = True

    def _pause(self, seconds=None):
        if self.reading:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False
        if seconds is not None and not self.closed:
            self.loop.call_later(seconds, self._read)

    def _readable(self):
        if self.closed:
            return
        if not self.table.may_accept(self.row, self.load()):
            self._pause(PAUSE_SECONDS)
            return
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up while it was queued
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                logger.warning(
                    "out of resources accepting connections (%s): pausing %.0f s", error, OUT_OF_DESCRIPTORS_PAUSE_SECONDS
                )
                self._pause(OUT_OF_DESCRIPTORS_PAUSE_SECONDS)
                return
            raise
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending += 1
        self.beat()
        task = self.loop.create_task(self._connect(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, conn):
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except OSError:  # the client reset the connection before it could be served
            conn.close()
        finally:
            self.pending -= 1
