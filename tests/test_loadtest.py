"""The Locust scenarios against the `make run` topology: they pass on the real layer and fail on a broken one."""

import json
import subprocess
import sys

from conftest import ROOT, local_stack

USERS, SECONDS, PROCESSES = 24, 10, 2


def run_locust(url, scenario, report_dir, *options, processes=PROCESSES):
    """A bounded headless run, as `make loadtest` starts it; returns (exit status, verdict, output)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtest/locustfile.py"),
            "--headless",
            "--only-summary",
            "-H",
            url,
            "-u",
            str(USERS),
            "-r",
            str(USERS),
            "-t",
            f"{SECONDS}s",
            "--processes",
            str(processes),
            "--report-dir",
            str(report_dir),
            "--html",
            str(report_dir / "report.html"),
            "--csv",
            str(report_dir / "locust"),
            *options,
            scenario,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS + 60,
    )
    output = result.stdout + result.stderr
    verdict_file = report_dir / "verdict.json"
    # Locust itself failing (it wrote no verdict) says why here, not as a missing file.
    assert verdict_file.exists(), f"Locust wrote no verdict (exit status {result.returncode}):\n{output[-4000:]}"
    return result.returncode, json.loads(verdict_file.read_text()), output


def assert_passed(status, verdict, output, processes=PROCESSES):
    assert status == 0 and verdict["passed"], output[-3000:]
    assert verdict["missing"] == 0 and verdict["deliveries_expected"] > USERS
    assert verdict["workers_serving_sockets"] >= 2 and verdict["cross_worker_deliveries"] > 0
    assert "fan-out verdict: PASS" in output
    # Every generating process reported its own CPU to the master.
    assert len(verdict["generators"]) == processes, verdict["generators"]
    assert all(cpu["samples"] >= 2 for cpu in verdict["generators"].values()), verdict["generators"]


def test_room_fanout_passes_and_reports_everything(stack, tmp_path):
    status, verdict, output = run_locust(stack["url"], "RoomFanoutUser", tmp_path, "--rooms", "3")
    assert_passed(status, verdict, output)
    assert verdict["latency_ms_p50"] <= verdict["latency_ms_p95"] <= verdict["latency_ms_p99"]
    assert set(verdict["rooms"]) <= {"load-0", "load-1", "load-2"}
    csv_rows = (tmp_path / "verdict.csv").read_text().splitlines()
    assert csv_rows[0].startswith("room,") and csv_rows[-1].startswith("TOTAL,")
    assert (tmp_path / "report.html").stat().st_size > 0
    assert "DELIVER,cross-worker" in (tmp_path / "locust_stats.csv").read_text()


def test_churn_passes(stack, tmp_path):
    status, verdict, output = run_locust(stack["url"], "ChurnUser", tmp_path, "--message-interval", "0.3")
    assert_passed(status, verdict, output)
    assert verdict["sockets_joined"] > 2 * USERS, "users should have left and rejoined rooms"


def test_reconnect_storm_resumes_and_owes_what_was_said_meanwhile(stack, tmp_path):
    status, verdict, output = run_locust(stack["url"], "ReconnectStormUser", tmp_path, "--storm-interval", "3")
    assert_passed(status, verdict, output)
    assert verdict["resumes"] >= 2 * USERS, "every user should have resumed in each storm"
    assert verdict["resumes_not_recovered"] == 0 and verdict["duplicates"] == 0


def test_p99_over_the_limit_fails_the_run(stack, tmp_path):
    status, verdict, output = run_locust(stack["url"], "RoomFanoutUser", tmp_path, "--max-p99-ms", "0.001")
    assert status == 1 and verdict["outcome"] == "FAIL" and verdict["missing"] == 0
    assert any("p99 fan-out latency" in reason for reason in verdict["failures"]), output[-2000:]


def test_workers_that_do_not_share_groups_fail_the_run(tmp_path):
    """CHANNEL_LAYER=memory with 3 workers: each worker only reaches its own sockets."""
    with local_stack(CHANNEL_LAYER="memory") as broken:
        status, verdict, output = run_locust(broken["url"], "RoomFanoutUser", tmp_path, "--rooms", "2")
    assert status != 0 and not verdict["passed"], output[-3000:]
    assert verdict["workers_serving_sockets"] >= 2 and verdict["missing"] > 0
    assert verdict["cross_worker_deliveries"] == 0
    assert "fan-out verdict: FAIL" in output and "expected deliveries are missing" in output
