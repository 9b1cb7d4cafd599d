"""Sockets move to capacity added later: a worker holding more than its share closes the excess, slowly.

WebSockets live for hours, so replicas added by a scale-out get only new sockets and the old ones stay
as loaded as before: 240 members on 3 replicas, scaled to 6, were still [80, 80, 80, 0, 0, 0] 150 s
later. Every REPORT_SECONDS each worker writes how many WebSockets it holds into one hash in the cluster
(``lua/worker_sockets.lua``) and reads everyone's back. A worker of a pod whose workers hold more than the
mean per worker by more than the tolerance closes sockets with 1012 (service restart), which every client of this chat takes as "resume
elsewhere", at most CHAT_REBALANCE_CLOSES_PER_S a second, until it is down to the mean. A pod at or
below its share closes nothing, so sockets only ever flow from loaded workers to lighter ones and the spread cannot oscillate.
The sockets open longest go first: a socket that has just moved here is not moved again.

The ingress must place new sockets by load (HAProxy ``balance leastconn``): by round robin, half of what a
loaded worker sheds would land back on the loaded replicas.
"""

import asyncio
import logging
import math
from pathlib import Path

from channels.layers import get_channel_layer

from . import environment as env
from . import health
from .identity import worker_id

logger = logging.getLogger(__name__)

REPORT_SECONDS = 2.0
# A report not renewed for three rounds is a worker gone (crashed, cut off) and no longer counted.
REPORT_LIFE_MS = int(3 * REPORT_SECONDS * 1000)
# A worker is counted once it has reported for this long: by then the ingress sends it sockets (HAProxy
# finds a new replica by DNS within 3 s and checks it every 2 s). Counted sooner, the old workers shed
# towards a replica the ingress does not use yet, and the sockets land back on them: 54 moves instead of 25
# in a scale-out from 3 replicas to 6.
NEWCOMER_MS = 6000
# Below this many sockets over the mean nothing moves: closing 1 socket of 5 is churn, not balance.
LEAST_EXCESS = 2
REPORT_LUA = (Path(__file__).parent / "lua" / "worker_sockets.lua").read_text()


def reports_key():
    """One hash per deployment, beside the layer's keys of the same prefix."""
    return f"chat:{{{env.text('CHANNEL_LAYER_PREFIX')}:workers}}:sockets"


def to_shed(mine, pod, counts, tolerance):
    """How many of its ``mine`` sockets a worker closes, given its pod's workers' counts ``pod`` and every live
    worker's ``counts`` (both with its own).

    Only a pod above its share sheds: within a pod the workers take turns accepting (balance.py), and a
    socket closed there could land on the same pod again. So a single pod (`make run`) never sheds, and
    churn that leaves one worker of a pod ahead of its neighbours closes nothing.
    """
    if len(counts) < 2 or not pod:
        return 0
    mean = sum(counts) / len(counts)
    if sum(pod) / len(pod) <= mean * (1 + tolerance) or mine - mean < LEAST_EXCESS:
        return 0
    # Down to the mean itself: the share of each worker is a few sockets in small deployments, and shedding
    # only to the band's middle left 12 sockets per old replica against 8 per new one after a scale-out of
    # 61 sockets from 3 replicas to 6, outside the band. Once a pod is at the mean nothing moves again.
    return max(0, mine - math.floor(mean))


class Rebalancer:
    """The loop of one worker: report, compare, shed. ``server`` is the worker's DrainingServer."""

    def __init__(self, server):
        # Imported here, in the worker: the layer's metrics need the metrics directory gunicorn makes.
        from channels_redis_cluster import Script

        self.report = Script(REPORT_LUA)
        self.server = server
        self.tolerance = env.number("CHAT_REBALANCE_TOLERANCE")
        self.closes_per_s = env.number("CHAT_REBALANCE_CLOSES_PER_S")
        self.me = worker_id()
        self.pod = self.me.rpartition(":")[0]  # worker ids are "<pod or host>:<pid>"

    async def run(self):
        from chat import metrics  # made in the worker, where the metrics directory exists

        layer = get_channel_layer()
        if "scripts" not in layer.extensions:
            logger.info("rebalancing is off: the channel layer keeps no state shared by every worker")
            return
        while not self.server.should_exit and not health.draining:
            await asyncio.sleep(REPORT_SECONDS)
            websockets = self.server.websockets()
            try:
                flat = await layer.run_script(self.report, reports_key(), self.me, len(websockets), REPORT_LIFE_MS)
            except Exception as exc:  # noqa: BLE001 - Redis unreachable: readiness and the handover deal with that
                logger.debug("socket report failed: %r", exc)
                continue
            live = [
                (worker.decode() if isinstance(worker, bytes) else worker, int(count))
                for worker, count, age in zip(flat[0::3], flat[1::3], flat[2::3])
                if int(age) >= NEWCOMER_MS or worker in (self.me, self.me.encode())
            ]
            counts = [count for _, count in live]
            pod = [count for worker, count in live if worker.rpartition(":")[0] == self.pod]
            excess = to_shed(len(websockets), pod, counts, self.tolerance)
            metrics.WORKER_SHARE.set(len(websockets) / (sum(counts) / len(counts)) if counts and sum(counts) else 1.0)
            if excess <= 0:
                continue
            # At most one round's worth of closes, spread over the round.
            excess = min(excess, max(1, int(self.closes_per_s * REPORT_SECONDS)))
            logger.info(
                "holding %d of %d WebSockets on %d workers: closing %d (1012) to rebalance",
                len(websockets),
                sum(counts),
                len(counts),
                excess,
            )
            oldest = sorted(websockets, key=lambda connection: getattr(connection, "opened_at", 0.0))[
                :excess
            ]  # any uvicorn protocol
            for connection in oldest:
                if self.server.should_exit or health.draining:
                    break
                if connection in self.server.server_state.connections:
                    connection.shutdown()  # close code 1012: the client resumes on the replica the ingress picks
                    metrics.REBALANCED.inc()
                    await asyncio.sleep(1 / self.closes_per_s)

    async def leave(self):
        """Remove this worker's report, so the others stop counting it at once."""
        layer = get_channel_layer()
        if "scripts" in layer.extensions:
            try:
                await asyncio.wait_for(layer.run_script(self.report, reports_key(), self.me, -1, REPORT_LIFE_MS), 1.0)
            except Exception:  # noqa: BLE001 - the report then expires by itself within REPORT_LIFE_MS
                pass
