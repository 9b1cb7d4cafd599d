"""The layer as a package: built from layer/, installed into a clean environment with nothing but Django
and Channels, and running the Channels tutorial's consumer across two processes on the local cluster."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UV = ROOT / ".tools/bin/uv"
# The async ChatConsumer of the Channels tutorial, part 3, as the tutorial prints it.
TUTORIAL_CONSUMER = ROOT / "tests/tutorial/consumers.py"

SETTINGS = """
SECRET_KEY = "package-test"
INSTALLED_APPS = ["channels"]
CHANNEL_LAYERS = {{"default": {{"BACKEND": "channels_redis_cluster.RedisClusterChannelLayer",
                               "CONFIG": {{"hosts": {hosts!r}, "prefix": "tutorial"}}}}}}
"""

# One member of room "lobby": it joins, says so, then prints what the room sends it. With an argument,
# it also sends that message to the room after joining.
MEMBER = """
import asyncio, json, os, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "settings"
import django
django.setup()
from asgiref.testing import ApplicationCommunicator  # channels.testing needs Daphne, which is not installed
from django.urls import re_path
from channels.routing import URLRouter
from chat.consumers import ChatConsumer

application = URLRouter([re_path(r"^ws/chat/(?P<room_name>\\w+)/$", ChatConsumer.as_asgi())])

async def main():
    scope = {"type": "websocket", "path": "/ws/chat/lobby/", "headers": [], "subprotocols": []}
    member = ApplicationCommunicator(application, scope)
    await member.send_input({"type": "websocket.connect"})
    assert (await member.receive_output(10))["type"] == "websocket.accept"
    print("joined", flush=True)
    if len(sys.argv) > 1:
        await member.send_input({"type": "websocket.receive", "text": json.dumps({"message": sys.argv[1]})})
    print(json.loads((await member.receive_output(10))["text"])["message"], flush=True)
    await member.send_input({"type": "websocket.disconnect", "code": 1000})
    await member.wait(10)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([UV, "build", str(ROOT / "layer"), "--out-dir", out, "--offline", "--quiet"], check=True)
    return out


def test_the_wheel_and_sdist_carry_the_metadata_a_package_index_shows(dist):
    (wheel,) = dist.glob("channels_redis_cluster-*.whl")
    (sdist,) = dist.glob("channels_redis_cluster-*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(info).decode())
    assert "channels_redis_cluster/py.typed" in names
    # The scripts are package data: every .lua file of the source is in the wheel.
    scripts = {
        f"channels_redis_cluster/{p.relative_to(ROOT / 'layer/channels_redis_cluster').as_posix()}"
        for p in (ROOT / "layer/channels_redis_cluster/lua").rglob("*.lua")
    }
    assert len(scripts) >= 15 and scripts <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "services/"))]
    assert metadata["Name"] == "channels-redis-cluster"
    assert metadata["Version"] == importlib.metadata.version("channels-redis-cluster")
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata["Requires-Python"] == ">=3.11"
    assert "## Migrating from channels_redis" in metadata.get_payload()
    requires = {re.split(r"[ ;<>=\[]", r)[0] for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    assert requires == {"channels", "channels-redis", "redis", "msgpack"}
    with tarfile.open(sdist) as archive:
        members = {Path(m).relative_to(Path(m).parts[0]).as_posix() for m in archive.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "LICENSE", "channels_redis_cluster/layer.py"} <= members
    # The layer's own suite travels with its source, and not in the wheel.
    assert {"tests/test_layer_conformance.py", "tests/peers/conftest.py"} <= members


def test_the_tutorial_consumer_runs_on_the_wheel_in_a_clean_environment(dist, tmp_path, cluster_hosts):
    """A new project: a fresh venv with the wheel, Django and Channels only; two processes share a room."""
    venv = tmp_path / "venv"
    python = venv / "bin/python"
    (wheel,) = dist.glob("*.whl")
    # Django, Channels and the layer's dependencies at the locked versions, from uv's cache (`make env`
    # filled it; no index is asked), then the wheel alone; `uv pip check` proves it needs nothing more.
    subprocess.run(
        [
            UV,
            "sync",
            "--frozen",
            "--offline",
            "--quiet",
            "--only-group",
            "clean-project",
            "--no-install-package",
            "channels-redis-cluster",
            "--python",
            sys.executable,
        ],
        cwd=ROOT,
        env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)},
        check=True,
    )
    subprocess.run([UV, "pip", "install", "--quiet", "--offline", "--no-deps", "--python", python, wheel], check=True)
    subprocess.run([UV, "pip", "check", "--quiet", "--python", python], check=True)
    installed = subprocess.run([UV, "pip", "freeze", "--python", python], capture_output=True, text=True, check=True)
    names = {re.split(r"==| @ ", line)[0].lower() for line in installed.stdout.splitlines()}
    assert names <= {
        "channels-redis-cluster",
        "django",
        "channels",
        "channels-redis",
        "redis",
        "msgpack",
        "asgiref",
        "sqlparse",
    }, names
    project = tmp_path / "project"
    (project / "chat").mkdir(parents=True)
    (project / "chat/__init__.py").write_text("")
    shutil.copy(TUTORIAL_CONSUMER, project / "chat/consumers.py")
    (project / "settings.py").write_text(SETTINGS.format(hosts=cluster_hosts))
    (project / "member.py").write_text(MEMBER)
    run = {"cwd": project, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    listener = subprocess.Popen([python, "member.py"], **run)
    try:
        assert listener.stdout.readline().strip() == "joined", listener.stderr.read()
        speaker = subprocess.run([python, "member.py", "hello from another process"], timeout=60, **run)
        assert speaker.returncode == 0, speaker.stderr
        assert speaker.stdout.split("\n")[:2] == ["joined", "hello from another process"]
        out, err = listener.communicate(timeout=30)
        assert listener.returncode == 0, err
        assert out.strip() == "hello from another process"
    finally:
        listener.kill()
