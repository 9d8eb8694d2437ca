import asyncio
import json
import logging
import os
import stat

import aiohttp
import pytest

from captcha_solver.service import Service, StartupTimeout, parse_solve_request
from captcha_solver.vault import KvSecret, WrappingTokenError

from .helpers import FakeProvider, FakeVault, make_config, new_key, serve_fake_provider

PARAMS = {"googlekey": "g", "pageurl": "https://example.test/"}


class FakeSession(FakeVault):
    """FakeVault plus the token/unwrap surface the service drives."""

    has_token = True

    def unwrap_secret_id(self) -> bool:
        return False

    def ensure_token(self) -> None:
        pass

    def seconds_until_renewal(self) -> float:
        return 3600.0

    def close(self) -> None:
        pass

    def read_kv(self, mount: str, path: str) -> KvSecret:
        return super().read_kv(mount, path)


async def _with_service(tmp_path, fake, vault, body, **over):
    async with serve_fake_provider(fake):
        cfg = make_config(tmp_path, provider__url=fake.url, **over)
        service = Service(cfg, vault=vault)
        await service.start()
        base = f"http://127.0.0.1:{cfg.server.port}"
        try:
            async with aiohttp.ClientSession() as http:
                await asyncio.sleep(0)  # let the first refresh run
                for _ in range(100):
                    if service.keys.key_version is not None:
                        break
                    await asyncio.sleep(0.02)
                return await body(service, http, base)
        finally:
            await service.shutdown()


def test_solve_healthz_metrics(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=1)
    vault = FakeSession(
        {"api_key": key},
        version=3,
        custom_metadata={"rotation_id": "r1", "rotation_state": "complete"},
    )

    async def body(service, http, base):
        async with http.post(f"{base}/solve", json={"method": "userrecaptcha", **PARAMS}) as r:
            assert r.status == 200
            solved = await r.json()
        async with http.post(
            f"{base}/solve", json={"method": "userrecaptcha", "params": PARAMS}
        ) as r:
            assert r.status == 200
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
            health = await r.json()
        async with http.get(f"{base}/metrics") as r:
            assert r.status == 200
            assert r.content_type == "text/plain"
            metrics = await r.text()
        return solved, health, metrics

    solved, health, metrics = asyncio.run(_with_service(tmp_path, fake, vault, body))
    assert solved["status"] == "ok"
    assert solved["token"] == f"token-{solved['task_id']}"
    assert solved["key_version"] == 3
    assert list(health) == [
        "status",
        "env",
        "key_version",
        "key_fingerprint",
        "key_age_seconds",
        "last_refresh",
        "vault_reachable",
        "vault_stale_seconds",
        "circuit",
        "rotation",
        "tasks_in_flight",
        "error",
    ]
    assert health["status"] == "ok"
    assert health["env"] == "dev"
    assert health["key_version"] == 3
    assert health["key_fingerprint"] == "***" + key[-4:]
    assert health["rotation"] == {"rotation_id": "r1", "rotation_state": "complete"}
    assert health["circuit"] == "closed"
    assert health["tasks_in_flight"] == 0
    assert health["error"] is None
    assert 'captcha_solver_solves_total{outcome="solved"} 2' in metrics
    assert "captcha_solver_key_version 3" in metrics
    assert "captcha_solver_tasks_in_flight 0" in metrics
    assert 'captcha_solver_provider_requests_total{endpoint="in"} 2' in metrics
    for text in (json.dumps(solved), json.dumps(health), metrics):
        assert key not in text


def test_bad_requests_and_unhealthy(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key})
    vault = FakeSession({"api_key": key})

    async def body(service, http, base):
        for payload, status in [
            ("not json", 400),
            (json.dumps([1]), 400),
            (json.dumps({"method": "userrecaptcha", "key": "x"}), 400),
            (json.dumps({"method": "bad method!"}), 400),
            (json.dumps({"method": "userrecaptcha", "pageurl": {"x": 1}}), 400),
        ]:
            headers = {"Content-Type": "application/json"}
            async with http.post(f"{base}/solve", data=payload, headers=headers) as r:
                assert r.status == status
                assert (await r.json())["status"] == "error"
        vault.down = True
        await service.keys.refresh("test")  # fails; max_staleness = 0: fail closed at once
        await asyncio.sleep(0.01)
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 503
            health = await r.json()
        async with http.post(f"{base}/solve", json={"method": "userrecaptcha", **PARAMS}) as r:
            assert r.status == 503
            error = (await r.json())["error"]
        return health, error

    health, error = asyncio.run(
        _with_service(tmp_path, fake, vault, body, vault__max_staleness=0.0)
    )
    assert health["status"] == "unhealthy"
    assert health["vault_reachable"] is False
    assert error["code"] == "STALE"
    assert error["kind"] == "unavailable"


def test_solve_refuses_what_a_browser_page_could_send(tmp_path):
    """A hostile page in a scraper's browser can POST a "simple" request (text/plain, no CORS
    preflight) and DNS rebinding can reach the worker under a foreign Host: /solve takes JSON
    only, and every route answers only requests addressed to a loopback host. Nothing of such a
    request reaches the provider."""
    key = new_key()
    fake = FakeProvider(valid_keys={key})
    vault = FakeSession({"api_key": key})
    task = json.dumps({"method": "userrecaptcha", **PARAMS})

    async def body(service, http, base):
        seen = []
        text_plain = {"Content-Type": "text/plain", "Origin": "http://attacker.example"}
        async with http.post(f"{base}/solve", data=task, headers=text_plain) as r:
            seen.append((r.status, (await r.json())["error"]["code"]))
        foreign = {"Content-Type": "application/json", "Host": "attacker.example"}
        async with http.post(f"{base}/solve", data=task, headers=foreign) as r:
            seen.append((r.status, (await r.json())["error"]["code"]))
        async with http.get(f"{base}/healthz", headers={"Host": "attacker.example:18401"}) as r:
            seen.append((r.status, (await r.json())["error"]["code"]))
        for host in ("localhost:18401", "127.0.0.1", "[::1]:18401"):
            async with http.get(f"{base}/healthz", headers={"Host": host}) as r:
                seen.append((r.status, host))
        return seen

    seen = asyncio.run(_with_service(tmp_path, fake, vault, body))
    assert seen == [
        (415, "UNSUPPORTED_MEDIA_TYPE"),
        (421, "NOT_LOOPBACK_HOST"),
        (421, "NOT_LOOPBACK_HOST"),
        (200, "localhost:18401"),
        (200, "127.0.0.1"),
        (200, "[::1]:18401"),
    ]
    assert not [r for r in fake.requests if r["endpoint"] == "in"]


def test_sigterm_drain_finishes_in_flight(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=8)  # ~0.4 s per solve
    vault = FakeSession({"api_key": key})

    async def body(service, http, base):
        async def one():
            async with http.post(f"{base}/solve", json={"method": "userrecaptcha", **PARAMS}) as r:
                return r.status

        tasks = [asyncio.create_task(one()) for _ in range(10)]
        await asyncio.sleep(0.15)
        assert service.dispatcher.in_flight == 10
        drain = asyncio.create_task(service.shutdown())
        await asyncio.sleep(0.05)
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 503
            assert (await r.json())["error"] == "shutting down"
        async with http.post(f"{base}/solve", json={"method": "userrecaptcha", **PARAMS}) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "SHUTTING_DOWN"
            assert r.headers["Retry-After"] == "1"  # a client retries (on the restarted worker)
        statuses = await asyncio.gather(*tasks)
        await drain
        return statuses

    statuses = asyncio.run(_with_service(tmp_path, fake, vault, body))
    assert statuses == [200] * 10


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {"method": "hcaptcha", "sitekey": "s", "pageurl": "u"},
            ("hcaptcha", {"sitekey": "s", "pageurl": "u"}),
        ),
        (
            {"method": "base64", "params": {"body": "QQ==", "numeric": 1}},
            ("base64", {"body": "QQ==", "numeric": "1"}),
        ),
        ({"method": "userrecaptcha", "invisible": True}, ("userrecaptcha", {"invisible": "1"})),
    ],
)
def test_parse_solve_request(doc, expected):
    assert parse_solve_request(doc) == expected


@pytest.mark.parametrize(
    "doc",
    [
        {"method": "x", "json": "0"},
        {"method": "x", "ids": "1"},
        {},
        {
            "method": "x",
            "params": [],
        },
    ],
)
def test_parse_solve_request_rejects(doc):
    assert isinstance(parse_solve_request(doc), str)


def test_unix_socket(tmp_path):
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=0)
    vault = FakeSession({"api_key": key})
    sock_path = tmp_path / "solver.sock"

    async def body(service, http, base):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        connector = aiohttp.UnixConnector(path=str(sock_path))
        async with aiohttp.ClientSession(connector=connector) as unix_http:
            async with unix_http.get("http://localhost/healthz") as r:
                assert r.status == 200
            # Some unix-socket clients send the socket path as Host; no browser gets here.
            headers = {"Host": "%2Frun%2Fcaptcha-solver%2Fapi.sock"}
            async with unix_http.get("http://localhost/healthz", headers=headers) as r:
                assert r.status == 200
            async with unix_http.post(
                "http://localhost/solve", json={"method": "userrecaptcha", **PARAMS}
            ) as r:
                assert r.status == 200

    asyncio.run(_with_service(tmp_path, fake, vault, body, server__unix_socket=str(sock_path)))
    assert not sock_path.exists()


def test_replayed_wrapping_token_found_later_stops_the_service(tmp_path):
    """Vault was down at start; when the unwrap finally fails, serve() raises (CLI: exit 78)."""

    class ReplayedSession(FakeSession):
        def read_kv(self, mount, path):
            raise WrappingTokenError("already unwrapped: possible tampering")

    cfg = make_config(tmp_path)
    service = Service(cfg, vault=ReplayedSession({"api_key": new_key()}))
    with pytest.raises(WrappingTokenError):
        asyncio.run(asyncio.wait_for(service.serve_forever(), 10))
    assert service.draining


def test_no_key_within_the_startup_timeout_stops_the_service(tmp_path):
    """Vault down from the start: /healthz says why while it retries; after
    ``vault.startup_timeout`` serve() raises StartupTimeout (CLI: exit 75, systemd restarts)."""
    vault = FakeSession({"api_key": new_key()}, down=True)
    cfg = make_config(tmp_path, vault__startup_timeout=0.6)
    service = Service(cfg, vault=vault)
    seen: list[dict] = []

    async def main() -> None:
        serving = asyncio.ensure_future(service.serve_forever())
        await asyncio.sleep(0.3)
        seen.append(service.health()[0])
        await asyncio.wait_for(serving, 10)

    with pytest.raises(StartupTimeout) as caught:
        asyncio.run(main())
    assert str(caught.value) == (
        "no key from Vault within 0.6s of start:"
        " vault unavailable: read: no Vault address answered (fake)"
    )
    assert seen[0]["status"] == "unhealthy"
    assert seen[0]["error"] == "vault unavailable: read: no Vault address answered (fake)"
    assert vault.reads >= 3  # it kept retrying until the deadline
    assert service.draining


def test_startup_timeout_does_not_apply_once_a_key_is_loaded(tmp_path):
    """A key read at start: a later Vault outage never trips the startup deadline."""
    vault = FakeSession({"api_key": new_key()})
    cfg = make_config(tmp_path, vault__startup_timeout=0.3)
    service = Service(cfg, vault=vault)

    async def main() -> dict:
        serving = asyncio.ensure_future(service.serve_forever())
        await asyncio.sleep(0.2)
        vault.down = True
        await asyncio.sleep(0.8)
        health = service.health()[0]
        service.request_stop()
        await asyncio.wait_for(serving, 10)
        return health

    health = asyncio.run(main())
    assert health["key_version"] == 1
    assert health["status"] == "degraded"
    assert service.fatal is None


def test_sigterm_abandons_tasks_still_in_flight_after_the_grace(tmp_path, caplog):
    """Tasks the provider never finishes do not hold the shutdown: after ``shutdown_grace`` the
    service stops anyway (long before the tasks' own timeout) and says so in its log."""
    key = new_key()
    fake = FakeProvider(valid_keys={key}, ready_after=10_000)  # never ready
    vault = FakeSession({"api_key": key})

    async def body(service, http, base):
        async def one():
            try:
                async with http.post(
                    f"{base}/solve", json={"method": "userrecaptcha", **PARAMS}
                ) as r:
                    return r.status
            except aiohttp.ClientError as exc:
                return type(exc).__name__

        tasks = [asyncio.create_task(one()) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert service.dispatcher.in_flight == 3
        loop = asyncio.get_running_loop()
        started = loop.time()
        await service.shutdown()
        took = loop.time() - started
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return took, answers

    caplog.set_level(logging.WARNING, logger="captcha_solver.service")
    took, answers = asyncio.run(
        _with_service(
            tmp_path,
            fake,
            vault,
            body,
            server__shutdown_grace=0.5,
            provider__task_timeout=60.0,
        )
    )
    assert took < 10.0, took  # bounded by the 0.5 s grace: not the 60 s task timeout, nor
    # aiohttp's own 60 s wait for open requests (systemd would SIGKILL at TimeoutStopSec=35)
    assert all(a != 200 for a in answers), answers
    assert "grace period over, abandoning tasks" in caplog.messages
