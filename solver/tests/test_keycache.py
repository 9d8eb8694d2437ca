import asyncio

import pytest

from captcha_solver.keycache import KeyCache, KeyUnavailable
from captcha_solver.metrics import new_metrics
from captcha_solver.secret import Secret
from captcha_solver.vault import VaultAuthError, VaultUnavailable

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


class FailingVault(FakeVault):
    """A FakeVault whose reads raise ``failure`` while it is set (each counts as a read)."""

    failure: Exception | None = None

    def read_kv(self, mount, path, *, prompt=False):
        if self.failure is not None:
            self.reads += 1
            raise self.failure
        return super().read_kv(mount, path)


def _loaded_cache(tmp_path, clock, vault_class=FakeVault, **over):
    """A cache that has read one key from its vault: (cache, vault, key)."""
    key = new_key()
    vault = vault_class({"api_key": key})
    cache = _cache(tmp_path, vault, clock, **over)
    asyncio.run(cache.refresh("test"))
    return cache, vault, key


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
    cache, vault, key = _loaded_cache(tmp_path, clock, vault__max_staleness=10.0)
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
    cache, vault, key = _loaded_cache(tmp_path, clock, provider__circuit_cooldown=30.0)
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
    cache, _vault, key = _loaded_cache(tmp_path, clock, provider__circuit_cooldown=30.0)
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
    cache, vault, key = _loaded_cache(tmp_path, clock, provider__circuit_cooldown=300.0)
    new = new_key()
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
    cache, _vault, _key = _loaded_cache(tmp_path, clock, provider__circuit_cooldown=10.0)
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
    cache, vault, _key = _loaded_cache(tmp_path, clock, FailingVault, vault__max_staleness=10.0)
    vault.failure = VaultAuthError("AppRole login at 'approle' refused: invalid secret id")
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
    vault = FailingVault({"api_key": key})
    vault.failure = KeyError("data")  # e.g. an unexpected response shape
    cache = _cache(tmp_path, vault, vault__refresh_interval=0.05)

    async def scenario():
        cache.start()
        await wait_for(lambda: vault.reads >= 2, within=3)
        vault.failure = None
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


def _vault_down_cache(tmp_path, clock, nudge_retry_window):
    """A loaded cache (kit retry timings, no jitter) whose Vault is now down: (cache, vault)."""
    cache, vault, _ = _loaded_cache(
        tmp_path,
        clock,
        FailingVault,
        vault__retry_delay=0.5,
        vault__nudge_retry_window=nudge_retry_window,
        vault__refresh_jitter=0.0,
        vault__refresh_interval=300.0,
    )
    vault.failure = VaultUnavailable("all addresses down")
    return cache, vault


def test_a_nudged_worker_retries_a_failed_read_promptly_for_the_window_only(tmp_path):
    """After a SIGHUP (the rotation's nudge) a failed read is retried every retry_delay
    (+-50 %), not on the growing backoff, for nudge_retry_window seconds; then, and without a
    nudge, and once a read has answered, the backoff grows again (a long outage must not see
    every worker retrying at once)."""
    clock = Clock()
    cache, vault = _vault_down_cache(tmp_path, clock, nudge_retry_window=30.0)
    for _ in range(4):
        assert not asyncio.run(cache.refresh("interval"))
    backoff = cache._next_delay()
    assert backoff == pytest.approx(0.5 * 2**4 + 0.05), "not nudged: the growing backoff"

    cache.request_refresh("sighup")
    prompt = [cache._next_delay() for _ in range(200)]
    assert all(0.25 <= d <= 0.75 for d in prompt), (min(prompt), max(prompt))
    assert max(prompt) - min(prompt) > 0.2, "the retries of a nudged fleet are spread"

    clock.now += 31  # past the window: back to the backoff
    assert cache._next_delay() == pytest.approx(backoff)

    cache.request_refresh("sighup")
    vault.failure = None
    assert asyncio.run(cache.refresh("sighup"))  # answered: the nudge is spent
    vault.failure = VaultUnavailable("all addresses down")
    assert not asyncio.run(cache.refresh("interval"))
    assert cache._next_delay() == pytest.approx(0.5 * 2 + 0.05)

    off, _ = _vault_down_cache(tmp_path, clock, nudge_retry_window=0.0)
    assert not asyncio.run(off.refresh("interval"))
    off.request_refresh("sighup")
    assert off._next_delay() == pytest.approx(0.5 * 2 + 0.05), "window 0: no difference"


def test_only_a_nudged_read_is_asked_for_promptly(tmp_path):
    """The read after a SIGHUP is made with prompt=True (steady pauses in the Vault client)
    until one answers; the interval reads are not."""

    prompts: list[bool] = []

    class Recording(FailingVault):
        def read_kv(self, mount, path, *, prompt=False):
            prompts.append(prompt)
            return super().read_kv(mount, path, prompt=prompt)

    cache, vault, _ = _loaded_cache(tmp_path, Clock(), Recording)
    asyncio.run(cache.refresh("interval"))
    vault.failure = VaultUnavailable("all addresses down")
    cache.request_refresh("sighup")
    asyncio.run(cache.refresh("sighup"))
    vault.failure = None
    asyncio.run(cache.refresh("sighup"))
    asyncio.run(cache.refresh("interval"))
    assert prompts == [False, False, True, True, False]


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


# ---------------------------------------------------------------- the provider's word on a version


class Balance:
    """A scripted getbalance: the keys it accepts, codes to answer first, the keys it was asked."""

    def __init__(self, accepted: set[str], errors: list[str] | None = None) -> None:
        self.accepted = accepted
        self.errors = list(errors or [])
        self.asked: list[str] = []

    async def __call__(self, key: Secret) -> float:
        from captcha_solver.provider import ProviderError

        self.asked.append(key.reveal())
        if self.errors:
            raise ProviderError(self.errors.pop(0))
        if key.reveal() not in self.accepted:
            raise ProviderError("ERROR_KEY_DOES_NOT_EXIST")
        return 5.0


def _checked_cache(tmp_path, vault, balance, **over):
    cfg = make_config(tmp_path, **over)
    return KeyCache(cfg.vault, cfg.provider, vault, new_metrics(), balance_check=balance)


def test_each_new_version_is_checked_at_the_provider(tmp_path):
    """A version the worker picks up is checked once (getbalance): accepted -> its number is
    provider_accepted_version; rejected -> provider_check says so, the accepted version stays
    the last good one, and the circuit is left as it was (a solve decides that)."""
    good, bad, fixed = new_key(), new_key(), new_key()
    vault = FakeVault({"api_key": good}, version=1)
    balance = Balance({good, fixed})
    cache = _checked_cache(tmp_path, vault, balance, vault__refresh_interval=60.0)

    async def scenario():
        cache.start()
        await wait_for(lambda: cache.health()["provider_accepted_version"] == 1, within=3)
        health = cache.health()
        assert health["provider_check"] == {"version": 1, "result": "accepted", "code": None}
        vault.write({"api_key": bad})
        cache.request_refresh("sighup")
        await wait_for(lambda: cache.health()["provider_check"]["result"] == "rejected", within=3)
        health = cache.health()
        assert health["key_version"] == 2
        assert health["provider_check"] == {
            "version": 2,
            "result": "rejected",
            "code": "ERROR_KEY_DOES_NOT_EXIST",
        }
        assert health["provider_accepted_version"] == 1
        assert health["circuit"] == "closed"
        vault.write({"api_key": fixed})
        cache.request_refresh("sighup")
        await wait_for(lambda: cache.health()["provider_accepted_version"] == 3, within=3)
        await cache.stop()

    asyncio.run(scenario())
    assert balance.asked == [good, bad, fixed]
    assert not any(k in repr(cache.health()) for k in (good, bad, fixed))


def test_a_check_that_fails_is_retried_and_a_sighup_checks_again(tmp_path):
    """A network error is retried with the provider backoff; a rejected key is asked again on
    the next SIGHUP (the rotation's nudge), not before the circuit cool-down otherwise."""
    key = new_key()
    vault = FakeVault({"api_key": key})
    balance = Balance(set(), errors=["NETWORK"])
    cache = _checked_cache(
        tmp_path, vault, balance, vault__refresh_interval=60.0, provider__circuit_cooldown=60.0
    )

    async def scenario():
        cache.start()
        await wait_for(lambda: len(balance.asked) == 2, within=3)  # NETWORK, then rejected
        await wait_for(lambda: cache.health()["provider_check"]["result"] == "rejected", within=3)
        await asyncio.sleep(0.2)
        assert len(balance.asked) == 2  # no hammering of a rejected key
        balance.accepted.add(key)  # e.g. the worker's address was allowed at the provider
        cache.request_refresh("sighup")
        await wait_for(lambda: cache.health()["provider_accepted_version"] == 1, within=3)
        await cache.stop()

    asyncio.run(scenario())


def test_an_accepted_submit_counts_as_the_providers_word(tmp_path):
    """Without the loop nothing is checked (pending); a task the provider took with the key
    marks its version accepted."""
    key = new_key()
    vault = FakeVault({"api_key": key}, version=7)
    cache = _checked_cache(tmp_path, vault, Balance(set()))
    asyncio.run(cache.refresh("test"))
    assert cache.health()["provider_check"] == {"version": 7, "result": "pending", "code": None}
    assert cache.health()["provider_accepted_version"] is None
    cache.report_accepted(Secret(new_key()))  # not this version's key: no effect
    assert cache.health()["provider_accepted_version"] is None
    cache.report_accepted(Secret(key))
    assert cache.health()["provider_accepted_version"] == 7
    assert cache.health()["provider_check"]["result"] == "accepted"
