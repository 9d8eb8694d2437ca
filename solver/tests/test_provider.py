import asyncio

import pytest
from aiohttp import web

from captcha_solver.metrics import new_metrics
from captcha_solver.provider import (
    ErrorKind,
    KeyProblem,
    ProviderClient,
    ProviderError,
    TaskResult,
    classify,
    parse_bulk,
)
from captcha_solver.secret import Secret

from .helpers import FakeProvider, make_config, new_key, serve_fake_provider, serve_posts


@pytest.mark.parametrize(
    ("code", "kind", "problem"),
    [
        ("ERROR_NO_SLOT_AVAILABLE", ErrorKind.RETRYABLE, None),
        ("HTTP_5XX", ErrorKind.RETRYABLE, None),
        ("UNPARSEABLE", ErrorKind.RETRYABLE, None),
        ("ERROR_KEY_DOES_NOT_EXIST", ErrorKind.KEY_PROBLEM, KeyProblem.REJECTED),
        ("ERROR_WRONG_USER_KEY", ErrorKind.KEY_PROBLEM, KeyProblem.REJECTED),
        ("ERROR_ZERO_BALANCE", ErrorKind.KEY_PROBLEM, KeyProblem.EXHAUSTED),
        ("IP_BANNED", ErrorKind.KEY_PROBLEM, KeyProblem.BANNED),
        ("ERROR_CAPTCHA_UNSOLVABLE", ErrorKind.FATAL, None),
        ("ERROR_PAGEURL", ErrorKind.FATAL, None),
    ],
)
def test_classify(code, kind, problem):
    assert classify(code) == (kind, problem)


def test_parse_bulk_forms():
    ids = ["1", "2", "3"]
    got = parse_bulk(ids, 1, "tok1|CAPCHA_NOT_READY|ERROR_CAPTCHA_UNSOLVABLE")
    assert got == {
        "1": TaskResult(True, token="tok1"),
        "2": TaskResult(False),
        "3": TaskResult(True, error="ERROR_CAPTCHA_UNSOLVABLE"),
    }
    assert parse_bulk(ids, 0, "CAPCHA_NOT_READY") == {i: TaskResult(False) for i in ids}
    assert parse_bulk(["9"], 1, "tok9") == {"9": TaskResult(True, token="tok9")}
    assert parse_bulk(["9"], 0, "CAPCHA_NOT_READY") == {"9": TaskResult(False)}
    assert parse_bulk(["9"], 0, "ERROR_CAPTCHA_UNSOLVABLE")["9"].error == "ERROR_CAPTCHA_UNSOLVABLE"
    assert parse_bulk(["1", "2"], 1, ["a", "CAPCHA_NOT_READY"])["1"].token == "a"
    assert parse_bulk(["1", "2"], 1, {"2": "b"}) == {
        "1": TaskResult(False),
        "2": TaskResult(True, token="b"),
    }
    with pytest.raises(ProviderError) as err:
        parse_bulk(ids, 0, "ERROR_KEY_DOES_NOT_EXIST")
    assert err.value.kind is ErrorKind.KEY_PROBLEM
    with pytest.raises(ProviderError) as err:
        parse_bulk(["9"], 0, "ERROR_KEY_DOES_NOT_EXIST")
    assert err.value.kind is ErrorKind.KEY_PROBLEM
    with pytest.raises(ProviderError, match="UNPARSEABLE"):
        parse_bulk(ids, 1, "a|b")


def test_submit_and_bulk_results_key_only_in_post_body(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=1)

    async def scenario():
        async with serve_fake_provider(fake):
            cfg = make_config(tmp_path, provider__url=fake.url)
            client = ProviderClient(cfg.provider, new_metrics())
            try:
                ids = [
                    await client.submit(
                        Secret(key), "userrecaptcha", {"googlekey": "g", "pageurl": "https://x"}
                    )
                    for _ in range(3)
                ]
                first = await client.results(Secret(key), ids)
                second = await client.results(Secret(key), ids)
                single = await client.results(Secret(key), ids[:1])
                return ids, first, second, single
            finally:
                await client.close()

    ids, first, second, single = asyncio.run(scenario())
    assert all(not r.ready for r in first.values())
    assert second == {i: TaskResult(True, token=f"token-{i}") for i in ids}
    assert single[ids[0]].token == f"token-{ids[0]}"
    assert all(r["key"] == key and r["json"] == "1" for r in fake.requests)
    assert all(key not in url for url in fake.urls)
    bulk = [r for r in fake.requests if r["endpoint"] == "res" and "ids" in r]
    assert bulk[0]["ids"] == ",".join(ids)
    assert bulk[0]["action"] == "get"


@pytest.mark.parametrize(
    ("scripted", "code"),
    [
        ("HTTP_503", "HTTP_5XX"),
        ("GARBAGE", "UNPARSEABLE"),
        ("ERROR_NO_SLOT_AVAILABLE", "ERROR_NO_SLOT_AVAILABLE"),
    ],
)
def test_submit_errors_are_classified(tmp_path, scripted, code):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, submit_errors=[scripted])

    async def scenario():
        async with serve_fake_provider(fake):
            cfg = make_config(tmp_path, provider__url=fake.url)
            client = ProviderClient(cfg.provider, new_metrics())
            try:
                await client.submit(Secret(key), "base64", {"body": "x"})
            finally:
                await client.close()

    with pytest.raises(ProviderError) as err:
        asyncio.run(scenario())
    assert err.value.code == code
    assert err.value.kind is ErrorKind.RETRYABLE
    assert key not in str(err.value)


def test_unknown_key_and_network_error(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys=set())

    async def scenario():
        async with serve_fake_provider(fake):
            cfg = make_config(tmp_path, provider__url=fake.url)
            client = ProviderClient(cfg.provider, new_metrics())
            try:
                with pytest.raises(ProviderError) as err:
                    await client.submit(Secret(key), "base64", {"body": "x"})
                assert err.value.key_problem is KeyProblem.REJECTED
            finally:
                await client.close()
        cfg = make_config(tmp_path, provider__url=fake.url)  # server gone now
        client = ProviderClient(cfg.provider, new_metrics())
        try:
            with pytest.raises(ProviderError) as err:
                await client.submit(Secret(key), "base64", {"body": "x"})
            assert err.value.code == "NETWORK"
        finally:
            await client.close()

    asyncio.run(scenario())


def test_request_timeout_is_a_retryable_error(tmp_path):
    """A provider that does not answer within ``request_timeout``: the call gives up then
    (not at the task timeout) with a retryable TIMEOUT that names no key."""
    key = new_key()

    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="OK|1")

    async def scenario() -> tuple[ProviderError, float]:
        async with serve_posts({"/in.php": stall}) as (url, _):
            cfg = make_config(tmp_path, provider__url=url, provider__request_timeout=0.3)
            client = ProviderClient(cfg.provider, new_metrics())
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                with pytest.raises(ProviderError) as err:
                    await client.submit(Secret(key), "base64", {"body": "x"})
                return err.value, loop.time() - started
            finally:
                await client.close()

    error, took = asyncio.run(scenario())
    assert error.code == "TIMEOUT"
    assert error.kind is ErrorKind.RETRYABLE
    assert "0.3s" in str(error)
    assert key not in str(error)
    assert took < 2.0, took  # gave up at the request timeout, not after the stalled answer


def test_check_balance_uses_its_own_session_and_classifies(tmp_path):
    """check_balance (the worker's check of a new key version): the balance for a key the
    provider knows, a KEY_PROBLEM error for one it does not; the key only in the POST body."""
    from captcha_solver.provider import check_balance

    good, bad = new_key(), new_key()
    seen: list[dict[str, str]] = []

    async def res_php(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        seen.append({"query": request.query_string, **form})
        if form.get("action") != "getbalance":
            return web.json_response({"status": 0, "request": "ERROR_EMPTY_ACTION"})
        if form.get("key") != good:
            return web.json_response({"status": 0, "request": "ERROR_KEY_DOES_NOT_EXIST"})
        return web.json_response({"status": 1, "request": "4.20000"})

    async def scenario():
        async with serve_posts({"/res.php": res_php}) as (url, runner):
            cfg = make_config(tmp_path, provider__url=url).provider
            metrics = new_metrics()
            assert await check_balance(cfg, metrics, Secret(good)) == pytest.approx(4.2)
            with pytest.raises(ProviderError) as err:
                await check_balance(cfg, metrics, Secret(bad))
            assert err.value.code == "ERROR_KEY_DOES_NOT_EXIST"
            assert err.value.kind is ErrorKind.KEY_PROBLEM
            await runner.cleanup()
            with pytest.raises(ProviderError) as down:
                await check_balance(cfg, metrics, Secret(good))
            assert down.value.kind is ErrorKind.RETRYABLE

    asyncio.run(scenario())
    assert all(s["query"] == "" for s in seen)
