"""Test hosts on one machine: a network namespace per host, joined by a bridge in a namespace of its own.

Faults between hosts (a host isolated, a link cut one way, a port blackholed, packet loss) are
iptables rules in a chain of each host's own namespace. The machine's own namespace gets no interface,
route or rule: the bridge lives in a "switch" namespace, so nothing the hosts send can leave them.

The addresses are in 198.18.0.0/15, the range set aside for network benchmarking (RFC 2544): no real
network this machine may sit on uses it, and no route from the machine's own namespace leads there.
Rules match on the host's ``eth0`` only, so a host's traffic with itself (an admin client talking to
the node on its own host) is never affected by a fault.

Usable by hand: ``python -m localstack.nethosts up`` brings up the partition stack (``make hosts``),
``cut``, ``isolate``, ``blackhole``, ``lose`` and ``heal`` make and clear faults, ``down`` removes it all.
"""

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from channels_redis_cluster.testing import SLOTS, cluster_node_args, die_with_parent, server_binary, wait_until

SUBNET = "198.18.0"
CLONE_NEWNET = 0x40000000
CHAIN = "FAULTS"
STATE = Path(tempfile.gettempdir()) / "chat-nethosts.json"  # what `up` started, for the other commands
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Hosts:
    """Named hosts, each a network namespace with one address on a shared bridge.

    ``tag`` prefixes every namespace name, so runs of this class never meet another's namespaces;
    ``down()`` (also on an exception in ``with``) kills what runs on the hosts and deletes them.
    """

    def __init__(self, names, tag=None):
        self.tag = tag or f"crc{os.getpid()}"
        self.names = list(names)
        self.address = {name: f"{SUBNET}.{10 + index}" for index, name in enumerate(self.names)}
        self.switch = f"{self.tag}-switch"
        self.processes = []

    def namespace(self, host):
        return f"{self.tag}-{host}"

    def up(self):
        """Create the switch with its bridge and every host with its address; returns self."""
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for index, host in enumerate(self.names):
                ns = self.namespace(host)
                _ip("netns", "add", ns)
                _ip("-n", self.switch, "link", "add", f"p{index}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", f"p{index}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.iptables(host, "-N", CHAIN)
                for hook in ("INPUT", "OUTPUT"):
                    self.iptables(host, "-A", hook, "-j", CHAIN)
        except BaseException:
            self.down()
            raise
        return self

    def down(self):
        """Kill what runs on the hosts and delete every namespace of this tag; safe to call twice."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()
        existing = set(_ip("netns", "list").stdout.split())
        for ns in [self.namespace(host) for host in self.names] + [self.switch]:
            if ns not in existing:
                continue
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    # Running things on a host

    def start(self, host, argv, log=None, **kwargs):
        """Start ``argv`` on ``host`` (output to the file ``log``); it dies with the caller and with ``down()``."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(host), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
            **kwargs,
        )
        self.processes.append(process)
        return process

    def call(self, host, function, *args):
        """Run ``function(*args)`` in a thread whose sockets are made on ``host``; its result or its exception."""
        result = {}

        def run():
            try:
                enter(self.namespace(host))
                result["value"] = function(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=run, name=f"on-{host}")
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    # Faults: rules in each host's own FAULTS chain

    def iptables(self, host, *rule):
        subprocess.run(["ip", "netns", "exec", self.namespace(host), "iptables", "-w", *rule], check=True, capture_output=True)

    def isolate(self, host):
        """Drop everything ``host`` sends or receives on its network."""
        self.iptables(host, "-A", CHAIN, "-i", "eth0", "-j", "DROP")
        self.iptables(host, "-A", CHAIN, "-o", "eth0", "-j", "DROP")

    def cut(self, host, other, one_way=False, port=None):
        """Drop what ``host`` sends to ``other`` (to its TCP ``port`` only, if given), and, unless
        ``one_way``, what it receives from ``other``."""
        to_port = ["-p", "tcp", "--dport", str(port)] if port else []
        from_port = ["-p", "tcp", "--sport", str(port)] if port else []
        self.iptables(host, "-A", CHAIN, "-o", "eth0", "-d", self.address[other], *to_port, "-j", "DROP")
        if not one_way:
            self.iptables(host, "-A", CHAIN, "-i", "eth0", "-s", self.address[other], *from_port, "-j", "DROP")

    def blackhole(self, host, port):
        """``host`` swallows every packet to its TCP ``port``: no reset, no answer."""
        self.iptables(host, "-A", CHAIN, "-i", "eth0", "-p", "tcp", "--dport", str(port), "-j", "DROP")

    def lose(self, host, percent, others):
        """Drop ``percent`` of the packets ``host`` sends to and receives from each of ``others``, at random."""
        probability = f"{percent / 100:.4f}"
        for other in others:
            for direction, flag in (("-o", "-d"), ("-i", "-s")):
                self.iptables(
                    host,
                    "-A",
                    CHAIN,
                    direction,
                    "eth0",
                    flag,
                    self.address[other],
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    probability,
                    "-j",
                    "DROP",
                )

    def heal(self, *hosts):
        """Remove every fault of ``hosts`` (all hosts when none are named)."""
        for host in hosts or self.names:
            self.iptables(host, "-F", CHAIN)

    def faults(self, host):
        """The rules of ``host``'s FAULTS chain, as iptables lists them."""
        listed = subprocess.run(
            ["ip", "netns", "exec", self.namespace(host), "iptables", "-w", "-S", CHAIN],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return [line for line in listed.splitlines() if not line.startswith("-N")]


def enter(namespace):
    """Move the calling thread into ``namespace``'s network: sockets it makes from now on are there."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {namespace}: {os.strerror(error)}")
    finally:
        os.close(fd)


REDIS_PORT = 6379
CHAT_PORT = 8000
OPS_PORT = 9000  # readiness and metrics, as in deployments: never forwarded by the ingress
INGRESS_PORT = 8080
KEEPING_PORT = 8081  # the ingress frontend that keeps a marked-down server's sessions
REDIS_HOSTS = [f"redis-{n}" for n in range(1, 7)]
CHAT_HOSTS = ["chat-a", "chat-b"]
HAPROXY_CONFIG = """\
# The ingress host: HAProxy in front of the chat hosts, checked as the compose stack's are (docker/haproxy.cfg
# says why), more often. A second frontend keeps the sessions of a server marked down, as most ingresses
# do: there the chat worker's own handover (1012) is what moves them.
global
    maxconn 8000
defaults
    mode http
    retries 3
    option redispatch 1
    timeout connect 2s
    timeout http-request 10s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout client-fin 5s
    balance leastconn
    option httpchk
    http-check disable-on-404
    http-check send meth GET uri /readyz?drain=404 ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
frontend http
    bind {ingress}:{ingress_port}
    default_backend chat
frontend keeps-sessions
    bind {ingress}:{keeping_port}
    default_backend chat-keeps-sessions
backend chat
    default-server check port {ops_port} inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
{servers}
backend chat-keeps-sessions
    default-server check port {ops_port} inter 500ms fall 2 rise 2
{servers}
"""


class PartitionStack:
    """The chat across hosts: a Redis node on each of six hosts, chat workers on two, the HAProxy
    ingress on one, and a client host to talk from. ``node_timeout_ms`` is the cluster's."""

    def __init__(self, workers_per_host=2, node_timeout_ms=2000, env=None, tag=None, workdir=None):
        self.hosts = Hosts([*REDIS_HOSTS, *CHAT_HOSTS, "ingress", "client"], tag=tag)
        self.workers_per_host = workers_per_host
        self.node_timeout_ms = node_timeout_ms
        self.env = env or {}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="nethosts-"))
        self.chat = {}

    @property
    def url(self):
        return f"http://{self.hosts.address['ingress']}:{INGRESS_PORT}"

    @property
    def ws(self):
        return f"ws://{self.hosts.address['ingress']}:{INGRESS_PORT}"

    @property
    def ws_keeping_sessions(self):
        """The ingress frontend that leaves a marked-down server's sockets open."""
        return f"ws://{self.hosts.address['ingress']}:{KEEPING_PORT}"

    def redis_nodes(self):
        return [f"{self.hosts.address[host]}:{REDIS_PORT}" for host in REDIS_HOSTS]

    def log(self, name):
        return self.workdir / f"{name}.log"

    # Start and stop

    def up(self):
        try:
            self.hosts.up()
            self._start_cluster()
            for host in CHAT_HOSTS:
                self.start_chat(host)
            for host in CHAT_HOSTS:
                self.wait_chat_ready(host)
            self._start_ingress()
        except BaseException:
            self.down()
            raise
        return self

    def down(self):
        self.hosts.down()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    def _start_cluster(self):
        binary = server_binary()
        for host in REDIS_HOSTS:
            directory = self.workdir / host
            directory.mkdir(parents=True, exist_ok=True)
            self.hosts.start(
                host,
                [
                    binary,
                    "--bind",
                    self.hosts.address[host],
                    "127.0.0.1",
                    "--port",
                    str(REDIS_PORT),
                    *cluster_node_args(directory, self.node_timeout_ms),
                    # Reached from the other hosts: only they can reach these namespaces.
                    "--protected-mode",
                    "no",
                    "--logfile",
                    str(directory / "server.log"),
                ],
            )
        for host in REDIS_HOSTS:
            self._wait(lambda h=host: self.admin(h, "PING"), f"{host} to answer")
        primaries, replicas = REDIS_HOSTS[:3], REDIS_HOSTS[3:]
        per = SLOTS // 3
        for index, host in enumerate(primaries):
            last = SLOTS - 1 if index == 2 else (index + 1) * per - 1
            self.admin(host, "CLUSTER", "ADDSLOTSRANGE", index * per, last)
        for host in REDIS_HOSTS[1:]:
            self.admin(REDIS_HOSTS[0], "CLUSTER", "MEET", self.hosts.address[host], REDIS_PORT)
        self._wait(lambda: all(len(self.admin(h, "CLUSTER", "NODES").splitlines()) == 6 for h in REDIS_HOSTS), "nodes to meet")
        for primary, replica in zip(primaries, replicas):
            self.admin(replica, "CLUSTER", "REPLICATE", self.admin(primary, "CLUSTER", "MYID"))
        self.wait_healthy()

    def wait_healthy(self, timeout=60):
        """Every node says cluster_state:ok and every primary has an online replica."""

        def healthy():
            if not all("cluster_state:ok" in self.admin(h, "CLUSTER", "INFO") for h in REDIS_HOSTS):
                return False
            roles = {h: self.admin(h, "ROLE") for h in REDIS_HOSTS}
            masters = [r for r in roles.values() if r[0] == "master"]
            return (
                len(masters) == 3
                and all(len(r[2]) == 1 for r in masters)
                and all(r[3] == "connected" for r in roles.values() if r[0] == "slave")
            )

        self._wait(healthy, "cluster_state:ok with every primary replicated", timeout)

    def start_chat(self, host):
        """gunicorn on ``host``, as `make run` starts it, with the cluster's nodes on their hosts."""
        services = Path(__file__).resolve().parent.parent
        env = {
            **os.environ,
            "CHANNEL_LAYER": "redis-cluster",
            "REDIS_CLUSTER_NODES": ",".join(self.redis_nodes()),
            "WEB_CONCURRENCY": str(self.workers_per_host),
            "BIND": f"{self.hosts.address[host]}:{CHAT_PORT}",
            "PYTHONPATH": str(services),
            "DJANGO_SETTINGS_MODULE": "chatsite.settings",
            "DJANGO_ALLOWED_HOSTS": "*",
            "POD_NAME": host,
            "OPS_BIND": f"{self.hosts.address[host]}:{OPS_PORT}",
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / f"metrics-{host}"),
            **self.env,
        }
        self.chat[host] = self.hosts.start(
            host,
            [sys.executable, "-m", "gunicorn", "-c", "python:chatsite.gunicorn_conf", "chatsite.asgi:application"],
            log=self.log(host),
            cwd=services,
            env=env,
        )

    def chat_ready(self, host):
        """True when the chat on ``host`` answers /readyz with 200 (call it on another host)."""
        import urllib.request

        if self.chat[host].poll() is not None:
            raise RuntimeError(f"gunicorn on {host} exited: {self.log(host).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{self.hosts.address[host]}:{OPS_PORT}/readyz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_chat_ready(self, host, timeout=60):
        self._wait(lambda: self.hosts.call("client", self.chat_ready, host), f"the chat on {host} to be ready", timeout)

    def _start_ingress(self):
        servers = "\n".join(f"    server {host} {self.hosts.address[host]}:{CHAT_PORT}" for host in CHAT_HOSTS)
        config = self.workdir / "haproxy.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(
                ingress=self.hosts.address["ingress"],
                ingress_port=INGRESS_PORT,
                keeping_port=KEEPING_PORT,
                ops_port=OPS_PORT,
                servers=servers,
            )
        )
        self.hosts.start("ingress", [shutil.which("haproxy") or "haproxy", "-db", "-f", str(config)], log=self.log("ingress"))
        import urllib.request

        def answers():
            try:
                with urllib.request.urlopen(f"{self.url}/chat/", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        self._wait(lambda: self.hosts.call("client", answers), "the ingress to serve /chat/")

    # The cluster, seen from its own hosts

    def admin(self, host, *command):
        """One command to the node on ``host``, from that host (so no fault between hosts affects it)."""
        import redis

        def run():
            with redis.Redis(host="127.0.0.1", port=REDIS_PORT, socket_timeout=5, decode_responses=True) as client:
                return client.execute_command(*command)

        return self.hosts.call(host, run)

    def host_of(self, address):
        """The host whose node answers on ``address`` (ip:port)."""
        ip = address.split(":")[0]
        return next(host for host, own in self.hosts.address.items() if own == ip)

    def primary_for(self, key):
        """The host of the primary that owns ``key``'s slot, as the majority of nodes see it now."""
        slot = self.admin(REDIS_HOSTS[0], "CLUSTER", "KEYSLOT", key)
        return self.owner_of_slot(slot)

    def owner_of_slot(self, slot, among=REDIS_HOSTS):
        """The host that claims ``slot`` with the highest config epoch, among the nodes that answer."""
        best = None
        for host in among:
            try:
                lines = self.admin(host, "CLUSTER", "NODES").splitlines()
            except Exception:  # noqa: BLE001 - a node that does not answer has no say
                continue
            for line in lines:
                fields = line.split()
                if "myself" in fields[2] and "master" in fields[2] and _claims(fields[8:], slot):
                    epoch = int(fields[6])
                    if best is None or epoch > best[0]:
                        best = (epoch, host)
        if best is None:
            raise LookupError(slot)
        return best[1]

    def replica_of(self, host):
        """The host of the replica of the primary on ``host``."""
        role = self.admin(host, "ROLE")
        return self.host_of(f"{role[2][0][0]}:{role[2][0][1]}")

    def role(self, host):
        return self.admin(host, "ROLE")[0]

    @staticmethod
    def _wait(condition, what, timeout=30):
        wait_until(condition, what, timeout)


def _claims(ranges, slot):
    for item in ranges:
        if item.startswith("["):
            continue  # a slot being migrated
        first, _, last = item.partition("-")
        if int(first) <= slot <= int(last or first):
            return True
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="bring up the partition stack and wait (Ctrl-C takes it down)")
    for name, text in (("isolate", "drop all of HOST's traffic"), ("heal", "clear HOST's faults (all hosts without HOST)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("host", nargs="?" if name == "heal" else None)
    cut = commands.add_parser("cut", help="drop traffic between HOST and OTHER")
    cut.add_argument("host")
    cut.add_argument("other")
    cut.add_argument("--one-way", action="store_true")
    cut.add_argument("--port", type=int)
    blackhole = commands.add_parser("blackhole", help="HOST swallows packets to PORT")
    blackhole.add_argument("host")
    blackhole.add_argument("port", type=int)
    lose = commands.add_parser("lose", help="drop PERCENT of the packets between HOST and each OTHER")
    lose.add_argument("host")
    lose.add_argument("percent", type=float)
    lose.add_argument("others", nargs="+")
    commands.add_parser("status", help="hosts, addresses and the faults in force")
    args = parser.parse_args()

    if args.command == "up":
        with PartitionStack() as stack:
            STATE.write_text(json.dumps({"tag": stack.hosts.tag}))
            print(f"hosts up ({stack.hosts.tag}):", flush=True)
            for host, address in stack.hosts.address.items():
                print(f"  {host:8} {address}  (ip netns exec {stack.hosts.namespace(host)} ...)")
            print(
                f"\n  chat is ready: {stack.url}/chat/ from the client host, e.g.\n"
                f"  ip netns exec {stack.hosts.namespace('client')} curl {stack.url}/chat/\n"
                f"  faults: python -m localstack.nethosts cut redis-1 redis-4 | isolate chat-a | heal\n",
                flush=True,
            )
            try:
                while all(p.poll() is None for p in stack.chat.values()):
                    time.sleep(1)
            except KeyboardInterrupt:
                print("stopping…")
            finally:
                STATE.unlink(missing_ok=True)
        return 0
    if not STATE.exists():
        print("no test hosts are up: run `make hosts` first", file=sys.stderr)
        return 2
    hosts = Hosts([*REDIS_HOSTS, *CHAT_HOSTS, "ingress", "client"], tag=json.loads(STATE.read_text())["tag"])
    if args.command == "isolate":
        hosts.isolate(args.host)
    elif args.command == "heal":
        hosts.heal(*([args.host] if args.host else []))
    elif args.command == "cut":
        hosts.cut(args.host, args.other, one_way=args.one_way, port=args.port)
    elif args.command == "blackhole":
        hosts.blackhole(args.host, args.port)
    elif args.command == "lose":
        hosts.lose(args.host, args.percent, args.others)
    for host in hosts.names:
        faults = hosts.faults(host)
        if faults or args.command == "status":
            print(f"{host:8} {hosts.address[host]:14} {'; '.join(faults) or 'no faults'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
