"""`make run`: a local Redis Cluster plus WEB_CONCURRENCY chat workers behind 127.0.0.1:8000."""

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from channels_redis_cluster.testing import LocalCluster, die_with_parent

SERVICES = Path(__file__).resolve().parent.parent


def stack_env(cluster, bind, workers):
    """Environment of the chat workers: the cluster layer on the local nodes."""
    env = dict(os.environ)
    env.update(
        CHANNEL_LAYER=env.get("CHANNEL_LAYER", "redis-cluster"),
        REDIS_CLUSTER_NODES=",".join(cluster.startup_nodes),
        WEB_CONCURRENCY=str(workers),
        BIND=bind,
        PYTHONPATH=str(SERVICES),
        DJANGO_SETTINGS_MODULE=env.get("DJANGO_SETTINGS_MODULE", "chatsite.settings"),
    )
    return env


def start_workers(env, app="chatsite.asgi:application", log=None):
    """gunicorn with the project's config, in its own process group so Ctrl-C reaches it once; its output
    to the open file ``log`` when given."""
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:chatsite.gunicorn_conf", app],
        cwd=SERVICES,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def wait_ready(url, process, timeout=60, what="gunicorn"):
    """Wait until /readyz answers 200, or fail if ``what`` (the server process) died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready")


def stop(process, grace=30):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", "3")))
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("REDIS_BASE_PORT", "7000")))
    args = parser.parse_args()

    # Also SIGINT: a shell that starts us in the background would otherwise leave it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    cluster = LocalCluster(base_port=args.redis_port)
    workers = None
    try:
        print(
            f"starting a 6-node Redis Cluster on 127.0.0.1:{cluster.ports[0]}-{cluster.ports[-1]} ({cluster.binary})", flush=True
        )
        cluster.start()
        url = f"http://{args.host}:{args.port}"
        workers = start_workers(stack_env(cluster, f"{args.host}:{args.port}", args.workers))
        # With OPS_BIND set (as in deployments) readiness answers on that internal port only.
        wait_ready(f"http://{os.environ['OPS_BIND']}" if os.environ.get("OPS_BIND") else url, workers)
        print(f"\n  chat is ready: {url}/chat/  ({args.workers} workers; Ctrl-C stops everything)\n", flush=True)
        workers.wait()
        print(f"gunicorn exited with status {workers.returncode}", file=sys.stderr)
        return workers.returncode or 1
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    finally:
        if workers is not None:
            stop(workers)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
