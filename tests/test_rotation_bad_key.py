"""A rotation cannot confirm a key the workers cannot use (issue 13), against the real local
OpenBao, the CaptchaAI emulator and ``captcha-solver serve`` worker processes.

(a) the provider rejects the new key from the workers: the rotation stops before the revocation
    prompt, the old key stays held, the printed rollback command works;
(b) the staged key is changed between the plan's validation and the put: nothing is put;
(c) a confirmation must name the rotation awaiting it;
(d) a put whose answer was dropped after Vault applied it reports what Vault holds.
"""

from __future__ import annotations

import json
import shlex

from testkit.creds import assert_no_secrets, write_private
from testkit.playbook import BIN, run_argv
from testkit.rotation import (
    DroppingProxy,
    ProviderStandIn,
    RotEnv,
    rotation_env,
    run_rotation,
    run_unattended,
    write_inventory,
)
from tools.rotate_unattended import EXIT_FAILED, EXIT_FAILED_MID_ROTATION, exit_code

FIXED = {"key_rotation_wait_mode": "fixed", "key_rotation_window_margin": 0}


def test_a_key_the_provider_rejects_from_the_workers_stops_before_the_prompt(
    rot_env: RotEnv, start_workers
):
    """The controller's getbalance accepts the new key (e.g. its address is allowed at the
    provider), the workers' provider does not. Every worker reports the new version, but not
    one has the provider's word on it: no revocation prompt, the old key stays in Vault, and the
    rollback command the message prints brings every worker back to it."""
    workers = start_workers(2)
    new = rot_env.next_key(at_provider=False)  # unknown to the workers' provider
    before = rot_env.current_version()
    with ProviderStandIn(lambda: None) as controller_view:
        inv = write_inventory(rot_env, workers, {"key_rotation_provider_url": controller_view.url})
        run = run_unattended(rot_env, inv, {"key_rotation_new_key": new})
        assert controller_view.checks == 1

    print("\n--- what the operator saw ---\n" + run.status["message"])
    assert run.rc == 2, run.output[-3000:]
    assert run.status["outcome"] == "failed"
    assert run.status["stop_reason"] == "key_rejected"
    assert run.status["rotation_state"] == "propagating"
    assert exit_code(run.status) == EXIT_FAILED_MID_ROTATION  # tools/rotate-unattended: 3
    msg = run.status["message"]
    assert msg.startswith(
        f"KEY REJECTED: the provider refuses the new key ***{new[-4:]} (version {before + 1}) "
        "from worker(s) "
    )
    for w in workers:
        assert f"{w.name} (ERROR_KEY_DOES_NOT_EXIST)" in msg
    assert "stopped before the revocation prompt and stays propagating" in msg
    assert f"The old key ***{rot_env.old_key[-4:]} (version {before}) is still held" in msg
    assert "AWAITING REVOCATION" not in run.output
    assert "Now revoke the OLD key" not in run.output
    # The old key is still held, readable at its version, and the provider still takes it.
    assert rot_env.read(before)["api_key"] == rot_env.old_key
    assert rot_env.current_key() == new
    for w in workers:
        health = w.health()
        assert health["key_version"] == before + 1
        assert health["provider_check"]["result"] == "rejected"
        assert health["provider_accepted_version"] == before

    command = run.status["rollback_command"]
    # Both commands in full: the playbook's with the inventory in use, the wrapper's likewise.
    assert f"Roll back now with: {command} (unattended: " in msg
    assert msg.endswith(f"rotate-unattended --env {rot_env.name} -i {inv} --rollback)"), msg
    argv = shlex.split(command)
    assert argv[0] == "ansible-playbook"
    assert argv[-4:] == [
        "-e",
        f"key_rotation_env={rot_env.name}",
        "-e",
        "key_rotation_rollback=true",
    ]
    status_file = rot_env.tmp / "rollback-status.json"
    more = write_private(
        rot_env.tmp / "rollback-vars.json",
        json.dumps({"key_rotation_status_file": str(status_file)}),
    )
    proc = run_argv(
        [str(BIN / "ansible-playbook"), *argv[1:], "-e", f"@{more}"],
        rotation_env(rot_env, rot_env.rotator_token()),
    )
    assert_no_secrets(proc.stdout + proc.stderr, rot_env.secrets)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert json.loads(status_file.read_text())["outcome"] == "rolled_back"
    assert rot_env.current_version() == before + 2
    assert rot_env.current_key() == rot_env.old_key
    for w in workers:
        health = w.health()
        assert (health["key_version"], health["provider_accepted_version"]) == (
            before + 2,
            before + 2,
        )
        assert (health["status"], health["circuit"]) == ("ok", "closed")


def test_a_staged_key_changed_after_the_plan_is_not_put(rot_env: RotEnv):
    """The stager replaces the staged key while the controller validates it at the provider
    (delete and stage again, as docs/scheduled-rotation.md says): the put refuses the key it did
    not validate and nothing is written; the next run validates and puts the new staged key."""
    first, swapped = rot_env.next_key(), rot_env.next_key()
    rot_env.stage(first)

    def restage() -> None:
        if rot_env.current_key() == rot_env.old_key and not restaged:
            restaged.append(True)
            rot_env.admin.secrets.kv.v2.delete_metadata_and_all_versions(
                rot_env.staged_path, mount_point="secret"
            )
            rot_env.stage(swapped)

    restaged: list[bool] = []
    before = rot_env.snapshot()
    with ProviderStandIn(restage) as provider:
        inv = write_inventory(rot_env, [], FIXED | {"key_rotation_provider_url": provider.url})
        run = run_unattended(rot_env, inv, {"key_rotation_key_source": "staged"})
        assert restaged, "the staged key was not replaced during the provider check"

        assert run.rc == 2, run.output[-3000:]
        msg = run.status["message"]
        assert msg.startswith("The staged key changed after it was validated: plan checked ")
        assert "now holds v1@" in msg
        assert f"(***{swapped[-4:]}). Nothing put" in msg
        assert exit_code(run.status) == EXIT_FAILED  # before any change: 1
        assert rot_env.snapshot() == before, "nothing put, no record written"

        rerun = run_unattended(rot_env, inv, {"key_rotation_key_source": "staged"})
        assert rerun.rc == 0, rerun.output[-3000:]
        assert rerun.status["outcome"] == "awaiting_revocation"
        assert rot_env.current_key() == swapped
        assert provider.checks == 2


def test_a_confirmation_must_name_the_rotation_awaiting_it(rot_env: RotEnv):
    """With nothing awaiting, a named confirmation is refused; with a rotation awaiting, one
    naming another rotation or only the env is refused; naming it finishes it."""
    inv = write_inventory(rot_env, [], FIXED)
    token = rot_env.rotator_token()

    def refused(confirmation: str) -> str:
        """The message of a run confirming ``confirmation``, which must be refused (rc 2)."""
        run = run_rotation(
            rot_env, inv, {"key_rotation_confirm_revoked": confirmation}, token=token
        )
        assert run.rc == 2
        return run.status["message"]

    ghost = f"{rot_env.name}-20260101T000000Z-abcdef"
    before = rot_env.snapshot()
    assert refused(ghost) == (
        f"Confirmation refused: no rotation of {rot_env.name} is awaiting revocation (recorded "
        f"state: none; the confirmation names rotation {ghost}); nothing changed"
    )
    assert rot_env.snapshot() == before

    key = rot_env.next_key()
    first = run_unattended(rot_env, inv, {"key_rotation_new_key": key})
    assert first.status["outcome"] == "awaiting_revocation", first.output[-3000:]
    rid = first.status["rotation_id"]
    assert f"-e key_rotation_confirm_revoked={rid}" in first.status["message"]
    awaiting = rot_env.snapshot()

    assert refused(ghost) == (
        f"Confirmation refused: it names rotation {ghost}, but the rotation of {rot_env.name} in "
        f"progress is {rid} (awaiting_revocation); check which rotation you mean and pass "
        f"key_rotation_confirm_revoked={rid}; nothing changed"
    )
    assert refused(rot_env.name) == (
        f"Confirmation refused: a confirmation names the rotation it confirms; rotation {rid} of "
        f"{rot_env.name} is awaiting_revocation: pass key_rotation_confirm_revoked={rid}; "
        "nothing changed"
    )
    assert rot_env.snapshot() == awaiting, "nothing destroyed, still awaiting revocation"

    rot_env.emulator.admin.revoke_key(rot_env.old_key)
    done = run_rotation(rot_env, inv, {"key_rotation_confirm_revoked": rid}, token=token)
    assert done.rc == 0, done.output[-3000:]
    assert done.status["outcome"] == "complete"
    assert rot_env.record()["rotation_state"] == "complete"


def test_a_put_whose_answer_was_dropped_reports_what_vault_holds(rot_env: RotEnv):
    """The connection drops after Vault applied the check-and-set write; the client's retry
    then loses the check-and-set to that very write. The put reads back, recognises its own
    write and the rotation goes on: one new version, no "concurrent rotation"."""
    key = rot_env.next_key()
    before = rot_env.current_version()
    with DroppingProxy(rot_env.vault, "POST", f"/v1/secret/data/{rot_env.key_path}") as proxy:
        inv = write_inventory(rot_env, [], FIXED | {"captcha_kit_vault_addr": proxy.addr})
        run = run_unattended(rot_env, inv, {"key_rotation_new_key": key})
    assert proxy.dropped == 1
    writes = [
        f for f in proxy.forwarded if f[:2] == ("POST", f"/v1/secret/data/{rot_env.key_path}")
    ]
    assert [status for _, _, status in writes] == [200, 400], "applied, then the retry's cas lost"
    assert run.rc == 0, run.output[-3000:]
    assert "Concurrent rotation" not in run.output
    assert (
        f"the write landed although its answer was lost (InvalidRequest): read back version "
        f"{before + 1}, which holds this run's key ***{key[-4:]}"
    ) in " ".join(run.stdout.split()).replace("''", "'")  # the YAML callback wraps and quotes
    assert run.status["outcome"] == "awaiting_revocation"
    assert rot_env.current_version() == before + 1
    assert rot_env.current_key() == key
    assert rot_env.record()["rotation_id"] == run.status["rotation_id"]
