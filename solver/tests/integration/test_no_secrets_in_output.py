"""The key, backup keys, secret-id, wrapping token and Vault tokens never show up in any output."""

from __future__ import annotations

import asyncio
import json
import re
import signal

import pytest

from captcha_solver.config import parse_config
from captcha_solver.dispatcher import Dispatcher, SolveError
from captcha_solver.keycache import KeyCache
from captcha_solver.metrics import new_metrics
from captcha_solver.provider import ProviderClient
from captcha_solver.vault import VaultAuthError, VaultClient

from .conftest import KV_MOUNT, new_key

# OpenBao tokens start with "s." (Vault: "hvs."), batch tokens "b.", then 24+ characters.
TOKEN_RE = re.compile(r"\b(?:hvs|hvb|s|b)\.[A-Za-z0-9]{20,}")


def _assert_clean(texts: list[str], secrets: list[str]) -> None:
    assert secrets
    assert all(len(s) >= 16 for s in secrets)
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[-4:]}) leaked into: {text[:200]!r}"
        assert not TOKEN_RE.search(text), f"a Vault token leaked into: {text[:200]!r}"


def test_secrets_never_in_logs_health_metrics_cli_or_errors(vault, worker_factory):
    backup = new_key()
    w = worker_factory(vault, wrapped=True, backups=[backup])
    wrapping_token = w.wrapped_file.read_text().strip()
    w.start(vault={"refresh_interval": 0.3}, provider={"circuit_cooldown": 60.0})
    secret_id = w.secret_id_file.read_text().strip()
    role_id = (w.dir / "role-id").read_text().strip()
    w.keys += [secret_id]

    # Happy path, through HTTP and the CLI.
    assert w.solve().status_code == 200
    for args in (
        ["status"],
        ["check-config"],
        [
            "solve",
            "--method",
            "turnstile",
            "--param",
            "sitekey=x",
            "--param",
            "pageurl=https://e.test/",
        ],
    ):
        w.run_cli(*args)
    # Backup key on zero balance, then both keys revoked: rejection, refresh, circuit open.
    w.emulator.admin.set_balance(w.keys[0], 0.0)
    assert w.solve().status_code == 200
    w.emulator.admin.revoke_key(w.keys[0])
    w.emulator.admin.revoke_key(backup)
    assert w.solve().status_code == 503
    assert w.solve().status_code == 503
    assert w.healthz()[1]["circuit"] == "open"
    w.metrics()
    # New key + SIGHUP: recovery. Then a request that tries to smuggle a key.
    new = new_key()
    w.emulator.admin.add_key(new)
    w.write_key(new)
    w.signal(signal.SIGHUP)
    w.wait_health(lambda h: h["status"] == "ok" and h["key_version"] == 2)
    assert w.solve().status_code == 200
    smuggle = w.solve(key=new, pageurl="https://e.test/", googlekey="x")
    assert smuggle.status_code == 400
    w.metrics()
    assert w.stop() == 0

    # Replay of the wrapping token with no secret-id to fall back on: loud refusal (exit 78),
    # still nothing secret in the output.
    w.secret_id_file.unlink()
    w.wrapped_file.write_text(wrapping_token + "\n")
    assert w.run_cli("serve").returncode == 78

    log = w.log_text()
    assert len(log.splitlines()) > 20  # DEBUG logging was on and the worker talked a lot
    assert f"***{w.keys[0][-4:]}" in log  # keys appear only as their fingerprints
    _assert_clean([log, *w.extra_outputs], [*w.keys, wrapping_token, role_id])


def test_secrets_never_in_reprs_or_exceptions(vault, worker_factory):
    w = worker_factory(vault)
    key = w.keys[0]
    secret_id = w.secret_id_file.read_text().strip()
    cfg = parse_config(w.make_config(), environ={})
    client = VaultClient(cfg.vault)
    texts: list[str] = []
    try:
        secret = client.read_kv(KV_MOUNT, w.key_path)
        token = client._token.reveal() if client._token else ""
        assert token.startswith(("s.", "hvs."))
        texts += [
            repr(secret),
            str(secret),
            repr(client._token),
            f"{client._token}",
            repr(vars(client)),
        ]

        metrics = new_metrics()
        keys = KeyCache(cfg.vault, cfg.provider, client, metrics)
        provider = ProviderClient(cfg.provider, metrics)
        dispatcher = Dispatcher(cfg.provider, provider, keys, metrics)
        w.emulator.admin.revoke_key(key)

        async def scenario() -> None:
            await keys.refresh("test")
            texts.append(repr(keys.current_key()))
            dispatcher.start()
            try:
                for _ in range(2):
                    try:
                        await dispatcher.solve(
                            "userrecaptcha", {"googlekey": "g", "pageurl": "https://e.test/"}
                        )
                    except SolveError as exc:
                        texts.extend(
                            [str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)]
                        )
                    else:
                        raise AssertionError("a revoked key solved")
            finally:
                await dispatcher.stop()
                await provider.close()

        asyncio.run(scenario())
        texts += [json.dumps(keys.health()), metrics.render()]

        # A refused login (wrong secret-id) names no credential either.
        w.secret_id_file.write_text(new_key() + "\n")
        bad = VaultClient(cfg.vault)
        try:
            with pytest.raises(VaultAuthError) as err:
                bad.login()
        finally:
            bad.close()
        texts += [str(err.value), repr(err.value)]
    finally:
        client.close()
    _assert_clean(texts, [key, secret_id, token])
