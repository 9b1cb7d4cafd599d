"""`make up` and `make down` as a user runs them: a second `up` changes nothing, `down` leaves nothing."""

import os
import subprocess
import urllib.request

from conftest import ROOT, ComposeStack


def make(target, stack):
    # With a Redis password, as the Helm chart always runs it: nodes, init job and chat all use it.
    env = {**os.environ, "COMPOSE_PROJECT_NAME": stack.project, "INGRESS_PORT": str(stack.port),
           "REDIS_PASSWORD": "lifecycle-test-password"}
    return subprocess.run(["make", target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def volumes():
    return set(subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split())


def test_second_up_is_harmless_and_down_leaves_nothing_behind(chat_images, tmp_path):
    stack = ComposeStack(chat_images, tmp_path)
    # Anonymous volumes carry no project label: compare the engine's volumes before and after too.
    volumes_before = volumes()
    try:
        first = make("up", stack)
        assert first.returncode == 0, first.stderr[-3000:]
        second = make("up", stack)
        assert second.returncode == 0, second.stderr[-3000:]
        init_log = stack.run("logs", "redis-init").stdout
        assert "cluster of 6 nodes already ok" in init_log
        refused = stack.run("exec", "-T", "redis-0", "redis-cli", "ping", check=False)
        assert "NOAUTH" in refused.stdout + refused.stderr, "the nodes must refuse clients without the password"
        with urllib.request.urlopen(f"{stack.url}/readyz", timeout=10) as response:
            assert response.status == 200 and response.headers["X-Served-By"]
    finally:
        down = make("down", stack)
    assert down.returncode == 0, down.stderr[-3000:]
    assert stack.leftovers() == []
    assert volumes() - volumes_before == set()
