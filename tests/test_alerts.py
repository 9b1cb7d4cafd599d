"""The chart's alerts, unit-tested with promtool (Debian's prometheus): each fires on the series it names.

The rules come from `helm template` with the PrometheusRule on; the series are what the chat's and the
layer's counters export after the events that the partition tests make happen for real.
"""

import shutil
import subprocess

import yaml
from test_helm_chart import one, render

SERIES = 'namespace="chat", service="channels-chat", pod="chat-0"'
# Each partition alert and the counter it watches.
PARTITION_ALERTS = {
    "ChatSendsNotReplicated": "channels_layer_not_replicated_total",
    "ChatRedisUnanswered": "channels_layer_command_deadlines_total",
    "ChatCutOffFromRedis": "chat_sockets_handed_over_total",
    "ChatSubscriptionsFollowedFailover": "channels_layer_subscriptions_followed_total",
}


def case(rule, counter, values, fires):
    """A promtool test: ``counter`` takes ``values``, one sample a minute; at 10m ``rule`` fires, or not."""
    expected = [{"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}] if fires else []
    return {
        "interval": "1m",
        "input_series": [{"series": f"{counter}{{{SERIES}}}", "values": values}],
        "alert_rule_test": [{"eval_time": "10m", "alertname": rule["alert"], "exp_alerts": expected}],
    }


def test_partition_alerts_fire_on_their_counters_and_stay_quiet_without(tmp_path):
    groups = one(render("--set", "metrics.prometheusRule.enabled=true"), "PrometheusRule")["spec"]["groups"]
    rules = {rule["alert"]: rule for group in groups for rule in group["rules"]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    cases = []
    for alert, counter in PARTITION_ALERTS.items():
        cases.append(case(rules[alert], counter, "0x6 3x4", fires=True))  # it happened in the last minutes
        cases.append(case(rules[alert], counter, "0x10", fires=False))  # a counter that stays still
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": cases}))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by docker/host-setup.sh (Debian's prometheus)"
    result = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
