"""Key and shard-channel names: every name carries a hash tag so each command touches one slot."""

import functools


@functools.lru_cache(maxsize=10_000)
def shared(text: str) -> str:
    """One string object for equal names held per socket (group names, epochs): bounded, unlike sys.intern."""
    return text


class KeyScheme:
    """Builds the Redis names of one layer prefix; the braces pick the slot."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def group_channel(self, group: str) -> bytes:
        """Shard channel that carries a group's messages."""
        return f"{{{self.prefix}:g:{group}}}".encode()

    def group_members(self, group: str) -> str:
        """Sorted set of a group's members (channel -> join time), in the group's slot."""
        return f"{{{self.prefix}:g:{group}}}:members"

    def group_queues(self, group: str) -> str:
        """Sorted set of a group's normal channels (channel -> join time): group_send pushes to their queues."""
        return f"{{{self.prefix}:g:{group}}}:queues"

    def group_history(self, group: str) -> list:
        """The keys of a group's history, in the group's slot: offsets hash, entries, idempotency keys.

        Entries carry their frame's header; the names differ from those of layers whose entries did not,
        so an upgrade starts each history anew (a resume across it is told ``recovered: false``)."""
        tag = f"{{{self.prefix}:g:{group}}}"
        return [f"{tag}:offsets", f"{tag}:entries", f"{tag}:keys"]

    def group_presence(self, group: str) -> str:
        """Hash of a group's present members (member channel -> member id and name), in the group's slot."""
        return f"{{{self.prefix}:g:{group}}}:presence"

    def presence_channel(self, group: str) -> bytes:
        """Shard channel of a group's presence events, in the group's slot: watched once per process, not per socket."""
        return f"{{{self.prefix}:g:{group}}}:presence".encode()

    def presence_leases(self) -> str:
        """Sorted set of the processes that keep presence entries (client prefix -> lease end, ms)."""
        return f"{{{self.prefix}:presence}}:leases"

    def presence_reaping(self) -> str:
        """Hash beside the leases: an ended lease's prefix -> when its claim to remove its entries ends, or 'done'."""
        return f"{{{self.prefix}:presence}}:reaping"

    def presence_groups(self, client_prefix: str) -> str:
        """Set beside the leases of the groups one process has presence entries in: what to clean when it dies."""
        return f"{{{self.prefix}:presence}}:groups:{client_prefix}"

    def inbox(self, client_prefix: str) -> bytes:
        """Shard channel of one layer instance: direct sends and remote group_add land here."""
        return f"{{{self.prefix}:w:{client_prefix}}}".encode()

    def queue(self, channel: str) -> str:
        """List that holds the messages of a normal (not process-specific) channel."""
        return f"{{{self.prefix}:c:{channel}}}"

    def pattern(self) -> str:
        """Glob that matches every key of this prefix, for flush."""
        return f"{{{self.prefix}:*"
