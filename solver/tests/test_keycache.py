import asyncio

import pytest

from captcha_solver.keycache import KeyCache, KeyUnavailable
from captcha_solver.metrics import new_metrics
from captcha_solver.secret import Secret
from captcha_solver.vault import VaultAuthError

from .helpers import FakeVault, make_config, new_key, wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cache(tmp_path, vault, clock=None, **over):
    cfg = make_config(tmp_path, **over)
    kwargs = {"clock": clock} if clock else {}
    return KeyCache(cfg.vault, cfg.provider, vault, new_metrics(), **kwargs)


def test_no_key_before_first_read(tmp_path):
    cache = _cache(tmp_path, FakeVault({"api_key": new_key()}))
    with pytest.raises(KeyUnavailable) as err:
        cache.current_key()
    assert err.value.reason == "no_key"
    assert cache.health()["status"] == "unhealthy"


def test_refresh_loads_key_version_and_rotation(tmp_path):
    key = new_key()
    vault = FakeVault(
        {"api_key": key}, version=4, custom_metadata={"rotation_state": "complete", "x": "y"}
    )
    cache = _cache(tmp_path, vault)
    assert asyncio.run(cache.refresh("test"))
    assert cache.current_key() == Secret(key)
    health = cache.health()
    assert health["status"] == "ok"
    assert health["key_version"] == 4
    assert health["key_fingerprint"] == "***" + key[-4:]
    assert health["rotation"] == {"rotation_state": "complete"}
    assert health["vault_reachable"] is True
    assert key not in repr(health)


def test_missing_api_key_is_an_error(tmp_path):
    cache = _cache(tmp_path, FakeVault({"other": "x"}))
    assert not asyncio.run(cache.refresh("test"))
    assert "api_key" in cache.health()["error"]


def test_interval_refresh_and_request_refresh(tmp_path):
    vault = FakeVault({"api_key": new_key()})
    cache = _cache(tmp_path, vault, vault__refresh_interval=0.1)

    async def scenario():
        cache.start()
        await wait_for(lambda: vault.reads >= 3, within=3)  # startup + two intervals
        await cache.stop()
        slow = _cache(tmp_path, vault, vault__refresh_interval=60.0)
        slow.start()
        await wait_for(lambda: slow.key_version == vault.version)
        new = new_key()
        vault.write({"api_key": new})
        before = vault.reads
        slow.request_refresh("sighup")
        await wait_for(lambda: vault.reads > before, within=1)
        await wait_for(lambda: slow.current_key() == Secret(new), within=1)
        await slow.stop()

    asyncio.run(scenario())


def test_vault_outage_keeps_key_until_max_staleness(tmp_path):
    clock = Clock()
    key = new_key()
    vault = FakeVault({"api_key": key})
    cache = _cache(tmp_path, vault, clock, vault__max_staleness=10.0)
    asyncio.run(cache.refresh("test"))
    vault.down = True
    clock.now += 4
    assert not asyncio.run(cache.refresh("test"))
    assert cache.current_key() == Secret(key)
    health = cache.health()
    assert health["status"] == "degraded"
    assert health["vault_reachable"] is False
    assert health["vault_stale_seconds"] == pytest.approx(4.0)
    clock.now += 7  # 11 s since the last confirmation
    with pytest.raises(KeyUnavailable) as err:
        cache.current_key()
    assert err.value.reason == "stale"
    assert cache.health()["status"] == "unhealthy"
    vault.down = False
    assert asyncio.run(cache.refresh("test"))
    assert cache.current_key() == Secret(key)
    assert cache.health()["status"] == "ok"


def test_rejected_key_replaced_by_vault_closes_nothing(tmp_path):
    old, new = new_key(), new_key()
    vault = FakeVault({"api_key": old})
    cache = _cache(tmp_path, vault)
    asyncio.run(cache.refresh("test"))
    vault.write({"api_key": new})
    replacement = asyncio.run(cache.report_rejected(Secret(old), "ERROR_KEY_DOES_NOT_EXIST"))
    assert replacement == Secret(new)
    assert not cache.circuit_open


def test_rejected_key_still_in_vault_opens_circuit_then_half_opens(tmp_path):
    clock = Clock()
    key = new_key()
    vault = FakeVault({"api_key": key})
    cache = _cache(tmp_path, vault, clock, provider__circuit_cooldown=30.0)
    asyncio.run(cache.refresh("test"))
    reads = vault.reads
    assert asyncio.run(cache.report_rejected(Secret(key), "ERROR_KEY_DOES_NOT_EXIST")) is None
    assert vault.reads == reads + 1  # refreshed at once
    assert cache.circuit_open
    with pytest.raises(KeyUnavailable) as err:
        cache.current_key()
    assert err.value.reason == "circuit_open"
    health = cache.health()
    assert health["circuit"] == "open"
    assert health["status"] == "unhealthy"
    clock.now += 31  # half-open: health checks do not take the probe ...
    assert cache.health()["circuit"] == "open"
    assert cache.current_key() == Secret(key)  # ... one caller gets the key as a probe ...
    with pytest.raises(KeyUnavailable):
        cache.current_key()  # ... and everyone else waits for its outcome
    assert cache.circuit_open
    cache.report_accepted(Secret(key))
    assert not cache.circuit_open
    assert cache.current_key() == Secret(key)
    assert cache.health()["status"] == "ok"


def test_failed_probe_reopens_the_circuit(tmp_path):
    clock = Clock()
    key = new_key()
    vault = FakeVault({"api_key": key})
    cache = _cache(tmp_path, vault, clock, provider__circuit_cooldown=30.0)
    asyncio.run(cache.refresh("test"))
    asyncio.run(cache.report_rejected(Secret(key), "ERROR_KEY_DOES_NOT_EXIST"))
    clock.now += 31
    probe = cache.current_key()
    assert asyncio.run(cache.report_rejected(probe, "ERROR_KEY_DOES_NOT_EXIST")) is None
    clock.now += 29
    with pytest.raises(KeyUnavailable) as err:
        cache.current_key()
    assert err.value.reason == "circuit_open"
    clock.now += 2
    assert cache.current_key() == Secret(key)  # the next probe


def test_new_key_in_vault_closes_open_circuit(tmp_path):
    clock = Clock()
    key, new = new_key(), new_key()
    vault = FakeVault({"api_key": key})
    cache = _cache(tmp_path, vault, clock, provider__circuit_cooldown=300.0)
    asyncio.run(cache.refresh("test"))
    asyncio.run(cache.report_rejected(Secret(key), "ERROR_WRONG_USER_KEY"))
    assert cache.circuit_open
    vault.write({"api_key": new})
    asyncio.run(cache.refresh("sighup"))
    assert not cache.circuit_open
    assert cache.current_key() == Secret(new)


def test_backup_keys_on_zero_balance(tmp_path):
    clock = Clock()
    primary, backup1, backup2 = new_key(), new_key(), new_key()
    vault = FakeVault({"api_key": primary, "backup_keys": [backup1, backup2, primary]})
    cache = _cache(tmp_path, vault, clock, provider__zero_balance_cooldown=60.0)
    asyncio.run(cache.refresh("test"))
    assert cache.current_key() == Secret(primary)
    assert cache.report_exhausted(Secret(primary), "ERROR_ZERO_BALANCE") == Secret(backup1)
    assert cache.health()["status"] == "degraded"
    assert cache.health()["key_fingerprint"] == "***" + backup1[-4:]
    assert cache.report_exhausted(Secret(backup1), "ERROR_ZERO_BALANCE") == Secret(backup2)
    assert cache.report_exhausted(Secret(backup2), "ERROR_ZERO_BALANCE") is None
    with pytest.raises(KeyUnavailable) as err:
        cache.current_key()
    assert err.value.reason == "keys_exhausted"
    clock.now += 61
    assert cache.current_key() == Secret(primary)


def test_banned_pauses_provider_calls(tmp_path):
    clock = Clock()
    vault = FakeVault({"api_key": new_key()})
    cache = _cache(tmp_path, vault, clock, provider__circuit_cooldown=10.0)
    asyncio.run(cache.refresh("test"))
    cache.report_banned("IP_BANNED")
    with pytest.raises(KeyUnavailable) as err:
        cache.current_key()
    assert err.value.reason == "ip_banned"
    clock.now += 11
    cache.current_key()


def test_concurrent_refreshes_share_one_read(tmp_path):
    vault = FakeVault({"api_key": new_key()})
    cache = _cache(tmp_path, vault)

    async def many():
        return await asyncio.gather(*(cache.refresh("x") for _ in range(50)))

    assert all(asyncio.run(many()))
    assert vault.reads == 1


def test_refused_login_counts_as_stale_then_fails_closed(tmp_path):
    """A revoked secret-id (Vault reachable, login refused) must not keep the key alive."""
    clock = Clock()
    key = new_key()

    class RefusingVault(FakeVault):
        refuse = False

        def read_kv(self, mount, path):
            if self.refuse:
                raise VaultAuthError("AppRole login at 'approle' refused: invalid secret id")
            return super().read_kv(mount, path)

    vault = RefusingVault({"api_key": key})
    cache = _cache(tmp_path, vault, clock, vault__max_staleness=10.0)
    asyncio.run(cache.refresh("test"))
    vault.refuse = True
    clock.now += 5
    assert not asyncio.run(cache.refresh("test"))
    health = cache.health()
    assert health["status"] == "degraded"
    assert health["vault_reachable"] is True
    assert "refused" in health["error"]
    clock.now += 6
    with pytest.raises(KeyUnavailable) as err:
        cache.current_key()
    assert err.value.reason == "stale"


def test_unexpected_vault_error_does_not_kill_the_refresh_loop(tmp_path):
    key = new_key()

    class OddVault(FakeVault):
        odd = True

        def read_kv(self, mount, path):
            if self.odd:
                self.reads += 1
                raise KeyError("data")  # e.g. an unexpected response shape
            return super().read_kv(mount, path)

    vault = OddVault({"api_key": key})
    cache = _cache(tmp_path, vault, vault__refresh_interval=0.05)

    async def scenario():
        cache.start()
        await wait_for(lambda: vault.reads >= 2, within=3)
        vault.odd = False
        await wait_for(lambda: cache.key_version == 1, within=3)
        await cache.stop()

    asyncio.run(scenario())
    assert cache.current_key() == Secret(key)


def test_refresh_delay_is_spread_by_the_jitter(tmp_path):
    """Each wait is interval x (1 +- jitter): within the bounds, and not all the same (so a fleet
    started together does not read Vault in lockstep)."""
    cache = _cache(tmp_path, FakeVault({"api_key": new_key()}), vault__refresh_interval=100.0)
    delays = [cache._next_delay() for _ in range(200)]
    assert all(90.0 <= d <= 110.0 for d in delays), (min(delays), max(delays))
    assert max(delays) - min(delays) > 10.0, (min(delays), max(delays))
    still = _cache(
        tmp_path,
        FakeVault({"api_key": new_key()}),
        vault__refresh_interval=100.0,
        vault__refresh_jitter=0.0,
    )
    assert {still._next_delay() for _ in range(20)} == {100.0}


def test_a_rejection_reads_vault_again_even_while_an_older_read_is_on_the_wire(tmp_path):
    """The interval read started before the provider refused the key (and before the operator
    put a new one) must not stand in for the re-read the refusal asks for: the cache gets the
    new key at once, the circuit stays closed, and the re-read counts as key_rejected."""
    old, new = new_key(), new_key()
    vault = FakeVault({"api_key": old})
    cfg = make_config(tmp_path)
    metrics = new_metrics()
    cache = KeyCache(cfg.vault, cfg.provider, vault, metrics)

    async def scenario() -> Secret | None:
        await cache.refresh("startup")
        vault.read_delay = 0.3
        interval = asyncio.ensure_future(cache.refresh("interval"))  # answer: the old key
        await asyncio.sleep(0.1)
        vault.write({"api_key": new})
        vault.read_delay = 0.0
        replacement = await cache.report_rejected(Secret(old), "ERROR_KEY_DOES_NOT_EXIST")
        await interval
        return replacement

    assert asyncio.run(scenario()) == Secret(new)
    assert cache.current_key() == Secret(new)
    assert not cache.circuit_open
    assert vault.reads == 3
    text = metrics.render()
    assert 'key_refreshes_total{reason="key_rejected",result="ok"} 1' in text
