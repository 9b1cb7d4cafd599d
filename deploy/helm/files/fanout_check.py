"""`helm test`: WebSockets through the chat Service land on >= N pods and every room message reaches every member.

Runs in the chat image (it ships the `websockets` client). Exit status 0 only when both hold.
"""

import argparse
import asyncio
import json
import sys
import uuid
from urllib.parse import urlsplit

from websockets.asyncio.client import connect

MAX_SOCKETS = 60
RECEIVE_TIMEOUT_S = 15


def serving(client, by):
    """Who serves the socket: its pod (the host part of X-Served-By) or its process (all of it)."""
    served_by = client.response.headers["X-Served-By"]
    return served_by if by == "process" else served_by.partition(":")[0]


async def check(url, sockets, min_workers, by):
    target = urlsplit(url)
    ws_url = f"{'wss' if target.scheme == 'https' else 'ws'}://{target.netloc}/ws/chat/helm-test-{uuid.uuid4().hex[:8]}/"
    clients, servers = [], set()
    try:
        # The Service spreads connections; open more (up to MAX_SOCKETS) until they span min_workers.
        while len(clients) < sockets or (len(servers) < min_workers and len(clients) < MAX_SOCKETS):
            client = await connect(ws_url, origin=f"{target.scheme}://{target.netloc}", open_timeout=15)
            clients.append(client)
            servers.add(serving(client, by))
        if len(servers) < min_workers:
            return f"FAIL: {len(clients)} sockets landed on {len(servers)} {by}(s) {sorted(servers)}, need {min_workers}"
        expected = {f"m{index}" for index in range(len(clients))}
        for index, client in enumerate(clients):
            await client.send(json.dumps({"message": f"m{index}"}))

        async def receive(client):
            got = set()
            try:
                while not expected <= got:
                    got.add(json.loads(await asyncio.wait_for(client.recv(), RECEIVE_TIMEOUT_S))["message"])
            except TimeoutError:
                pass
            return len(expected - got)

        missing = await asyncio.gather(*(receive(client) for client in clients))
        if any(missing):
            return f"FAIL: {sum(missing)} of {len(expected) * len(clients)} deliveries missing"
        return f"OK: {len(clients)} sockets on {len(servers)} {by}s, {len(expected) * len(clients)} deliveries, none missing"
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the chat Service, e.g. http://chat:80")
    parser.add_argument("--sockets", type=int, default=12, help="sockets to open at least")
    parser.add_argument("--min-workers", type=int, default=2, help="pods (or processes) the sockets must span")
    parser.add_argument("--by", choices=("pod", "process"), default="pod", help="what counts as a worker")
    args = parser.parse_args(argv)
    verdict = asyncio.run(check(args.url, args.sockets, args.min_workers, args.by))
    print(verdict)
    return 0 if verdict.startswith("OK") else 1


if __name__ == "__main__":
    sys.exit(main())
