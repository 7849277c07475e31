"""The monitoring artifacts in deploy/: alert rules that promtool accepts and whose unit tests pass, a
runbook section behind every alert, and a dashboard that queries only series the server exports.

promtool is required: these tests fail without it (CI installs Debian's `prometheus` package) unless
LLMSERVE_SKIP_PROMTOOL=1. The rule file is read with regular expressions (no YAML parser among the
dependencies): one `- alert:` line per rule, `expr` before `for`; promtool's rule count checks that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "llmserve-dashboard.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_URL_PREFIX = "docs/runbook.md#"

# Every series the server exports, histograms by their base name. Queries may use these and `up`.
EXPORTED_METRICS = frozenset(
    {
        # HTTP layer (prometheus-flask-exporter)
        "llmserve_http_request_duration_seconds",
        "llmserve_http_request_total",
        "llmserve_http_request_exceptions_total",
        # engine and process gauges
        "llmserve_slots_busy",
        "llmserve_slots_total",
        "llmserve_requests_running",
        "llmserve_requests_waiting",
        "llmserve_kv_cells_used",
        "llmserve_kv_cells_total",
        "llmserve_model_load_seconds",
        "llmserve_model_info",
        "llmserve_canary_weight",
        "llmserve_workers_alive",
        "llmserve_workers_expected",
        "llmserve_process_resident_memory_bytes",
        "llmserve_gpu_utilization_ratio",
        "llmserve_gpu_memory_used_bytes",
        "llmserve_gpu_memory_total_bytes",
        # counters
        "llmserve_prompt_tokens_total",
        "llmserve_generation_tokens_total",
        "llmserve_rejections_total",
        "llmserve_cancellations_total",
        "llmserve_errors_total",
        "llmserve_model_requests_total",
        "llmserve_canary_rollbacks_total",
        "llmserve_canary_retries_total",
        # histograms
        "llmserve_time_to_first_token_seconds",
        "llmserve_inter_token_latency_seconds",
        "llmserve_queue_wait_seconds",
        "llmserve_request_duration_seconds",
        "llmserve_engine_step_seconds",
        "llmserve_engine_batch_tokens",
    }
)
ALLOWED_METRICS = EXPORTED_METRICS | {"up"}
SEVERITIES = frozenset({"page", "ticket"})

METRIC_NAME = re.compile(r"llmserve_[a-z_]+")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
ALERT_START = re.compile(r"^\s*- alert:\s*(\S+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Alert:
    name: str
    text: str  # the rule's lines, from `- alert:` to the next rule

    def field(self, key: str) -> str | None:
        match = re.search(rf"^\s*{key}:[ \t]*\"?([^\"\n]*)\"?[ \t]*$", self.text, re.MULTILINE)
        return match.group(1).strip() if match else None

    @property
    def expr(self) -> str:
        match = re.search(r"^\s*expr:(.*?)^\s*for:", self.text, re.MULTILINE | re.DOTALL)
        assert match, f"{self.name}: no expr before for"
        return match.group(1)


def read_alerts() -> list[Alert]:
    text = ALERTS.read_text()
    starts = list(ALERT_START.finditer(text))
    ends = [match.start() for match in starts[1:]] + [len(text)]
    return [Alert(match.group(1), text[match.start() : end]) for match, end in zip(starts, ends, strict=True)]


def metric_names(expr: str) -> set[str]:
    return {HISTOGRAM_SUFFIX.sub("", name) for name in METRIC_NAME.findall(expr)}


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link counts as its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in RUNBOOK.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        heading = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if in_code or not heading:
            continue
        anchor = github_anchor(heading.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if os.environ.get("LLMSERVE_SKIP_PROMTOOL") == "1":
        pytest.skip("LLMSERVE_SKIP_PROMTOOL=1")
    executable = shutil.which("promtool")
    if executable is None:
        pytest.fail(
            "promtool is not installed (Debian: apt-get install prometheus); set LLMSERVE_SKIP_PROMTOOL=1 to skip",
            pytrace=False,
        )
    return subprocess.run([executable, *args], capture_output=True, text=True, timeout=120, check=False)


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in the dashboard, nested panels and targets included."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target, and the queries of the templating variables."""
    queries = [obj["expr"] for obj in walk(dashboard["panels"]) if "expr" in obj]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


# --- alert rules --------------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # The regular-expression reading below sees every rule promtool sees.
    assert f"SUCCESS: {len(read_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_severity_for_and_annotations() -> None:
    alerts = read_alerts()
    assert len(alerts) >= 8
    assert len({alert.name for alert in alerts}) == len(alerts), "duplicate alert names"
    for alert in alerts:
        assert alert.field("for"), f"{alert.name}: no for"
        assert alert.field("severity") in SEVERITIES, f"{alert.name}: severity must be one of {sorted(SEVERITIES)}"
        for annotation in ("summary", "description", "runbook_url"):
            assert alert.field(annotation), f"{alert.name}: no {annotation}"


def test_every_alert_links_to_its_runbook_section() -> None:
    anchors = runbook_anchors()
    for alert in read_alerts():
        url = alert.field("runbook_url") or ""
        assert url.startswith(RUNBOOK_URL_PREFIX), f"{alert.name}: runbook_url {url!r} is not {RUNBOOK_URL_PREFIX}..."
        anchor = url.removeprefix(RUNBOOK_URL_PREFIX)
        assert anchor in anchors, f"{alert.name}: docs/runbook.md has no heading with anchor #{anchor}"


def test_runbook_links_between_sections_resolve() -> None:
    anchors = runbook_anchors()
    for anchor in re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text()):
        assert anchor in anchors, f"docs/runbook.md links to #{anchor}, which is no heading"


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    cases = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", ALERT_TESTS.read_text())
    for alert in read_alerts():
        outcomes = {silent == "[]" for name, silent in cases if name == alert.name}
        assert outcomes == {True, False}, f"{alert.name}: needs a case that fires and one with exp_alerts: []"


def test_alerts_query_only_exported_series() -> None:
    for alert in read_alerts():
        unknown = metric_names(alert.expr) - ALLOWED_METRICS
        assert not unknown, f"{alert.name} queries series the server does not export: {sorted(unknown)}"


# --- dashboard ----------------------------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"model", "tenant"} <= variables.keys()
    panels = list(walk(dashboard["panels"]))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for obj in panels:
        if "datasource" in obj:
            assert obj["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def test_dashboard_queries_only_exported_series() -> None:
    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 20
    for query in queries:
        unknown = metric_names(query) - ALLOWED_METRICS
        assert not unknown, f"dashboard query uses series the server does not export: {sorted(unknown)}\n{query}"


def test_dashboard_shows_every_exported_series() -> None:
    used = set().union(*(metric_names(query) for query in dashboard_queries(load_dashboard())))
    missing = EXPORTED_METRICS - used
    assert not missing, f"no dashboard panel shows {sorted(missing)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, parses as the expression of a recording rule."""
    exprs = [obj["expr"] for obj in walk(load_dashboard()["panels"]) if "expr" in obj]
    rules = [
        {
            "record": f"dashboard:query_{index}",
            "expr": re.sub(r"\$\{?\w+\}?", ".*", expr.replace("$__rate_interval", "5m")),
        }
        for index, expr in enumerate(exprs)
    ]
    # JSON is YAML: promtool reads this file as it is.
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
