"""Bad inputs of the rotation: each a clear error (or a clear no-op) and nothing changed."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest

from testkit.creds import new_key
from testkit.paths import PROVISION
from testkit.playbook import provision_inventory, run_playbook
from testkit.rotation import ENVS, RotEnv, run_rotation, run_unattended, write_inventory

FIXED = {"key_rotation_wait_mode": "fixed", "key_rotation_window_margin": 0}


def refused(
    rot_env: RotEnv,
    variables: dict[str, Any],
    *,
    token: str | None = None,
    inventory_vars: dict[str, Any] | None = None,
    workers: list | None = None,
):
    inv = write_inventory(rot_env, workers or [], inventory_vars)
    before = rot_env.snapshot()
    run = run_rotation(rot_env, inv, variables, token=token or rot_env.rotator_token())
    assert run.rc == 2, run.output[-3000:]
    assert run.status["outcome"] == "failed"
    assert rot_env.snapshot() == before, "a refused run must change nothing"
    return run


def test_malformed_key_is_refused(rot_env: RotEnv):
    """A key that does not match the pattern (here: upper case, 31 chars) is refused."""
    bad = new_key().upper()[:31]
    rot_env.secrets.append(bad)
    run = refused(rot_env, {"key_rotation_new_key": bad})
    assert "is malformed" in run.status["message"]
    assert "nothing changed" in run.status["message"]


def test_same_key_as_current_is_refused(rot_env: RotEnv):
    """Rotating to the key Vault already serves is refused."""
    run = refused(rot_env, {"key_rotation_new_key": rot_env.old_key})
    assert "is the current key" in run.status["message"]


def test_key_still_held_in_an_older_version_is_refused(rot_env: RotEnv):
    """A key still held in an older version (e.g. a rolled-back bad key) cannot come back."""
    older = rot_env.old_key
    newer = rot_env.next_key(at_provider=False)
    rot_env.admin.secrets.kv.v2.create_or_update_secret(
        rot_env.key_path, {"api_key": newer}, cas=1, mount_point="secret"
    )
    run = refused(rot_env, {"key_rotation_new_key": older})
    assert "still held in Vault as version 1" in run.status["message"]


def test_no_staged_key_in_scheduled_mode_is_a_noop_that_says_so(rot_env: RotEnv):
    """Scheduled (staged source, unattended) with nothing staged: rc 0, outcome noop, unchanged."""
    inv = write_inventory(rot_env)
    before = rot_env.snapshot()
    run = run_unattended(rot_env, inv, {"key_rotation_key_source": "staged"})
    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "noop"
    assert f"no staged key at secret/captchaai-staged/{rot_env.name}" in run.status["message"]
    assert rot_env.snapshot() == before


@pytest.mark.parametrize(
    ("env", "listed", "expected"),
    [
        pytest.param("nosuchenv", False, "Unknown environment 'nosuchenv'", id="not_listed"),
        pytest.param(
            "ghost",
            True,
            "Unknown environment 'ghost': there is no key at secret/captchaai/ghost",
            id="listed_without_key",
        ),
    ],
)
def test_unknown_env_is_refused(rot_env: RotEnv, env: str, listed: bool, expected: str):
    """An env outside captcha_kit_envs, and a listed env without a key in Vault, are refused."""
    key = rot_env.next_key(at_provider=False)
    listing = {"captcha_kit_envs": [env, rot_env.name]} if listed else None
    inv = write_inventory(rot_env, extra_vars=listing)
    run = run_rotation(
        rot_env,
        inv,
        {"key_rotation_env": env, "key_rotation_new_key": key},
        token=rot_env.admin.token,
    )
    assert run.rc == 2
    assert expected in run.output


def test_a_rotator_policy_an_older_kit_wrote_is_named_and_provisioning_mends_it(
    rot_env: RotEnv, tmp_path: Path
):
    """The env's rotator policy as a kit before the staged path's write-back wrote it (no
    create on the staged metadata): the rotator's run is refused before any change and says to
    provision again, not to use the rotator AppRole it uses; playbooks/provision-vault.yml (its
    provisioner token) writes the kit's policy again."""
    policy = f"captcha-rotator-{rot_env.name}"
    current = rot_env.admin.sys.read_policy(policy)["data"]["rules"]
    older = current.replace('["create", "read", "delete"]', '["read", "delete"]')
    assert older != current
    rot_env.admin.sys.create_or_update_policy(policy, older)

    run = refused(rot_env, {"key_rotation_new_key": rot_env.next_key()})

    message = run.status["message"]
    assert f"missing create on secret/metadata/captchaai-staged/{rot_env.name}." in message
    assert f"The {policy} policy in Vault lacks them: it is older than this kit" in message
    assert "Run playbooks/provision-vault.yml (with the provisioner token)" in message
    inventory = provision_inventory(
        rot_env.vault, ENVS, tmp_path, {"vault_provision_audit_managed_externally": True}
    )
    provisioned = run_playbook(PROVISION, vault=rot_env.vault, inventory=inventory)
    assert provisioned.rc == 0, provisioned.failure_messages()[-3000:]
    assert rot_env.admin.sys.read_policy(policy)["data"]["rules"] == current


@pytest.mark.parametrize("policy", ["captcha-worker", "captcha-stager"])
def test_token_without_rotator_rights_is_refused(rot_env: RotEnv, policy: str):
    """Worker and stager tokens are not rotators: the missing capabilities are named."""
    key = rot_env.next_key()
    run = refused(
        rot_env,
        {"key_rotation_new_key": key},
        token=rot_env.token(f"{policy}-{rot_env.name}"),
    )
    assert f"The token lacks rotator rights for {rot_env.name}" in run.status["message"]
    assert f"update on secret/data/captchaai/{rot_env.name}" in run.status["message"]


def test_unreachable_worker_is_refused_before_the_put(rot_env: RotEnv, start_workers):
    """One worker answering, one port with nothing behind it: refused, named, nothing written."""
    (worker,) = start_workers(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    key = rot_env.next_key()
    run = refused(
        rot_env,
        {"key_rotation_new_key": key},
        workers=[worker, (f"dead-{rot_env.name}", dead_port)],
    )
    assert f"dead-{rot_env.name}" in run.status["message"]
    assert worker.name + " (" not in run.status["message"]
    assert "not reachable or not answering" in run.status["message"]
    # The check is a play on the worker hosts (all at once, up to forks), not a loop of the
    # controller's delegated to one worker after the other.
    assert "PLAY [Check that every worker of the environment answers on its loopback]" in run.stdout
    task = run.stdout.split("TASK [key_rotation : Ask the worker's /healthz on its loopback]")[1]
    task = re.split(r"\n(?:TASK|PLAY) \[", task)[0]
    reported = re.findall(r"^(?:ok|changed|failed|fatal): \[([^\]]+)\]", task, re.M)
    assert sorted(reported) == sorted([worker.name, f"dead-{rot_env.name}"]), task


def test_provider_rejecting_the_new_key_is_refused(rot_env: RotEnv):
    """getbalance validation (on by default): a key the provider does not know is refused."""
    key = rot_env.next_key(at_provider=False)  # never registered at the emulator
    run = refused(rot_env, {"key_rotation_new_key": key})
    assert "The provider did not accept the new key" in run.status["message"]
    assert "ERROR_KEY_DOES_NOT_EXIST" in run.status["message"]


def test_confirmation_without_pending_rotation_is_refused(rot_env: RotEnv):
    """key_rotation_confirm_revoked with nothing awaiting revocation and nothing to rotate to
    (the scheduler's staged source, nothing staged) is refused. (With a key to come, the env
    name is the confirmation given up front: docs/runbooks.md, emergency rotation.)"""
    run = refused(
        rot_env, {"key_rotation_confirm_revoked": rot_env.name, "key_rotation_key_source": "staged"}
    )
    assert "no rotation of" in run.status["message"]
    assert "is awaiting revocation (recorded state: none)" in run.status["message"]
    # Without a terminal and without a key, the up-front confirmation has no key to rotate to.
    run = refused(rot_env, {"key_rotation_confirm_revoked": rot_env.name})
    assert run.status["message"].startswith(f"No new key for {rot_env.name}: ")


def test_rollback_after_finalize_is_refused(rot_env: RotEnv):
    """Once finalized (old version destroyed) a rollback is refused with a clear message."""
    key = rot_env.next_key()
    inv = write_inventory(rot_env, [], FIXED)
    token = rot_env.rotator_token()
    first = run_rotation(
        rot_env, inv, {"key_rotation_new_key": key, "key_rotation_unattended": True}, token=token
    )
    assert first.status["outcome"] == "awaiting_revocation", first.output[-3000:]
    rot_env.emulator.admin.revoke_key(rot_env.old_key)
    done = run_rotation(
        rot_env, inv, {"key_rotation_confirm_revoked": first.status["rotation_id"]}, token=token
    )
    assert done.status["outcome"] == "complete", done.output[-3000:]
    run = refused(rot_env, {"key_rotation_rollback": True}, inventory_vars=FIXED)
    assert "Rollback refused" in run.status["message"]
    assert "was finalized at" in run.status["message"]
    assert rot_env.current_key() == key
