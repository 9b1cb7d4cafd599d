"""The Helm chart with the real tools: helm lint and template, kubernetes-validate, kubectl kustomize, and policy."""

import filecmp
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

CHART = ROOT / "deploy" / "helm"
HELM = ROOT / ".tools" / "bin" / "helm"
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
KUBERNETES_VERSION = "1.37.0"
SCENARIOS = sorted(CHART.glob("ci/*-values.yaml"))
# Custom resources whose schemas kubernetes-validate does not carry; their fields are asserted below.
CUSTOM_KINDS = {"HTTPRoute", "ServiceMonitor"}


def helm(*args, check=True):
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def render(*args):
    """Every object `helm template` makes (tests included) for the given values arguments."""
    out = helm("template", "channels-chat", str(CHART), "--namespace", "chat", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def validate(path):
    """kubernetes-validate --strict; returns its output, asserting every known kind passed."""
    result = subprocess.run([str(ROOT / ".venv/bin/kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    unknown = [line for line in result.stdout.splitlines() if "Couldn't find schema" in line]
    assert all(any(f"kind {kind} " in line for kind in CUSTOM_KINDS) for line in unknown), unknown
    return result.stdout


def one(objects, kind, name_suffix=""):
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def chat_deployment(objects):
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["labels"]["app.kubernetes.io/component"] == "chat")


@pytest.fixture(scope="module")
def default_objects():
    return render()


def test_chart_lints_strict_in_every_scenario():
    helm("lint", "--strict", str(CHART))
    for values in SCENARIOS:
        helm("lint", "--strict", str(CHART), "-f", str(values))


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_renders_and_validates_strictly(values, tmp_path):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(helm("template", "channels-chat", str(CHART), "-f", str(values)).stdout)
    output = validate(rendered)
    objects = [doc for doc in yaml.safe_load_all(rendered.read_text()) if doc]
    assert output.count(" passed for resource ") == len([o for o in objects if o["kind"] not in CUSTOM_KINDS])


def test_k8s_manifests_are_what_the_chart_renders(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "deploy/render_k8s.py"), str(HELM), str(tmp_path)], check=True)
    committed = {p.relative_to(ROOT / "deploy/k8s") for p in (ROOT / "deploy/k8s").rglob("*.yaml")}
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml")}
    assert committed == fresh, "deploy/k8s drifted from the chart: run `make k8s`"
    drifted = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / "deploy/k8s" / p, shallow=False)]
    assert not drifted, f"deploy/k8s drifted from the chart in {drifted}: run `make k8s`"


@pytest.mark.parametrize("target", ["base", "overlays/gateway", "overlays/ingress-nginx"])
def test_kustomize_builds_and_validates(target, tmp_path):
    built = subprocess.run([str(KUBECTL), "kustomize", str(ROOT / "deploy/k8s" / target)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (tmp_path / "built.yaml").write_text(built.stdout)
    validate(tmp_path / "built.yaml")
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert all(o["metadata"].get("namespace") == "chat" for o in objects)
    assert not [o for o in objects if o["kind"] == "Secret"], "plain manifests must not carry generated secrets"


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_no_session_affinity_anywhere(values):
    objects = render("-f", str(values))
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"].get("sessionAffinity", "None") == "None", service["metadata"]["name"]
    for obj in objects:
        for key in obj["metadata"].get("annotations", {}):
            assert not any(word in key for word in ("affinity", "session-cookie", "upstream-hash", "sticky")), key
    for route in (o for o in objects if o["kind"] == "HTTPRoute"):
        assert all("sessionPersistence" not in rule for rule in route["spec"]["rules"])
    chat_service = next(o for o in objects if o["kind"] == "Service" and o["spec"].get("clusterIP") != "None"
                        and o["metadata"]["labels"].get("app.kubernetes.io/component") == "chat")
    assert chat_service["spec"]["sessionAffinity"] == "None" and chat_service["spec"]["type"] == "ClusterIP"
    assert chat_service["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/ws"


def test_chat_pods_have_probes_security_and_a_safe_rollout(default_objects):
    deployment = chat_deployment(default_objects)
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0 and spec["minReadySeconds"] > 0
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    graceful = int(one(default_objects, "ConfigMap", "channels-chat")["data"]["GRACEFUL_TIMEOUT"])
    assert sleep > 0 and pod["terminationGracePeriodSeconds"] > sleep + graceful
    assert pod["securityContext"]["runAsNonRoot"] and isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])
    assert pod["automountServiceAccountToken"] is False
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert one(default_objects, "ServiceAccount")["automountServiceAccountToken"] is False


def test_config_change_rolls_the_pods(default_objects):
    before = chat_deployment(default_objects)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = chat_deployment(render("--set", "chat.logLevel=debug"))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert before != after


def test_redis_is_reachable_only_from_chat_pods(default_objects):
    policy = one(default_objects, "NetworkPolicy")
    redis_selector = policy["spec"]["podSelector"]["matchLabels"]
    assert redis_selector["app.kubernetes.io/component"] == "redis" and policy["spec"]["policyTypes"] == ["Ingress"]
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in peers), "no namespaceSelector or ipBlock may open Redis"
    components = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in peers}
    assert components == {"chat", "redis-bootstrap", "redis"}
    assert not [o for o in default_objects if o["kind"] == "Service" and o["spec"].get("type") in ("NodePort", "LoadBalancer")]
    headless = one(default_objects, "Service", "redis-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True


def test_built_in_cluster_starts_in_parallel_and_is_ready_only_when_whole(default_objects):
    statefulset = one(default_objects, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 6 and statefulset["spec"]["podManagementPolicy"] == "Parallel"
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "cluster_state:ok" in container["readinessProbe"]["exec"]["command"][-1]
    assert any(e["name"] == "REDIS_ANNOUNCE_HOSTNAME" for e in container["env"])
    job = one(default_objects, "Job", "redis-bootstrap")
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    nodes = next(e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "REDIS_NODES")
    assert len(nodes.split()) == 6


def test_pdb_and_hpa_with_slow_scale_down(default_objects):
    assert one(default_objects, "PodDisruptionBudget", "channels-chat")["spec"]["maxUnavailable"] == 1
    hpa = one(default_objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
    with_connections = one(render("--set", "autoscaling.connectionsPerPod.enabled=true"), "HorizontalPodAutoscaler")
    assert with_connections["spec"]["metrics"][1]["pods"]["metric"]["name"] == "chat_connections"


def test_drain_fits_in_the_graceful_timeout_and_the_grace_period(default_objects):
    """Sockets close over drainSeconds, inside gunicorn's graceful timeout, inside the pod's grace period."""
    config = one(default_objects, "ConfigMap", "channels-chat")["data"]
    pod = one(default_objects, "Deployment", "channels-chat")["spec"]["template"]["spec"]
    pre_stop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert int(config["DRAIN_SECONDS"]) < int(config["GRACEFUL_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + int(config["GRACEFUL_TIMEOUT"])
    assert int(config["CHAT_HISTORY_SIZE"]) > 0, "room history is on in every deployment"


def test_helm_test_pod_checks_fanout_through_the_service(default_objects):
    pod = one(default_objects, "Pod", "test-fanout")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "/check/fanout_check.py"] and "http://channels-chat:80" in command
    assert "--min-workers" in command and command[command.index("--min-workers") + 1] == "2"


REFUSED = [
    (["--set", "chat.replicas=-1"], "minimum"),
    (["--set", "unknownKey=1"], "additional properties"),
    (["--set", "chat.logLevel=loud"], "logLevel"),
    (["--set", "loadtest.users=100000"], "maximum"),
    (["--set", "redis.externalNodes[0]=nohost"], "externalNodes"),
    (["--set", "chat.topologySpread.zone=Sometimes"], "zone"),
    (["--set", "httpRoute.enabled=true"], "httpRoute.enabled needs httpRoute.parentRefs"),
    (["--set", "redis.builtIn=false"], "redis.externalNodes must list"),
    (["--set", "ingress.enabled=true"], "ingress.enabled needs ingress.hosts"),
    (["--set", "chat.drainSeconds=25"], "chat.drainSeconds must be below chat.gracefulTimeoutSeconds"),
    (["--set", "ingress.enabled=true", "--set", "ingress.hosts[0]=chat.example.com",
      "--set-string", "ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/affinity=cookie"], "no affinity"),
]


@pytest.mark.parametrize("args,message", REFUSED, ids=[m for _, m in REFUSED])
def test_bad_values_are_refused_with_a_clear_message(args, message):
    result = helm("template", "channels-chat", str(CHART), *args, check=False)
    assert result.returncode != 0 and message.lower() in result.stderr.lower(), result.stderr


def test_every_value_is_documented_and_the_readme_table_is_current():
    sys.path.insert(0, str(ROOT / "deploy"))
    import values_table

    assert values_table.undocumented() == []
    readme = (CHART / "README.md").read_text()
    assert f"{values_table.START}\n{values_table.table()}\n{values_table.END}" in readme, "run `make k8s`"


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_install_notes_render_and_say_how_to_check(values):
    result = helm("install", "chat", str(CHART), "--dry-run=client", "--namespace", "chat", "-f", str(values))
    notes = result.stdout.partition("NOTES:")[2]
    assert "helm test chat -n chat" in notes and "rollout status deploy/chat-channels-chat" in notes
