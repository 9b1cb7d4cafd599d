"""Layer event counters, mirrored into Prometheus when prometheus_client is installed."""

import collections

try:
    from prometheus_client import Counter
except ImportError:  # the layer works without it; only the export is lost
    Counter = None

EVENTS = {
    "delivered": "Group messages handed to local channels (buffers or attached receivers)",
    "overflow": "Messages dropped because their channel was full: a local buffer, an attached receiver, or a queue a group_send pushed to",
    "undeliverable": "Membership changes for a process-specific channel whose process is gone",
    "parked": "Direct sends to a process-specific channel whose loop was not listening, queued in Redis for its process",
    "sequence_gaps": "Pub/sub messages numbered by a sender that never arrived here",
    "out_of_order": "Pub/sub messages that arrived after a later one from the same sender",
    "resubscribes": "Subscriber connections lost and moved to the slot's current primary",
    "resynced": "Group messages published while a subscription was being moved, delivered here from the group's history",
    "errors": "Layer operations that failed after retrying",
    "epoch_rotations": "Group histories given a new epoch: new, lost, or written by another server process since",
    "presence_restored": "Presence entries of this process written again after Redis lost them (a failover, a lost lease)",
    "presence_reaped": "Presence entries of processes whose lease ended, removed by this one",
    "duplicates_suppressed": "Group sends not published again because their idempotency key was in the history",
    "not_replicated": "Group sends with history refused because their primary's replicas did not confirm them in time",
    "published_in_one_round_trip": "Group sends with history published in the same write as the message and its WAIT for the replicas (Valkey 8 and later)",
    "command_deadlines": "Connections to a node dropped because a command or a subscription went unanswered past its deadline",
    "subscriptions_followed": "Shard subscriptions moved because the slot map gave their slot to another primary",
}

_exported = {name: Counter(f"channels_layer_{name}", text) for name, text in EVENTS.items()} if Counter is not None else {}


class LayerStats:
    """Per-layer counts of the events in ``EVENTS``; ``counts`` is what tests and health checks read."""

    def __init__(self):
        self.counts = collections.Counter()

    def inc(self, name, amount=1):
        """Count ``amount`` events of kind ``name``."""
        self.counts[name] += amount
        exported = _exported.get(name)
        if exported is not None:
            exported.inc(amount)

    def __getitem__(self, name):
        return self.counts[name]
