"""Each setting is declared once (chatsite.environment): the code reads it there, and the docs, the chart,
compose and the image agree with its default or say why not."""

import re
import subprocess

import yaml

from chatsite import environment
from conftest import ROOT

HELM = ROOT / ".tools/bin/helm"
# Read straight from the environment, and why: set before Django or gunicorn read any setting.
NOT_SETTINGS = {"DJANGO_SETTINGS_MODULE", "PROMETHEUS_MULTIPROC_DIR"}


def test_the_code_reads_every_setting_through_the_catalog():
    reads = []
    for path in [*(ROOT / "services/chat").rglob("*.py"), *(ROOT / "services/chatsite").rglob("*.py")]:
        if path.name == "environment.py":
            continue
        for name in re.findall(r"os\.environ(?:\.get|\.setdefault|\[)\(?\s*[\"']([A-Z_]+)", path.read_text()):
            if name not in NOT_SETTINGS:
                reads.append(f"{path.relative_to(ROOT)}: {name}")
    assert reads == []


def test_the_configuration_page_is_the_catalog():
    page = (ROOT / "docs/configuration.md").read_text()
    assert environment.table() in page, "docs/configuration.md: paste `python -m chatsite.environment` in place of its table"


def deviation(name, where, value):
    """None when ``value`` is the setting's default there (or a declared one of its own), else what is wrong."""
    setting = environment.BY_NAME.get(name)
    if setting is None:
        return f"{where} sets {name}, which is no setting"
    declared = (setting.elsewhere or {}).get(where)
    if declared is not None:
        return None if declared[0] in (value, environment.DEPLOYMENT) else f"{where}: {name}={value!r}, declared {declared[0]!r}"
    if value in ("", setting.default) or (setting.default or "").lower() == value.lower():
        return None
    return f"{where}: {name}={value!r} against the default {setting.default!r}, with no reason given"


def test_the_charts_configmap_sets_the_defaults_or_says_why():
    out = subprocess.run(
        [
            str(HELM),
            "template",
            "chat",
            str(ROOT / "deploy/helm"),
            "--show-only",
            "templates/configmap.yaml",
            "--set",
            "secrets.djangoSecretKey=k",
            "--set",
            "secrets.redisPassword=p",
            "--set",
            "redis.tls.existingSecret=t",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = yaml.safe_load(out)["data"]
    assert len(data) >= 15
    problems = [p for name, value in data.items() if (p := deviation(name, "chart", str(value)))]
    assert problems == []


def test_compose_and_the_image_set_the_defaults_or_say_why():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    chat = compose["services"]["chat"]["environment"]
    problems = []
    for name, value in chat.items():
        name = name.removesuffix("_FILE")
        default = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", str(value))
        if default or name not in ("REDIS_CLUSTER_NODES", "REDIS_TLS_CA", "REDIS_PASSWORD"):
            problems.append(deviation(name, "compose", default.group(1) if default else str(value)))
    dockerfile = (ROOT / "Dockerfile").read_text()
    block = dockerfile[dockerfile.rindex("ENV PATH=/opt/venv/bin") :].split("\nWORKDIR", 1)[0]
    for name, value in re.findall(r"([A-Z_]+)=(\S+)", block):
        if name in environment.BY_NAME:
            problems.append(deviation(name, "image", value))
    assert [p for p in problems if p] == []


def test_no_deployment_sets_a_bench_only_setting():
    bench_only = [setting.name for setting in environment.SETTINGS if setting.bench_only]
    assert "CHAT_REPLICATE_BEFORE_PUBLISH" in bench_only
    deployed = [
        (ROOT / "compose.yaml").read_text(),
        (ROOT / "Dockerfile").read_text(),
        *(path.read_text() for path in (ROOT / "deploy").rglob("*.yaml")),
    ]
    assert [name for name in bench_only if any(name in text for text in deployed)] == []


def test_a_deviation_without_a_reason_is_found():
    assert deviation("CHAT_HISTORY_SIZE", "chart", "500") is None
    assert "no reason" in deviation("CHAT_HISTORY_SIZE", "chart", "50")
    assert "no setting" in deviation("CHAT_NOT_A_SETTING", "chart", "1")
    assert deviation("WEB_CONCURRENCY", "image", "2") is None and deviation("WEB_CONCURRENCY", "image", "4")
