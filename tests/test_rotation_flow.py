"""The rotation flow end to end against the real local OpenBao, emulator and solver workers."""

from __future__ import annotations

import hvac
import pytest

from testkit.rotation import (
    STAGED_PATH_SETTINGS,
    RotEnv,
    run_rotation,
    run_unattended,
    write_inventory,
)


def test_unattended_rotation_converges_then_confirmation_finishes(rot_env: RotEnv, start_workers):
    """A staged key is promoted, every worker reports it, and a confirmation run finalizes."""
    workers = start_workers(3)
    inv = write_inventory(rot_env, workers)
    new = rot_env.next_key(at_provider=False)
    rot_env.emulator.admin.add_key(new, balance=5.0)
    rot_env.stage(new)
    before = rot_env.current_version()

    run = run_rotation(
        rot_env, inv, {"key_rotation_unattended": True}, token=rot_env.rotator_token()
    )

    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "awaiting_revocation"
    assert "AWAITING REVOCATION" in run.status["message"]
    record = rot_env.record()
    assert record["rotation_state"] == "awaiting_revocation"
    assert record["previous_version"] == str(before)
    assert record["new_version"] == str(before + 1)
    assert record["actor"].startswith("token")
    assert {"started_at", "converged_at", "rotation_id"} <= record.keys()
    assert rot_env.current_key() == new
    assert not rot_env.staged_exists(), "the promoted staged key must be deleted"
    # ... and its path keeps what provisioning set: check-and-set stays required on it.
    assert rot_env.staged_settings() == STAGED_PATH_SETTINGS
    # The record (and the staged key's deletion) waited until the workers were nudged: an
    # election right after the put holds up the bookkeeping, not the nudge.
    put, nudge, recorded = (
        run.output.find(f"TASK [key_rotation : {task}")
        for task in (
            "Write the new key with check-and-set",
            "Reload the worker so it reads the new version now",
            "Record the rotation, which the put left until the workers were nudged",
        )
    )
    assert -1 < put < nudge < recorded, (put, nudge, recorded)
    assert {w.health()["key_version"] for w in workers} == {before + 1}
    # Converged means the provider accepted the new key from every worker, circuit closed.
    assert {w.health()["provider_accepted_version"] for w in workers} == {before + 1}
    assert {w.health()["circuit"] for w in workers} == {"closed"}
    assert set(run.status["worker_convergence_seconds"]) == {w.name for w in workers}
    window = 2.0 * 1.1 + 8
    assert 0 <= run.status["put_to_converged_seconds"] <= window
    print(
        "put->converged",
        run.status["put_to_converged_seconds"],
        "put->prompt",
        run.status["put_to_prompt_seconds"],
        "per worker",
        run.status["worker_convergence_seconds"],
    )

    # The operator revokes the old key at the provider, then confirms with a second run.
    rot_env.emulator.admin.revoke_key(rot_env.old_key)
    rid = record["rotation_id"]
    assert f"-e key_rotation_confirm_revoked={rid}" in run.status["message"]
    done = run_rotation(
        rot_env,
        inv,
        {"key_rotation_confirm_revoked": rid},
        token=rot_env.rotator_token(),
    )

    assert done.rc == 0, done.output[-3000:]
    assert done.status["outcome"] == "complete"
    record = rot_env.record()
    assert record["rotation_state"] == "complete"
    assert "confirmed_at" in record
    versions = rot_env.metadata()["versions"]
    assert versions[str(before)]["destroyed"] is True
    assert versions[str(before + 1)]["destroyed"] is False
    with pytest.raises(hvac.exceptions.InvalidPath):
        rot_env.read(before)
    assert "old key rejected by the provider: True" in done.status["message"]
    assert {w.health()["key_version"] for w in workers} == {before + 1}
    # The stager stages the next key as docs/scheduled-rotation.md says (check-and-set 0); a
    # write without check-and-set is refused, as on a freshly provisioned path.
    with pytest.raises(hvac.exceptions.InvalidRequest, match="check-and-set"):
        rot_env.admin.secrets.kv.v2.create_or_update_secret(
            rot_env.staged_path, {"api_key": rot_env.next_key()}, mount_point="secret"
        )
    rot_env.stage(rot_env.next_key())
    assert rot_env.staged_exists()


def test_check_mode_shows_the_plan_and_changes_nothing(rot_env: RotEnv, start_workers):
    """--check lists what would be written and which workers would be asked; Vault is unchanged."""
    workers = start_workers(1)
    inv = write_inventory(rot_env, workers)
    new = rot_env.next_key()
    before = rot_env.metadata()

    run = run_rotation(
        rot_env, inv, {"key_rotation_new_key": new}, token=rot_env.rotator_token(), check=True
    )

    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "check"
    assert f"Would write ***{new[-4:]} as" in run.stdout
    assert f"poll /healthz of {workers[0].name}" in run.stdout
    after = rot_env.metadata()
    assert after["current_version"] == before["current_version"]
    assert after.get("custom_metadata") == before.get("custom_metadata")
    assert rot_env.current_key() == rot_env.old_key


def _fixed_wait_rotation(rot_env: RotEnv):
    """An inventory without workers in the no-poll mode (1 s margin) and a new key the
    provider knows."""
    inv = write_inventory(
        rot_env, [], {"key_rotation_wait_mode": "fixed", "key_rotation_window_margin": 1}
    )
    new = rot_env.next_key()
    return inv, new


def test_no_workers_fixed_wait_mode_waits_the_window(rot_env: RotEnv):
    """The no-poll mode never contacts workers and waits interval x (1 + jitter) + margin."""
    inv, new = _fixed_wait_rotation(rot_env)

    run = run_unattended(rot_env, inv, {"key_rotation_new_key": new})

    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "awaiting_revocation"
    assert run.status["window_seconds"] == 4  # ceil(2 x 1.1 + 1)
    assert run.status["put_to_converged_seconds"] >= 4
    assert rot_env.current_key() == new


def test_emergency_rotation_revoke_first_then_one_shot_with_confirmation(
    rot_env: RotEnv, start_workers
):
    """Exposed key: revoked at the provider first, then one run rotates and finalizes."""
    workers = start_workers(2)
    inv = write_inventory(rot_env, workers)
    rot_env.emulator.admin.revoke_key(rot_env.old_key)
    new = rot_env.next_key()
    before = rot_env.current_version()

    run = run_rotation(
        rot_env,
        inv,
        {"key_rotation_new_key": new, "key_rotation_confirm_revoked": rot_env.name},
        token=rot_env.rotator_token(),
    )

    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "complete"
    assert rot_env.metadata()["versions"][str(before)]["destroyed"] is True
    assert {w.health()["key_version"] for w in workers} == {before + 1}
    assert {w.health()["status"] for w in workers} == {"ok"}


def test_run_without_a_terminal_never_blocks_at_the_prompt(rot_env: RotEnv):
    """No TTY and no mode variable (a scheduler that forgot key_rotation_unattended): the
    confirmation prompt does not wait; the run stops at awaiting_revocation all the same."""
    inv, new = _fixed_wait_rotation(rot_env)

    run = run_rotation(
        rot_env, inv, {"key_rotation_new_key": new}, token=rot_env.rotator_token(), timeout=120
    )

    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "awaiting_revocation"
    assert rot_env.record()["rotation_state"] == "awaiting_revocation"
    assert rot_env.current_key() == new
