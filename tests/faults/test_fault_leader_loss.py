"""Raft leader loss under solve load, and in the middle of a key rotation (3-node cluster,
workers configured with every node address)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time

import pytest

from testkit.creds import assert_no_secrets, new_key
from testkit.faults import (
    SESSION,
    Env,
    kill_leader_mid_run,
    provision,
    rotation_inventory,
    rotation_vars,
)
from testkit.loadgen import LoadGenerator
from testkit.net import wait_for
from testkit.paths import ROTATE
from testkit.playbook import ansible_env, playbook_argv, run_argv, start_argv
from testkit.tokens import token_with


def refreshed_since(worker, wall: float) -> bool:
    """The worker read its key from Vault after ``wall`` (epoch seconds)."""
    try:
        health = worker.health()
    except (OSError, ValueError):
        return False
    last = health.get("last_refresh")
    return bool(
        last
        and health.get("vault_reachable")
        and dt.datetime.fromisoformat(last).timestamp() > wall
    )


def kill_leader(cluster) -> str:
    leader = cluster.active_node()
    assert leader is not None, "no active node to kill"
    os.killpg(leader.pid(), signal.SIGKILL)
    return leader.addr


def test_leader_killed_under_load_no_solve_fails(ha, ha_envs, emulator, tmp_path):
    """SIGKILL of the active node under steady load: 0 failed solves; every worker reads from
    the new leader by itself (same process), and a key put afterwards reaches them."""
    env = Env(ha, ha_envs[0], emulator, tmp_path)
    with env.fleet(ha.addrs) as fleet:
        workers = fleet.start(3)
        pids = [w.pid for w in workers]
        load = LoadGenerator(fleet.urls, clients=4, duration=120, pause=0.05).start()
        try:
            time.sleep(2)
            killed_at = time.time()
            killed = kill_leader(ha)
            wait_for(lambda: ha.active_node() is not None, 60, "a new leader")
            for w in workers:
                wait_for(lambda w=w: refreshed_since(w, killed_at), 60, f"{w.name} to re-read")
            version = env.put_new_key()
            for w in workers:
                wait_for(lambda w=w: w.health().get("key_version") == version, 30, "the new key")
            time.sleep(1)
        finally:
            summary = load.summary()
        assert ha.active_node().addr != killed
        assert summary["attempted"] > 0
        assert summary["failed"] == 0, summary
        assert all(s["ok"] > 0 for s in summary["workers"].values())
        assert [w.pid for w in workers] == pids
        assert all(w.proc.poll() is None for w in workers)
    print(f"\nleader kill under load: attempted {summary['attempted']} failed {summary['failed']}")


@pytest.mark.slow_faults
def test_leader_killed_in_the_middle_of_a_rotation(ha, ha_envs, emulator, tmp_path):
    """The leader (the controller's VAULT_ADDR) is killed after the put, while the rotation
    waits for the workers: 0 failed solves, the run finishes at awaiting_revocation (or a
    rerun resumes it), the confirmation completes it, and a provisioning rerun passes."""
    env = Env(ha, ha_envs[1], emulator, tmp_path)
    old_key, before = env.key, env.current_version()
    leader = ha.active_node()
    others = [n.addr for n in ha.nodes if n is not leader]
    with env.fleet(ha.addrs) as fleet:
        workers = fleet.start(3)
        pids = [w.pid for w in workers]
        inventory = rotation_inventory(env, workers, tmp_path, vault_addr=leader.addr)
        key = new_key()
        env.keys.append(key)
        emulator.admin.add_key(key, balance=1000.0)
        vars_file, status_file = rotation_vars(
            env, tmp_path, {"key_rotation_new_key": key, "key_rotation_unattended": True}
        )
        rotator = token_with(ha, [f"captcha-rotator-{env.name}"])  # the rotator's rights only
        run_env = ansible_env(ha, token=rotator, addrs=others) | {"VAULT_ADDR": leader.addr}
        load = LoadGenerator(fleet.urls, clients=4, duration=240, pause=0.05).start()
        try:
            proc = start_argv(playbook_argv(ROTATE, inventory, vars_file), run_env)
            output = kill_leader_mid_run(
                proc, leader, lambda: env.current_version() > before, "the put", 240
            )
            assert_no_secrets(output, [key, old_key, ha.root_token()])
            status = json.loads(status_file.read_text()) if status_file.exists() else {}
            if proc.returncode != 0:  # the run gave up: a rerun must resume it
                rerun = run_argv(
                    playbook_argv(ROTATE, inventory, vars_file),
                    run_env | {"VAULT_ADDR": others[0]},
                    240,
                )
                assert "resuming rotation" in rerun.stdout, rerun.stdout[-3000:]
                assert rerun.returncode == 0, rerun.stdout[-3000:]
                status = json.loads(status_file.read_text())
            assert status["outcome"] == "awaiting_revocation", output[-3000:]
            assert env.current_version() == before + 1, "exactly one new version"
            assert {w.health()["key_version"] for w in workers} == {before + 1}

            emulator.admin.revoke_key(old_key)
            confirm_vars, confirm_status = rotation_vars(
                env, tmp_path, {"key_rotation_confirm_revoked": status["rotation_id"]}
            )
            done = run_argv(
                playbook_argv(ROTATE, inventory, confirm_vars),
                run_env | {"VAULT_ADDR": others[0]},
                240,
            )
            assert done.returncode == 0, done.stdout[-3000:]
            assert json.loads(confirm_status.read_text())["outcome"] == "complete"
            time.sleep(1)
        finally:
            summary = load.summary()
        assert summary["attempted"] > 0
        assert summary["failed"] == 0, summary
        assert [w.pid for w in workers] == pids
    meta = env.admin.secrets.kv.v2.read_secret_metadata(
        f"captchaai/{env.name}", mount_point="secret"
    )["data"]
    assert meta["custom_metadata"]["rotation_state"] == "complete"
    assert meta["versions"][str(before)]["destroyed"] is True
    ha.start()
    rerun = provision(ha, ha_envs, tmp_path, ha.addrs)
    assert rerun.rc == 0, rerun.output[-3000:]
    assert rerun.changed == 0
    print(
        f"\nleader kill mid-rotation ({SESSION}): attempted {summary['attempted']} "
        f"failed {summary['failed']}; first run rc {proc.returncode}"
    )
