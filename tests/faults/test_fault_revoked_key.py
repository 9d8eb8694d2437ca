"""The provider revokes the current key without warning (the emulator's admin call)."""

from __future__ import annotations

import re
import time

from testkit.faults import Env
from testkit.loadgen import LoadGenerator
from testkit.net import wait_for

BAD_KEY_BOUND = 4  # bad-key provider requests one worker may send (its tasks in flight)


def refreshes(metrics: str, reason: str) -> int:
    found = re.findall(
        rf'captcha_solver_key_refreshes_total\{{[^}}]*reason="{reason}"[^}}]*\}} (\d+)', metrics
    )
    return sum(int(n) for n in found)


def test_revoked_key_bounded_bad_requests_unhealthy_until_a_new_key(
    solo_vault, solo_envs, emulator, tmp_path
):
    """Each worker sends at most a few bad-key requests (no ban), re-reads Vault, reports
    unhealthy (503, circuit open) while Vault holds the revoked key, and solves again once a
    new key is put — without a restart."""
    env = Env(solo_vault, solo_envs[0], emulator, tmp_path)
    old_key = env.key
    with env.fleet([solo_vault.addr]) as fleet:
        workers = fleet.start(2)
        pids = [w.pid for w in workers]

        before = LoadGenerator(fleet.urls, clients=4, duration=3, pause=0.05).start()
        before.wait()
        healthy = before.summary()
        assert healthy["attempted"] > 0
        assert healthy["failed"] == 0, healthy

        during = LoadGenerator(fleet.urls, clients=4, duration=120, pause=0.1).start()
        try:
            time.sleep(1)
            emulator.admin.revoke_key(old_key)
            for w in workers:
                wait_for(lambda w=w: w.health().get("status") == "unhealthy", 30, f"{w.name} 503")
            states = [w.healthz() for w in workers]
            bad_then = emulator.admin.counters(old_key)["bad_key"]
            time.sleep(5)  # the load goes on; no worker may try the revoked key again
            states_later = [w.healthz() for w in workers]
            bad_later = emulator.admin.counters(old_key)["bad_key"]
        finally:
            revoked = during.summary()
        metrics = [w.metrics() for w in workers]

        for http_status, state in states + states_later:
            assert state["status"] == "unhealthy", state
            assert http_status == 503
            assert state["circuit"] == "open"
            assert state["key_version"] == 1
        assert bad_later == bad_then, "a worker kept sending the revoked key"
        assert 1 <= bad_later <= BAD_KEY_BOUND * len(workers)
        for text in metrics:
            assert refreshes(text, "key_rejected") >= 1, "the worker did not re-read Vault"
        counters = emulator.admin.counters(old_key)
        assert counters["ip_banned"] == 0
        assert emulator.admin.bans() == {}
        assert revoked["failed"] > 0  # solves failed while no valid key existed (expected)

        version = env.put_new_key()
        for w in workers:
            wait_for(lambda w=w: w.health().get("key_version") == version, 30, "the new key")
            assert w.health()["status"] == "ok"
        after = LoadGenerator(fleet.urls, clients=4, duration=3, pause=0.05).start()
        after.wait()
        recovered = after.summary()
        assert recovered["attempted"] > 0
        assert recovered["failed"] == 0, recovered
        assert [w.pid for w in workers] == pids
        assert all(w.proc.poll() is None for w in workers)
    print(
        f"\nrevoked key: before {healthy['attempted']}/{healthy['failed']} "
        f"during {revoked['attempted']}/{revoked['failed']} "
        f"after {recovered['attempted']}/{recovered['failed']} (attempted/failed); "
        f"bad-key requests {bad_later} from {len(workers)} workers"
    )
