"""Vault stopped for 60 s under steady solve load."""

from __future__ import annotations

import time

import pytest

from testkit.faults import Env
from testkit.loadgen import LoadGenerator

OUTAGE = 60.0


@pytest.mark.slow_faults
def test_vault_down_60s_under_load_no_solve_fails_and_workers_recover(
    solo_vault, solo_envs, emulator, tmp_path
):
    """While Vault is down the workers keep solving with the cached key and report it
    (degraded, vault_reachable false, growing vault_stale_seconds); when it is back they
    recover by themselves (same process) and pick up a key put afterwards."""
    env = Env(solo_vault, solo_envs[1], emulator, tmp_path)
    with env.fleet([solo_vault.addr]) as fleet:
        workers = fleet.start(2)
        pids = [w.pid for w in workers]
        load = LoadGenerator(fleet.urls, clients=4, duration=OUTAGE + 90, pause=0.1).start()
        stale: list[dict] = []
        try:
            time.sleep(2)
            solo_vault.stop()
            down_since = time.monotonic()
            try:
                while time.monotonic() - down_since < OUTAGE:
                    time.sleep(5)
                    stale.append({w.name: w.health() for w in workers})
                during = load.snapshot()
            finally:
                solo_vault.start()
            deadline = time.monotonic() + 60
            while not all(w.health().get("status") == "ok" for w in workers):
                assert time.monotonic() < deadline, [w.health() for w in workers]
                time.sleep(0.5)
            version = env.put_new_key()
            deadline = time.monotonic() + 30
            while {w.health().get("key_version") for w in workers} != {version}:
                assert time.monotonic() < deadline, "the workers did not pick up the new key"
                time.sleep(0.3)
            time.sleep(1)
        finally:
            summary = load.summary()
        last = stale[-1]
        for name, health in last.items():
            assert health["status"] == "degraded", (name, health)
            assert health["vault_reachable"] is False
            assert health["vault_stale_seconds"] >= OUTAGE - 15
            assert health["key_version"] == 1
        assert during["attempted"] > 0
        assert during["failed"] == 0, during
        assert summary["failed"] == 0, summary
        for w in workers:
            health = w.health()
            assert health["vault_reachable"] is True
            assert health["vault_stale_seconds"] == 0
        assert [w.pid for w in workers] == pids
        assert all(w.proc.poll() is None for w in workers)
    print(
        f"\nvault outage {OUTAGE:.0f}s: attempted {summary['attempted']} "
        f"(during the outage {during['attempted']}) failed {summary['failed']}"
    )
