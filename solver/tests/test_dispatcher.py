import asyncio
import time

import pytest

from captcha_solver.dispatcher import Dispatcher, SolveError
from captcha_solver.keycache import KeyCache
from captcha_solver.metrics import new_metrics
from captcha_solver.provider import ProviderClient

from .helpers import FakeProvider, FakeVault, make_config, new_key, serve_fake_provider

PARAMS = {"googlekey": "g", "pageurl": "https://example.test/"}


async def _run(tmp_path, fake, vault, body, **over):
    async with serve_fake_provider(fake):
        cfg = make_config(tmp_path, provider__url=fake.url, **over)
        metrics = new_metrics()
        keys = KeyCache(cfg.vault, cfg.provider, vault, metrics)
        await keys.refresh("startup")
        provider = ProviderClient(cfg.provider, metrics)
        dispatcher = Dispatcher(cfg.provider, provider, keys, metrics)
        dispatcher.start()
        try:
            return await body(dispatcher, keys, metrics)
        finally:
            await dispatcher.stop()
            await provider.close()


async def _seconds(awaitable) -> float:
    """How long ``awaitable`` takes, by the event loop's clock."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await awaitable
    return loop.time() - started


def test_many_tasks_share_bulk_polls(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=2)

    async def body(dispatcher, keys, metrics):
        results = await asyncio.gather(
            *(dispatcher.solve("userrecaptcha", PARAMS) for _ in range(200))
        )
        assert dispatcher.in_flight == 0
        assert metrics.value("solves_total", outcome="solved") == 200
        return results

    results = asyncio.run(
        _run(tmp_path, fake, FakeVault({"api_key": key}), body, provider__poll_tick=0.05)
    )
    assert {r.token for r in results} == {f"token-{r.task_id}" for r in results}
    # 200 tasks, each needing 3 polls: far fewer than 600 res.php calls thanks to bulk polling.
    assert fake.res_calls() <= 12
    assert (
        max(len(r.get("ids", "").split(",")) for r in fake.requests if r["endpoint"] == "res") > 50
    )


def test_first_poll_delay_per_method(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=0)

    async def body(dispatcher, keys, metrics):
        slow = await _seconds(dispatcher.solve("userrecaptcha", PARAMS))
        fast = await _seconds(dispatcher.solve("base64", {"body": "x"}))
        return slow, fast

    slow, fast = asyncio.run(
        _run(
            tmp_path,
            fake,
            FakeVault({"api_key": key}),
            body,
            provider__first_poll_delay={"userrecaptcha": 0.6, "base64": 0.0},
        )
    )
    assert slow >= 0.6 - 0.005  # polls happen at the tick nearest their time (± half a tick)
    assert fast < 0.5
    assert fake.res_calls() == 2


def test_not_ready_task_is_polled_again_after_one_interval(tmp_path):
    """Polled near its first-poll delay, then one poll_interval later (not a tick later)."""
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=1)

    async def body(dispatcher, keys, metrics):
        return await _seconds(dispatcher.solve("userrecaptcha", PARAMS))

    elapsed = asyncio.run(
        _run(
            tmp_path,
            fake,
            FakeVault({"api_key": key}),
            body,
            provider__first_poll_delay={"userrecaptcha": 0.1},
            provider__poll_interval=0.4,
            provider__poll_tick=0.2,
        )
    )
    # First poll at once (0.1 s is within half a tick of now), the second one interval later
    # (0.4 s); a skipped tick would make it 0.6 s.
    assert 0.3 <= elapsed < 0.55
    assert fake.res_calls() == 2


def test_backoff_on_no_slot_and_server_errors(tmp_path):
    key = new_key()
    fake = FakeProvider(
        valid_keys={key},
        ready_after=0,
        submit_errors=["ERROR_NO_SLOT_AVAILABLE", "HTTP_502", "GARBAGE"],
        poll_status=[500],
    )

    async def body(dispatcher, keys, metrics):
        result = await dispatcher.solve("userrecaptcha", PARAMS)
        assert metrics.value("provider_errors_total", code="ERROR_NO_SLOT_AVAILABLE") == 1
        assert metrics.value("provider_errors_total", code="HTTP_5XX") == 2
        assert metrics.value("provider_errors_total", code="UNPARSEABLE") == 1
        return result

    result = asyncio.run(_run(tmp_path, fake, FakeVault({"api_key": key}), body))
    assert result.token.startswith("token-")
    assert sum(1 for r in fake.requests if r["endpoint"] == "in") == 4


def test_unsolvable_is_fatal(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=0, unsolvable=True)

    async def body(dispatcher, keys, metrics):
        with pytest.raises(SolveError) as err:
            await dispatcher.solve("userrecaptcha", PARAMS)
        assert err.value.code == "ERROR_CAPTCHA_UNSOLVABLE"
        assert err.value.kind == "fatal"
        assert metrics.value("solves_total", outcome="unsolvable") == 1

    asyncio.run(_run(tmp_path, fake, FakeVault({"api_key": key}), body))


def test_task_timeout(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=10_000)

    async def body(dispatcher, keys, metrics):
        with pytest.raises(SolveError) as err:
            await dispatcher.solve("userrecaptcha", PARAMS)
        assert err.value.kind == "timeout"
        assert dispatcher.pending == 0

    asyncio.run(_run(tmp_path, fake, FakeVault({"api_key": key}), body, provider__task_timeout=0.5))


def test_rejected_key_refreshes_and_resubmits_with_new_key(tmp_path):
    old, new = new_key(), new_key()
    fake = FakeProvider(valid_keys={old}, ready_after=3)
    vault = FakeVault({"api_key": old})

    async def body(dispatcher, keys, metrics):
        tasks = [asyncio.create_task(dispatcher.solve("userrecaptcha", PARAMS)) for _ in range(20)]
        await asyncio.sleep(0.1)  # submitted with the old key, polling
        vault.write({"api_key": new})
        fake.valid_keys = {new}  # old key revoked at the provider before workers noticed
        results = await asyncio.gather(*tasks)
        assert not keys.circuit_open
        return results

    results = asyncio.run(_run(tmp_path, fake, vault, body))
    assert len(results) == 20
    assert all(fake.tasks[r.task_id]["key"] == new for r in results)


def test_rejected_key_still_in_vault_opens_circuit_and_stops_calls(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys=set())
    vault = FakeVault({"api_key": key})

    async def body(dispatcher, keys, metrics):
        with pytest.raises(SolveError) as err:
            await dispatcher.solve("userrecaptcha", PARAMS)
        assert err.value.kind == "key_problem"
        calls = len(fake.requests)
        for _ in range(5):
            with pytest.raises(SolveError) as err:
                await dispatcher.solve("userrecaptcha", PARAMS)
            assert err.value.code == "CIRCUIT_OPEN"
        assert len(fake.requests) == calls  # no provider call while the circuit is open
        assert keys.circuit_open

    asyncio.run(_run(tmp_path, fake, vault, body, provider__circuit_cooldown=60.0))


def test_a_revoked_key_under_heavy_traffic_costs_few_bad_requests(tmp_path):
    """40 solves at once with a key the provider no longer knows, and a slow in.php: at most
    ``max_submits_in_flight`` submits are ever on the wire, and the ones waiting behind them
    never leave once the first refusal opened the circuit (CaptchaAI bans an address after
    about 20 bad-key requests a minute)."""
    key = new_key()
    fake = FakeProvider(valid_keys=set(), submit_delay=0.2)

    async def body(dispatcher, keys, metrics):
        results = await asyncio.gather(
            *(dispatcher.solve("userrecaptcha", PARAMS) for _ in range(40)),
            return_exceptions=True,
        )
        assert all(isinstance(r, SolveError) for r in results)
        assert keys.circuit_open
        return len([r for r in fake.requests if r["endpoint"] == "in"])

    submits = asyncio.run(
        _run(
            tmp_path,
            fake,
            FakeVault({"api_key": key}),
            body,
            provider__circuit_cooldown=60.0,
            provider__max_submits_in_flight=4,
        )
    )
    assert submits <= 4


def test_zero_balance_switches_to_backup_key(tmp_path):
    primary, backup = new_key(), new_key()
    fake = FakeProvider(valid_keys={primary, backup}, zero_balance={primary}, ready_after=0)
    vault = FakeVault({"api_key": primary, "backup_keys": [backup]})

    async def body(dispatcher, keys, metrics):
        return await dispatcher.solve("userrecaptcha", PARAMS)

    result = asyncio.run(_run(tmp_path, fake, vault, body))
    assert fake.tasks[result.task_id]["key"] == backup


def test_max_in_flight(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=3)

    async def body(dispatcher, keys, metrics):
        first = [asyncio.create_task(dispatcher.solve("userrecaptcha", PARAMS)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(SolveError) as err:
            await dispatcher.solve("userrecaptcha", PARAMS)
        assert err.value.kind == "busy"
        await asyncio.gather(*first)

    asyncio.run(_run(tmp_path, fake, FakeVault({"api_key": key}), body, provider__max_in_flight=2))


def test_key_rejected_while_polling_fails_every_task_of_that_key_at_once(tmp_path):
    """Tasks due at different ticks: one bad-key bulk poll, not one per tick."""
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=10_000)
    vault = FakeVault({"api_key": key})

    async def body(dispatcher, keys, metrics):
        tasks = []
        for _ in range(20):  # staggered: their polls fall on different ticks
            tasks.append(asyncio.create_task(dispatcher.solve("userrecaptcha", PARAMS)))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        before = fake.res_calls()
        fake.valid_keys = set()  # revoked at the provider, still the key in Vault
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, SolveError) and r.kind == "key_problem" for r in results)
        return fake.res_calls() - before

    bad_polls = asyncio.run(
        _run(
            tmp_path,
            fake,
            vault,
            body,
            provider__poll_interval=0.3,
            provider__poll_tick=0.05,
            provider__circuit_cooldown=60.0,
        )
    )
    assert bad_polls == 1


def test_slow_refresh_after_rejection_stays_within_task_timeout(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys=set())

    class SlowVault(FakeVault):
        slow = False

        def read_kv(self, mount, path, *, prompt=False):
            if self.slow:
                time.sleep(1.5)
            return super().read_kv(mount, path)

    vault = SlowVault({"api_key": key})

    async def body(dispatcher, keys, metrics):
        vault.slow = True
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(SolveError) as err:
            await dispatcher.solve("userrecaptcha", PARAMS)
        assert err.value.kind == "key_problem"
        return loop.time() - t0

    elapsed = asyncio.run(_run(tmp_path, fake, vault, body, provider__task_timeout=0.5))
    assert elapsed < 1.0


def test_solve_duration_histogram_by_method_and_outcome(tmp_path):
    """Every finished solve is observed once, labelled with its method and outcome."""
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=1)

    async def body(dispatcher, keys, metrics):
        await asyncio.gather(*(dispatcher.solve("userrecaptcha", PARAMS) for _ in range(3)))
        await dispatcher.solve("base64", {"body": "aGk="})
        fake.unsolvable = True
        with pytest.raises(SolveError):
            await dispatcher.solve("userrecaptcha", PARAMS)
        name = "solve_duration_seconds"
        assert metrics.histogram_count(name, method="userrecaptcha", outcome="solved") == 3
        assert metrics.histogram_count(name, method="base64", outcome="solved") == 1
        assert metrics.histogram_count(name, method="userrecaptcha", outcome="unsolvable") == 1
        text = metrics.render()
        labels = '{method="userrecaptcha",outcome="solved"}'
        count = f"captcha_solver_solve_duration_seconds_count{labels}"
        assert f"{count} 3" in text
        # One poll interval at least: the sum is real wall time, not zero.
        line = next(x for x in text.splitlines() if x.startswith(count.replace("_count", "_sum")))
        assert float(line.split()[-1]) > 0

    asyncio.run(_run(tmp_path, fake, FakeVault({"api_key": key}), body))


def test_solve_duration_method_labels_are_bounded(tmp_path, monkeypatch):
    """Past MAX_METHOD_LABELS distinct caller-sent methods, further ones count as "other"."""
    from captcha_solver import dispatcher as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "MAX_METHOD_LABELS", 2)
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=0)

    async def body(dispatcher, keys, metrics):
        for method in ("m1", "m2", "m3", "m4", "m1"):
            await dispatcher.solve(method, PARAMS)
        name = "solve_duration_seconds"
        assert metrics.histogram_count(name, method="m1", outcome="solved") == 2
        assert metrics.histogram_count(name, method="m2", outcome="solved") == 1
        assert metrics.histogram_count(name, method="other", outcome="solved") == 2
        assert metrics.histogram_count(name, method="m3", outcome="solved") == 0

    asyncio.run(_run(tmp_path, fake, FakeVault({"api_key": key}), body))
