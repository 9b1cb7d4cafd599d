"""The chat image as an SRE runs it: lint-clean, non-root, read-only root file system, healthy, quick to stop."""

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from testcontainers.core.container import DockerContainer

from conftest import ROOT

IMAGE = "chat-blueprint/chat:latest"


def test_dockerfile_passes_hadolint_at_warning():
    result = subprocess.run(
        [str(ROOT / ".venv/bin/hadolint"), "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_non_root_on_a_read_only_root_and_turns_healthy(chat_images):
    config = json.loads(subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, check=True).stdout)[0]
    assert config["Config"]["User"].split(":")[0].isdigit() and not config["Config"]["User"].startswith("0")
    assert config["Config"]["Healthcheck"]["Test"][-1] == "/healthz"
    container = (
        DockerContainer(IMAGE)
        .with_env("CHANNEL_LAYER", "memory")
        .with_exposed_ports(8000, 9000)
        .with_tmpfs_mount("/tmp")
        .with_kwargs(read_only=True, cap_drop=["ALL"])
    )
    with container:
        wrapped = container.get_wrapped_container()
        deadline = time.monotonic() + 90
        wrapped.reload()
        # Docker's own health check of the image decides; poll its verdict.
        while wrapped.attrs["State"]["Health"]["Status"] != "healthy":
            assert time.monotonic() < deadline and wrapped.attrs["State"]["Running"], container.get_logs()
            time.sleep(1)
            wrapped.reload()
        public, ops = (f"http://127.0.0.1:{container.get_exposed_port(port)}" for port in (8000, 9000))
        with urllib.request.urlopen(f"{ops}/healthz", timeout=10) as response:
            assert response.status == 200 and response.headers["X-Served-By"].startswith(wrapped.attrs["Config"]["Hostname"])
        with urllib.request.urlopen(f"{public}/chat/", timeout=10) as response:
            assert response.status == 200
        # Probes and metrics are on the internal port only.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{public}/metrics", timeout=10)
        assert refused.value.code == 404
        assert container.exec(["id", "-u"]).output.decode().strip() == "10001"
        assert container.exec(["touch", "/app/x"]).exit_code != 0, "the root file system is writable"
        started = time.monotonic()
        wrapped.stop(timeout=30)
        wrapped.reload()
        assert wrapped.attrs["State"]["ExitCode"] == 0 and time.monotonic() - started < 10
