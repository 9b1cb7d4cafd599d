"""`make bench` works: a seconds-long smoke of every part of the fan-out benchmark writes its report."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


# A stack per backend and per part: minutes on two cores, so its own bound rather than the suite's.
@pytest.mark.timeout(780)
def test_benchmark_smoke_writes_the_report_with_every_part():
    try:
        result = subprocess.run(
            [sys.executable, "-m", "loadtest.benchmark", "--smoke"],
            cwd=ROOT,
            env={"PYTHONPATH": f"{ROOT / 'services'}:{ROOT}", "PATH": "/usr/bin:/bin"},
            timeout=720,
            capture_output=True,
            text=True,
        )
    except subprocess.TimeoutExpired as late:
        pytest.fail(f"the smoke run passed 720 s; its last output:\n{(late.stdout or b'')[-3000:]}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = ROOT / "artifacts" / "bench"
    report = json.loads((out / "report.json").read_text())
    # Against Socket.IO and nchan: every system on every smoke shape, all delivered, its CPU counted, the
    # mixed v1/v2 room at 50 members, the chat with room history off for its cost only; the report's table
    # and the targets on them.
    compared = report["comparison"]
    assert set(compared) == {"4x2", "1x50"}
    assert set(compared["1x50"]["systems"]) == {"chat", "chat-mixed", "chat-nohistory", "socketio", "nchan", "ceiling"}
    for shape in compared.values():
        for name, found in shape["systems"].items():
            cost = found["cost"]
            assert cost["delivered_ratio"] == 1.0 and cost["system_us_per_delivery"] > 0 and cost["client_us_per_delivery"] > 0, (
                name
            )
            assert (cost["redis_us_per_delivery"] > 0) == (name != "ceiling"), name
    assert "| rooms x members @ offered/s |" in (ROOT / "artifacts" / "bench" / "report.md").read_text()
    assert any("at or below Socket.IO's on every room shape" in row["target"] for row in report["targets"])
    assert set(report["backends"]) == {
        "redis-cluster",
        "redis-cluster-nohistory",
        "redis-cluster-unreplicated",
        "redis",
        "redis-pubsub",
        "ceiling",
    }
    ours = report["backends"]["redis-cluster"]
    assert ours["sustainable"]["delivered_ratio"] == 1.0 and ours["big_room"]["delivered_ratio"] == 1.0
    assert ours["overload"]["counted_drops"] == ours["overload"]["expected"] - ours["overload"]["delivered"]
    # Overload runs on chat.v2 members that resume when closed as too slow.
    assert {"resumes", "not_recovered", "duplicates"} <= set(ours["overload"]) and ours["overload"]["duplicates"] == 0
    # Commands per group_send, whatever else the connections do: with history, the write, a WAIT for the replica
    # and the publish; published as written, one script; without history, one script that SPUBLISHes.
    commands = report["commands"]
    assert all(r["by_command"] == {"evalsha": 2.0, "wait": 1.0} for k, r in commands.items() if k.startswith("redis-cluster/"))
    for layer in ("redis-cluster-unreplicated", "redis-cluster-nohistory"):
        assert all(r["by_command"] == {"evalsha": 1.0} for k, r in commands.items() if k.startswith(f"{layer}/")), layer
    assert report["memory"]["chat/wsproto"]["kib_per_socket"] is not None
    met = {row["target"]: row["met"] for row in report["targets"]}
    assert met["no silent drop at 2x overload"]
    assert met[
        "a fixed number of Redis commands per group_send whatever the room size: 1 without waiting for replicas, "
        "at most 3 with (write, WAIT, publish)"
    ]
    assert any(target.startswith("publishing a room message only once its replicas hold it") for target in met)
    assert "room history on costs at most 10% of the sustainable rate with it off" in met
    assert set(report["server_settings"]) == {"wsproto/uvloop"}
    # Synchronous callers: each call's loop takes its connections with it.
    assert report["sync"]["redis-cluster"]["descriptors_growth"] == 0 and report["sync"]["redis-cluster"]["median_ms"] > 0
    assert "group_send from synchronous code (async_to_sync) at most 2x channels_redis core's time per call" in met
    assert (out / "latency_vs_load.png").stat().st_size > 0 and (out / "commands_per_send.png").stat().st_size > 0
    assert "| this layer (Redis Cluster) |" in (out / "report.md").read_text()
    # Both sides' CPU per step, from every client process and server worker.
    step = ours["steps"][0]
    assert len(step["client_cpu_percent"]) == report["args"]["client_processes"] == 2
    assert len(step["server_cpu_percent"]) == 3 and len(report["backends"]["ceiling"]["steps"][0]["server_cpu_percent"]) == 1
    assert any("client is not the bottleneck" in target for target in met)
    # The join storm reaches every member, the curves have every point, the capacity model is rendered.
    assert all(storm["all_delivered"] for storm in report["storms"].values())
    points = report["curves"]["redis-cluster"]["rooms"]["points"]
    assert [p["x"] for p in points] == report["args"]["curve_rooms"]
    assert all(p["delivered_ratio"] == 1.0 and p["sockets_closed_by_server"] == 0 for p in points)
    assert all(us > 0 for us in report["redis_cost"]["measured"].values()) and report["capacity"]["pods"]["count"] >= 2
    assert (out / "scale_curves.png").stat().st_size > 0 and "## Capacity model" in (out / "report.md").read_text()
    # Where the gap to the ceiling is: both sides' costs per recipient and per message, from the room-size curve.
    ceiling_points = report["curves"]["ceiling"]["room_size"]["points"]
    assert [p["x"] for p in ceiling_points] == report["args"]["curve_room_sizes"] and all(
        p["delivered_ratio"] == 1.0 for p in ceiling_points
    )
    # A second per point at 300/s is mostly the workers' idle CPU: the fit's values are noise here, its
    # arithmetic is tested in test_capacity_model; the smoke checks that both sides were fitted.
    assert all(
        set(report["gap"][side]["split"]) == {"per_recipient_us", "per_message_us"} for side in ("redis-cluster", "ceiling")
    )
    assert "## Why this layer stops short of the ceiling" in (out / "report.md").read_text()
    # Presence: one command per join or leave, its event included, whatever the room size.
    assert all(r["commands_per_join_and_leave"] == 1.0 for r in report["presence"]["rooms"].values()), report["presence"]
    assert report["presence"]["renew_us"] > 0 and "## Presence cost" in (out / "report.md").read_text()
    # A machine's worth of sockets, scaled down: every one opened and reopened after the storm, the rooms beside
    # them delivered, nothing logged at ERROR; SPUBLISH per subscriber measured alone and set against the model.
    many = report["many_sockets"]
    assert many["opening"]["opened"] == many["sockets"] == 600 and not many["opening"]["refused"]
    assert many["storm"]["opened"] == 600 and not many["storm"]["refused"] and many["closed_by_server_after_storm"] == 0
    assert many["talking"]["delivered_ratio"] == 1.0 and many["error_lines"] == 0 and many["workers_replaced"] == 0
    assert many["rss_kib_per_socket"] > 0 and len(many["descriptors_per_worker"]) == many["workers"]
    assert "sockets on one machine" in (out / "report.md").read_text()
    # The same opening and storm with the bare app: the machine's own bound, beside the chat's rates.
    bare = many["bare"]
    assert bare["opening"]["opened"] == bare["storm"]["opened"] == 600 and not bare["storm"]["refused"]
    assert bare["storm"]["handshakes_per_s"] > 0 and "the bare app (no Django" in (out / "report.md").read_text()
    assert set(report["spublish"]["us_per_publish"]) == {"0", "5"} and report["spublish"]["us_per_publish"]["5"] > 0
