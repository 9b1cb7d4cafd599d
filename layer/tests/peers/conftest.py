"""The peers' own layer test suites, run against this layer: what does not apply, and why.

Every test not listed here must pass. A listed test is deselected (not skipped), and the README's
table of them is checked against this list. The peers' xfail marks are dropped: they record
channels_redis's known failures, which this layer must not share.
"""

import pytest

from peers import peer_layers

NOT_APPLICABLE = {
    "test_channels_redis_core.py::test_reject_bad_client_prefix":
        "expects channels_redis's AssertionError for a process channel of another process; this layer raises ValueError",
    "test_channels_redis_core.py::test_random_reset__client_prefix":
        "reads the layer's client_prefix attribute; this layer has one per event loop, not per layer",
    "test_channels_redis_core.py::test_default_group_key_format":
        "calls channels_redis's private _group_key; this layer's names are in channels_redis_cluster.keys",
    "test_channels_redis_core.py::test_custom_group_key_format":
        "calls channels_redis's private _group_key; this layer's names are in channels_redis_cluster.keys",
    "test_channels_redis_core.py::test_receive_buffer_respects_capacity":
        "fills channels_redis's private receive_buffer; layer/tests/test_layer_conformance.py tests this layer's buffers",
    "test_channels_redis_core.py::test_message_expiry__group_send__one_channel_expires_message":
        "contradicts itself: it waits out a 1 s timeout and then expects a message sent 3 s before with expiry=3,"
        " which is due to expire that instant (upstream marks it xfail)",
    "test_channels_redis_pubsub.py::test_receive_on_non_owned_general_channel":
        "sends a str; the channel layer spec and channels_redis core take only dicts, as this layer does",
    "test_channels_redis_pubsub.py::test_loop_instance_channel_layer_reference":
        "calls the pub/sub layer's private _get_layer()",
    "test_channels_redis_pubsub.py::test_multi_event_loop_garbage_collection":
        "reads the pub/sub layer's private _layers; layer/tests/test_sync_callers.py checks this layer's per-loop state",
    "test_channels_redis_pubsub.py::test_auto_reconnect":
        "closes the pub/sub layer's private _shards[0]._redis; tests/test_failover.py kills real primaries instead",
    "test_channels_inmemorychannel.py::test_send_receive":
        "reads the in-memory layer's channels dict, its internal store",
    "test_channels_inmemorychannel.py::test_race_empty":
        "deletes from the in-memory layer's channels dict, its internal store",
    "test_channels_inmemorychannel.py::test_expiry_single":
        "reads the in-memory layer's channels dict, its internal store",
    "test_channels_inmemorychannel.py::test_expiry_unread":
        "reads the in-memory layer's channels dict, its internal store",
    "test_channels_inmemorychannel.py::test_expiry_multi":
        "reads the in-memory layer's channels dict, its internal store",
}


@pytest.fixture(scope="session", autouse=True)
def peer_hosts(redis_cluster):
    """Every layer the peers' tests build runs on the session's local cluster."""
    peer_layers.HOSTS[:] = [f"redis://{node}" for node in redis_cluster.startup_nodes]


def pytest_collection_modifyitems(config, items):
    here = [item for item in items if item.path.parent.name == "peers"]
    names = {f"{item.path.name}::{item.originalname}" for item in here}
    stale = set(NOT_APPLICABLE) - names
    assert not stale, f"listed as not applicable but not in the peers' suites: {stale}"
    deselected = [item for item in here if f"{item.path.name}::{item.originalname}" in NOT_APPLICABLE]
    for item in here:
        item.own_markers[:] = [mark for mark in item.own_markers if mark.name != "xfail"]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
