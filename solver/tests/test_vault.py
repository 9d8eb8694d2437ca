import datetime as dt
import logging
import os
import stat
import time
from typing import Any

import hvac.exceptions
import pytest

from captcha_solver.config import ConfigError, parse_config
from captcha_solver.vault import (
    SecretIdExpiry,
    VaultAuthError,
    VaultClient,
    VaultUnavailable,
    parse_rfc3339,
    read_secret_id_expiry,
    write_private_file,
)

from .helpers import free_port, make_config


def test_write_private_file_is_0600_and_atomic(tmp_path):
    path = tmp_path / "secret-id"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_private_file(path, "new\n")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret-id"]


def test_all_addresses_down_is_unavailable_after_retries(tmp_path):
    ports = [free_port(), free_port()]
    cfg = make_config(
        tmp_path,
        vault__addrs=[f"https://127.0.0.1:{p}" for p in ports],
        vault__retries=3,
    )
    (tmp_path / "role-id").write_text("r")
    (tmp_path / "secret-id").write_text("s")
    sleeps: list[float] = []
    client = VaultClient(cfg.vault, sleep=sleeps.append)
    with pytest.raises(VaultUnavailable, match="no Vault address answered"):
        client.login()
    assert len(sleeps) == 2  # between the three rounds over both addresses
    assert not client.has_token


def test_a_prompt_read_pauses_steadily_between_rounds(tmp_path):
    """A read the rotation waits for (prompt=True: the worker was nudged) pauses retry_delay
    (+-50 %) between its rounds; any other call doubles the pause each round."""
    cfg = make_config(
        tmp_path,
        vault__addrs=[f"https://127.0.0.1:{free_port()}"],
        vault__retries=4,
        vault__retry_delay=1.0,
    )
    (tmp_path / "role-id").write_text("r")
    (tmp_path / "secret-id").write_text("s")
    prompt: list[float] = []
    with pytest.raises(VaultUnavailable):
        VaultClient(cfg.vault, sleep=prompt.append).read_kv("secret", "k", prompt=True)
    assert len(prompt) == 3
    assert all(0.5 <= d <= 1.5 for d in prompt), prompt
    backoff: list[float] = []
    client = VaultClient(cfg.vault, sleep=backoff.append)
    with pytest.raises(VaultUnavailable):
        client.read_kv("secret", "k")
    assert len(backoff) == 3
    assert 2.0 <= backoff[2] <= 6.0, backoff
    assert not client._prompt, "the next call is not prompt"


def test_missing_credential_files(tmp_path):
    cfg = make_config(tmp_path)
    client = VaultClient(cfg.vault)
    with pytest.raises(VaultAuthError, match="role-id file"):
        client.login()
    (tmp_path / "role-id").write_text("r")
    (tmp_path / "secret-id").write_text("\n")
    with pytest.raises(VaultAuthError, match=r"secret-id file .* is empty"):
        client.login()


def test_no_wrapped_file_means_nothing_to_unwrap(tmp_path):
    cfg = make_config(tmp_path, vault__wrapped_secret_id_file=str(tmp_path / "wrapped"))
    assert VaultClient(cfg.vault).unwrap_secret_id() is False


def test_ambient_vault_token_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "s.ambient-token-value")
    cfg = make_config(tmp_path)
    client = VaultClient(cfg.vault)
    assert all(c.token == "" for c in client._clients)


# --------------------------------------------------------------------------- secret-id expiry

ISSUED = "2031-05-06T07:08:09.123456789Z"  # Vault's RFC 3339 with nanoseconds
ISSUED_AT = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC).timestamp()
ACCESSOR = "0b1c2d3e-aaaa-bbbb-cccc-000000000001"


class ScriptedVault:
    """Answers VaultClient._call by operation name, from a script; records the calls."""

    def __init__(self, **answers: Any) -> None:
        self.answers = {k: list(v) for k, v in answers.items()}
        self.calls: list[str] = []

    def __call__(self, what: str, op: Any) -> Any:
        self.calls.append(what)
        answer = self.answers[what].pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _wrapped_client(tmp_path, monkeypatch, ttl: Any, **over: Any) -> tuple[VaultClient, Any]:
    cfg = make_config(tmp_path, vault__wrapped_secret_id_file=str(tmp_path / "wrapped"), **over)
    (tmp_path / "wrapped").write_text("wrapping-token-value\n")
    unwrapped: dict[str, Any] = {"secret_id": "the-secret-id-value", "secret_id_accessor": ACCESSOR}
    if ttl is not None:
        unwrapped["secret_id_ttl"] = ttl
    script = ScriptedVault(
        unwrap=[
            {"data": {"creation_path": "auth/approle/role/r/secret-id", "creation_time": ISSUED}},
            {"data": unwrapped},
        ]
    )
    client = VaultClient(cfg.vault)
    monkeypatch.setattr(client, "_call", script)
    return client, cfg


def test_parse_rfc3339():
    assert parse_rfc3339(ISSUED) == pytest.approx(ISSUED_AT)
    assert parse_rfc3339("2031-05-06T09:08:09+02:00") == pytest.approx(ISSUED_AT - 0.123456)
    assert parse_rfc3339("2031-05-06T07:08:09Z") == pytest.approx(ISSUED_AT - 0.123456)
    assert parse_rfc3339("0001-01-01T00:00:00Z") is None  # Vault's "no expiry"
    assert parse_rfc3339("") is None
    assert parse_rfc3339("yesterday") is None


def test_unwrap_keeps_the_expiry_beside_the_secret_id(tmp_path, monkeypatch):
    """The unwrap response's secret_id_ttl, counted from the wrapping token's creation (when
    the secret-id was issued), is written to <secret_id_file>.expires (0600, not secret)."""
    client, _ = _wrapped_client(tmp_path, monkeypatch, ttl=2592000)
    assert client.unwrap_secret_id() is True
    expected = ISSUED_AT + 2592000
    assert client.secret_id_expiry == SecretIdExpiry(expires_at=pytest.approx(expected))
    expires = tmp_path / "secret-id.expires"
    assert expires.read_text() == "2031-06-05T07:08:09Z\n"
    assert stat.S_IMODE(expires.stat().st_mode) == 0o600
    assert "the-secret-id-value" not in expires.read_text()
    assert (tmp_path / "secret-id.accessor").read_text() == ACCESSOR + "\n"


def test_the_expiry_is_read_back_at_start(tmp_path, monkeypatch):
    """A restarted worker (a new VaultClient) knows the expiry from the file."""
    client, cfg = _wrapped_client(tmp_path, monkeypatch, ttl=600)
    assert client.unwrap_secret_id() is True
    again = VaultClient(cfg.vault)
    assert again.secret_id_expiry.expires_at == pytest.approx(ISSUED_AT + 600, abs=1)
    assert again.secret_id_expiry.text() == "2031-05-06T07:18:09Z"


def test_a_secret_id_without_ttl_never_expires(tmp_path, monkeypatch):
    client, cfg = _wrapped_client(tmp_path, monkeypatch, ttl=0)
    assert client.unwrap_secret_id() is True
    assert client.secret_id_expiry == SecretIdExpiry(never=True)
    assert (tmp_path / "secret-id.expires").read_text() == "never\n"
    assert VaultClient(cfg.vault).secret_id_expiry.never


def test_an_unwrap_without_ttl_leaves_no_stale_expiry(tmp_path, monkeypatch):
    """No secret_id_ttl in the answer: unknown, and an earlier secret-id's file is removed."""
    (tmp_path / "secret-id.expires").write_text("2031-01-01T00:00:00Z\n")
    client, _ = _wrapped_client(tmp_path, monkeypatch, ttl=None)
    assert client.unwrap_secret_id() is True
    assert not client.secret_id_expiry.known
    assert client.secret_id_expiry.text() == "unknown"
    assert not (tmp_path / "secret-id.expires").exists()


def test_unknown_expiry_without_a_file_or_with_one_of_an_earlier_secret_id(tmp_path):
    cfg = make_config(tmp_path)
    secret_id = tmp_path / "secret-id"
    secret_id.write_text("s\n")
    assert read_secret_id_expiry(cfg.vault) == SecretIdExpiry()  # an older deployment
    expires = tmp_path / "secret-id.expires"
    expires.write_text("not a time\n")
    assert read_secret_id_expiry(cfg.vault) == SecretIdExpiry()
    expires.write_text("2031-01-01T00:00:00Z\n")
    assert read_secret_id_expiry(cfg.vault).expires_at == pytest.approx(1924992000)
    # The secret-id file was replaced after the expiry was written: that expiry is not its own.
    later = time.time() + 5
    os.utime(secret_id, (later, later))
    assert read_secret_id_expiry(cfg.vault) == SecretIdExpiry()


def _login_answer(role_name: str = "captcha-worker-dev") -> dict[str, Any]:
    return {
        "auth": {
            "client_token": "s.not-a-real-token-000000000",
            "lease_duration": 3600,
            "renewable": True,
            "metadata": {"role_name": role_name},
        }
    }


def _old_deployment(tmp_path) -> Any:
    cfg = make_config(tmp_path)
    (tmp_path / "role-id").write_text("r\n")
    (tmp_path / "secret-id").write_text("the-secret-id-value\n")
    (tmp_path / "secret-id.accessor").write_text(ACCESSOR + "\n")
    return cfg


def test_unknown_expiry_is_looked_up_once_where_the_policy_allows(tmp_path, monkeypatch):
    """A secret-id from before the worker kept its expiry: looked up once by its accessor
    after a login (when the worker's policy allows it), then kept in the file."""
    cfg = _old_deployment(tmp_path)
    client = VaultClient(cfg.vault)
    assert client.secret_id_expiry.text() == "unknown"
    script = ScriptedVault(
        login=[_login_answer(), _login_answer()],
        **{"secret-id lookup": [{"data": {"expiration_time": "2031-01-01T00:00:00Z"}}]},
    )
    monkeypatch.setattr(client, "_call", script)
    client.login()
    assert client.secret_id_expiry.expires_at == pytest.approx(1924992000)
    assert (tmp_path / "secret-id.expires").read_text() == "2031-01-01T00:00:00Z\n"
    client.login()
    assert script.calls == ["login", "secret-id lookup", "login"]


def test_unknown_expiry_stays_unknown_when_the_lookup_is_refused(tmp_path, monkeypatch, caplog):
    """The kit's worker policy does not allow the lookup: one refused lookup per process, the
    expiry stays "unknown", the login is not disturbed."""
    caplog.set_level(logging.INFO, logger="captcha_solver.vault")
    cfg = _old_deployment(tmp_path)
    client = VaultClient(cfg.vault)
    script = ScriptedVault(
        login=[_login_answer(), _login_answer()],
        **{"secret-id lookup": [hvac.exceptions.Forbidden(["permission denied"])]},
    )
    monkeypatch.setattr(client, "_call", script)
    client.login()
    client.login()
    assert client.has_token
    assert client.secret_id_expiry.text() == "unknown"
    assert script.calls == ["login", "secret-id lookup", "login"]
    assert any("secret-id expiry unknown" in m for m in caplog.messages)
    assert not any("the-secret-id-value" in m for m in caplog.messages)
    # Not asked again for this secret-id, not even by a restarted worker ...
    assert (tmp_path / "secret-id.expires").read_text() == "unknown\n"
    again = VaultClient(cfg.vault)
    assert again.secret_id_expiry.text() == "unknown"
    script_again = ScriptedVault(login=[_login_answer()])
    monkeypatch.setattr(again, "_call", script_again)
    again.login()
    assert script_again.calls == ["login"]
    # ... but for a new secret-id (written after that mark) it is.
    later = time.time() + 5
    os.utime(tmp_path / "secret-id", (later, later))
    third = VaultClient(cfg.vault)
    script_third = ScriptedVault(
        login=[_login_answer()], **{"secret-id lookup": [VaultUnavailable("down")]}
    )
    monkeypatch.setattr(third, "_call", script_third)
    third.login()
    assert script_third.calls == ["login", "secret-id lookup"]
    # Vault was away: no mark, the next process asks again.
    fourth = VaultClient(cfg.vault)
    script_fourth = ScriptedVault(
        login=[_login_answer()],
        **{"secret-id lookup": [{"data": {"expiration_time": "0001-01-01T00:00:00Z"}}]},
    )
    monkeypatch.setattr(fourth, "_call", script_fourth)
    fourth.login()
    assert script_fourth.calls == ["login", "secret-id lookup"]
    assert fourth.secret_id_expiry.never  # Vault's answer for a secret-id without TTL


def test_secret_id_warn_before_setting(tmp_path):
    """Default 7 days; validated like every setting (the error names it); the environment
    overrides it (how a unit drop-in sets it where the deployment has no variable for it)."""
    assert make_config(tmp_path).vault.secret_id_warn_before == 604800.0
    assert make_config(tmp_path, vault__secret_id_warn_before=30).vault.secret_id_warn_before == 30
    with pytest.raises(ConfigError, match=r"^vault\.secret_id_warn_before: must be >= 0"):
        make_config(tmp_path, vault__secret_id_warn_before=-1)
    cfg = make_config(tmp_path)
    raw = {
        "env": "dev",
        "vault": {
            "addrs": ["https://127.0.0.1:1"],
            "role_id_file": str(tmp_path / "role-id"),
            "secret_id_file": str(tmp_path / "secret-id"),
        },
        "provider": {"url": "http://127.0.0.1:1"},
    }
    env = {"CAPTCHA_SOLVER_VAULT_SECRET_ID_WARN_BEFORE": "45"}
    assert parse_config(raw, environ=env).vault.secret_id_warn_before == 45.0
    assert cfg.vault.secret_id_expiry_file == tmp_path / "secret-id.expires"
