"""The capacity model's arithmetic on a hand-made report (the real costs come from `make bench`)."""

import random

from loadtest import capacity
from loadtest.benchmark import cost_split

REPORT = {
    "args": {"ws": "wsproto"},
    "backends": {"redis-cluster": {"sustainable": {"achieved_per_s": 30000, "server_cpu_percent": [50.0, 50.0, 50.0]}}},
    "memory": {"chat/wsproto": {"kib_per_socket": 18.0}},
    "redis_cost": {"us_per_send": 10.0, "us_per_subscriber": 2.0},
}


def test_costs_are_read_from_the_report():
    costs = capacity.measured_costs(REPORT)
    assert costs["worker_cpu_us_per_delivery"] == 50.0  # 1.5 cores / 30,000 deliveries/s
    assert (costs["kib_per_socket"], costs["redis_us_per_send"], costs["redis_us_per_subscriber"]) == (18.0, 10.0, 2.0)


def test_the_room_size_curve_splits_into_a_cost_per_recipient_and_per_message():
    points = [{"room_size": n, "cpu_us_per_delivery": 20.0 + 500.0 / n} for n in (2, 10, 50, 500, 5000)]
    assert cost_split(points) == {"per_recipient_us": 20.0, "per_message_us": 500.0}
    # Relative errors: a small room's 10% error does not drag the per-recipient cost the way it would absolutely.
    points[0]["cpu_us_per_delivery"] *= 1.1
    split = cost_split(points)
    assert abs(split["per_recipient_us"] - 20.0) < 0.5 and abs(split["per_message_us"] - 500.0) < 40  # absolute: 18.5 and 555
    assert cost_split(points[:1]) is None


def test_a_room_reaches_at_most_every_pod_and_at_most_one_pod_per_member():
    assert abs(capacity.distinct_pods(1, 50) - 1) < 1e-9
    assert 9 < capacity.distinct_pods(10, 50) < 10
    assert 49.9 < capacity.distinct_pods(5000, 50) <= 50


def test_zipf_rooms_hold_every_socket_and_respect_the_largest_room():
    sizes = capacity.zipf_rooms(1000, 100_000, 1.0, 2000, random.Random(1))
    assert len(sizes) == 1000 and max(sizes) == 2000
    assert abs(sum(sizes) - 100_000) < 1000


def test_rooms_of_even_size_spread_evenly_over_shards():
    spread = capacity.spread([10] * 100_000, 6)
    assert spread["max_over_mean"] < 1.05 and spread["min_over_mean"] > 0.95


def test_more_messages_need_more_pods_and_shards():
    args = capacity.parse(["--sockets", "100000", "--rooms", "10000"])
    costs = capacity.measured_costs(REPORT)
    sizes = [10] * 10_000
    quiet = capacity.plan(costs, sizes, args)
    args.messages_per_socket_per_minute *= 10
    busy = capacity.plan(costs, sizes, args)
    assert busy["pods"]["for_cpu"] > quiet["pods"]["for_cpu"] and busy["redis"]["shards"] >= quiet["redis"]["shards"]
    # Every member of a room of 10 gets each message: 100,000 sockets at 10 a minute, times 10.
    assert busy["workload"]["deliveries_per_s"] == round(100_000 * 10 / 60 * 10)
    # The shard count covers the simulated busiest shard at the planned share of a core.
    redis = busy["redis"]
    assert redis["cores"] * redis["busiest_over_mean"] / redis["shards"] <= args.redis_core_budget


def test_a_shard_count_that_never_holds_ends_the_search_and_says_so():
    """Redis so slow per message that no count covers the busiest shard: the search stops, it does not spin."""
    args = capacity.parse(["--sockets", "100000", "--rooms", "10000"])
    costs = {**capacity.measured_costs(REPORT), "redis_us_per_send": 1e6}
    redis = capacity.plan(costs, [10] * 10_000, args)["redis"]
    assert not redis["converged"] and redis["shards"] > capacity.MAX_SHARDS


def test_the_section_renders_from_a_report():
    numbers, text = capacity.section(REPORT, capacity.parse(["--sockets", "20000", "--rooms", "2000"]))
    assert numbers["pods"]["count"] >= 2 and "| Redis shards (primaries) |" in text


def test_spublish_measured_alone_replaces_the_fitted_cost_per_subscriber_and_both_plans_are_reported():
    report = {**REPORT, "spublish": {"us_per_subscriber": 0.5, "us_per_publish": {"0": 2.0, "100": 52.0}}}
    costs = capacity.measured_costs(report)
    assert (costs["redis_us_per_subscriber"], costs["redis_us_per_subscriber_fitted"]) == (0.5, 2.0)
    check = capacity.spublish_check(report)
    assert check["model_us_per_subscriber"] == 2.0 and check["spublish_us_per_subscriber"] == 0.5
    assert check["redis_cores"]["with_spublish"] < check["redis_cores"]["model"]
    assert capacity.spublish_check(REPORT) is None
