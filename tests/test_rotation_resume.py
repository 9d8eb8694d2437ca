"""Resume after interruptions, rollback, and a concurrent second rotation."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time

import hvac
import pytest
from ansible_collections.captcha_kit.vault.plugins.module_utils.rotation import (
    Rotation,
    RotationRefused,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils.rotation_actions import mark, put
from ansible_collections.captcha_kit.vault.plugins.modules.key_rotation_state import OPTIONS

from testkit.creds import assert_no_secrets, new_key
from testkit.playbook import start_argv
from testkit.rotation import (
    RotEnv,
    rotation_argv,
    rotation_env,
    run_rotation,
    run_unattended,
    write_inventory,
)

FIXED = {"key_rotation_wait_mode": "fixed", "key_rotation_window_margin": 0}


def test_resume_after_the_run_is_killed_after_the_put(rot_env: RotEnv):
    """Killed while waiting (after the put): the rerun continues, no second new version."""
    key = rot_env.next_key()
    rot_env.stage(key)
    before = rot_env.current_version()
    slow = write_inventory(
        rot_env, [], {"key_rotation_wait_mode": "fixed", "key_rotation_window_margin": 120}
    )
    argv, _ = rotation_argv(rot_env, slow, {"key_rotation_unattended": True}, check=False)
    env = rotation_env(rot_env, rot_env.rotator_token())
    proc = start_argv(argv, env)
    try:
        deadline = time.monotonic() + 90
        while rot_env.current_version() == before:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the put never happened"
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        assert_no_secrets(proc.stdout.read().decode(), rot_env.secrets)
    record = rot_env.record()
    assert record["rotation_state"] == "propagating"
    assert not rot_env.staged_exists()

    fast = write_inventory(rot_env, [], FIXED)
    run = run_unattended(rot_env, fast, {"key_rotation_key_source": "staged"})

    assert run.rc == 0, run.output[-3000:]
    assert "resuming rotation " + record["rotation_id"] in run.stdout
    assert run.status["outcome"] == "awaiting_revocation"
    assert rot_env.current_version() == before + 1, "a resumed rotation must not write again"
    assert rot_env.record()["rotation_id"] == record["rotation_id"]
    assert rot_env.record()["rotation_state"] == "awaiting_revocation"

    # The same key given again as a variable is also a resume, not a new rotation.
    again = run_unattended(rot_env, fast, {"key_rotation_new_key": key})
    assert again.rc == 0, again.output[-3000:]
    assert rot_env.current_version() == before + 1


def test_resume_when_the_record_was_written_but_not_the_key(rot_env: RotEnv):
    """Interrupted between recording and writing: the rerun writes once, same rotation id."""
    key = rot_env.next_key()
    before = rot_env.current_version()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {
        "rotation_id": f"{rot_env.name}-interrupted",
        "rotation_state": "propagating",
        "previous_version": str(before),
        "new_version": str(before + 1),
        "started_at": started,
        "actor": "test",
    }
    rot_env.admin.adapter.post(
        f"/v1/secret/metadata/{rot_env.key_path}", json={"custom_metadata": record}
    )
    inv = write_inventory(rot_env, [], FIXED)
    run = run_unattended(rot_env, inv, {"key_rotation_new_key": key})
    assert run.rc == 0, run.output[-3000:]
    assert rot_env.current_version() == before + 1
    assert rot_env.current_key() == key
    after = rot_env.record()
    assert after["rotation_id"] == record["rotation_id"]
    assert after["started_at"] == started
    assert after["rotation_state"] == "awaiting_revocation"


def test_resume_when_the_key_was_written_but_not_the_record(rot_env: RotEnv):
    """Cut off between the check-and-set write and the record: the version names its rotation,
    so the rerun resumes that rotation (no second version) and records it."""
    key = rot_env.next_key()
    before = rot_env.current_version()
    rotation_id = f"{rot_env.name}-cut-off"
    rot_env.admin.secrets.kv.v2.create_or_update_secret(
        rot_env.key_path,
        secret={"api_key": key, "rotation_id": rotation_id},
        cas=before,
        mount_point="secret",
    )
    inv = write_inventory(rot_env, [], FIXED)
    run = run_unattended(rot_env, inv, {"key_rotation_key_source": "staged"})
    assert run.rc == 0, run.output[-3000:]
    assert "resuming rotation " + rotation_id in run.stdout
    assert rot_env.current_version() == before + 1
    after = rot_env.record()
    assert (after["rotation_id"], after["rotation_state"]) == (rotation_id, "awaiting_revocation")
    assert (after["previous_version"], after["new_version"]) == (str(before), str(before + 1))


def test_stale_worker_fails_the_wait_then_the_rerun_resumes(rot_env: RotEnv, start_workers):
    """A worker that does not move within the window is named; no prompt; a rerun resumes."""
    good, lagging = start_workers(2)
    lagging.stop()
    lagging.settings["vault"]["refresh_interval"] = 3600.0
    lagging.start()
    key = rot_env.next_key()
    before = rot_env.current_version()
    inv = write_inventory(rot_env, [good, lagging], {"key_rotation_window_margin": 2})

    run = run_unattended(rot_env, inv, {"key_rotation_new_key": key})

    assert run.rc == 2
    assert run.status["outcome"] == "failed"
    assert lagging.name in run.status["message"]
    assert good.name + " (" not in run.status["message"]
    assert "stays propagating" in run.status["message"]
    assert "AWAITING" not in run.output
    assert rot_env.record()["rotation_state"] == "propagating"

    lagging.stop()
    lagging.settings["vault"]["refresh_interval"] = 2.0
    lagging.start()
    rerun = run_rotation(
        rot_env, inv, {"key_rotation_unattended": True}, token=rot_env.rotator_token()
    )
    assert rerun.rc == 0, rerun.output[-3000:]
    assert rerun.status["outcome"] == "awaiting_revocation"
    assert rot_env.current_version() == before + 1


def test_rollback_restores_the_previous_key_on_every_worker(rot_env: RotEnv, start_workers):
    """Rollback before finalize writes the old data back (new version) and workers follow."""
    workers = start_workers(2)
    key = rot_env.next_key()
    before = rot_env.current_version()
    inv = write_inventory(rot_env, workers)
    token = rot_env.rotator_token()
    first = run_rotation(
        rot_env, inv, {"key_rotation_new_key": key, "key_rotation_unattended": True}, token=token
    )
    assert first.status["outcome"] == "awaiting_revocation", first.output[-3000:]

    run = run_rotation(rot_env, inv, {"key_rotation_rollback": True}, token=token)

    assert run.rc == 0, run.output[-3000:]
    assert run.status["outcome"] == "rolled_back"
    assert rot_env.current_version() == before + 2
    assert rot_env.current_key() == rot_env.old_key
    assert rot_env.record()["rotation_state"] == "rolled_back"
    assert {w.health()["key_version"] for w in workers} == {before + 2}
    # A second rollback is a no-op, and the bad key cannot be rotated to again.
    again = run_rotation(rot_env, inv, {"key_rotation_rollback": True}, token=token)
    assert again.rc == 0
    assert again.status["outcome"] == "noop"
    bad = run_rotation(rot_env, inv, {"key_rotation_new_key": key}, token=token)
    assert bad.rc == 2
    assert f"still held in Vault as version {before + 1}" in bad.status["message"]


def test_second_rotation_is_refused_while_one_is_pending(rot_env: RotEnv):
    """A rotation awaiting revocation blocks another key until confirmed or rolled back."""
    first_key, second_key = new_key(), new_key()
    rot_env.secrets += [first_key, second_key]
    for k in (first_key, second_key):
        rot_env.emulator.admin.add_key(k)
    inv = write_inventory(rot_env, [], FIXED)
    token = rot_env.rotator_token()
    first = run_rotation(
        rot_env,
        inv,
        {"key_rotation_new_key": first_key, "key_rotation_unattended": True},
        token=token,
    )
    assert first.status["outcome"] == "awaiting_revocation", first.output[-3000:]
    version = rot_env.current_version()

    second = run_rotation(rot_env, inv, {"key_rotation_new_key": second_key}, token=token)

    assert second.rc == 2
    assert "Another rotation is in progress" in second.status["message"]
    assert rot_env.current_version() == version
    assert rot_env.current_key() == first_key


def test_two_rotations_started_at_once_write_one_version(rot_env: RotEnv):
    """Two runs racing with different keys: check-and-set lets exactly one write."""
    keys = [new_key(), new_key()]
    rot_env.secrets += keys
    for k in keys:
        rot_env.emulator.admin.add_key(k)
    before = rot_env.current_version()
    inv = write_inventory(rot_env, [], FIXED)
    token = rot_env.rotator_token()
    env = rotation_env(rot_env, token)
    procs = []
    for k in keys:
        argv, status = rotation_argv(
            rot_env, inv, {"key_rotation_new_key": k, "key_rotation_unattended": True}, False
        )
        procs.append(
            (
                start_argv(argv, env),
                status,
            )
        )
    results = []
    for proc, status in procs:
        out = proc.communicate(timeout=300)[0].decode()
        assert_no_secrets(out, rot_env.secrets)
        results.append((proc.returncode, json.loads(status.read_text())))
    assert sorted(rc for rc, _ in results) == [0, 2], results
    assert rot_env.current_version() == before + 1
    winner = next(s for rc, s in results if rc == 0)
    loser = next(s for rc, s in results if rc == 2)
    assert winner["outcome"] == "awaiting_revocation"
    assert (
        "Concurrent rotation refused" in loser["message"]
        or "Another rotation is in progress" in loser["message"]
    )
    assert rot_env.current_key() in keys
    assert rot_env.record()["rotation_id"] == winner["rotation_id"]


def _loaded_put(rot_env: RotEnv, key: str, rotation_id: str) -> Rotation:
    """A rotator's ``put`` of ``key`` as the module prepares it: the key path read, not yet
    written (the module's own code, in this process, against the test OpenBao)."""
    params = {name: spec.get("default") for name, spec in OPTIONS.items()}
    params.update(
        env=rot_env.name, action="put", new_key=key, rotation_id=rotation_id, actor="test"
    )
    client = hvac.Client(
        url=rot_env.vault.addr, token=rot_env.rotator_token(), verify=str(rot_env.vault.ca_file)
    )
    rot = Rotation(client, params)
    rot.load()
    return rot


def test_the_run_that_loses_the_check_and_set_leaves_the_winners_record(rot_env: RotEnv):
    """Both runs read version n; the first puts n+1, then the second, still holding what it read,
    puts. The second is refused and writes nothing: not the key, not the record. (The CI race of
    the test above: the loser wrote its record over the winner's, then lost the check-and-set,
    and the winner failed at mark on a record naming the loser.)"""
    keys = [rot_env.next_key(), rot_env.next_key()]
    before = rot_env.current_version()
    first = _loaded_put(rot_env, keys[0], f"{rot_env.name}-first")
    second = _loaded_put(rot_env, keys[1], f"{rot_env.name}-second")

    put(first, False)
    with pytest.raises(RotationRefused, match="Concurrent rotation refused"):
        put(second, False)

    assert rot_env.current_version() == before + 1
    assert rot_env.current_key() == keys[0]
    record = rot_env.record()
    assert (record["rotation_id"], record["rotation_state"]) == (
        f"{rot_env.name}-first",
        "propagating",
    )
    first.refresh()
    mark(first, False)
    assert rot_env.record()["rotation_state"] == "awaiting_revocation"
