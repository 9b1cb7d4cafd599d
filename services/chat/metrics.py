"""Prometheus metrics of the chat consumer (multiprocess-safe under gunicorn)."""

import asyncio

from prometheus_client import Counter, Gauge, Histogram


class Tally:
    """A counter bumped once per frame, written to Prometheus once per event loop turn.

    Each increment of a multiprocess counter is a locked write to its file; a room message fans out
    to every local member within one turn, so one write per turn instead of one per recipient.
    """

    def __init__(self, counter):
        self.counter, self.pending = counter, 0

    def inc(self):
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending += 1

    def flush(self):
        pending, self.pending = self.pending, 0
        self.counter.inc(pending)


CONNECTIONS = Gauge("chat_connections", "Open chat WebSockets", multiprocess_mode="livesum")
MESSAGES_IN = Tally(Counter("chat_messages_in_total", "Chat messages accepted from clients"))
MESSAGES_OUT = Tally(Counter("chat_messages_out_total", "Chat messages written to clients"))
REJECTED = Counter("chat_rejected_total", "Client frames or connections refused", ["reason"])
LAYER_ERRORS = Counter("chat_layer_errors_total", "Channel layer calls that failed", ["operation"])
RESUMES = Counter("chat_resumes_total", "v2 reconnects with since/epoch, by whether the replay was exact", ["recovered"])
CATCH_UPS = Counter(
    "chat_catch_ups_total",
    "Gaps or epoch changes in a live v2 stream filled from room history, by whether exactly",
    ["recovered"],
)
DROPPED_CLOSING = Counter(
    "chat_messages_dropped_closing_total",
    "Room messages not written because their socket was closing or ended (4408 or any close)",
)
CLOSED_TOO_SLOW = Counter("chat_closed_too_slow_total", "Sockets closed with 4408 because their backlog was full")
FANOUT_LATENCY = Histogram(
    "chat_fanout_latency_seconds",
    "From the sender's worker to the first write of a room message on a receiving worker (once per message and worker)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
HANDED_OVER = Counter(
    "chat_sockets_handed_over_total", "WebSockets this worker closed with 1012 because it could not reach Redis"
)
REBALANCED = Counter(
    "chat_sockets_rebalanced_total", "WebSockets this worker closed with 1012 because it held more than its share"
)
WORKER_SHARE = Gauge(
    "chat_worker_socket_share",
    "A worker's WebSockets over the deployment's mean per worker (1: its share), the highest of the pod's workers",
    multiprocess_mode="livemax",
)
DISCONNECTS_CUT_SHORT = Counter(
    "chat_disconnects_cut_short_total",
    "Socket clean-ups a stopping worker's graceful timeout ended; what they had not undone lapses by itself",
)
