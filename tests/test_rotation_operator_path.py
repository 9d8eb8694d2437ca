"""The operator's path through the rotation (issue 15): a proof that cannot be empty, runbooks
and messages whose commands run as printed, a staged key the stager can take back, and a
confirmation that does not finalize while the provider still accepts the old key."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from testkit.creds import assert_no_secrets, write_private
from testkit.paths import BIN, REPO
from testkit.playbook import process_host
from testkit.rotation import (
    ENVS,
    WRAPPER,
    RotEnv,
    rotation_env,
    run_in_terminal,
    run_rotation,
    run_unattended,
    run_wrapper,
    write_inventory,
)

FIXED = {"key_rotation_wait_mode": "fixed", "key_rotation_window_margin": 0}


def add_hosts(inventory: Path, hosts: dict[str, dict[str, Any]]) -> Path:
    """Add worker hosts (name -> host vars) to a rotation inventory."""
    data = yaml.safe_load(inventory.read_text())
    data["all"]["children"]["workers"]["hosts"] = {
        **(data["all"]["children"]["workers"]["hosts"] or {}),
        **hosts,
    }
    inventory.write_text(yaml.safe_dump(data))
    return inventory


def refused_before_any_change(rot_env: RotEnv, inventory: Path, variables: dict[str, Any]):
    before = rot_env.snapshot()
    run = run_unattended(rot_env, inventory, variables)
    assert run.rc == 2, run.output[-3000:]
    assert run.status["outcome"] == "failed"
    assert rot_env.snapshot() == before, "a refused run must change nothing"
    return run


def wrapper(rot_env: RotEnv, *args: str) -> tuple[int, str]:
    """tools/rotate-unattended with the rotator's AppRole files; the outcome's message is in
    ``rot_env.tmp / "status.json"``."""
    return run_wrapper(rot_env, *args, "--status-file", str(rot_env.tmp / "status.json"))


# --------------------------------------------------------------------------- 1. no empty proof


def test_a_rotation_without_workers_of_the_env_is_refused(rot_env: RotEnv):
    """No worker of the env in the inventory: refused before the put (and in check mode);
    key_rotation_allow_no_workers is the explicit way for an env that has none."""
    inv = write_inventory(rot_env, [], {"key_rotation_allow_no_workers": False})
    key = rot_env.next_key()
    run = refused_before_any_change(rot_env, inv, {"key_rotation_new_key": key})
    message = run.status["message"]
    print("empty fleet:", message)
    assert message.startswith(f"No worker of {rot_env.name} in the inventory {inv} ")
    assert "key_rotation_allow_no_workers=true; nothing changed" in message
    check = run_unattended(rot_env, inv, {"key_rotation_new_key": key}, check=True)
    assert check.rc == 2, "check mode tells the truth: the run would be refused"
    assert f"No worker of {rot_env.name}" in check.status["message"]


def test_a_worker_host_of_an_env_the_kit_does_not_serve_is_flagged(rot_env: RotEnv, start_workers):
    """A misspelt captcha_worker_env (and a worker host without one) stops the rotation, named;
    key_rotation_ignore_hosts acknowledges them."""
    (worker,) = start_workers(1)
    typo = f"{rot_env.name}x"
    inv = add_hosts(
        write_inventory(rot_env, [worker]),
        {
            "typo-host": process_host(typo, worker.port),
            "bare-host": {"ansible_connection": "local"},
        },
    )
    key = rot_env.next_key()
    run = refused_before_any_change(rot_env, inv, {"key_rotation_new_key": key})
    message = run.status["message"]
    assert f"typo-host (captcha_worker_env '{typo}'); bare-host (no captcha_worker_env)" in message
    assert '"key_rotation_ignore_hosts": ["typo-host", "bare-host"]' in message
    check = run_unattended(
        rot_env,
        inv,
        {"key_rotation_new_key": key, "key_rotation_ignore_hosts": ["typo-host", "bare-host"]},
        check=True,
    )
    assert check.rc == 0, check.output[-3000:]
    assert check.status["outcome"] == "check"


def test_a_host_holding_a_live_secret_id_outside_the_inventory_stops_the_rotation(
    rot_env: RotEnv, start_workers
):
    """The census in Vault: a host that holds a live secret-id of captcha-worker-<env> (its
    metadata names it) but is not in the inventory stops the rotation before the put, named;
    acknowledged, the rotation runs."""
    (worker,) = start_workers(1)
    inv = write_inventory(rot_env, [worker])
    retired = f"retired-{rot_env.name}"
    _, accessor = rot_env.worker_secret_id(retired)
    key = rot_env.next_key()
    run = refused_before_any_change(rot_env, inv, {"key_rotation_new_key": key})
    message = run.status["message"]
    print("unknown host:", message)
    assert message.startswith(
        f"Host(s) holding a live secret-id of captcha-worker-{rot_env.name} (the host named in "
        f"its metadata) but not a worker of {rot_env.name} in the inventory {inv}: "
        f"{retired} (accessor {accessor}, expires "
    )
    assert worker.name not in message
    assert f'"key_rotation_ignore_hosts": ["{retired}"]' in message

    run = run_unattended(
        rot_env, inv, {"key_rotation_new_key": key, "key_rotation_ignore_hosts": [retired]}
    )
    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "awaiting_revocation"
    assert rot_env.current_key() == key


# --------------------------------------------------------------------------- 3. emergency runbook


def test_the_emergency_runbook_runs_as_written(rot_env: RotEnv, start_workers):
    """docs/runbooks.md, exposed key: revoke first, then the command exactly as the runbook
    shows it (the env name as the confirmation up front), the new key at the hidden prompt: the
    run finalizes as soon as every worker moved."""
    runbook = (REPO / "docs" / "runbooks.md").read_text()
    shown = re.search(
        r"ansible-playbook -i inventories/prod playbooks/rotate-key\.yml "
        r"-e key_rotation_env=prod\s*\\\s*-e key_rotation_confirm_revoked=prod\n",
        runbook,
    )
    assert shown, "the runbook's command changed: update this test with it"
    workers = start_workers(2)
    inv = write_inventory(rot_env, workers)
    rot_env.emulator.admin.revoke_key(rot_env.old_key)  # step 1: revoke first
    key = rot_env.next_key()
    argv = [
        str(BIN / "ansible-playbook"),
        "-i",
        str(inv),
        "playbooks/rotate-key.yml",
        "-e",
        f"key_rotation_env={rot_env.name}",
        "-e",
        f"key_rotation_confirm_revoked={rot_env.name}",
    ]
    env = rotation_env(rot_env, rot_env.rotator_token()) | {"TERM": "xterm"}
    rc, text, unseen = run_in_terminal(argv, env, [("(input hidden", key)], cwd=REPO)
    assert_no_secrets(text, rot_env.secrets)
    assert not unseen, text[-3000:]
    assert rc == 0, text[-3000:]
    assert "is COMPLETE" in text
    assert rot_env.record()["rotation_state"] == "complete"
    assert rot_env.current_key() == key
    versions = rot_env.metadata()["versions"]
    assert versions["1"]["destroyed"], "the exposed key's version is destroyed"


# --------------------------------------------------------------------------- 5. staged key


def _commands(message: str) -> tuple[str, str]:
    withdraw = re.search(r"withdraws it: (.+?) \(the next runs", message)
    replace = re.search(r"replaces it by the right key: (.+? ; unset KEY)", message)
    assert withdraw, message
    assert replace, message
    return withdraw.group(1), replace.group(1)


def test_a_bad_staged_key_is_withdrawn_with_the_printed_command(rot_env: RotEnv):
    """A staged key the provider rejects: the message says how to withdraw or replace it and
    never to turn the provider check off; the stager's withdraw command, as printed, makes the
    next scheduled run find nothing staged."""
    inv = write_inventory(rot_env, [], FIXED)
    rot_env.stage(rot_env.next_key(at_provider=False))  # a typo: well formed, unknown
    run = refused_before_any_change(rot_env, inv, {"key_rotation_key_source": "staged"})
    message = run.status["message"]
    assert "The provider did not accept the new key" in message
    assert "validate_provider" not in message
    withdraw, _ = _commands(message)
    assert withdraw == f"bao kv delete -mount=secret captchaai-staged/{rot_env.name}"
    done = rot_env.bao(withdraw, rot_env.token(f"captcha-stager-{rot_env.name}"))
    assert done.returncode == 0, done.stderr

    run = run_unattended(rot_env, inv, {"key_rotation_key_source": "staged"})
    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "noop"
    assert rot_env.current_version() == 1


def test_a_bad_staged_key_is_replaced_with_the_printed_command(rot_env: RotEnv):
    """The stager replaces a malformed staged key by a new staged version over it (check-and-set
    on the current version, which the stager reads from the metadata); the next run puts it."""
    inv = write_inventory(rot_env, [], FIXED)
    bad = rot_env.next_key(at_provider=False)[:31]
    rot_env.secrets.append(bad)
    rot_env.stage(bad)
    run = refused_before_any_change(rot_env, inv, {"key_rotation_key_source": "staged"})
    assert "is malformed" in run.status["message"]
    _, replace = _commands(run.status["message"])
    good = rot_env.next_key()
    done = rot_env.bao(replace, rot_env.token(f"captcha-stager-{rot_env.name}"), good + "\n")
    assert done.returncode == 0, done.stderr
    assert_no_secrets(done.stdout + done.stderr, rot_env.secrets)

    run = run_unattended(rot_env, inv, {"key_rotation_key_source": "staged"})
    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "awaiting_revocation"
    assert rot_env.current_key() == good


# --------------------------------------------------------------------------- 6. exact commands


def test_the_awaiting_revocation_message_prints_commands_that_run(rot_env: RotEnv, start_workers):
    """The awaiting-revocation message names the inventory in use (-i) and the wrapper with the
    rotator's files; the printed confirmation, run as printed, finishes the rotation."""
    (worker,) = start_workers(1)
    inv = write_inventory(rot_env, [worker])
    rot_env.stage(rot_env.next_key())
    rc, out = wrapper(rot_env, "--env", rot_env.name, "-i", str(inv))
    assert rc == 75, out[-3000:]
    rid = rot_env.record()["rotation_id"]
    message = json.loads((rot_env.tmp / "status.json").read_text())["message"]
    print("awaiting revocation:", message)
    found = re.search(r"then finish with: (ansible-playbook .+?) \(unattended: (.+?); or", message)
    assert found, message
    confirm, unattended = found.group(1), found.group(2)
    assert f" -i {inv} " in confirm
    assert confirm.endswith(f"-e key_rotation_confirm_revoked={rid}")
    assert unattended.startswith(f"{WRAPPER} --env {rot_env.name} -i {inv} --role-id-file ")
    assert unattended.endswith(f"--confirm-revoked {rid}")

    rot_env.emulator.admin.revoke_key(rot_env.old_key)
    argv = shlex.split(confirm)
    argv[0] = str(BIN / "ansible-playbook")
    proc = subprocess.run(
        argv,
        cwd=REPO,
        env=rotation_env(rot_env, rot_env.rotator_token()),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert rot_env.record()["rotation_state"] == "complete"


def test_the_wrapper_names_its_own_flag_for_an_unknown_env(rot_env: RotEnv):
    """tools/rotate-unattended --env prd: the answer names --env, not the playbook variable."""
    inv = write_inventory(rot_env)
    rc, out = wrapper(rot_env, "--env", "prd", "-i", str(inv))
    assert rc == 1, out[-3000:]
    message = json.loads((rot_env.tmp / "status.json").read_text())["message"]
    assert message.startswith("Unknown environment 'prd': pass --env <env> with one of ")
    assert "key_rotation_env" not in out


def test_a_rotator_of_another_env_is_refused_naming_its_role(rot_env: RotEnv):
    """The AppRole login of another env's rotator: refused, naming the role that logged in."""
    other = next(e for e in ENVS if e != rot_env.name)
    role_id, secret_id = rot_env.approle_files(f"captcha-rotator-{other}")
    inv = write_inventory(rot_env)
    run = run_rotation(
        rot_env,
        inv,
        {
            "key_rotation_new_key": rot_env.next_key(),
            "key_rotation_auth_method": "approle",
            "key_rotation_approle_role_id_file": str(role_id),
            "key_rotation_approle_secret_id_file": str(secret_id),
        },
    )
    assert run.rc == 2, run.output[-3000:]
    message = run.status["message"]
    assert message.startswith(f"The token lacks rotator rights for {rot_env.name}: missing ")
    assert f"logged in with AppRole role captcha-rotator-{other}" in message


def test_the_playbook_outside_the_repository_names_the_cause(rot_env: RotEnv, tmp_path: Path):
    """ansible-playbook from another directory finds the roles and collections (playbooks/roles
    and playbooks/collections); without the kit's ansible.cfg it stops and says so, with
    ANSIBLE_CONFIG it runs."""
    inv = write_inventory(rot_env)
    # The new key goes in a 0600 vars file, never on the command line.
    key_file = write_private(
        tmp_path / "key.json", json.dumps({"key_rotation_new_key": rot_env.next_key()})
    )
    argv = [
        str(BIN / "ansible-playbook"),
        "-i",
        str(inv),
        str(REPO / "playbooks" / "rotate-key.yml"),
        "-e",
        f"key_rotation_env={rot_env.name}",
        "-e",
        f"@{key_file}",
        "--check",
    ]
    env = rotation_env(rot_env, rot_env.rotator_token())
    bare = {k: v for k, v in env.items() if k != "ANSIBLE_CONFIG"}
    proc = subprocess.run(argv, cwd=tmp_path, env=bare, capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "was not found" not in out
    assert "ansible-playbook runs without the kit's ansible.cfg (config file in use: none" in out
    assert f"export ANSIBLE_CONFIG={REPO}/ansible.cfg; nothing changed" in out
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


# --------------------------------------------------------------------------- 7. not revoked


def test_a_confirmation_while_the_old_key_still_works_is_not_finalized(rot_env: RotEnv):
    """Confirmed without revoking: the old version stays, the rotation stays awaiting
    revocation, the wrapper exits 76; revoked, the same confirmation completes it (0)."""
    inv = write_inventory(rot_env, [], FIXED)
    rot_env.stage(rot_env.next_key())
    rc, out = wrapper(rot_env, "--env", rot_env.name, "-i", str(inv))
    assert rc == 75, out[-3000:]
    rid = rot_env.record()["rotation_id"]

    rc, out = wrapper(rot_env, "--env", rot_env.name, "-i", str(inv), "--confirm-revoked", rid)
    assert rc == 76, out[-3000:]
    # The wrapper's own last line (on stdout; Ansible's warnings go to stderr).
    last = [line for line in out.splitlines() if line.startswith("key-rotation: ")][-1]
    assert last.startswith(
        f"key-rotation: old_key_active exit=76 env={rot_env.name} state=awaiting_revocation"
    ), last
    message = json.loads((rot_env.tmp / "status.json").read_text())["message"]
    assert (
        "is NOT FINALIZED: the revocation was confirmed, but the provider still ACCEPTS the old "
        f"key ***{rot_env.old_key[-4:]}" in message
    )
    assert rot_env.record()["rotation_state"] == "awaiting_revocation"
    assert not rot_env.metadata()["versions"]["1"]["destroyed"]

    rot_env.emulator.admin.revoke_key(rot_env.old_key)
    rc, out = wrapper(rot_env, "--env", rot_env.name, "-i", str(inv), "--confirm-revoked", rid)
    assert rc == 0, out[-3000:]
    assert rot_env.record()["rotation_state"] == "complete"
    assert rot_env.metadata()["versions"]["1"]["destroyed"]
