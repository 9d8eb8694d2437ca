"""One host with a refused secret-id must not lock its env out of Vault.

OpenBao and Vault lock an AppRole role-id after a few refused logins (user lockout: 5 within
15 minutes by default), and every worker of an env shares one role-id. Here the test server's
AppRole mount gets a short lockout (3 refusals, 10 s) and a worker retries with a wrong
secret-id for several windows while a healthy worker of the same role logs in again every few
seconds (a 2 s token, 8 s max TTL). The bad worker sends at most 2 refused logins per 12 s window
(its ``login_refusal_*`` settings, kept across a restart) and says why; the healthy one logs in
every time and stays healthy; no role-id is ever locked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import hvac
import pytest

from .conftest import APPROLE_MOUNT

# OpenBao takes the counter reset as lockout_counter_reset_duration; Vault's documented name is
# lockout_counter_reset. Both are sent.
SHORT_LOCKOUT = {
    "lockout_threshold": "3",
    "lockout_duration": "10s",
    "lockout_counter_reset": "10s",
    "lockout_counter_reset_duration": "10s",
}
DEFAULT_LOCKOUT = {
    "lockout_threshold": "5",
    "lockout_duration": "15m",
    "lockout_counter_reset": "15m",
    "lockout_counter_reset_duration": "15m",
}
WINDOW = 12.0  # the bad worker's login_refusal_window: longer than the server's counter reset
LIMIT = 2  # below the server's threshold of 3


def _admin(server) -> hvac.Client:
    return hvac.Client(url=server.addr, token=server.root_token(), verify=str(server.ca_file))


@pytest.fixture
def short_lockout(private_vault) -> Iterator[hvac.Client]:
    admin = _admin(private_vault)
    tune = f"/v1/sys/auth/{APPROLE_MOUNT}/tune"
    admin.adapter.post(tune, json={"user_lockout_config": SHORT_LOCKOUT})
    try:
        yield admin
    finally:
        admin.adapter.post(tune, json={"user_lockout_config": DEFAULT_LOCKOUT})


def _locked_users(admin: hvac.Client) -> int:
    data = (admin.adapter.get("/v1/sys/locked-users") or {}).get("data") or {}
    return sum(int(ns.get("counts", 0)) for ns in data.get("by_namespace") or [])


def _refusals(records: list[dict]) -> list[float]:
    """Times of the logins Vault refused (each refused login is logged once, by its caller)."""
    return [
        datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).timestamp()
        for r in records
        if "refused: invalid role or secret ID" in str(r.get("error", ""))
    ]


def test_a_host_with_a_refused_secret_id_never_locks_out_its_env(
    private_vault, worker_factory, short_lockout
):
    healthy = worker_factory(private_vault, token_ttl=2)
    healthy.start(vault={"refresh_interval": 0.5})
    bad = worker_factory(private_vault)
    (bad.dir / "role-id").write_text((healthy.dir / "role-id").read_text())
    bad.secret_id_file.write_text("not-the-secret-id-of-this-role\n")
    bad_settings = {
        "refresh_interval": 0.5,
        "retry_delay": 0.1,
        "login_refusal_limit": LIMIT,
        "login_refusal_window": WINDOW,
    }
    bad.start(wait=False, vault=bad_settings)
    statuses: list[int] = []
    locked: list[int] = []
    started = time.monotonic()
    restarted = False
    while time.monotonic() < started + 3 * WINDOW:
        statuses.append(healthy.healthz()[0])
        locked.append(_locked_users(short_lockout))
        if not restarted and time.monotonic() > started + 1.5 * WINDOW:
            # A restart (systemd after the startup timeout) must not forget the refusals.
            bad.stop()
            bad.start(wait=False, vault=bad_settings)
            restarted = True
        time.sleep(0.5)

    # The healthy worker logged in again and again, never refused, and stayed healthy.
    healthy_records = healthy.log_records()
    assert sum(r["msg"] == "vault login ok" for r in healthy_records) >= 4
    assert not _refusals(healthy_records)
    assert not [r for r in healthy_records if "permission denied" in str(r.get("error", ""))]
    assert set(statuses) == {200}
    assert set(locked) == {0}

    # The bad worker sent at most LIMIT refused logins in any WINDOW, held back the rest, said why.
    bad_records = bad.log_records()
    refused = sorted(_refusals(bad_records))
    assert len(refused) >= LIMIT
    for i, t in enumerate(refused):
        in_window = [u for u in refused[i:] if u - t < WINDOW - 0.5]
        assert len(in_window) <= LIMIT, refused
    assert any("AppRole login held back" in str(r.get("error", "")) for r in bad_records)
    status, health = bad.healthz()
    assert status == 503
    assert "held back" in health["error"] or "refused" in health["error"]
    assert 'vault_errors_total{kind="login_held_back"}' in bad.metrics()
