"""The workers of one stack take turns accepting: a burst of handshakes spreads evenly, and a draining
worker leaves what is queued to the others (the `make run` topology: 3 workers, one listening socket)."""

import asyncio
import os
import signal
import urllib.request
from collections import Counter

from test_rolling_restart import gunicorn_workers, save
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from chatsite.rebalance import to_shed
from conftest import local_stack
from loadtest.member import until

BURST = 300
BURSTS = 5
# The busiest worker may hold at most this much more than the mean of a burst.
MOST_OVER_MEAN = 1.25


def open_sockets(stack):
    """chat_connections summed over the stack's workers."""
    with urllib.request.urlopen(f"{stack['url']}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("chat_connections"))


async def burst(stack, room, count=BURST):
    """``count`` handshakes at once; the open sockets and the worker (X-Served-By) of each, or the error."""

    async def one():
        try:
            client = await connect(f"{stack['ws']}/ws/chat/{room}/", origin=stack["url"], open_timeout=60, max_queue=None)
        except (TimeoutError, OSError, ConnectionClosed, InvalidHandshake) as error:  # refused, reset, unanswered
            return None, repr(error)
        return client, client.response.headers["X-Served-By"]

    return await asyncio.gather(*(one() for _ in range(count)))


async def every_worker_accepting(stack, workers=3):
    """Open sockets until each of the stack's workers has answered one, then close them: a worker still
    booting when the stack says it is ready is not yet in the table, and the others take its share."""
    seen, opened = set(), []
    for _ in range(200):
        client, worker = (await burst(stack, "warm-up", count=1))[0]
        assert client is not None, worker
        opened.append((client, worker))
        seen.add(worker)
        if len(seen) == workers:
            break
    assert len(seen) == workers, seen
    await close_all(stack, opened)


async def close_all(stack, opened):
    await asyncio.gather(*(client.close() for client, _ in opened if client is not None))
    await until(lambda: open_sockets(stack) == 0, 30, "every socket of the burst to be closed on the server")


async def test_a_burst_of_handshakes_spreads_evenly_over_the_workers():
    spreads = []
    with local_stack(ACCEPT_BALANCE="true") as stack:
        await every_worker_accepting(stack)
        for index in range(BURSTS):
            opened = await burst(stack, f"burst-{index}")
            failed = [worker for client, worker in opened if client is None]
            assert not failed, failed[:5]
            per_worker = Counter(worker for _, worker in opened)
            spreads.append(sorted(per_worker.values(), reverse=True))
            await close_all(stack, opened)
    save("worker_balance", {"burst": BURST, "sockets_per_worker": spreads})
    mean = BURST / 3
    for spread in spreads:
        assert len(spread) == 3 and spread[0] <= MOST_OVER_MEAN * mean, spreads


async def test_a_draining_worker_leaves_its_queued_handshakes_to_the_others():
    """SIGTERM to a worker while a burst is queued: every handshake is answered by a worker, none refused
    or reset; the sockets the stopping worker had taken are closed with 1012, and the rest stay open."""
    with local_stack(DRAIN_SECONDS="1", ACCEPT_BALANCE="true") as stack:
        await every_worker_accepting(stack)
        victim = gunicorn_workers(stack["process"])[0]
        arriving = asyncio.create_task(burst(stack, "draining", count=BURST))
        # The burst's first handshake is answered: the rest are queued or being served.
        await until(lambda: open_sockets(stack) > 0, 30, "the burst to start landing")
        os.kill(victim, signal.SIGTERM)
        opened = await arriving
        failed = [error for client, error in opened if client is None]
        assert not failed, failed[:5]
        by_victim = [client for client, worker in opened if worker.endswith(f":{victim}")]
        others = [client for client, worker in opened if not worker.endswith(f":{victim}")]
        for client in by_victim:
            await asyncio.wait_for(client.wait_closed(), 30)
            assert client.close_code == 1012
        assert others and all(client.close_code is None for client in others)
        save("worker_balance_drain", {"burst": BURST, "by_stopping_worker": len(by_victim), "by_others": len(others)})
        await close_all(stack, opened)


def test_only_a_worker_of_a_pod_above_its_share_sheds_and_only_down_to_the_band():
    """The rule each worker applies to the deployment's counts (rebalanced for real in test_compose_stack)."""
    # 3 replicas of 2 workers at 40 each, 6 new workers empty: mean 20, band 16-24; shed down to the mean.
    counts = [40] * 6 + [0] * 6
    assert to_shed(40, [40, 40], counts, 0.2) == 20
    assert to_shed(0, [0, 0], counts, 0.2) == 0
    # Within the band nobody moves, nor does a worker a socket or two over a small mean.
    assert to_shed(24, [24, 16], [24, 16, 20, 20], 0.2) == 0
    assert to_shed(3, [3, 1], [3, 1, 1, 1], 0.2) == 0
    # One pod never sheds, however its workers differ: they take turns accepting instead.
    assert to_shed(30, [30, 5, 5], [30, 5, 5], 0.2) == 0
    # Alone, or with nothing open, there is no share to be over.
    assert to_shed(50, [50], [50], 0.2) == 0
    assert to_shed(0, [0, 0], [0, 0], 0.2) == 0
