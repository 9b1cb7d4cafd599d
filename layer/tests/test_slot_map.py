"""The slot map built from CLUSTER NODES replies: the highest config epoch owns a slot, failed replicas do not count.

A unit test of the parsing; the partition tests (tests/test_partitions.py) make the same views happen for real.
"""

from channels_redis_cluster.cluster import slot_ranges

# The majority's view after the primary of 0-5460 (a, epoch 1) was cut off and its replica d promoted (epoch 4).
MAJORITY = """\
a 10.0.0.1:6379@16379 master,fail - 0 0 1 connected
b 10.0.0.2:6379@16379 myself,master - 0 0 2 connected 5461-10922
c 10.0.0.3:6379@16379 master - 0 0 3 connected 10923-16383
d 10.0.0.4:6379@16379 master - 0 0 4 connected 0-5460
e 10.0.0.5:6379@16379 slave b 0 0 2 connected
f 10.0.0.6:6379@16379 slave c 0 0 3 connected
"""
# What the cut-off primary says of itself and the others: it still claims 0-5460 with its old epoch.
ISOLATED = """\
a 10.0.0.1:6379@16379 myself,master - 0 0 1 connected 0-5460
b 10.0.0.2:6379@16379 master,fail? - 0 0 2 disconnected 5461-10922
c 10.0.0.3:6379@16379 master,fail? - 0 0 3 disconnected 10923-16383
d 10.0.0.4:6379@16379 slave,fail? a 0 0 1 disconnected
e 10.0.0.5:6379@16379 slave,fail? b 0 0 2 disconnected
f 10.0.0.6:6379@16379 slave,fail? c 0 0 3 disconnected
"""


def owner(ranges, slot):
    return next(nodes for first, last, nodes in ranges if first <= slot <= last)


def test_the_promoted_replica_owns_the_slots_whatever_the_cut_off_primary_claims():
    for views in ([MAJORITY, ISOLATED], [ISOLATED, MAJORITY]):
        ranges = slot_ranges(views)
        assert owner(ranges, 0)[0] == ("10.0.0.4", 6379, "primary")
        assert owner(ranges, 6000)[0] == ("10.0.0.2", 6379, "primary")
        assert [first for first, _, _ in ranges] == [0, 5461, 10923]


def test_replicas_are_those_that_name_their_primary_and_no_view_marks_failed():
    ranges = slot_ranges([MAJORITY, ISOLATED])
    assert owner(ranges, 6000)[1:] == [("10.0.0.5", 6379, "replica")]
    assert owner(ranges, 0)[1:] == [], "the promoted replica has none until the old primary rejoins"
    # "fail?" is one node's suspicion, not the cluster's verdict: a replica it suspects still counts.
    alone = slot_ranges([ISOLATED])
    assert owner(alone, 0) == [("10.0.0.1", 6379, "primary"), ("10.0.0.4", 6379, "replica")]


def test_a_node_announcing_a_hostname_is_reached_by_it_and_migrating_slots_are_skipped():
    view = (
        "a 127.0.0.1:7000@17000,node-a myself,master - 0 0 1 connected 0-16383 [77->-b]\n"
        "b 127.0.0.1:7001@17001,node-b slave a 0 0 1 connected\n"
    )
    assert slot_ranges([view]) == [(0, 16383, [("node-a", 7000, "primary"), ("node-b", 7001, "replica")])]
