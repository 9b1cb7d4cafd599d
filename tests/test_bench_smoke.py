"""`make bench` works: a seconds-long smoke of every part of the fan-out benchmark writes its report."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_smoke_writes_the_report_with_every_part():
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.benchmark", "--smoke"],
        cwd=ROOT, env={"PYTHONPATH": f"{ROOT / 'services'}:{ROOT}", "PATH": "/usr/bin:/bin"},
        timeout=300, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = ROOT / "artifacts" / "bench"
    report = json.loads((out / "report.json").read_text())
    assert set(report["backends"]) == {"redis-cluster", "redis", "redis-pubsub", "ceiling"}
    ours = report["backends"]["redis-cluster"]
    assert ours["sustainable"]["delivered_ratio"] == 1.0 and ours["big_room"]["delivered_ratio"] == 1.0
    assert ours["overload"]["counted_drops"] == ours["overload"]["expected"] - ours["overload"]["delivered"]
    # One SPUBLISH per group_send, whatever else the connections do.
    assert all(r["by_command"].get("spublish") == 1.0 for r in report["commands"].values() if r["layer"] == "redis-cluster")
    assert report["memory"]["chat/wsproto"]["kib_per_socket"] is not None
    assert [row["met"] for row in report["targets"]][1:3] == [True, True]  # no silent drop, one command per send
    assert set(report["server_settings"]) == {"wsproto/uvloop"}
    assert (out / "latency_vs_load.png").stat().st_size > 0 and (out / "commands_per_send.png").stat().st_size > 0
    assert "| this layer (Redis Cluster) |" in (out / "report.md").read_text()
