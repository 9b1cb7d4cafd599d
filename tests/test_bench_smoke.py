"""`make bench` works: a seconds-long run of the layer fan-out benchmark writes its report."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layer_fanout_benchmark_smoke():
    subprocess.run(
        [sys.executable, "-m", "loadtest.fanout_bench", "--members", "6", "--messages", "30", "--rate", "100"],
        cwd=ROOT, env={"PYTHONPATH": f"{ROOT / 'services'}:{ROOT}", "PATH": ""},
        check=True, timeout=120, capture_output=True,
    )
    results = json.loads((ROOT / "artifacts" / "bench" / "layer_fanout.json").read_text())["results"]
    assert set(results) == {"redis-cluster (this)", "channels_redis core", "channels_redis pubsub"}
    assert results["redis-cluster (this)"]["delivered_ratio"] == 1.0
