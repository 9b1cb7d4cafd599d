"""The systems `make bench` compares the chat with, run beside it on this machine: Socket.IO and nchan.

A team choosing how to scale its real-time chat compares it with what it would pick instead. Two of
those run on a Redis Cluster as this chat does, so each gets a 6-node cluster of its own and 3 server
processes, as the chat gets 3 workers:

- **Socket.IO 4 with `@socket.io/redis-adapter`'s sharded adapter** (Node, `socketio/server.js`,
  npm packages pinned by its lock file): one SPUBLISH per room message to the room's channel, every
  process holding a member subscribed to it.
- **nginx with nchan** (C, Debian's `nginx` and `libnginx-mod-nchan`, `nchan/nginx.conf.template`):
  one Redis subscription per room per nginx, its workers sharing messages through shared memory.

They are installed here, by the benchmark, the first time it needs them (`install`), and never by
`make run`. Each stack answers what the benchmark's load asks of a stack: its port, the processes whose
CPU it spends (`server_pids`: every server process and every Redis node of its cluster), and the
`wire` its sockets speak (`loadtest.benchload.WIRES`).
"""

import os
import shutil
import string
import subprocess
import tempfile
import time
from pathlib import Path

from channels_redis_cluster.testing import die_with_parent, free_port
from localstack.run import wait_ready

HERE = Path(__file__).resolve().parent
SOCKETIO = HERE / "socketio"
NCHAN_TEMPLATE = HERE / "nchan" / "nginx.conf.template"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
NGINX = Path("/usr/sbin/nginx")  # Debian's, wherever PATH leads
DEBIAN_PACKAGES = ("nginx", "libnginx-mod-nchan")
STARTUP_SECONDS = 60


def install():
    """Install what the peers run on, where it is missing: nchan from Debian, the Socket.IO packages from npm."""
    if not (NGINX.exists() and NCHAN_MODULE.exists()):
        if os.geteuid() != 0:
            raise RuntimeError(f"the nchan peer needs Debian's {' and '.join(DEBIAN_PACKAGES)}: install them as root")
        # Installed for the benchmark only: the package's own nginx service must not start on port 80.
        policy = Path("/usr/sbin/policy-rc.d")
        had_policy = policy.exists()
        if not had_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            if (
                subprocess.run(
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES],
                    env=environment,
                    capture_output=True,
                ).returncode
                != 0
            ):
                subprocess.run(["apt-get", "update", "-q"], env=environment, check=True, capture_output=True)
                subprocess.run(
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES],
                    env=environment,
                    check=True,
                    capture_output=True,
                )
        finally:
            if not had_policy:
                policy.unlink()
    if not shutil.which("node"):
        raise RuntimeError("the Socket.IO peer needs Node.js (Debian's nodejs)")
    lock = SOCKETIO / "package-lock.json"
    installed = SOCKETIO / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=SOCKETIO, check=True)


def _children(pid):
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class _PeerStack:
    """A peer's server processes on a free port of 127.0.0.1, over ``cluster``."""

    wire = None

    def __init__(self, cluster, workers):
        self.cluster, self.workers = cluster, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def worker_pids(self):
        """The processes that serve sockets."""
        return _children(self.process.pid)

    @property
    def redis_pids(self):
        return [process.pid for process in self.cluster.processes.values()]

    def server_pids(self):
        """Every process of the system: its server processes (the parent too) and its Redis nodes."""
        return [self.process.pid, *self.worker_pids(), *self.redis_pids]

    def close(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SocketIOStack(_PeerStack):
    """Socket.IO 4 on the sharded Redis adapter: ``workers`` Node processes sharing one listening socket."""

    label = "Socket.IO 4, sharded Redis adapter"
    wire = "socketio"

    def __init__(self, cluster, workers=3):
        super().__init__(cluster, workers)
        environment = {
            **os.environ,
            "PORT": str(self.port),
            "WORKERS": str(workers),
            "REDIS_CLUSTER_NODES": ",".join(cluster.startup_nodes),
        }
        self.process = subprocess.Popen(
            ["node", str(SOCKETIO / "server.js")], env=environment, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        wait_ready(self.url, self.process, STARTUP_SECONDS, "the Socket.IO peer")
        deadline = time.monotonic() + STARTUP_SECONDS
        # The primary listens as soon as one worker does: every worker must be up before a run.
        while len(self.worker_pids()) < workers and time.monotonic() < deadline:
            time.sleep(0.1)


class NchanStack(_PeerStack):
    """nginx with nchan over the cluster: one master and ``workers`` worker processes."""

    label = "nginx + nchan"
    wire = "nchan"

    def __init__(self, cluster, workers=3):
        super().__init__(cluster, workers)
        self.prefix = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
        servers = "\n".join(f"        nchan_redis_server redis://{node};" for node in cluster.startup_nodes)
        config = string.Template(NCHAN_TEMPLATE.read_text()).substitute(
            workers=workers, prefix=self.prefix, port=self.port, redis_servers=servers
        )
        (self.prefix / "nginx.conf").write_text(config)
        log = self.prefix / "error.log"
        self.process = subprocess.Popen(
            [str(NGINX), "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), "-e", str(log)],
            stderr=subprocess.STDOUT,
            stdout=log.open("wb"),
            preexec_fn=die_with_parent,
        )
        try:
            wait_ready(self.url, self.process, STARTUP_SECONDS, "the nchan peer")
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}: {log.read_text()[-2000:]}") from None

    def close(self):
        super().close()
        shutil.rmtree(self.prefix, ignore_errors=True)
