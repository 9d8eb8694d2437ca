import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import stat
import time

import aiohttp
import pytest
from testkit.creds import assert_no_secrets

from captcha_solver.cli import EX_CONFIG, main
from captcha_solver.config import ConfigError, render_config
from captcha_solver.service import SecretIdWatch, Service, StartupTimeout, parse_solve_request
from captcha_solver.vault import KvSecret, SecretIdExpiry, WrappingTokenError

from .helpers import (
    FakeProvider,
    FakeVault,
    free_port,
    make_config,
    new_key,
    serve_fake_provider,
    serve_once,
    wait_for,
)

PARAMS = {"googlekey": "g", "pageurl": "https://example.test/"}


class FakeSession(FakeVault):
    """FakeVault plus the token/unwrap surface the service drives."""

    has_token = True
    secret_id_expiry = SecretIdExpiry()  # unknown, as for a secret-id of an older deployment

    def unwrap_secret_id(self) -> bool:
        return False

    def ensure_token(self) -> None:
        pass

    def seconds_until_renewal(self) -> float:
        return 3600.0

    def close(self) -> None:
        pass

    def read_kv(self, mount: str, path: str, *, prompt: bool = False) -> KvSecret:
        return super().read_kv(mount, path)


def _provider_and_vault(**fake) -> tuple[FakeProvider, FakeSession]:
    """A fake provider (``fake``: its settings) and a fake Vault session holding one key the
    provider takes."""
    key = new_key()
    return FakeProvider(valid_keys={key}, **fake), FakeSession({"api_key": key})


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
        "provider_accepted_version",
        "provider_check",
        "rotation",
        "tasks_in_flight",
        "error",
        "secret_id_expires_at",
        "secret_id_expires_in_seconds",
        "warnings",
    ]
    assert health["status"] == "ok"
    # The provider took the two tasks with the key of version 3: that is its word on version 3.
    assert health["provider_accepted_version"] == 3
    assert health["provider_check"] == {"version": 3, "result": "accepted", "code": None}
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
    fake, vault = _provider_and_vault()

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
    fake, vault = _provider_and_vault()
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
    fake, vault = _provider_and_vault(ready_after=8)  # ~0.4 s per solve

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
    fake, vault = _provider_and_vault(ready_after=0)
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
        def read_kv(self, mount, path, *, prompt=False):
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
    fake, vault = _provider_and_vault(ready_after=10_000)  # never ready

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


# --------------------------------------------------------------------------- secret-id expiry


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _watch(tmp_path, expiry_box: list[SecretIdExpiry], wall: Clock, mono: Clock, warn=600.0):
    cfg = make_config(tmp_path, vault__secret_id_warn_before=warn)
    return SecretIdWatch(cfg.vault, lambda: expiry_box[0], wall=wall, clock=mono)


def test_secret_id_watch_warns_once_an_hour_below_the_threshold_and_never_above(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="captcha_solver.service")
    wall, mono = Clock(1_000_000.0), Clock(50.0)
    box = [SecretIdExpiry(expires_at=wall.now + 700)]
    watch = _watch(tmp_path, box, wall, mono)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    # Above vault.secret_id_warn_before (600 s): nothing, and the next look is when it crosses.
    assert watch.expires_in() == 700
    assert watch.warning() is None
    assert watch.check() is False
    assert watch.next_check_in() == pytest.approx(60.0)
    wall.now += 50
    assert watch.next_check_in() == pytest.approx(50.5)
    assert warnings() == []

    # Below it: one WARNING, then none for an hour however often it is checked.
    wall.now += 60  # 590 s left
    assert watch.check() is True
    assert len(warnings()) == 1
    assert "secret-id expires in 590 s" in warnings()[0]
    assert "vault.secret_id_warn_before (600 s)" in warnings()[0]
    for _ in range(100):
        wall.now += 1
        mono.now += 1
        assert watch.check() is False
    assert len(warnings()) == 1
    assert watch.warning() is not None  # /healthz keeps saying it meanwhile

    # A new secret-id, still short: said at once. A long one: silence again.
    box[0] = SecretIdExpiry(expires_at=wall.now + 300)
    assert watch.check() is True
    box[0] = SecretIdExpiry(expires_at=wall.now + 3000)
    assert watch.check() is False
    assert watch.warning() is None
    box[0] = SecretIdExpiry(expires_at=wall.now + 300)

    # An hour after the last one: the next WARNING.
    mono.now += 3599
    assert watch.check() is False
    mono.now += 1
    assert watch.check() is True
    assert len(warnings()) == 3

    # Expired: said at once (the next login will be refused), then once an hour; expires_in 0.
    wall.now += 400
    assert watch.expires_in() == 0
    assert watch.check() is True
    assert "secret-id expired at" in warnings()[-1]
    assert watch.check() is False
    assert len(warnings()) == 4
    record = [r for r in caplog.records if r.levelno == logging.WARNING][-1]
    assert record.secret_id_warn_before == 600.0
    assert record.secret_id_expires_in_seconds == 0


def test_secret_id_watch_unknown_and_never(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="captcha_solver.service")
    wall, mono = Clock(1_000_000.0), Clock(50.0)
    for expiry in (SecretIdExpiry(), SecretIdExpiry(never=True)):
        watch = _watch(tmp_path, [expiry], wall, mono, warn=10**9)
        assert watch.expires_in() is None
        assert watch.warning() is None
        assert watch.check() is False
        assert watch.next_check_in() == 60.0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


class ExpiringSession(FakeSession):
    def __init__(self, data, expiry: SecretIdExpiry) -> None:
        super().__init__(data)
        self.secret_id_expiry = expiry  # type: ignore[misc]


def _health_and_metrics(tmp_path, expiry: SecretIdExpiry, **over):
    key = new_key()
    fake = FakeProvider(valid_keys={key})
    vault = ExpiringSession({"api_key": key}, expiry)

    async def body(service, http, base):
        async with http.get(f"{base}/healthz") as r:
            status, health = r.status, await r.json()
        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()
        return status, health, metrics

    return asyncio.run(_with_service(tmp_path, fake, vault, body, **over))


def _metric(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + " ")]


def test_healthz_and_metrics_show_a_secret_id_expiry_within_the_warning(tmp_path, caplog):
    """Below vault.secret_id_warn_before: /healthz stays ok (200) and lists the warning, the
    gauge shows the seconds left, and the journal gets the WARNING at start."""
    caplog.set_level(logging.INFO, logger="captcha_solver.service")
    expiry = SecretIdExpiry(expires_at=time.time() + 300)
    status, health, metrics = _health_and_metrics(
        tmp_path, expiry, vault__secret_id_warn_before=600.0
    )
    assert status == 200
    assert health["status"] == "ok"
    assert health["error"] is None
    assert 295 <= health["secret_id_expires_in_seconds"] <= 300
    assert health["secret_id_expires_at"] == expiry.text()
    assert health["secret_id_expires_at"].endswith("Z")
    [warning] = health["warnings"]
    assert warning.startswith("secret-id expires in ")
    assert "vault.secret_id_warn_before (600 s)" in warning
    [sample] = _metric(metrics, "captcha_solver_secret_id_expires_in_seconds")
    assert 295 <= float(sample.split()[1]) <= 300
    assert "# TYPE captcha_solver_secret_id_expires_in_seconds gauge" in metrics
    assert "captcha_solver_healthy 1" in metrics
    logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 1
    assert logged[0].getMessage().startswith("secret-id expires in ")


def test_healthz_and_metrics_of_a_secret_id_far_from_expiry(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="captcha_solver.service")
    status, health, metrics = _health_and_metrics(
        tmp_path, SecretIdExpiry(expires_at=time.time() + 30 * 86400)
    )
    assert status == 200
    assert health["warnings"] == []
    assert health["secret_id_expires_in_seconds"] > 29 * 86400  # default warn_before: 7 days
    assert _metric(metrics, "captcha_solver_secret_id_expires_in_seconds")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("expiry", "shown", "sample"),
    [
        (SecretIdExpiry(), "unknown", []),
        (SecretIdExpiry(never=True), "never", ["captcha_solver_secret_id_expires_in_seconds +Inf"]),
    ],
)
def test_healthz_and_metrics_of_an_unknown_or_endless_secret_id(tmp_path, expiry, shown, sample):
    """Unknown (an older deployment, no lookup allowed) or no expiry (TTL 0): null seconds, no
    warning; the gauge has no sample when unknown (alert on absent()) and +Inf when endless."""
    status, health, metrics = _health_and_metrics(tmp_path, expiry)
    assert status == 200
    assert health["status"] == "ok"
    assert health["secret_id_expires_at"] == shown
    assert health["secret_id_expires_in_seconds"] is None
    assert health["warnings"] == []
    assert _metric(metrics, "captcha_solver_secret_id_expires_in_seconds") == sample


# --------------------------------------------------------------------------- server.token_file


def _write_token(path, token: str | None = None) -> str:
    """A token file as the role writes it (one token, a newline, 0640); returns the token."""
    token = token or secrets.token_urlsafe(32)
    path.write_text(token + "\n")
    path.chmod(0o640)
    return token


def _log_text(caplog) -> str:
    """Every captured log record: its message and every field given with ``extra=``."""
    return "\n".join(f"{r.getMessage()} {json.dumps(vars(r), default=str)}" for r in caplog.records)


def test_solve_requires_the_bearer_token_over_tcp_and_the_unix_socket(tmp_path, caplog):
    """With server.token_file, POST /solve answers a request without the token, with a wrong
    one or another scheme 401 (the usual JSON error, WWW-Authenticate: Bearer), over TCP and the
    unix socket alike, and solves with it; /healthz and /metrics stay open. No unauthorised
    request reaches the provider, and the token is in no log record, answer or metric."""
    caplog.set_level(logging.DEBUG)
    fake, vault = _provider_and_vault(ready_after=0)
    token_file = tmp_path / "api-token"
    token = _write_token(token_file)
    sock_path = tmp_path / "solver.sock"
    task = {"method": "userrecaptcha", **PARAMS}
    cases = {
        "none": {},
        "wrong": {"Authorization": "Bearer " + secrets.token_urlsafe(32)},
        "prefix": {"Authorization": "Bearer " + token[:-1]},
        "longer": {"Authorization": "Bearer " + token + "x"},
        "basic": {"Authorization": "Basic " + token},
        "bare": {"Authorization": token},
        "right": {"Authorization": "Bearer " + token},
        "scheme in lower case": {"Authorization": "bearer " + token},
    }
    answers: list[str] = []

    async def post(http, url, headers):
        async with http.post(url, json=task, headers=headers) as r:
            text = await r.text()
            answers.append(text + json.dumps(dict(r.headers)))
            return r.status, r.headers.get("WWW-Authenticate"), json.loads(text)

    async def get(http, url):
        async with http.get(url) as r:
            answers.append(await r.text())
            return r.status

    async def body(service, http, base):
        seen = {}
        connector = aiohttp.UnixConnector(path=str(sock_path))
        async with aiohttp.ClientSession(connector=connector) as unix_http:
            for via, client, root in (("tcp", http, base), ("unix", unix_http, "http://localhost")):
                for case, headers in cases.items():
                    seen[via, case] = await post(client, f"{root}/solve", headers)
                seen[via, "healthz"] = await get(client, f"{root}/healthz")
                seen[via, "metrics"] = await get(client, f"{root}/metrics")
        return seen

    seen = asyncio.run(
        _with_service(
            tmp_path,
            fake,
            vault,
            body,
            server__token_file=str(token_file),
            server__unix_socket=str(sock_path),
        )
    )
    for via in ("tcp", "unix"):
        for case in ("none", "wrong", "prefix", "longer", "basic", "bare"):
            status, challenge, doc = seen[via, case]
            assert (via, case, status, challenge) == (via, case, 401, "Bearer")
            assert doc == {
                "status": "error",
                "error": {
                    "code": "UNAUTHORIZED",
                    "kind": "fatal",
                    "message": "this worker requires Authorization: Bearer <token> (the token"
                    " in its server.token_file)",
                },
            }
        for case in ("right", "scheme in lower case"):
            status, challenge, doc = seen[via, case]
            assert (via, case, status, challenge, doc["status"]) == (via, case, 200, None, "ok")
        assert seen[via, "healthz"] == 200
        assert seen[via, "metrics"] == 200
    assert len([r for r in fake.requests if r["endpoint"] == "in"]) == 4  # the 4 with the token
    assert "POST /solve requires a bearer token" in caplog.messages
    assert_no_secrets("\n".join(answers) + _log_text(caplog), [token])


def test_without_a_token_file_the_authorization_header_is_ignored(tmp_path):
    """No server.token_file (the package default): /solve needs no token, and a client that
    sends one anyway is served."""
    fake, vault = _provider_and_vault(ready_after=0)

    async def body(service, http, base):
        statuses = []
        for headers in ({}, {"Authorization": "Bearer " + secrets.token_urlsafe(32)}):
            task = {"method": "userrecaptcha", **PARAMS}
            async with http.post(f"{base}/solve", json=task, headers=headers) as r:
                statuses.append(r.status)
        return statuses, service.api_token

    assert asyncio.run(_with_service(tmp_path, fake, vault, body)) == ([200, 200], None)


def test_sighup_reads_the_token_file_again_and_keeps_the_token_when_it_went_bad(tmp_path, caplog):
    """``systemctl reload`` (SIGHUP) takes a replaced token at once, without a restart; a token
    file that became empty keeps the current token (a reload never locks the clients out) and
    says so in the log, without either token."""
    caplog.set_level(logging.DEBUG)
    fake, vault = _provider_and_vault(ready_after=0)
    token_file = tmp_path / "api-token"
    old = _write_token(token_file)
    tokens = [old]

    async def body(service, http, base):
        service.install_signal_handlers()

        async def status(token: str) -> int:
            task = {"method": "userrecaptcha", **PARAMS}
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(f"{base}/solve", json=task, headers=headers) as r:
                return r.status

        before = await status(old)
        new = _write_token(token_file)
        tokens.append(new)
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: service.api_token is not None and service.api_token.reveal() == new)
        after = (await status(old), await status(new))
        token_file.write_text("")
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: "API token not reloaded" in " ".join(caplog.messages))
        kept = await status(new)
        return before, after, kept

    before, after, kept = asyncio.run(
        _with_service(tmp_path, fake, vault, body, server__token_file=str(token_file))
    )
    assert (before, after, kept) == (200, (401, 200), 200)
    assert f"API token reloaded from {token_file}" in caplog.messages
    assert (
        f"API token not reloaded; keeping the current one: server.token_file: {token_file} is empty"
        in caplog.messages
    )
    assert_no_secrets(_log_text(caplog), tokens)


class _CountingSession(FakeSession):
    unwraps = 0

    def unwrap_secret_id(self) -> bool:
        self.unwraps += 1
        return False


@pytest.mark.parametrize(
    ("problem", "reason"),
    [("missing", "No such file or directory"), ("empty", "is empty"), ("open", "other users")],
)
def test_a_bad_token_file_stops_the_start_before_anything_else(tmp_path, problem, reason):
    """A missing, empty or world-readable token file is a configuration error naming
    server.token_file (the CLI exits 78): raised before the wrapped secret-id is unwrapped and
    before anything listens."""
    token_file = tmp_path / "api-token"
    if problem != "missing":
        token_file.write_text("" if problem == "empty" else secrets.token_urlsafe(32))
        token_file.chmod(0o644 if problem == "open" else 0o640)
    cfg = make_config(tmp_path, server__token_file=str(token_file))
    vault = _CountingSession({"api_key": new_key()})
    service = Service(cfg, vault=vault)
    with pytest.raises(ConfigError) as err:
        asyncio.run(service.start())
    assert err.value.field == "server.token_file"
    assert reason in str(err.value)
    assert vault.unwraps == 0
    with pytest.raises(ConnectionRefusedError):  # nothing listens
        socket.create_connection(("127.0.0.1", cfg.server.port), timeout=1)


def _cli_config(tmp_path, port: int, token_file=None, name: str = "config.toml"):
    doc: dict = {
        "env": "dev",
        "vault": {
            "addrs": ["https://127.0.0.1:1"],
            "role_id_file": str(tmp_path / "role-id"),
            "secret_id_file": str(tmp_path / "secret-id"),
        },
        "provider": {"url": "http://127.0.0.1:1", "task_timeout": 5.0},
        "server": {"port": port, **({"token_file": str(token_file)} if token_file else {})},
    }
    path = tmp_path / name
    path.write_text(render_config(doc))
    return path


def test_serve_exits_78_naming_the_token_file_and_check_config_reports_it(tmp_path, capsys):
    """``captcha-solver serve`` with an unreadable token file exits 78 (no restart by systemd),
    naming the setting; ``check-config`` lists it as a problem (``--syntax-only`` does not read
    the files the configuration names)."""
    token_file = tmp_path / "api-token"
    path = _cli_config(tmp_path, free_port(), token_file)
    proc = serve_once(path)
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"captcha-solver: invalid configuration: server.token_file: cannot read {token_file}:"
        " No such file or directory"
    )
    assert main(["check-config", "--config", str(path)]) == EX_CONFIG
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert f"server.token_file: cannot read {token_file}: No such file or directory" in problems
    assert main(["check-config", "--syntax-only", "--config", str(path)]) == 0
    capsys.readouterr()
    token = _write_token(token_file)
    main(["check-config", "--config", str(path)])
    out = capsys.readouterr().out
    assert not [p for p in json.loads(out)["problems"] if "token_file" in p]
    assert_no_secrets(out, [token])


def test_the_solve_command_sends_the_token_of_the_configuration(tmp_path, capsys):
    """``captcha-solver solve`` reads server.token_file itself and sends the token (never on its
    command line); a configuration without it gets the worker's 401."""
    fake, vault = _provider_and_vault(ready_after=0)
    token_file = tmp_path / "api-token"
    token = _write_token(token_file)
    argv = ["--method", "userrecaptcha", "--param", "googlekey=g", "--param", "pageurl=u"]

    async def body(service, http, base):
        port = service.cfg.server.port
        with_token = _cli_config(tmp_path, port, token_file, "with-token.toml")
        without = _cli_config(tmp_path, port, None, "without-token.toml")
        ok = await asyncio.to_thread(main, ["solve", "--config", str(with_token), *argv])
        ok_out = capsys.readouterr().out
        refused = await asyncio.to_thread(main, ["solve", "--config", str(without), *argv])
        return ok, json.loads(ok_out), refused, json.loads(capsys.readouterr().out)

    ok, ok_body, refused, refused_body = asyncio.run(
        _with_service(tmp_path, fake, vault, body, server__token_file=str(token_file))
    )
    assert (ok, ok_body["status"]) == (0, "ok")
    assert (refused, refused_body["error"]["code"]) == (1, "UNAUTHORIZED")
    assert_no_secrets(json.dumps([ok_body, refused_body]), [token])
