"""The compose file and the ingress config as policy: what is exposed, hardened, and free of affinity."""

import json
import re
import subprocess

import pytest

from conftest import ROOT

LOCAL_IMAGES = ROOT / "docker" / "local-base-images.env"


def compose_config(*env_files, profiles=("loadtest",)):
    """The resolved compose model, as `docker compose config` renders it (no engine needed)."""
    command = [str(ROOT / ".venv/bin/docker-compose"), "-f", str(ROOT / "compose.yaml")]
    for env_file in env_files:
        command += ["--env-file", str(env_file)]
    for profile in profiles:
        command += ["--profile", profile]
    result = subprocess.run(
        [*command, "config", "--format", "json"], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def services():
    return compose_config()["services"]


def test_only_the_ingress_is_published_and_only_on_loopback(services):
    published = {name: spec["ports"] for name, spec in services.items() if spec.get("ports")}
    assert list(published) == ["ingress"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in published["ingress"]] == [("127.0.0.1", "8080", 8080)]


def test_redis_sits_on_an_internal_network_with_chat_only(services):
    config = compose_config()
    assert config["networks"]["redis"].get("internal") is True
    on_redis = {name for name, spec in services.items() if "redis" in spec.get("networks", {})}
    assert on_redis == {"chat", *(f"redis-{n}" for n in range(6))}
    assert all(list(services[f"redis-{n}"]["networks"]) == ["redis"] for n in range(6))


def test_redis_has_a_password_and_tls_by_default_that_only_the_nodes_and_chat_read(services):
    readers = {name for name, spec in services.items() for volume in spec.get("volumes", []) if volume.get("source") == "secrets"}
    assert readers == {"secrets", "chat", *(f"redis-{n}" for n in range(6))}
    for name in readers - {"secrets"}:
        mount = next(v for v in services[name]["volumes"] if v.get("source") == "secrets")
        assert mount["read_only"] is True, name
        assert services[name]["environment"]["REDIS_PASSWORD_FILE"] == "/run/chat-secrets/redis-password", name
        assert "REDIS_PASSWORD" not in services[name]["environment"], name
    assert all(services[f"redis-{n}"]["environment"]["REDIS_TLS_DIR"] == "/run/chat-secrets" for n in range(6))
    assert services["chat"]["environment"]["REDIS_TLS_CA"] == "/run/chat-secrets/ca.crt"
    assert services["secrets"]["network_mode"] == "none"
    assert services["redis-0"]["depends_on"]["secrets"]["condition"] == "service_completed_successfully"


def test_every_service_is_hardened(services):
    for name, spec in services.items():
        assert spec.get("read_only") is True, name
        assert spec.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in spec.get("security_opt", []), name
        assert spec.get("user") != "root", name


def test_chat_replicas_wait_for_the_cluster_and_stop_gracefully(services):
    chat = services["chat"]
    assert chat["deploy"]["replicas"] == 3 and "ports" not in chat
    assert chat["environment"]["CHANNEL_LAYER"] == "redis-cluster"
    # No one-shot job: the nodes form the cluster, and a node is healthy once it held a role in it.
    assert {name: dep["condition"] for name, dep in chat["depends_on"].items()} == {
        f"redis-{n}": "service_healthy" for n in range(6)
    }
    assert int(chat["stop_grace_period"].rstrip("s")) >= 30 and chat["tmpfs"] == ["/tmp"]
    for n in range(6):
        node = services[f"redis-{n}"]
        assert node["healthcheck"]["test"] == ["CMD", "sh", "/opt/chat/redis-cluster.sh", "ready"]
        assert node["entrypoint"] == ["sh", "/opt/chat/redis-node.sh"]
        assert node["environment"]["REDIS_NODES"].split()[0] == "redis-0:6379"


def test_images_are_built_never_pulled_and_every_service_is_bounded(services):
    for name in ("chat", "locust-master", "locust-worker"):
        assert services[name]["pull_policy"] == "build", name
    for name, spec in services.items():
        limits = spec.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("memory") and limits.get("cpus"), name
    for n in range(6):
        # A fork (AOF rewrite, replica sync) may double the data set; buffers come on top.
        node = services[f"redis-{n}"]
        maxmemory = int(node["environment"]["REDIS_MAXMEMORY"].removesuffix("mb")) * 2**20
        assert int(node["deploy"]["resources"]["limits"]["memory"]) >= 2 * maxmemory + 128 * 2**20


def test_images_are_official_by_default_and_local_with_the_switch():
    default, local = compose_config()["services"], compose_config(LOCAL_IMAGES)["services"]
    standins = dict(re.findall(r"^(\w+)=(\S+)$", LOCAL_IMAGES.read_text(), re.MULTILINE))
    assert default["redis-0"]["image"].startswith("redis:") and default["ingress"]["image"].startswith("haproxy:")
    assert "args" not in default["chat"]["build"]
    assert local["redis-0"]["image"] == local["redis-5"]["image"] == standins["REDIS_IMAGE"]
    assert local["ingress"]["image"] == standins["HAPROXY_IMAGE"]
    assert local["chat"]["build"]["args"]["PYTHON_IMAGE"] == standins["PYTHON_IMAGE"]


def test_ingress_balances_by_load_with_no_affinity():
    haproxy = (ROOT / "docker" / "haproxy.cfg").read_text()
    directives = [line.split("#")[0].strip() for line in haproxy.splitlines() if line.split("#")[0].strip()]
    assert "balance leastconn" in directives
    assert not [
        d
        for d in directives
        if re.match(r"(cookie|stick (on|match|store-request|store-response)|hash-type|balance (source|uri|hdr|url_param))\b", d)
    ]
    tables = [d for d in directives if d.startswith("stick-table")]
    assert tables and all("server_id" not in t for t in tables), "per-address counters only, never a replica choice"
    assert any(d.startswith("timeout tunnel") for d in directives)
    assert any(d.startswith("server-template chat") and "resolvers" not in d for d in directives)
    assert any("resolvers docker" in d for d in directives if d.startswith("default-server"))
    # A replica found through DNS is DOWN until its first check passes, where the HAProxy has init-state.
    assert ".if version_atleast(3.2)" in directives
    assert "server-template chat 32 chat:8000 init-state down" in directives


def test_ingress_keeps_a_draining_replicas_sockets_and_closes_a_broken_ones():
    haproxy = (ROOT / "docker" / "haproxy.cfg").read_text()
    directives = [line.split("#")[0].strip() for line in haproxy.splitlines() if line.split("#")[0].strip()]
    # A drain answers the check with 404 (no new sessions, the open ones kept); anything else marks it down.
    assert "http-check disable-on-404" in directives
    assert any(d.startswith("http-check send") and "uri /readyz?drain=404" in d for d in directives)
    assert any(d.startswith("default-server") and "on-marked-down shutdown-sessions" in d for d in directives)
