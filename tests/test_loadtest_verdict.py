"""The fan-out verdict's rules on hand-made ledgers (the real runs are in test_loadtest.py)."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "loadtest"))
from ledger import Ledger, save, verdict


def ledger_of(joins, sends, receipts, leaves=()):
    ledger = Ledger()
    ledger.merge({"joins": joins, "sends": sends, "receipts": receipts, "leaves": leaves})
    return ledger


# Two members of one room on two workers; "a" sends at t=10.
JOINS = [("a", "room", 1.0, "w1:1"), ("b", "room", 2.0, "w2:1")]
SENDS = [("n1", "room", 10.0, "a")]


def test_everyone_reached_passes_with_the_cross_worker_split():
    summary = verdict(ledger_of(JOINS, SENDS, [("n1", "a", 10.001), ("n1", "b", 10.003)]), 1.0, 100, ended_at=20)
    assert summary["passed"] and summary["deliveries_expected"] == 2 and summary["missing"] == 0
    assert (summary["same_worker_deliveries"], summary["cross_worker_deliveries"]) == (1, 1)
    assert abs(summary["latency_ms_p99"] - 3.0) < 1e-6


def test_a_missing_delivery_fails_and_is_shown():
    summary = verdict(ledger_of(JOINS, SENDS, [("n1", "a", 10.001)]), 1.0, 100, ended_at=20)
    assert not summary["passed"] and summary["missing"] == 1
    assert summary["missing_examples"][0]["member"] == "b"
    assert "1 of 2 expected deliveries are missing" in summary["failures"]


def test_members_who_joined_after_or_left_within_the_grace_are_not_owed_the_message():
    joins = [*JOINS, ("late", "room", 10.5, "w1:1"), ("leaving", "room", 1.0, "w2:1")]
    summary = verdict(
        ledger_of(joins, SENDS, [("n1", "a", 10.01), ("n1", "b", 10.01)], leaves=[("leaving", 10.5)]), 1.0, 100, ended_at=20
    )
    assert summary["passed"] and summary["deliveries_expected"] == 2


def test_no_cross_worker_delivery_with_two_workers_fails():
    joins = [("a", "room", 1.0, "w1:1"), ("b", "other", 1.0, "w2:1")]
    sends = [("n1", "room", 10.0, "a"), ("n2", "other", 10.0, "b")]
    summary = verdict(ledger_of(joins, sends, [("n1", "a", 10.01), ("n2", "b", 10.01)]), 1.0, 100, ended_at=20)
    assert not summary["passed"] and summary["missing"] == 0
    assert summary["failures"] == ["2 workers served sockets but no delivery crossed workers"]


def test_slow_p99_fails_and_duplicates_are_counted():
    receipts = [("n1", "a", 10.001), ("n1", "b", 10.5), ("n1", "b", 10.6)]
    summary = verdict(ledger_of(JOINS, SENDS, receipts), 1.0, 100, ended_at=20)
    assert not summary["passed"] and summary["duplicates"] == 1
    assert summary["failures"] == ["p99 fan-out latency 500.0 ms is over the 100 ms limit"]


def test_slow_p99_on_a_saturated_generator_is_inconclusive_not_a_failure():
    ledger = ledger_of(JOINS, SENDS, [("n1", "a", 10.001), ("n1", "b", 10.5)])
    for percent in (40.0, 95.0, 60.0):
        ledger.cpu_sample("gen:1", percent)
    ledger.cpu_sample("gen:2", 30.0)
    summary = verdict(ledger, 1.0, 100, ended_at=20)
    assert summary["outcome"] == "INCONCLUSIVE" and not summary["passed"] and summary["failures"] == []
    assert summary["generators_saturated"] == ["gen:1"]
    assert summary["generators"]["gen:1"] == {"samples": 3, "mean_percent": 65.0, "max_percent": 95.0}
    assert "saturated load generators (gen:1" in summary["inconclusive"][0]


def test_a_missing_delivery_fails_even_on_a_saturated_generator():
    joins = [*JOINS, ("c", "room", 3.0, "w2:1")]
    ledger = ledger_of(joins, SENDS, [("n1", "a", 10.001), ("n1", "b", 10.5)])
    ledger.cpu_sample("gen:1", 99.0)
    summary = verdict(ledger, 1.0, 100, ended_at=20)
    assert summary["outcome"] == "FAIL" and summary["failures"] == ["1 of 3 expected deliveries are missing"]
    assert summary["inconclusive"] and "p99" in summary["inconclusive"][0]


def test_a_fast_run_on_a_saturated_generator_passes():
    ledger = ledger_of(JOINS, SENDS, [("n1", "a", 10.001), ("n1", "b", 10.002)])
    ledger.cpu_sample("gen:1", 99.0)
    assert verdict(ledger, 1.0, 100, ended_at=20)["outcome"] == "PASS"


def test_nothing_is_owed_past_the_last_records_a_worker_handed_over():
    """Locust's master waits 0.5 s for the workers' final reports: a member whose process last reported at
    t=12 counts as gone then, so a message at t=15 is not owed to it, while one at t=10 is."""
    joins = [("a", "room", 1.0, "w1:1", "gen:1"), ("b", "room", 1.0, "w2:1", "gen:2")]
    sends = [("early", "room", 10.0, "a"), ("late", "room", 15.0, "a")]
    ledger = ledger_of(joins, sends, [("early", "a", 10.01), ("early", "b", 10.01), ("late", "a", 15.01)])
    ledger.merge({"horizons": [("gen:1", 9.0), ("gen:1", 20.0), ("gen:2", 12.0)]})
    summary = verdict(ledger, 1.0, 100, ended_at=20)
    assert summary["passed"] and summary["deliveries_expected"] == 3 and summary["missing"] == 0


def test_a_run_with_nothing_to_deliver_fails():
    assert verdict(Ledger(), 1.0, 100, ended_at=20)["failures"][0].startswith("no delivery was expected")


def test_records_travel_from_worker_to_master_and_are_saved(tmp_path):
    worker = ledger_of(JOINS, SENDS, [("n1", "a", 10.001), ("n1", "b", 10.002)])
    master = Ledger()
    master.merge(worker.drain())
    again = worker.drain()
    assert [name for name, records in again.items() if records] == ["horizons"] and len(again["horizons"]) == 1
    summary = verdict(master, 1.0, 100, ended_at=20)
    save(summary, tmp_path)
    assert (tmp_path / "verdict.csv").read_text().splitlines()[-1] == "TOTAL,1,2,2,0"
    assert '"passed": true' in (tmp_path / "verdict.json").read_text()


def test_a_resumed_member_is_owed_what_was_said_while_it_was_away():
    """A member that resumes keeps its join time: a message sent between its sockets is still owed."""
    joins = [("a", "room", 1.0, "w1:1"), ("b", "room", 1.0, "w2:1")]
    sends = [("away", "room", 5.0, "a")]  # b's socket was down at 5.0 and b resumed after
    ledger = ledger_of(joins, sends, [("away", "a", 5.01)])
    ledger.recovered("b", True)
    summary = verdict(ledger, 1.0, 100, ended_at=20)
    assert summary["missing"] == 1 and summary["resumes"] == 1 and summary["resumes_not_recovered"] == 0
