"""Who is in a room, for v2 clients that ask (``?presence=1``): one view per room and worker, kept by events.

Every socket is recorded in the layer's presence of its room (one command on join, one on leave).
The sockets of a worker that watch a room share one view of it: the members the first of them read,
then the room's presence events, which reach the worker once (not once per socket). A member is its
id, so the view turns socket events into ``join`` and ``leave`` frames only when a member's first
socket comes or its last goes: a client that resumes on another worker within the grace period is
never seen to leave.
"""

import asyncio
import hashlib
import json
import logging
import re
import secrets
import weakref

logger = logging.getLogger(__name__)

MEMBER_KEY = re.compile(r"[0-9a-f]{32}")


def member_of(identity, key):
    """The member id: the identity's (its tabs are one member), else one derived from the client's secret key."""
    if identity is not None:
        return "u-" + identity.key[:16]
    return "a-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def new_member_key():
    return secrets.token_hex(16)


def snapshot_frame(members):
    return json.dumps({"type": "presence", "count": len(members), "members": members})


def change_frame(kind, member):
    return json.dumps({"type": kind, "member": member})


def join_event(channel, member, name):
    return {"type": "presence.join", "channel": channel, "id": member, "name": name}


def leave_event(channel, member, name):
    return {"type": "presence.leave", "channel": channel, "id": member, "name": name}


class RoomView:
    """A room's members as this worker knows them (id -> name and sockets), and the sockets here that watch it."""

    __slots__ = ("group", "layer", "members", "reads", "ready", "watchers")

    def __init__(self, layer, group):
        self.layer, self.group = layer, group
        self.members = {}  # id -> {"name": name, "channels": set()}
        self.watchers = set()  # consumers of this worker watching the room
        self.reads = []  # for each read in flight, the events that arrived since it was sent
        self.ready = asyncio.ensure_future(self._start())

    async def _start(self):
        # Watch first, then read: an event from before the read changes nothing it did not already show.
        await self.layer.presence_watch(self.group, self.on_event)
        await self.read()

    async def read(self):
        """Read the room's members; the frames that tell watchers what changed since the view's last.

        The events that arrive while the read is in flight are applied again on top of it: the read and
        the events come over different connections, so a member who joined after Redis answered the
        read can be announced before the answer arrives, and taking the answer as it is would drop them
        from the view (seen in a storm of 3,000 joins). Replaying is safe for those the read already
        shows: a join adds a socket the member may already have, a leave removes one it may not."""
        since = []
        self.reads.append(since)
        try:
            entries = await self.layer.presence(self.group)
        finally:
            self.reads.remove(since)
        known = {entry["id"]: {"name": entry["name"], "channels": set(entry["channels"])} for entry in entries}
        for event in since:
            apply_event(known, event)
        frames = [change_frame("leave", {"id": m, "name": s["name"]}) for m, s in self.members.items() if m not in known]
        frames += [change_frame("join", {"id": m, "name": e["name"]}) for m, e in known.items() if m not in self.members]
        self.members = known
        return frames

    def listed(self):
        return [{"id": member, "name": state["name"]} for member, state in self.members.items()]

    def on_event(self, event):
        """A presence event of the room (None: read the members again, after a gap or entries written back)."""
        if event is None:
            in_background(self.reload())
            return
        for since in self.reads:
            since.append(event)
        self.tell_change(apply_event(self.members, event))

    async def reload(self):
        try:
            frames = await self.read()
        except Exception as exc:  # noqa: BLE001 - the next event or gap reads again
            logger.warning("presence of %s not read again: %r", self.group, exc)
            return
        for frame in frames:
            self.tell(frame)

    def forget(self, member, channel):
        """One socket of ``member`` is gone; its watchers hear of it when it was the member's last."""
        self.tell_change(apply_event(self.members, leave_event(channel, member, None)))

    def tell_change(self, change):
        """Tell the watchers of a member who came or went (``apply_event``'s answer; None: no one did)."""
        if change is not None:
            kind, member, name = change
            self.tell(change_frame(kind, {"id": member, "name": name}))

    def channels_gone(self, gone):
        """Forget the sockets of processes that died without saying goodbye (``gone(channel)`` says which)."""
        for member, state in list(self.members.items()):
            for channel in [c for c in state["channels"] if gone(c)]:
                self.forget(member, channel)

    def tell(self, frame):
        """Queue ``frame`` for every watcher, in order with its room messages."""
        if not self.ready.done():
            return  # the first read, which comes next, shows it
        for watcher in list(self.watchers):
            watcher.presence_frame_soon(frame)

    async def close(self):
        self.ready.cancel()
        try:
            await self.layer.presence_unwatch(self.group, self.on_event)
        except Exception as exc:  # noqa: BLE001 - only unwanted traffic remains, which is ignored
            logger.debug("presence unwatch of %s failed: %r", self.group, exc)


def apply_event(members, event):
    """Apply one presence event to ``members`` (id -> name and channels), the one rule of membership: a member
    is there while any of their sockets is. ``(kind, id, name)`` when the member came (``"join"``, their first
    socket) or went (``"leave"``, their last), else None."""
    member, channel = event["id"], event["channel"]
    state = members.get(member)
    if event["type"] == "presence.join":
        if state is None:
            members[member] = {"name": event["name"], "channels": {channel}}
            return ("join", member, event["name"])
        state["channels"].add(channel)
        return None
    if state is None or channel not in state["channels"]:
        return None
    state["channels"].discard(channel)
    if state["channels"]:
        return None
    del members[member]
    return ("leave", member, state["name"])


VIEWS = {}  # group -> RoomView, for rooms with watchers on this worker
_BACKGROUND = set()  # reloads and closes of views under way, kept until done: the loop holds tasks only weakly


def in_background(coroutine):
    """Run ``coroutine`` as a task held until it is done."""
    task = asyncio.ensure_future(coroutine)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_listening = weakref.WeakSet()  # layers whose process-gone events reach the views


async def watch(consumer, layer, group):
    """Add ``consumer`` to the worker's view of ``group``; the members it lists now."""
    if layer not in _listening:
        _listening.add(layer)
        await layer.on_channels_gone(lambda gone: [view.channels_gone(gone) for view in list(VIEWS.values())])
    view = VIEWS.get(group)
    if view is None:
        view = VIEWS[group] = RoomView(layer, group)
    view.watchers.add(consumer)
    try:
        await asyncio.shield(view.ready)
    except BaseException:
        unwatch(consumer, group)
        raise
    return view.listed()


def unwatch(consumer, group):
    """Remove ``consumer`` from the view at once; the last watcher out closes it in the background."""
    view = VIEWS.get(group)
    if view is None:
        return
    view.watchers.discard(consumer)
    if not view.watchers:
        del VIEWS[group]
        in_background(view.close())
