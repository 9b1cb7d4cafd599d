"""Cluster topology and per-primary pipelines that keep commands to one node in order."""

import asyncio
import bisect
import collections
import hashlib
import logging
import re
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from redis._parsers import AsyncCommandsParser, Encoder
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

logger = logging.getLogger(__name__)

# Errors after which the topology is refreshed and the command tried again: lost or refused
# connections, redirects (MOVED is an AskError) and a cluster that is electing a new primary.
RETRYABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    AskError,
    TryAgainError,
    ClusterDownError,
    RedisClusterException,
    OSError,
)


def parse_hosts(hosts):
    """Turn channels_redis-style ``hosts`` into startup nodes and shared connection options."""
    if not hosts:
        hosts = ["redis://127.0.0.1:6379"]
    if isinstance(hosts, (str, bytes)):
        raise ValueError("hosts must be a list of startup nodes, even if there is only one.")
    nodes, options = [], {}
    for entry in hosts:
        if isinstance(entry, dict):
            entry = dict(entry)
            address = entry.pop("address", None)
            if address is None:
                nodes.append(ClusterNode(entry.pop("host"), int(entry.pop("port", 6379))))
                options.update(entry)
                continue
            options.update(entry)
            entry = address
        if isinstance(entry, (tuple, list)):
            nodes.append(ClusterNode(entry[0], int(entry[1])))
            continue
        url = urlsplit(entry if "://" in entry else f"redis://{entry}")
        if url.scheme not in ("redis", "rediss"):
            raise ValueError(f"Unsupported scheme in {entry!r}: use redis:// or rediss://")
        nodes.append(ClusterNode(url.hostname or "127.0.0.1", url.port or 6379))
        if url.password:
            options["password"] = unquote(url.password)
        if url.username:
            options["username"] = unquote(url.username)
        if url.scheme == "rediss":
            options["ssl"] = True
    return nodes, options


class NotReplicated(RedisError):
    """A write its primary's replicas did not confirm in time: it was not published, and may be lost.

    Not retried by the layer: without an idempotency key a second try could write the message twice.
    """


def dedicated_connection(node, connect_timeout, read_timeout=None):
    """A connection to ``node`` outside the cluster pool; with no ``read_timeout`` its owner watches it."""
    kwargs = dict(node.connection_kwargs)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs["socket_timeout"] = read_timeout
    kwargs["socket_connect_timeout"] = connect_timeout
    return node.connection_class(**kwargs)


class SharedCommandTable(AsyncCommandsParser):
    """The server's COMMAND table, asked for once and reused by the cluster client of every later loop.

    Fetching and parsing it is most of what a new client's start costs (about 90 ms here), which a
    fresh event loop per call (``async_to_sync`` in a view or a task) would otherwise pay every time.
    """

    def __init__(self, holder: dict):
        super().__init__()
        self.holder = holder

    async def initialize(self, node=None):
        if node:
            self.node = node
        table = self.holder.get("table")
        if table is None:
            await super().initialize()
            self.holder["table"] = self.commands
        else:
            self.commands = table


class SlotRanges:
    """redis-py's ``slots_cache`` kept as the cluster's few slot ranges.

    redis-py keeps a dict of 16,384 int keys, about 1 MiB per client, and a process that calls the
    layer through ``async_to_sync`` builds a client per call. Looking a slot up in a handful of ranges
    costs a bisect; a slot redirected by ``MOVED`` is kept apart until the next refresh.
    """

    def __init__(self, ranges):
        self.firsts = [first for first, _, _ in ranges]
        self.ranges = ranges  # [(first, last, nodes)], ascending
        self.moved = {}

    def __getitem__(self, slot):
        nodes = self.moved.get(slot)
        if nodes is not None:
            return nodes
        index = bisect.bisect_right(self.firsts, slot) - 1
        if index < 0 or slot > self.ranges[index][1]:
            raise IndexError(slot)  # what redis-py's lookup turns into SlotNotCoveredError
        return self.ranges[index][2]

    def __setitem__(self, slot, nodes):
        self.moved[slot] = nodes

    def get(self, slot, default=None):
        """The nodes of ``slot``, as ``dict.get`` gives them."""
        try:
            return self[slot]
        except IndexError:
            return default


class SharedSlotMap:
    """The cluster's slot map as plain data, kept by the layer and shared by every loop's cluster client.

    A client that starts from it skips CLUSTER SLOTS and, above all, building redis-py's table of
    16,384 slots in Python (about 20 ms here), which a fresh loop per call would pay every time. Any
    loop's refresh (after MOVED or a failover) updates it for all. Slots map to node lists by range.
    """

    SLOTS = 16384

    def __init__(self):
        self.ranges = None  # [(first, last, [(host, port, server_type), ...])]

    def take(self, nodes_manager):
        """Remember the slot map a client just loaded."""
        ranges, slots = [], nodes_manager.slots_cache
        first, current = 0, slots.get(0)
        for slot in range(1, self.SLOTS + 1):
            nodes = slots.get(slot) if slot < self.SLOTS else None
            if nodes is not current or slot == self.SLOTS:
                if current:
                    ranges.append((first, slot - 1, [(n.host, n.port, n.server_type) for n in current]))
                first, current = slot, nodes
        self.ranges = ranges

    def give(self, nodes_manager):
        """Load the remembered slot map into a new client; False when there is none yet."""
        if not self.ranges:
            return False
        nodes, ranges = {}, []
        for first, last, members in self.ranges:
            listed = []
            for host, port, server_type in members:
                name = f"{host}:{port}"
                if name not in nodes:
                    # The client made a node for each startup node already: the same node, not a second one.
                    node = nodes_manager.startup_nodes.get(name)
                    if node is None:
                        node = ClusterNode(host, port, **nodes_manager.connection_kwargs)
                    node.server_type = server_type
                    nodes[name] = node
                listed.append(nodes[name])
            ranges.append((first, last, listed))
        slots = SlotRanges(ranges)
        nodes_manager.set_nodes(nodes_manager.nodes_cache, nodes, remove_old=True)
        nodes_manager.slots_cache = slots
        nodes_manager.default_node = slots[0][0]
        return True


class Topology:
    """The cluster client's slot map, refreshed from what the nodes say of themselves.

    redis-py trusts the first node whose CLUSTER SLOTS covers every slot, and a primary cut off from
    the rest of its cluster still claims its slots: a client that asks it keeps writing there while
    the majority has promoted its replica. A refresh here asks every known node for CLUSTER NODES at
    once and gives each slot to the primary that claims it with the highest config epoch, the rule the
    cluster itself follows; each slot's replicas are those of that primary not marked failed.
    ``changes`` counts the refreshes that moved a slot, so readers can tell when to follow.
    """

    def __init__(self, cluster: RedisCluster, slot_map: SharedSlotMap, command_timeout: float):
        self.cluster = cluster
        self.slot_map = slot_map
        self.command_timeout = command_timeout
        self.changes = 0
        self.reached_at = None  # loop time of the last refresh that heard from a node
        # Loop time of the first of the refreshes, up to the last one, that no node answered: None while the
        # last one was answered. A loop too busy to refresh often is not taken for one cut off from Redis.
        self.unreachable_since = None
        self._probes = {}  # node name -> a connection of its own for CLUSTER NODES
        self._given = None  # the shared slot map's ranges last loaded into this client
        self._refreshing = None

    async def start(self):
        """Load the slot map: the layer's shared copy when it has one, else from the cluster."""
        nodes_manager = self.cluster.nodes_manager
        if self.slot_map.give(nodes_manager):
            await self.cluster.commands_parser.initialize(nodes_manager.default_node)
            self.cluster._initialize = False  # redis-py's own flag: this client holds a slot map now
            return
        await self.cluster.initialize()
        self.slot_map.take(nodes_manager)
        self.reached_at = asyncio.get_running_loop().time()
        # One node's CLUSTER SLOTS may not list a replica it has not heard of yet, and sends wait for the
        # replicas the map gives: the first map of a process is read from every node's own word.
        await self.refresh()

    def nodes_for(self, name: bytes):
        """``[primary, replica, ...]`` of the slot of ``name`` in the current slot map."""
        return self.cluster.nodes_manager.slots_cache[self.cluster.keyslot(name)]

    def primary_for(self, name: bytes) -> ClusterNode:
        """The primary that owns the slot of ``name`` in the current slot map."""
        return self.cluster.get_node_from_key(name)

    def replicas_for(self, name: bytes) -> int:
        """How many replicas the primary of ``name``'s slot has that the cluster does not hold failed."""
        return len(self.nodes_for(name)) - 1

    def refresh_soon(self):
        """Start reloading the slot map without waiting for it (a reload already running serves)."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._reload())
            self._refreshing.add_done_callback(mark_retrieved)
        return self._refreshing

    async def refresh(self):
        """Reload the slot map; concurrent callers share one reload."""
        task = self.refresh_soon()
        try:
            await asyncio.shield(task)
        except RETRYABLE as exc:
            logger.debug("slot map refresh failed: %s", exc)

    async def _reload(self):
        loop = asyncio.get_running_loop()
        asked_at = loop.time()
        try:
            nodes_manager = self.cluster.nodes_manager
            known = {**nodes_manager.startup_nodes, **nodes_manager.nodes_cache}
            views = await asyncio.gather(*(self._ask(node) for node in known.values()), return_exceptions=True)
            views = [view for view in views if isinstance(view, str)]
            if not views:
                if self.unreachable_since is None:
                    self.unreachable_since = asked_at
                raise RedisConnectionError("no node of the cluster answered CLUSTER NODES")
            self.reached_at, self.unreachable_since = loop.time(), None
            ranges = slot_ranges(views)
            if ranges != self.slot_map.ranges:
                self.slot_map.ranges = ranges
                self.changes += 1
            if self.slot_map.ranges is not self._given:
                # Loaded only when it changed (here or in another loop): loading replaces redis-py's nodes,
                # whose pooled connections it drops.
                self.slot_map.give(nodes_manager)
                self._given = self.slot_map.ranges
        finally:
            self._refreshing = None

    async def _ask(self, node):
        connection = self._probes.get(node.name)
        if connection is None:
            connection = self._probes[node.name] = dedicated_connection(node, self.command_timeout, self.command_timeout)
        try:
            await connection.send_command("CLUSTER", "NODES", check_health=False)
            reply = await connection.read_response()
        except BaseException:
            self._probes.pop(node.name, None)
            await _disconnect(connection)
            raise
        return reply.decode() if isinstance(reply, bytes) else reply

    async def close(self):
        probes, self._probes = list(self._probes.values()), {}
        for connection in probes:
            await _disconnect(connection)


def slot_ranges(views):
    """The slot map of CLUSTER NODES replies: ``[(first, last, [(host, port, server_type), ...])]``.

    Each slot goes to the primary claiming it with the highest config epoch (its own word first, then
    the newest of what others say of a node that did not answer). Its replicas are the nodes that its
    own reply lists as its replicas (another's reply where it gave none: a primary knows its replicas
    first, as they connect to it), less any that a reply marks failed (``fail``, agreed by a majority;
    ``fail?``, one node's suspicion, does not count).
    """
    nodes, failed, told = {}, set(), {}  # told: a node's id -> {replica id: its primary's id} as its reply says
    for view in views:
        lines = [line.split() for line in view.splitlines()]
        lines = [fields for fields in lines if len(fields) >= 8]
        own = next((fields[0] for fields in lines if "myself" in fields[2].split(",")), None)
        for fields in lines:
            node_id, flags = fields[0], fields[2].split(",")
            if "fail" in flags:
                failed.add(node_id)
            if "noaddr" in flags or "handshake" in flags or fields[1].startswith(":"):
                continue
            myself, epoch = "myself" in flags, int(fields[6])
            if "slave" in flags and own is not None:
                told.setdefault(own, {})[node_id] = fields[3]
            known = nodes.get(node_id)
            # A node's own word wins; of what others say, the newest (the highest epoch they know it by).
            if known is not None and (known[5], known[3]) >= (myself, epoch):
                continue
            nodes[node_id] = (_address(fields[1]), "master" in flags, fields[3], epoch, fields[8:], myself)
    owners = [None] * SharedSlotMap.SLOTS
    claims = sorted(
        ((epoch, myself, node_id, slots) for node_id, (_, master, _, epoch, slots, myself) in nodes.items() if master),
        key=lambda claim: claim[:2],
    )
    for _, _, node_id, slots in claims:  # ascending: the highest epoch is written last and wins
        for item in slots:
            if item.startswith("["):
                continue  # a slot being migrated: its owner is listed as well
            first, _, last = item.partition("-")
            first, last = int(first), int(last or first)
            owners[first : last + 1] = [node_id] * (last - first + 1)

    def replicas_of(owner):
        if owner in told:
            ids = [node_id for node_id, primary in told[owner].items() if primary == owner]
        else:
            ids = [node_id for node_id, (_, master, primary, *_) in nodes.items() if not master and primary == owner]
        return [nodes[node_id][0] for node_id in sorted(ids) if node_id in nodes and node_id not in failed]

    ranges, first = [], 0
    for slot in range(1, SharedSlotMap.SLOTS + 1):
        if slot == SharedSlotMap.SLOTS or owners[slot] != owners[first]:
            owner = owners[first]
            if owner is not None:
                members = [(*nodes[owner][0], "primary")] + [(*address, "replica") for address in replicas_of(owner)]
                ranges.append((first, slot - 1, members))
            first = slot
    return ranges


def _address(field):
    """``(host, port)`` of a CLUSTER NODES address, ``ip:port@bus[,hostname]``: the hostname where one is set."""
    endpoint, _, hostname = field.partition(",")
    host, _, port = endpoint.partition("@")[0].rpartition(":")
    return (hostname or host, int(port))


async def _disconnect(connection):
    try:
        await connection.disconnect(nowait=True)
    except Exception:  # noqa: BLE001 - the socket is being dropped either way
        pass


RUN_ID = re.compile(rb"run_id:(\w+)")
# WAIT called from a script counts the replicas that acknowledged the calling connection's writes on Valkey
# 8 and later. Redis 7.0 refuses WAIT in a script; later Redis (its source as of late 2024) and Valkey 7 count
# every replica there, whatever it holds.
VALKEY_MAJOR = re.compile(rb"valkey_version:(\d+)\.")
SCRIPTS_WAIT_SINCE_VALKEY = 8


def pack_commands(commands):
    """The RESP bytes of ``commands``, as redis-py's packer makes them, in a sixth of its time.

    Every group message is one EVALSHA of about twenty arguments; redis-py's packer cost more than
    the rest of group_send's Python together. With hiredis (the ``[hiredis]`` extra) its C packer does
    it: for such an EVALSHA 2.0 us against 4.7 us for the Python below and 11.7 us for redis-py's.
    What hiredis refuses (bool, int subclasses, bytearray, lists) goes through the Python below,
    and types other than str, bytes, int and float through redis-py's own encoder (and its refusals).
    """
    if _pack_command is not None:
        try:
            return b"".join(map(_pack_command, commands))
        except TypeError:
            pass
    return _pack_in_python(commands)


def _pack_in_python(commands):
    out = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for arg in args:
            kind = type(arg)
            if kind is str:
                arg = arg.encode()
            elif kind is int or kind is float:
                arg = repr(arg).encode()
            elif kind is not bytes:
                arg = _ENCODER.encode(arg)
            out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


_ENCODER = Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # the [hiredis] extra is not installed: the Python packer does it all
    _pack_command = None


# A timer that runs this much later than it was due shows that the event loop itself was held up (a burst of
# closes, a long collection): what a node sent meanwhile may be waiting unread in its socket. Under a
# reconnect storm of 100,000 sockets on 2 cores a worker's loop was held up for seconds at a time, and
# deadlines that counted that time dropped answering nodes: 77 pipelines and 55 subscriptions in one storm,
# and with them 47,588 group_discard calls failed and 12,445 presence entries written again.
LOOP_STALL_SECONDS = 0.25


class Deadline:
    """Calls ``expire`` once ``seconds`` pass with nothing read (``progress()``), in time the loop could read.

    A check that runs late by more than ``LOOP_STALL_SECONDS`` does not judge: the loop was busy, not the
    node silent, and the loop reads what is waiting before the next check, ``seconds`` later. A node that
    answers nothing is still dropped after ``seconds`` of a loop free to hear it.
    """

    def __init__(self, seconds, expire):
        self.loop = asyncio.get_running_loop()
        self.seconds, self.expire = seconds, expire
        self.read_at = self.loop.time()
        self.handle = self.loop.call_at(self.read_at + seconds, self._check, self.read_at + seconds)

    def progress(self):
        """Something was read: the deadline counts from now."""
        self.read_at = self.loop.time()

    def cancel(self):
        self.handle.cancel()

    def _check(self, due):
        now = self.loop.time()
        if now - due > LOOP_STALL_SECONDS:
            due = now + self.seconds
        elif self.read_at + self.seconds > now:
            due = self.read_at + self.seconds
        else:
            self.expire()
            return
        self.handle = self.loop.call_at(due, self._check, due)


class NodePipeline:
    """One connection to one primary: commands from any task go out in batches, replies return in order.

    ``run_id`` is the server process this connection reached: it changes with every restart or
    failover, and a connection cannot outlive the process it reached. A batch of which nothing is answered
    for ``command_timeout`` seconds (of a loop free to read: ``Deadline``) fails, and the connection with
    it: a node that swallows packets costs its callers that long, not the minutes TCP would wait. Commands queued with ``replicas`` are
    answered only once that many replicas confirmed them: the batch ends with one WAIT for all of them.
    A command queued with a follow-up (``then``) has it sent after that WAIT, in the same write, where
    a script can ask WAIT itself whether the replicas hold the writes (``scripts_wait``).
    """

    def __init__(self, node: ClusterNode, command_timeout: float, replica_timeout: float, stats=None, preload=None):
        self.node = node
        self.preload = preload  # a ScriptCache, or None
        self.stats = stats
        self.command_timeout = command_timeout
        self.replica_timeout = replica_timeout
        self.connection = dedicated_connection(node, command_timeout)
        self.pending = collections.deque()
        self.wakeup = asyncio.Event()
        self.closed = False
        self.expired = False
        self.run_id = asyncio.get_running_loop().create_future()
        self.run_id.add_done_callback(mark_retrieved)
        self.scripts_wait = False  # known with run_id: whether WAIT in a script counts this connection's writes
        self.deadline = None  # of the batch being answered: every reply read moves it
        self.task = asyncio.ensure_future(self._run())

    def execute(self, *args, replicas=0, then=None):
        """Queue one command; the returned future holds its reply or error.

        With ``replicas`` or ``then`` (a command sent after the batch's WAIT) the future holds ``(reply,
        acknowledged, then_reply)`` instead: how many replicas acknowledged the batch (WAIT's answer), and
        the follow-up's reply or error (None without one). The caller judges whether that is enough.
        """
        future = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_exception(ConnectionError(f"pipeline to {self.node.name} is closed"))
            return future
        self.pending.append((args, future, replicas, then))
        self.wakeup.set()
        return future

    async def _reply(self):
        """The next reply; a Redis error is returned, not raised, so the rest of the batch is still read."""
        try:
            return await self.connection.read_response()
        except ResponseError as exc:
            return exc
        finally:
            self.deadline.progress()

    def _expire(self):
        self.expired = True
        self.task.cancel()

    async def _run(self):
        batch = []
        self.deadline = Deadline(self.command_timeout, self._expire)
        try:
            await self.connection.connect()
            await self.connection.send_command("INFO", "server", check_health=False)
            info = await self.connection.read_response()
            valkey = VALKEY_MAJOR.search(info)
            self.scripts_wait = valkey is not None and int(valkey.group(1)) >= SCRIPTS_WAIT_SINCE_VALKEY
            run_id = RUN_ID.search(info).group(1)
            if self.preload is not None and run_id not in self.preload.servers:
                # An error reply (SCRIPT LOAD refused) only leaves that script to NOSCRIPT's EVAL; a node
                # still loading its data fails the connect here, as it would fail any command.
                loads = [("SCRIPT", "LOAD", script.source) for script in self.preload.scripts]
                await self.connection.send_packed_command(pack_commands(loads), check_health=False)
                replies = [await self._reply() for _ in loads]
                if not any(isinstance(reply, ResponseError) for reply in replies):
                    self.preload.servers.add(run_id)
            self.run_id.set_result(run_id)
            self.deadline.cancel()
            while True:
                await self.wakeup.wait()
                self.wakeup.clear()
                batch = list(self.pending)
                self.pending.clear()
                if not batch:
                    continue
                commands = [args for args, _, _, _ in batch]
                replicas = max(wanted for _, _, wanted, _ in batch)
                if replicas:
                    commands.append(("WAIT", replicas, int(self.replica_timeout * 1000)))
                follow_ups = [then for _, _, _, then in batch if then is not None]
                for index, then in enumerate(follow_ups):
                    last = "1" if index == len(follow_ups) - 1 else "0"
                    commands.append(tuple(last if arg is LAST_IN_WRITE else arg for arg in then))
                self.deadline = Deadline(self.command_timeout + (self.replica_timeout if replicas else 0), self._expire)
                await self.connection.send_packed_command(pack_commands(commands), check_health=False)
                held = []  # replies that wait for the WAIT's answer, or for a follow-up's
                for item in batch:
                    reply = await self._reply()
                    _, future, wanted, then = item
                    if wanted or then is not None:
                        held.append((item, reply))
                    elif not future.done():
                        if isinstance(reply, ResponseError):
                            future.set_exception(reply)
                        else:
                            future.set_result(reply)
                acked = await self._reply() if replicas else 0  # an error: a node that is a replica now
                for (_, future, _, then), reply in held:
                    then_reply = await self._reply() if then is not None else None
                    if future.done():
                        continue
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    elif isinstance(acked, ResponseError):
                        future.set_exception(acked)
                    else:
                        future.set_result((reply, acked, then_reply))
                self.deadline.cancel()
                batch = []
        except asyncio.CancelledError:
            if not self.expired:
                error = ConnectionError(f"pipeline to {self.node.name} closed")
                raise
            error = RedisTimeoutError(f"{self.node.name} did not answer within {self.command_timeout}s")
            if self.stats is not None:
                self.stats.inc("command_deadlines")
            logger.warning("pipeline to %s failed: %s", self.node.name, error)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting callers
            error = exc if isinstance(exc, Exception) else ConnectionError(str(exc))
            logger.warning("pipeline to %s failed: %s", self.node.name, exc)
        finally:
            self.deadline.cancel()
            self.closed = True
            if not self.run_id.done():
                self.run_id.set_exception(error)
            for _, future, _, _ in [*batch, *self.pending]:
                if not future.done():
                    future.set_exception(error)
            self.pending.clear()
            await _disconnect(self.connection)

    async def close(self):
        """Stop the pipeline and fail whatever is still queued."""
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping: its callers were failed already
            pass


def mark_retrieved(future):
    """Mark a future's exception as seen: nobody may be waiting for it."""
    if not future.cancelled():
        future.exception()


class CommandRouter:
    """Routes each single-slot command (a publish, a script, a read) to the pipeline of its slot's primary,
    and runs it again on the new primary after a failover or a moved slot, for at most ``retry_timeout``."""

    def __init__(
        self, topology: Topology, retry_timeout: float, command_timeout: float, replica_timeout: float, stats=None, preload=None
    ):
        self.topology = topology
        self.preload = preload  # a ScriptCache every pipeline loads, or None
        self.stats = stats
        self.retry_timeout = retry_timeout
        self.command_timeout = command_timeout
        self.replica_timeout = replica_timeout
        self.pipelines = {}

    def _pipeline(self, node):
        pipeline = self.pipelines.get(node.name)
        if pipeline is None or pipeline.closed:
            pipeline = self.pipelines[node.name] = NodePipeline(
                node, self.command_timeout, self.replica_timeout, self.stats, self.preload
            )
        return pipeline

    async def execute(self, slot_key: bytes, *args):
        """Run a command on the primary that owns ``slot_key``; retry until ``retry_timeout`` passes."""
        return await self.execute_as(slot_key, lambda run_id: args)

    async def execute_as(self, slot_key: bytes, command, replicated=False, retry_timeout=None, then=None):
        """Run ``command(run_id)`` on the primary that owns ``slot_key``, ``run_id`` naming its server process.

        ``replicated``: answer only once every replica the slot map gives that primary holds the write
        (``NotReplicated`` otherwise, not retried), or the ones that do not were marked failed meanwhile;
        a primary with none answers at once. Retried across
        failovers for ``retry_timeout`` (the router's own by default).

        ``then``: a follow-up script sent after the replicas' WAIT in the same write, where the server's
        scripts can ask WAIT themselves (``NodePipeline.scripts_wait``); ``REPLICAS`` among its arguments
        stands for the number of replicas waited for. The answer is then ``(reply, confirmed,
        then_reply)``, and ``then_reply`` is None where the server cannot take the follow-up: the caller
        does its work another way.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.retry_timeout if retry_timeout is None else retry_timeout)
        delay = 0.02
        while True:
            try:
                pipeline = self._pipeline(self.topology.primary_for(slot_key))
                run_id = pipeline.run_id
                replicas = self.topology.replicas_for(slot_key) if replicated else 0
                args = command(run_id.result() if run_id.done() else await run_id)
                if not replicas and then is None:
                    return await pipeline.execute(*args)
                follow_up = None
                if then is not None and pipeline.scripts_wait:
                    follow_up = then.script.command(then.keys, *(replicas if a is REPLICAS else a for a in then.args))
                if replicas or follow_up is not None:
                    reply, acknowledged, then_reply = await pipeline.execute(*args, replicas=replicas, then=follow_up)
                else:  # a primary with no replica, on a server whose scripts cannot ask WAIT
                    reply, acknowledged, then_reply = await pipeline.execute(*args), 0, None
                if isinstance(then_reply, NoScriptError):  # loaded for the next ones; this one's caller falls back
                    pipeline.execute("SCRIPT", "LOAD", then.script.source).add_done_callback(mark_retrieved)
                confirmed = acknowledged >= replicas or await self._short_only_of_failed(slot_key, pipeline, acknowledged)
                if then is not None:
                    return reply, confirmed, then_reply
                if not confirmed:
                    raise NotReplicated(
                        f"{acknowledged} of {replicas} replicas of {pipeline.node.name} confirmed within {self.replica_timeout}s"
                    )
                return reply
            except RETRYABLE:
                if loop.time() + delay > deadline:
                    raise
            await self.topology.refresh()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _short_only_of_failed(self, slot_key, pipeline, acknowledged):
        """Whether the replicas that did not acknowledge a write are ones the cluster has marked failed since
        the slot map was read: the primary that took the write, asked at once, lists no more replicas not
        marked failed than acknowledged, and still owns the slot.

        The map is read every ``follow_interval`` (1 s by default), and a replica stopped or cut off is
        marked failed after the cluster's node timeout: without this, every send in the gap between the two
        waited for a replica that no longer counts, and was refused. The primary is asked, not every node
        as a refresh does, because the stopped replica would hold a refresh for ``command_timeout``.
        """
        # The map is read again either way, in the background: the next sends stop waiting for a failed
        # replica, or find the slot's new primary.
        self.topology.refresh_soon()
        try:
            view = await pipeline.execute("CLUSTER", "NODES")
        except Exception:  # noqa: BLE001 - unknown, so refused: retrying the write here could write it twice
            return False
        view = view.decode() if isinstance(view, bytes) else view
        slot = self.topology.cluster.keyslot(slot_key)
        for first, last, (owner, *replicas) in slot_ranges([view]):
            if first <= slot <= last:
                return f"{owner[0]}:{owner[1]}" == pipeline.node.name and len(replicas) <= acknowledged
        return False

    async def close(self):
        """Close every pipeline."""
        pipelines, self.pipelines = list(self.pipelines.values()), {}
        for pipeline in pipelines:
            await pipeline.close()


WRITER = object()  # stands for the run id of the server process that runs a script
REPLICAS = object()  # stands for the number of replicas a follow-up script asks WAIT about
LAST_IN_WRITE = object()  # stands for "1" in the last follow-up script of a pipeline's write, "0" in the others


class FollowUp(NamedTuple):
    """A script to run after the replicas' WAIT, in the same write as the command before it."""

    script: "Script"
    keys: tuple
    args: tuple


class ScriptCache:
    """The scripts every pipeline puts in its node's script cache as it connects, and the server processes
    (run ids) known to hold them: once per server process and client process, not once per event loop (a
    sync caller's every ``async_to_sync`` call has a loop and pipelines of its own). A node whose scripts are
    flushed later answers NOSCRIPT, and ``Script`` sends it the text."""

    def __init__(self):
        self.scripts = []
        self.servers = set()


class Script:
    """A Lua script run by EVALSHA; a node that does not hold it (NOSCRIPT) is sent the whole text by EVAL."""

    def __init__(self, source):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def command(self, keys, *args):
        """The EVALSHA that runs this script."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def later(self, keys, *args):
        """This script with these arguments, as ``CommandRouter.execute_as`` takes a follow-up (``then``)."""
        return FollowUp(self, keys, args)

    async def __call__(self, commands, keys, *args, replicated=False, retry_timeout=None, then=None):
        """Run on the primary of the keys' slot; ``WRITER`` among ``args`` becomes its server's run id.

        ``replicated``, ``retry_timeout`` and ``then`` as ``CommandRouter.execute_as`` takes them.
        """
        if isinstance(keys, str):
            keys = (keys,)

        def command(verb, script):
            return lambda run_id: (verb, script, len(keys), *keys, *(run_id if a is WRITER else a for a in args))

        try:
            return await commands.execute_as(keys[0].encode(), command("EVALSHA", self.sha), replicated, retry_timeout, then)
        except NoScriptError:
            return await commands.execute_as(keys[0].encode(), command("EVAL", self.source), replicated, retry_timeout, then)
