"""monitoring/: the Prometheus rules pass `promtool check rules` and their unit tests (every alert
fires in one case and stays silent in another; a changed rule fails them), and every metric the
rules and the Grafana dashboard name is one the kit exports: scraped from a real worker
(``captcha-solver serve`` against the test OpenBao and the emulator) or written by the
rotation's textfile writer (tools/rotate_unattended.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from testkit.loadgen import DEFAULT_TASK, solve_once
from testkit.paths import REPO
from testkit.rotation import RotEnv
from tools import rotate_unattended as ru

MONITORING = REPO / "monitoring"
RULES = MONITORING / "captcha-kit.rules.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.test.yml"))
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Series Prometheus makes itself for every target (not exported by anything of the kit).
PROMETHEUS_OWN = {"up"}
# A metric name in a PromQL expression: an identifier not followed by "(" (a function) and
# not a label name inside {...} or by (...) (those are stripped first).
_NAME = re.compile(r"(?<![\w:.\"])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")
_KEYWORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"),
    *("bool", "offset", "inf", "nan", "Inf", "NaN"),
}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in doc["templating"]["list"] if v.get("definition")]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression reads."""
    text = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r'"[^"]*"', "", text)
    text = re.sub(r"\blabel_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)", r"\1", text)
    names = set(_NAME.findall(text)) - _KEYWORDS
    for selector in re.findall(r'__name__=~"([^"]+)"', expr):
        names |= set(selector.split("|"))
    return names


def test_metric_names_parser():
    """The name extraction the check below relies on (it must not miss a name)."""
    expr = (
        'histogram_quantile(0.9, sum by (env, le) (rate(a_bucket{env=~"$env",le!="1"}[5m])))'
        " / on (env) group_left () b:c:d > 7 * 86400 unless on (env) max by (env) (e == 1)"
        ' or max by (env) ({__name__=~"f|g"}) and time() - h offset 5m'
    )
    assert metric_names(expr) == {"a_bucket", "b:c:d", "e", "f", "g", "h"}
    assert metric_names("label_values(captcha_solver_healthy, env)") == {"captcha_solver_healthy"}


def test_rules_are_valid_and_their_unit_tests_pass():
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    run = promtool("test", "rules", *(p.name for p in RULE_TESTS), cwd=MONITORING / "tests")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("SUCCESS") == len(RULE_TESTS), run.stdout


def test_every_alert_has_a_firing_and_a_silent_case():
    alerts = {r["alert"] for r in rules() if "alert" in r}
    fires: dict[str, int] = dict.fromkeys(alerts, 0)
    silent: dict[str, int] = dict.fromkeys(alerts, 0)
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                target = fires if check.get("exp_alerts") else silent
                target[check["alertname"]] += 1
    assert len(alerts) >= 9
    assert [a for a in alerts if not fires[a]] == [], "alerts no test sees firing"
    assert [a for a in alerts if not silent[a]] == [], "alerts no test sees silent"
    # The evidence in the closing note: the alerts and their test counts.
    print(
        "\n" + "\n".join(f"{a}: fires in {fires[a]}, silent in {silent[a]}" for a in sorted(alerts))
    )


def test_the_rule_tests_fail_when_a_rule_changes(tmp_path: Path):
    """The unit tests hold the thresholds: a rule that waits longer no longer passes them."""
    (tmp_path / "tests").mkdir()
    text = RULES.read_text()
    changed = text.replace(
        "captcha_solver_circuit_open == 1\n        for: 10m",
        "captcha_solver_circuit_open == 1\n        for: 20m",
    )
    assert changed != text
    (tmp_path / RULES.name).write_text(changed)
    for path in RULE_TESTS:
        shutil.copy(path, tmp_path / "tests" / path.name)
    run = promtool("test", "rules", "workers.test.yml", cwd=tmp_path / "tests")
    assert run.returncode != 0
    assert "CaptchaWorkerCircuitOpen" in run.stdout + run.stderr


def _textfile_names() -> set[str]:
    """Every metric the rotation's textfile writer can write (a run in each kind of state)."""
    record = {
        "previous_version": "4",
        "new_version": "5",
        "started_at": "2026-01-01T00:00:00Z",
        "converged_at": "2026-01-01T00:00:07Z",
        "confirmed_at": "2026-01-01T01:00:00Z",
    }
    status = {
        "outcome": "complete",
        "rotation_state": "complete",
        "rotation": record,
        "current_version": 5,
        "put_to_converged_seconds": 6.5,
        "put_to_prompt_seconds": 7.0,
    }
    texts = [
        ru.render_textfile("dev", status, code=0, started=1.0, ended=2.0),
        ru.render_textfile("dev", None, code=None, started=1.0, ended=None),
    ]
    return {line.split()[2] for t in texts for line in t.splitlines() if line.startswith("# TYPE")}


def _exported(metrics_text: str) -> set[str]:
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_every_metric_the_rules_and_dashboard_name_is_exported(rot_env: RotEnv, start_workers):
    (worker,) = start_workers(1)
    ok, reason = solve_once(worker.url, dict(DEFAULT_TASK), timeout=60)
    assert ok, reason
    scraped = worker.metrics()
    solved = r'\{method="userrecaptcha",outcome="solved"\} 1$'
    assert re.search(
        r"^captcha_solver_solve_duration_seconds_count" + solved, scraped, re.MULTILINE
    ), "the solve-duration histogram records the solve"
    exported = _exported(scraped) | _textfile_names()
    recorded = {r["record"] for r in rules() if "record" in r}

    used_by_rules = {n for r in rules() for n in metric_names(r["expr"])}
    used_by_dashboard = {n for e in dashboard_exprs() for n in metric_names(e)}
    used = used_by_rules | used_by_dashboard
    unknown = sorted(used - exported - recorded - PROMETHEUS_OWN)
    assert unknown == [], f"named by the rules or the dashboard but exported by nothing: {unknown}"
    # The check sees real names on both sides (not an empty set passing trivially).
    assert "captcha_solver_solve_duration_seconds_bucket" in used_by_rules & exported
    assert "captcha_key_rotation_state" in used_by_dashboard & exported
    assert {n for n in used_by_dashboard if ":" in n} <= recorded
    missing = sorted(n for n in exported if n not in used and n.startswith("captcha_"))
    print(f"\nmetrics named: {len(used)}; exported but not named anywhere: {missing}")
