"""The Helm chart with the real tools: helm lint and template, kubernetes-validate, kubectl kustomize, and policy."""

import filecmp
import json
import re
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
CUSTOM_KINDS = {"HTTPRoute", "ServiceMonitor", "PrometheusRule"}
# `helm template` reaches no cluster, so the chart refuses to generate secrets there: tests give them.
SECRETS = [
    "--set",
    "secrets.djangoSecretKey=test-secret-key",
    "--set",
    "secrets.redisPassword=test-redis-password",
    "--set",
    "redis.tls.existingSecret=test-redis-tls",
]


def helm(*args, check=True, secrets=True):
    """helm ARGS (with SECRETS for the commands that render); the completed process."""
    if secrets and args[0] in ("template", "lint", "install"):
        args = (args[0], *SECRETS, *args[1:])  # first, so a test's own --set wins
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
    result = subprocess.run(
        [str(ROOT / ".venv/bin/kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    unknown = [line for line in result.stdout.splitlines() if "Couldn't find schema" in line]
    assert all(any(f"kind {kind} " in line for kind in CUSTOM_KINDS) for line in unknown), unknown
    return result.stdout


def one(objects, kind, name_suffix=""):
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def chat_deployment(objects):
    return next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["labels"]["app.kubernetes.io/component"] == "chat"
    )


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
    chat_service = next(
        o
        for o in objects
        if o["kind"] == "Service"
        and o["spec"].get("clusterIP") != "None"
        and o["metadata"]["labels"].get("app.kubernetes.io/component") == "chat"
    )
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
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert one(default_objects, "ServiceAccount")["automountServiceAccountToken"] is False


def test_config_change_rolls_the_pods(default_objects):
    before = chat_deployment(default_objects)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = chat_deployment(render("--set", "chat.logLevel=debug"))["spec"]["template"]["metadata"]["annotations"][
        "checksum/config"
    ]
    assert before != after


def test_redis_is_reachable_only_from_chat_pods(default_objects):
    policy = one(default_objects, "NetworkPolicy", "redis")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in peers), "no namespaceSelector or ipBlock may open Redis"
    components = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in peers}
    assert components == {"chat", "redis"}
    assert not [o for o in default_objects if o["kind"] == "Service" and o["spec"].get("type") in ("NodePort", "LoadBalancer")]
    headless = one(default_objects, "Service", "redis-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_pdbs_evict_unhealthy_pods_and_the_hpa_scales_down_slowly(default_objects):
    for pdb in (o for o in default_objects if o["kind"] == "PodDisruptionBudget"):
        assert pdb["spec"]["maxUnavailable"] == 1
        # A not-ready pod serves no one: a drain must be able to evict it.
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
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


def test_presence_settings_reach_the_workers(default_objects):
    """A drained pod's clients resume within the grace, so a deploy does not show everyone leaving and coming back."""
    config = one(default_objects, "ConfigMap", "channels-chat")["data"]
    assert int(config["CHAT_PRESENCE_GRACE"]) > 0 and int(config["CHAT_PRESENCE_TIMEOUT"]) >= 3


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
    (["--set", "chat.webConcurrency=2"], "at least 500m per worker"),
    (["--set", "redis.maxmemory=512mb"], "at least twice redis.maxmemory"),
    (
        [
            "--set",
            "ingress.enabled=true",
            "--set",
            "ingress.hosts[0]=chat.example.com",
            "--set-string",
            "ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/affinity=cookie",
        ],
        "no affinity",
    ),
]


def test_a_render_without_a_cluster_refuses_to_generate_secrets():
    result = helm("template", "channels-chat", str(CHART), check=False, secrets=False)
    assert result.returncode != 0 and "secrets.existingSecret" in result.stderr, result.stderr
    existing = render(
        "--set", "secrets.existingSecret=mine", "--set", "secrets.djangoSecretKey=", "--set", "secrets.redisPassword="
    )
    assert not [o for o in existing if o["kind"] == "Secret"]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for o in existing
        for c in containers(o)
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {"mine"}


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


def pod_spec(obj):
    spec = obj.get("spec", {})
    return (
        spec.get("template", {}).get("spec")
        or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
        or (spec if obj["kind"] == "Pod" else None)
    )


def containers(obj):
    spec = pod_spec(obj)
    return (spec or {}).get("containers", [])


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_nothing_an_install_waits_for_is_a_hook(values):
    """helm --wait, --rollback-on-failure, Argo CD and Flux wait for readiness before hooks run: only tests are hooks."""
    objects = render("-f", str(values))
    hooks = {
        o["metadata"]["name"]: o["metadata"]["annotations"]["helm.sh/hook"]
        for o in objects
        if "helm.sh/hook" in o["metadata"].get("annotations", {})
    }
    assert set(hooks.values()) == {"test"}, hooks
    assert not [
        o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] not in hooks and "locust" not in o["metadata"]["name"]
    ], "no Job forms or repairs anything"


def test_the_redis_nodes_form_and_repair_the_cluster_themselves(default_objects):
    statefulset = one(default_objects, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 6 and statefulset["spec"]["podManagementPolicy"] == "Parallel"
    container = containers(statefulset)[0]
    assert container["command"] == ["sh", "/scripts/redis-node.sh"]
    assert container["readinessProbe"]["exec"]["command"] == ["sh", "/scripts/redis-cluster.sh", "ready"]
    env = env_of(container)
    assert len(env["REDIS_NODES"].split(",")) == 6 and env["REDIS_NODES"].startswith("channels-chat-redis-0.")
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NODE_ZONE"] == {"fieldRef": {"fieldPath": "metadata.labels['topology.kubernetes.io/zone']"}}
    scripts = one(default_objects, "ConfigMap", "redis-scripts")["data"]
    # The scripts compose.yaml runs, byte for byte.
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["configs"]
    for name in ("redis-node.sh", "redis-cluster.sh"):
        assert scripts[name] == (CHART / "files" / name).read_text()
        assert any(config["file"] == f"./deploy/helm/files/{name}" for config in compose.values())


def test_redis_nodes_spread_over_hosts_and_zones(default_objects):
    pod = pod_spec(one(default_objects, "StatefulSet"))
    preferred = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    strict = pod_spec(one(render("--set", "redis.requireSeparateHosts=true"), "StatefulSet"))
    required = strict["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert required["topologyKey"] == "kubernetes.io/hostname"
    assert required["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"


@pytest.mark.parametrize("persistent", [True, False])
def test_persistence_keeps_the_data_set_or_the_node_rejoins_empty(persistent):
    statefulset = one(render("--set", f"redis.persistence.enabled={str(persistent).lower()}"), "StatefulSet")
    assert env_of(containers(statefulset)[0])["REDIS_APPENDONLY"] == ("yes" if persistent else "no")
    claims = statefulset["spec"].get("volumeClaimTemplates", [])
    data = next(
        v for v in pod_spec(statefulset)["volumes"] + [{"name": c["metadata"]["name"]} for c in claims] if v["name"] == "data"
    )
    assert ("emptyDir" not in data) == persistent and bool(claims) == persistent


def test_redis_memory_limit_leaves_room_for_a_fork_and_buffers(default_objects):
    statefulset = one(default_objects, "StatefulSet")
    limit = containers(statefulset)[0]["resources"]["limits"]["memory"]
    maxmemory = env_of(containers(statefulset)[0])["REDIS_MAXMEMORY"]
    assert limit.endswith("Mi") and maxmemory.endswith("mb")
    assert int(limit[:-2]) >= 2 * int(maxmemory[:-2]) + 128


def test_secrets_roll_the_pods_and_never_reach_a_command_line(default_objects):
    def checksums(objects):
        return [
            o["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
            for o in objects
            if o["kind"] in ("Deployment", "StatefulSet") and "locust" not in o["metadata"]["name"]
        ]

    assert len(set(checksums(default_objects))) == 1 and len(checksums(default_objects)) == 2
    assert checksums(render()) == checksums(default_objects), "the same values render the same checksum"
    assert set(checksums(render("--set", "secrets.redisPassword=rotated"))).isdisjoint(checksums(default_objects))
    for obj in default_objects:
        for container in containers(obj):
            words = " ".join(container.get("command", []) + container.get("args", []))
            assert "test-redis-password" not in words and "requirepass" not in words, obj["metadata"]["name"]
    node_script = (CHART / "files" / "redis-node.sh").read_text()
    assert "requirepass" in node_script and "redis-server -" in node_script, "the password goes in on stdin"


def test_chat_probes_and_metrics_use_the_internal_port_no_route_reaches(default_objects):
    container = containers(chat_deployment(default_objects))[0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = one(default_objects, "ConfigMap", "channels-chat")["data"]
    assert config["OPS_BIND"] == f"0.0.0.0:{ports['ops']}" and ports["http"] == 8000 and ports["ops"] != 8000
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "ops", probe
    routed = render(
        "--set",
        "httpRoute.enabled=true",
        "--set",
        "httpRoute.parentRefs[0].name=gw",
        "--set",
        "ingress.enabled=true",
        "--set",
        "ingress.hosts[0]=chat.example.com",
        "--set",
        "metrics.serviceMonitor.enabled=true",
    )
    service = next(o for o in routed if o["kind"] == "Service" and o["metadata"]["name"] == "channels-chat")
    by_port = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    route = one(routed, "HTTPRoute")
    backends = [b["port"] for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    ingress = one(routed, "Ingress")
    ingress_ports = [p["backend"]["service"]["port"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert {by_port[p] for p in backends} == {"http"} and ingress_ports == [{"name": "http"}]
    assert one(routed, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "ops"


def policies_selecting(objects, labels):
    return [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and all(labels.get(k) == v for k, v in o["spec"]["podSelector"].get("matchLabels", {}).items())
        and all(labels.get(e["key"]) in e["values"] for e in o["spec"]["podSelector"].get("matchExpressions", []))
    ]


@pytest.mark.parametrize("values", SCENARIOS, ids=lambda p: p.stem)
def test_every_pod_works_in_a_default_deny_namespace(values):
    """Each pod is selected by a policy with ingress and egress rules, and may resolve names."""
    objects = render("-f", str(values))
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        labels = (obj["spec"].get("template", {}).get("metadata") or obj["metadata"])["labels"]
        policies = policies_selecting(objects, labels)
        assert policies, f"{obj['kind']} {obj['metadata']['name']} has no NetworkPolicy"
        assert all(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in policies)
        egress_ports = {port["port"] for p in policies for rule in p["spec"]["egress"] for port in rule.get("ports", [])}
        assert 53 in egress_ports, f"{obj['metadata']['name']} cannot resolve names"
    chat = one(objects, "NetworkPolicy", "channels-chat")
    egress_ports = {port["port"] for rule in chat["spec"]["egress"] for port in rule["ports"]}
    values_doc = yaml.safe_load(values.read_text()) or {}
    external = values_doc.get("redis", {}).get("externalNodes")
    assert egress_ports == {53, *({int(n.rpartition(":")[2]) for n in external} if external else {6379})}


def prometheus_names():
    """Every sample name the chat and the layer export."""
    import prometheus_client

    import channels_redis_cluster.metrics  # noqa: F401 - registers the layer's
    import chat.metrics  # noqa: F401 - registers the chat's metrics

    names = set()
    for family in prometheus_client.REGISTRY.collect():
        names.update(sample.name for sample in family.samples)
        names.update({family.name, f"{family.name}_total", f"{family.name}_bucket"})
    return names


def test_alerts_and_dashboard_are_valid_promql_on_metrics_that_exist():
    import promql_parser

    objects = render("--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.dashboard.enabled=true")
    rules = [r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads(one(objects, "ConfigMap", "dashboard")["data"]["channels-chat.json"])
    assert one(objects, "ConfigMap", "dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"
    exprs = [r["expr"] for r in rules] + [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(rules) >= 6 and len(exprs) > len(rules) + 10
    known = prometheus_names() | {"up"}
    for expr in exprs:
        promql_parser.parse(expr.replace("$__rate_interval", "5m"))
        used = set(re.findall(r"\b(chat_\w+|channels_layer_\w+|up)\b", expr))
        assert used and used <= known, (expr, used - known)
    for family in ("sequence_gaps", "overflow", "resubscribes", "errors"):
        assert any(f"channels_layer_{family}_total" in r["expr"] for r in rules), family
    assert any("chat_resumes_total" in r["expr"] for r in rules), "drains and failovers that lost history alert"
    assert {r["labels"]["severity"] for r in rules} <= {"critical", "warning", "info"}


def test_limits_and_identity_reach_the_pods_and_the_token_key_is_kept_in_the_secret(default_objects):
    config = one(default_objects, "ConfigMap", "chat")["data"]
    assert (config["CHAT_IDENTITY"], config["CHAT_MESSAGES_PER_S"], config["CHAT_MAX_SOCKETS_PER_WORKER"]) == (
        "off",
        "5",
        "10000",
    )
    assert "CHAT_TOKEN_SECRET" not in one(default_objects, "Secret")["data"]
    on = ["--set", "chat.identity=token"]
    refused = helm("template", "channels-chat", str(CHART), *on, check=False)
    assert refused.returncode != 0 and "secrets.chatTokenSecret" in refused.stderr, "no key generated anew on each render"
    objects = render(*on, "--set", "secrets.chatTokenSecret=" + "k" * 40, "--set", "chat.limits.roomsPerIdentity=3")
    assert one(objects, "ConfigMap", "chat")["data"]["CHAT_MAX_ROOMS_PER_IDENTITY"] == "3"
    assert "CHAT_TOKEN_SECRET" in one(objects, "Secret")["data"]
    env = env_of(chat_deployment(objects)["spec"]["template"]["spec"]["containers"][0])
    assert env["CHAT_TOKEN_SECRET"]["secretKeyRef"]["key"] == "CHAT_TOKEN_SECRET"
    ingress = render("--set", "ingress.enabled=true", "--set", "ingress.hosts[0]=chat.example.com")
    annotations = one(ingress, "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/limit-connections"] == "200"
    assert annotations["nginx.ingress.kubernetes.io/limit-rps"] == "30"


def test_redis_speaks_tls_by_default_and_chat_holds_only_the_ca(default_objects):
    nodes = one(default_objects, "StatefulSet", "redis")["spec"]["template"]["spec"]
    node = nodes["containers"][0]
    assert env_of(node)["REDIS_TLS_DIR"] == "/tls"
    assert {"name": "tls", "secret": {"secretName": "test-redis-tls"}} in nodes["volumes"]
    for probe in ("startupProbe", "livenessProbe"):
        assert "--tls --cacert $REDIS_TLS_DIR/ca.crt" in node[probe]["exec"]["command"][2]
    chat = chat_deployment(default_objects)["spec"]["template"]["spec"]
    assert env_of(chat["containers"][0])["REDIS_TLS_CA"] == "/redis-tls/ca.crt"
    ca = next(v for v in chat["volumes"] if v["name"] == "redis-ca")
    assert ca["secret"] == {"secretName": "test-redis-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    plain = render("--set", "redis.tls.enabled=false")
    assert "REDIS_TLS_DIR" not in env_of(one(plain, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0])
    refused = helm("template", "channels-chat", str(CHART), "--set", "redis.tls.existingSecret=", check=False)
    assert refused.returncode != 0 and "redis.tls.existingSecret" in refused.stderr


def test_a_generated_redis_certificate_is_valid_for_every_node_name(tmp_path):
    """The generating branch, rendered by a copy of the chart whose only change is that it believes a cluster answers."""
    import shutil

    from cryptography import x509

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    helpers = chart / "templates" / "_helpers.tpl"
    guard = '{{- if not (lookup "v1" "Namespace" "" "kube-system") }}\n{{- fail "redis.tls:'
    assert guard in helpers.read_text()
    helpers.write_text(helpers.read_text().replace(guard, '{{- if false }}\n{{- fail "redis.tls:'))
    out = helm("template", "channels-chat", str(chart), "--namespace", "chat", "--set", "redis.tls.existingSecret=").stdout
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    secret = one(objects, "Secret", "redis-tls")
    assert secret["type"] == "kubernetes.io/tls" and secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    import base64

    ca, cert = (x509.load_pem_x509_certificate(base64.b64decode(secret["data"][k])) for k in ("ca.crt", "tls.crt"))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "*.channels-chat-redis-headless" in names and "*.channels-chat-redis-headless.chat.svc.cluster.local" in names
    cert.verify_directly_issued_by(ca)
    nodes = env_of(chat_deployment(objects)["spec"]["template"]["spec"]["containers"][0])
    assert all(
        n.split(":")[0].split(".", 1)[1] == "channels-chat-redis-headless"
        for n in one(objects, "ConfigMap", "chat")["data"]["REDIS_CLUSTER_NODES"].split(",")
    ), "covered by the wildcard"
    assert nodes["REDIS_TLS_CA"] == "/redis-tls/ca.crt"
