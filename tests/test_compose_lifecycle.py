"""`make up` and `make down` as a user runs them: a second `up` changes nothing, `down` leaves nothing."""

import os
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, ComposeStack


def make(target, stack):
    # With a Redis password given (it replaces the generated one): the nodes and chat both use it.
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": stack.project,
        "INGRESS_PORT": str(stack.port),
        "REDIS_PASSWORD": "lifecycle-test-password",
    }
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
        creator_log = stack.run("logs", "redis-0").stdout
        assert creator_log.count("creating the cluster") == 1, "the second up must find the cluster formed"
        tls = ["--tls", "--cacert", "/run/chat-secrets/ca.crt"]
        refused = stack.run("exec", "-T", "redis-0", "redis-cli", *tls, "ping", check=False)
        assert "NOAUTH" in refused.stdout + refused.stderr, "the nodes must refuse clients without the password"
        plain = stack.run("exec", "-T", "redis-0", "redis-cli", "ping", check=False)
        assert "PONG" not in plain.stdout and "NOAUTH" not in plain.stdout, "the nodes must speak TLS only"
        answered = stack.run(
            "exec",
            "-T",
            "redis-0",
            "sh",
            "-c",
            f'REDISCLI_AUTH="$(cat /run/chat-secrets/redis-password)" redis-cli {" ".join(tls)} ping',
        )
        assert answered.stdout.strip() == "PONG"
        with urllib.request.urlopen(f"{stack.url}/chat/", timeout=10) as response:
            assert response.status == 200 and response.headers["X-Served-By"]
        # Readiness and metrics answer on the internal port, which the ingress never forwards to.
        for path in ("/readyz", "/metrics"):
            with pytest.raises(urllib.error.HTTPError) as refused_through_ingress:
                urllib.request.urlopen(f"{stack.url}{path}", timeout=10)
            assert refused_through_ingress.value.code == 404
        stack.run("exec", "-T", "chat", "python", "-m", "chatsite.probe", "/readyz")
    finally:
        down = make("down", stack)
    assert down.returncode == 0, down.stderr[-3000:]
    assert stack.leftovers() == []
    assert volumes() - volumes_before == set()
