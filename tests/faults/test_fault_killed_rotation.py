"""ansible-playbook of a rotation SIGKILLed after each step: the rerun resumes, no key is lost,
exactly one new version is written.

tests/test_rotation_resume.py already covers a kill while waiting for the workers (after the
put) and a record written without the key. This file kills the run at every other step
boundary, in the first run and in the confirmation run: the run is killed (whole process
group) as soon as ansible-playbook announces the task that follows the step. About 12 s per
kill point: they run in the normal suite."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

import hvac
import pytest

from testkit.creds import assert_no_secrets, new_key
from testkit.faults import Env, rotation_inventory, rotation_vars
from testkit.paths import ROTATE
from testkit.playbook import ansible_env, playbook_argv, run_argv, start_argv
from testkit.tokens import token_with

# (step that has just finished, the task header that shows it, the run it is in)
KILL_POINTS = [
    ("plan", "Note whether the workers are to be checked before anything changes", "first"),
    ("put", "Stop when the put was refused", "first"),
    (
        "put, its record left until the workers were nudged",
        "Compute the propagation window",
        "first",
    ),
    ("recorded after the nudge", "Collect what the workers reported", "first"),
    ("mark awaiting revocation", "Stop when the rotation could not be marked", "first"),
    ("confirmation taken", "Ask the operator to revoke the old key and confirm", "confirm"),
    ("finalize", "Stop when finalize was refused", "confirm"),
]


def reset_env(env: Env) -> None:
    """Back to one version holding a fresh key, no rotation record."""
    for path in (f"captchaai/{env.name}", f"captchaai-staged/{env.name}"):
        with contextlib.suppress(hvac.exceptions.InvalidPath):
            env.admin.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point="secret")
    env.put_new_key()


def run_until(argv, run_env, marker: str, timeout: float = 180) -> tuple[bool, str]:
    """Run ``argv``; SIGKILL its process group when ``marker`` appears in a TASK header.
    Returns (killed, output)."""
    proc = start_argv(argv, run_env)
    out: list[str] = []
    killed = False
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=1):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline().decode(errors="replace")
                if not line:
                    break
                out.append(line)
                if line.startswith("TASK [") and marker in line:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    break
        finally:
            if proc.poll() is None and not killed:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            out.append(proc.stdout.read().decode(errors="replace"))
    return killed, "".join(out)


def run(argv, run_env, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_argv(argv, run_env, timeout)


@pytest.mark.parametrize(("step", "marker", "phase"), KILL_POINTS, ids=[k[0] for k in KILL_POINTS])
def test_rotation_killed_after_a_step_resumes_with_one_new_version(
    step, marker, phase, solo_vault, solo_envs, emulator, tmp_path
):
    env = Env(solo_vault, solo_envs[2], emulator, tmp_path)
    reset_env(env)
    old_key = env.key
    key = new_key()
    env.keys.append(key)
    emulator.admin.add_key(key, balance=1000.0)
    rotator = token_with(solo_vault, [f"captcha-rotator-{env.name}"])  # the rotator's rights only
    secrets_seen = [old_key, key, solo_vault.root_token(), rotator]
    run_env = ansible_env(solo_vault, token=rotator) | {
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default"
    }
    with env.fleet([solo_vault.addr]) as fleet:
        workers = fleet.start(1)
        inventory = rotation_inventory(env, workers, tmp_path)
        first_vars, first_status = rotation_vars(
            env, tmp_path, {"key_rotation_new_key": key, "key_rotation_unattended": True}
        )
        first = playbook_argv(ROTATE, inventory, first_vars)

        def confirmation() -> tuple[list[str], Path]:
            """The confirming run, naming the rotation (its id, from the rotation record)."""
            record = env.admin.secrets.kv.v2.read_secret_metadata(
                f"captchaai/{env.name}", mount_point="secret"
            )["data"]["custom_metadata"]
            confirm_vars, status = rotation_vars(
                env, tmp_path, {"key_rotation_confirm_revoked": record["rotation_id"]}
            )
            return playbook_argv(ROTATE, inventory, confirm_vars), status

        if phase == "first":
            killed, output = run_until(first, run_env, marker)
        else:
            done = run(first, run_env)
            assert done.returncode == 0, done.stdout[-3000:]
            emulator.admin.revoke_key(old_key)
            confirm, confirm_status = confirmation()
            killed, output = run_until(confirm, run_env, marker)
        assert_no_secrets(output, secrets_seen)
        assert killed, f"the run never reached {marker!r}:\n{output[-3000:]}"

        # Nothing lost at the kill: the current version holds the old or the new key, and
        # until the finalize step the old version is still there.
        current = env.admin.secrets.kv.v2.read_secret_version(
            f"captchaai/{env.name}", mount_point="secret", raise_on_deleted_version=True
        )["data"]
        assert current["data"]["api_key"] in (old_key, key)
        assert current["metadata"]["version"] in (1, 2)
        assert workers[0].health()["status"] == "ok"

        if phase == "first":
            rerun = run(first, run_env)
            assert_no_secrets(rerun.stdout + rerun.stderr, secrets_seen)
            assert rerun.returncode == 0, rerun.stdout[-3000:]
            if step != "plan":
                assert "resuming rotation" in rerun.stdout or step.startswith("mark"), rerun.stdout[
                    -3000:
                ]
            assert json.loads(first_status.read_text())["outcome"] == "awaiting_revocation"
            assert env.current_version() == 2
            old = env.admin.secrets.kv.v2.read_secret_version(
                f"captchaai/{env.name}",
                version=1,
                mount_point="secret",
                raise_on_deleted_version=True,
            )
            assert old["data"]["data"]["api_key"] == old_key, "the old key is kept until confirmed"
            emulator.admin.revoke_key(old_key)
        state_at_kill = env.admin.secrets.kv.v2.read_secret_metadata(
            f"captchaai/{env.name}", mount_point="secret"
        )["data"]["custom_metadata"]["rotation_state"]
        confirm, confirm_status = confirmation()
        finished = run(confirm, run_env)
        assert_no_secrets(finished.stdout + finished.stderr, secrets_seen)
        if state_at_kill == "complete":
            # Killed after the finalize: nothing is left to do; the kit refuses a second
            # confirmation with a clear message and changes nothing.
            message = json.loads(confirm_status.read_text())["message"]
            assert "(recorded state: complete;" in message, message
            assert message.endswith("nothing changed"), message
        else:
            assert finished.returncode == 0, finished.stdout[-3000:]
            assert json.loads(confirm_status.read_text())["outcome"] == "complete"
        assert workers[0].health()["key_version"] == 2

    meta = env.admin.secrets.kv.v2.read_secret_metadata(
        f"captchaai/{env.name}", mount_point="secret"
    )["data"]
    assert meta["current_version"] == 2, "exactly one new version"
    assert sorted(meta["versions"]) == ["1", "2"]
    assert meta["custom_metadata"]["rotation_state"] == "complete"
    assert meta["versions"]["1"]["destroyed"] is True
    assert meta["versions"]["2"]["destroyed"] is False
    assert (
        env.admin.secrets.kv.v2.read_secret_version(
            f"captchaai/{env.name}", mount_point="secret", raise_on_deleted_version=True
        )["data"]["data"]["api_key"]
        == key
    )
