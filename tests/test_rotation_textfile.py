"""The rotation's node_exporter textfile metrics (tools/rotate_unattended.py): the writer on its
own, and one real unattended rotation (awaiting revocation, then confirmed) that writes them next
to its status file."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from testkit.creds import assert_no_secrets
from testkit.rotation import RotEnv, run_wrapper, write_inventory
from tools import rotate_unattended as ru

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

AWAITING = {
    "env": "prod",
    "outcome": "awaiting_revocation",
    "rotation_state": "awaiting_revocation",
    "rotation_id": "prod-20260101T000000Z-abcdef",
    "rotation": {
        "rotation_state": "awaiting_revocation",
        "previous_version": "4",
        "new_version": "5",
        "started_at": "2026-01-01T00:00:00Z",
        "converged_at": "2026-01-01T00:00:07Z",
        "actor": "approle (captcha-rotator-prod)",
    },
    "current_version": 5,
    "put_to_converged_seconds": 6.5,
    "put_to_prompt_seconds": 7.25,
}


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def promtool_lint(text: str) -> None:
    """The exposition format is valid (promtool parses it; its lint finds nothing)."""
    proc = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_render_finished_run():
    text = ru.render_textfile("prod", AWAITING, code=75, started=1000.0, ended=1012.5)
    got = samples(text)
    p = ru.METRIC_PREFIX
    assert got[f'{p}running{{env="prod"}}'] == 0
    assert got[f'{p}last_exit_code{{env="prod"}}'] == 75
    assert got[f'{p}last_run_timestamp_seconds{{env="prod"}}'] == 1012.5
    assert got[f'{p}last_run_duration_seconds{{env="prod"}}'] == 12.5
    assert got[f'{p}current_version{{env="prod"}}'] == 5
    assert got[f'{p}previous_version{{env="prod"}}'] == 4
    assert got[f'{p}new_version{{env="prod"}}'] == 5
    assert got[f'{p}put_to_converged_seconds{{env="prod"}}'] == 6.5
    assert got[f'{p}put_to_prompt_seconds{{env="prod"}}'] == 7.25
    assert got[f'{p}started_timestamp_seconds{{env="prod"}}'] == 1767225600
    assert got[f'{p}converged_timestamp_seconds{{env="prod"}}'] == 1767225607
    assert f'{p}confirmed_timestamp_seconds{{env="prod"}}' not in got
    outcomes = {k: v for k, v in got.items() if k.startswith(f"{p}last_outcome")}
    assert len(outcomes) == len(ru.OUTCOMES)
    assert [k for k, v in outcomes.items() if v == 1] == [
        f'{p}last_outcome{{env="prod",outcome="awaiting_revocation"}}'
    ]
    states = {k: v for k, v in got.items() if k.startswith(f"{p}state{{")}
    assert [k for k, v in states.items() if v == 1] == [
        f'{p}state{{env="prod",state="awaiting_revocation"}}'
    ]
    promtool_lint(text)


def test_render_without_status_and_with_odd_values():
    """No status (the playbook never started): outcome none, state none, no versions; values
    that are not numbers are left out rather than written wrong."""
    text = ru.render_textfile("dev", None, code=4, started=1.0, ended=2.0)
    got = samples(text)
    p = ru.METRIC_PREFIX
    assert got[f'{p}last_outcome{{env="dev",outcome="none"}}'] == 1
    assert got[f'{p}state{{env="dev",state="none"}}'] == 1
    assert not [k for k in got if "version" in k]
    record_times = ("started_timestamp", "converged_timestamp", "confirmed_timestamp")
    odd = {"outcome": "failed", "rotation_state": "weird", "current_version": "None"}
    odd |= {"put_to_converged_seconds": None, "rotation": {"started_at": "yesterday"}}
    got = samples(ru.render_textfile("dev", odd, code=1, started=1.0, ended=2.0))
    assert got[f'{p}state{{env="dev",state="unknown"}}'] == 1
    assert not [
        k
        for k in got
        if "version" in k or "converged" in k or k.startswith(tuple(p + t for t in record_times))
    ]
    promtool_lint(text)


def test_write_is_atomic_and_running_keeps_the_previous_outcome(tmp_path: Path):
    prom = tmp_path / "key-rotation-prod.prom"
    finished = ru.render_textfile("prod", AWAITING, code=75, started=1000.0, ended=1012.5)
    ru.write_textfile(prom, finished)
    assert prom.read_text() == finished
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == [prom.name], "no temporary file is left behind"

    inode = prom.stat().st_ino
    ru.mark_running(prom, "prod", 2000.0)
    assert prom.stat().st_ino != inode, "replaced by rename, not rewritten in place"
    got = samples(prom.read_text())
    p = ru.METRIC_PREFIX
    assert got[f'{p}running{{env="prod"}}'] == 1
    assert got[f'{p}run_started_timestamp_seconds{{env="prod"}}'] == 2000
    assert got[f'{p}last_exit_code{{env="prod"}}'] == 75, "the last run's outcome stays"
    assert prom.read_text().count(f"# TYPE {p}running gauge") == 1
    promtool_lint(prom.read_text())

    fresh = tmp_path / "new.prom"
    ru.mark_running(fresh, "prod", 3000.0)
    assert set(samples(fresh.read_text())) == {
        f'{p}running{{env="prod"}}',
        f'{p}run_started_timestamp_seconds{{env="prod"}}',
    }


def test_metrics_file_beside_the_status_file():
    args = ru.parse_args(["--env", "dev", "--status-file", "/var/lib/node/key-rotation-dev.json"])
    assert ru.metrics_path(args) == Path("/var/lib/node/key-rotation-dev.prom")
    assert ru.metrics_path(ru.parse_args(["--env", "dev"])) is None
    explicit = ru.parse_args(["--env", "dev", "--metrics-file", "/x/y.prom"])
    assert ru.metrics_path(explicit) == Path("/x/y.prom")


def test_metrics_file_must_not_be_the_status_file(tmp_path: Path):
    same = ["--env", "dev", "--status-file", str(tmp_path / "a.prom")]
    assert ru.main(same) == ru.EXIT_USAGE
    assert not (tmp_path / "a.prom").exists()


# --------------------------------------------------------------------------- a real run


def _wrapper(rot_env: RotEnv, inventory: Path, status: Path, *args: str) -> tuple[int, str]:
    return run_wrapper(
        rot_env, "--env", rot_env.name, "-i", str(inventory), "--status-file", str(status), *args
    )


@pytest.mark.timeout(600)
def test_unattended_run_writes_textfile_metrics(rot_env: RotEnv, start_workers):
    workers = start_workers(1)
    inventory = write_inventory(rot_env, workers)
    textfile_dir = rot_env.tmp / "textfile"
    textfile_dir.mkdir()
    status = textfile_dir / f"key-rotation-{rot_env.name}.json"
    prom = status.with_suffix(".prom")
    rot_env.stage(rot_env.next_key())
    before = rot_env.current_version()
    p, env = ru.METRIC_PREFIX, f'env="{rot_env.name}"'

    started = time.time()
    rc, out = _wrapper(rot_env, inventory, status)
    assert rc == 75, out[-3000:]
    text = prom.read_text()
    assert_no_secrets(text, rot_env.secrets)
    promtool_lint(text)
    got = samples(text)
    assert got[f"{p}running{{{env}}}"] == 0
    assert got[f"{p}last_exit_code{{{env}}}"] == 75
    assert got[f'{p}last_outcome{{{env},outcome="awaiting_revocation"}}'] == 1
    assert got[f'{p}state{{{env},state="awaiting_revocation"}}'] == 1
    assert got[f"{p}previous_version{{{env}}}"] == before
    assert got[f"{p}new_version{{{env}}}"] == before + 1 == rot_env.current_version()
    assert got[f"{p}current_version{{{env}}}"] == before + 1
    assert got[f"{p}put_to_converged_seconds{{{env}}}"] >= 0
    assert started - 1 <= got[f"{p}converged_timestamp_seconds{{{env}}}"] <= time.time() + 1
    assert started <= got[f"{p}last_run_timestamp_seconds{{{env}}}"] <= time.time()
    assert sorted(os.listdir(textfile_dir)) == sorted([status.name, prom.name])

    rot_env.emulator.admin.revoke_key(rot_env.old_key)
    rid = json.loads(status.read_text())["rotation_id"]
    rc, out = _wrapper(rot_env, inventory, status, "--confirm-revoked", rid)
    assert rc == 0, out[-3000:]
    got = samples(prom.read_text())
    assert got[f"{p}last_exit_code{{{env}}}"] == 0
    assert got[f'{p}state{{{env},state="complete"}}'] == 1
    assert got[f'{p}last_outcome{{{env},outcome="complete"}}'] == 1
    assert started - 1 <= got[f"{p}confirmed_timestamp_seconds{{{env}}}"] <= time.time() + 1
    assert json.loads(status.read_text())["outcome"] == "complete"
