"""The worker against the real OpenBao and the emulator: login, refresh, SIGHUP, HA, wrapping."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time

import hvac
import pytest

from captcha_solver.config import parse_config
from captcha_solver.vault import VaultClient, VaultUnavailable, WrappingTokenError

from .conftest import APPROLE_MOUNT, KV_MOUNT, counters, free_port, new_key


def test_login_read_and_solve(vault, worker_factory):
    w = worker_factory(vault)
    w.set_metadata({"rotation_id": "r-1", "rotation_state": "complete", "unrelated": "x"})
    w.start()
    status, health = w.healthz()
    assert status == 200
    assert health["status"] == "ok"
    assert health["env"] == "dev"
    assert health["key_version"] == 1
    assert health["key_fingerprint"] == "***" + w.keys[0][-4:]
    assert health["vault_reachable"] is True
    assert health["circuit"] == "closed"
    assert health["rotation"] == {"rotation_id": "r-1", "rotation_state": "complete"}
    r = w.solve()
    assert r.status_code == 200, r.text
    assert r.json()["token"].startswith("03AGdBq2")
    assert counters(w.emulator, w.keys[0])["solved"] == 1

    # A proxy in the environment must not capture the loopback API calls of the CLI.
    proxied = {**os.environ, "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    proxied.pop("no_proxy", None)
    proxied.pop("NO_PROXY", None)
    status_cli = w.run_cli("status", env=proxied)
    assert status_cli.returncode == 0, status_cli.stderr
    assert json.loads(status_cli.stdout)["key_version"] == 1
    solve_cli = w.run_cli(
        "solve",
        "--method",
        "hcaptcha",
        "--param",
        "sitekey=abc",
        "--param",
        "pageurl=https://example.test/",
        env=proxied,
    )
    assert solve_cli.returncode == 0, solve_cli.stdout + solve_cli.stderr
    assert json.loads(solve_cli.stdout)["token"].startswith("P1_")
    assert w.stop() == 0


def test_refresh_on_interval(vault, worker_factory):
    w = worker_factory(vault)
    w.start(vault={"refresh_interval": 0.3})
    new = new_key()
    w.emulator.admin.add_key(new)
    assert w.write_key(new) == 2
    health = w.wait_health(lambda h: h["key_version"] == 2, within=5)
    assert health["key_fingerprint"] == "***" + new[-4:]
    assert w.solve().status_code == 200
    assert counters(w.emulator, new)["submitted"] == 1


def test_sighup_reads_key_at_once(vault, worker_factory):
    w = worker_factory(vault)
    w.start(vault={"refresh_interval": 300.0})
    new = new_key()
    w.emulator.admin.add_key(new)
    w.write_key(new)
    time.sleep(0.5)
    assert w.healthz()[1]["key_version"] == 1  # no interval refresh within 300 s
    w.signal(signal.SIGHUP)
    health = w.wait_health(lambda h: h["key_version"] == 2, within=3)
    assert health["key_fingerprint"] == "***" + new[-4:]
    assert any(r.get("reason") == "sighup" for r in w.log_records() if r["msg"] == "key loaded")


def test_second_vault_address_used_when_first_is_down(vault, worker_factory):
    w = worker_factory(vault)
    dead = f"https://127.0.0.1:{free_port()}"
    w.start(vault={"addrs": [dead, vault.addr]})
    assert w.solve().status_code == 200
    records = w.log_records()
    assert any(r["msg"] == "vault address unavailable" and r.get("addr") == dead for r in records)
    assert any(
        r["msg"] == "vault address switched" and r.get("addr") == vault.addr for r in records
    )


def test_token_renewal_and_relogin(vault, worker_factory):
    """A 2 s token is renewed before it expires; at its max TTL the worker logs in again; no key
    read ever fails for it.

    The renewal is due when a third of the lease is left (0.7 s here). On a busy machine a
    renewal can still arrive after Vault let the token go: the design answer is a fresh login
    at once, so the test holds the worker to that (every refused renewal is followed by a login
    before anything else touches Vault) rather than to the scheduler's punctuality."""
    w = worker_factory(vault, token_ttl=2)  # max TTL 8 s
    w.start(vault={"refresh_interval": 0.3})
    time.sleep(10)
    status, health = w.healthz()
    assert status == 200, health
    assert health["vault_reachable"] is True
    records = w.log_records()
    logins = [r for r in records if r["msg"] == "vault login ok"]
    assert len(logins) >= 2  # initial + at least one re-login at max TTL
    assert any(r["msg"] == "vault token renewed" for r in records)
    assert not any(r["msg"] == "key refresh failed" for r in records)
    vault_records = [r for r in records if r["msg"].startswith(("vault", "token renewal", "key "))]
    for i, record in enumerate(vault_records):
        if record["msg"].startswith("token renewal failed"):
            following = [r["msg"] for r in vault_records[i + 1 : i + 2]]
            assert following == ["vault login ok"], (record["msg"], following)


def _token_accessors_of(w) -> list[str]:
    """Accessors of the tokens the worker's AppRole holds (looked up with the admin token).

    The list holds every token of the shared test server, and other suites' tokens expire or
    are revoked between the list and the lookup: a token gone by then ("invalid accessor") is
    not one the worker holds."""
    found = []
    for accessor in w.admin.auth.token.list_accessors()["data"]["keys"]:
        try:
            looked_up = w.admin.auth.token.lookup_accessor(accessor)
        except hvac.exceptions.InvalidRequest as exc:
            if "invalid accessor" not in str(exc):
                raise
            continue
        meta = looked_up["data"].get("meta") or {}
        if meta.get("role_name") == w.name:
            found.append(accessor)
    return found


def test_refused_token_renewal_logs_in_again(vault, worker_factory):
    """The worker's token revoked behind its back: the next renewal is refused, the worker logs
    in afresh with its secret-id and its next read works (same process, no failed read)."""
    w = worker_factory(vault, token_ttl=6)  # renewal due 4 s after login
    w.start(vault={"refresh_interval": 300.0})
    [accessor] = _token_accessors_of(w)
    w.admin.auth.token.revoke_accessor(accessor)

    def relogged() -> bool:
        msgs = [r["msg"] for r in w.log_records()]
        refused = [i for i, m in enumerate(msgs) if m.startswith("token renewal failed")]
        return bool(refused) and "vault login ok" in msgs[refused[0] :]

    deadline = time.monotonic() + 15
    while not relogged():
        assert time.monotonic() < deadline, w.log_tail()
        time.sleep(0.2)
    new_accessors = _token_accessors_of(w)
    assert new_accessors
    assert accessor not in new_accessors
    new = new_key()
    w.emulator.admin.add_key(new)
    assert w.write_key(new) == 2
    w.signal(signal.SIGHUP)
    health = w.wait_health(lambda h: h["key_version"] == 2, within=5)
    assert health["status"] == "ok", health
    records = w.log_records()
    assert not any(r["msg"] == "key refresh failed" for r in records)
    assert not any(r["msg"].startswith("vault read forbidden") for r in records)
    assert w.proc is not None
    assert w.proc.poll() is None


def test_wrapped_secret_id_unwrapped_once(vault, worker_factory):
    w = worker_factory(vault, wrapped=True)
    wrapping_token = w.wrapped_file.read_text().strip()
    w.start()
    assert not w.wrapped_file.exists()
    assert stat.S_IMODE(w.secret_id_file.stat().st_mode) == 0o600
    accessor_file = w.secret_id_file.with_name("secret-id.accessor")
    assert stat.S_IMODE(accessor_file.stat().st_mode) == 0o600
    accessor = accessor_file.read_text().strip()
    looked_up = w.admin.auth.approle.read_secret_id_accessor(
        w.name, accessor, mount_point=APPROLE_MOUNT
    )
    assert looked_up["data"]["secret_id_accessor"] == accessor
    secret_id = w.secret_id_file.read_text().strip()
    w.keys.append(secret_id)
    assert w.solve().status_code == 200
    assert w.stop() == 0

    # Replay while the host holds a secret-id (a leftover file): the worker keeps the secret-id
    # it has, sets the refused file aside for the role, says why loudly, and serves.
    w.wrapped_file.write_text(wrapping_token + "\n")
    w.start()
    assert not w.wrapped_file.exists()
    refused = w.wrapped_file.with_name("secret-id.wrapped.refused")
    assert refused.read_text().strip() == wrapping_token
    assert w.secret_id_file.read_text().strip() == secret_id
    assert any(
        r["msg"] == "wrapped secret-id refused; keeping the secret-id this host already has"
        and "possible tampering" in r.get("error", "")
        for r in w.log_records()
    )
    assert w.solve().status_code == 200
    assert w.stop() == 0

    # Replay with no secret-id to fall back on -> refused, exit 78, "tampering", nothing leaked.
    refused.unlink()
    w.secret_id_file.unlink()
    w.wrapped_file.write_text(wrapping_token + "\n")
    result = w.run_cli("serve")
    assert result.returncode == 78
    assert "possible tampering" in result.stderr
    assert w.wrapped_file.exists()  # left for the operator to look at


def test_expired_wrapping_token_refused(vault, worker_factory, tmp_path):
    """An expired wrapping token: refused loudly when there is no secret-id to fall back on;
    set aside (``.refused``) when the host still holds a secret-id, which is then kept."""
    w = worker_factory(vault)
    held = w.secret_id_file.read_text()
    token, _ = w.new_secret_id(wrap_ttl="1s")
    w.keys.append(token)
    w.wrapped_file.write_text(token + "\n")
    time.sleep(2.5)
    cfg = parse_config(w.make_config(), environ={})
    client = VaultClient(cfg.vault)
    try:
        assert client.unwrap_secret_id() is False
        assert w.secret_id_file.read_text() == held
        assert "possible tampering" in client.refused_wrapping
        refused = w.wrapped_file.with_name(w.wrapped_file.name + ".refused")
        assert refused.read_text().strip() == token
        refused.rename(w.wrapped_file)
        w.secret_id_file.unlink()
        with pytest.raises(WrappingTokenError) as err:
            client.unwrap_secret_id()
    finally:
        client.close()
    assert "possible tampering" in str(err.value)
    assert token not in str(err.value)
    assert token not in repr(err.value)


def test_foreign_wrapping_token_refused(vault, worker_factory):
    """A wrapping token that does not wrap an AppRole secret-id (e.g. a wrapped KV read)."""
    w = worker_factory(vault)
    resp = w.admin.adapter.post("/v1/sys/wrapping/wrap", json={"secret_id": "x"}, wrap_ttl="60s")
    token = resp["wrap_info"]["token"]
    w.keys.append(token)
    w.wrapped_file.write_text(token + "\n")
    w.secret_id_file.unlink()  # nothing to fall back on: the refusal is fatal
    cfg = parse_config(w.make_config(), environ={})
    client = VaultClient(cfg.vault)
    try:
        with pytest.raises(WrappingTokenError, match="creation path"):
            client.unwrap_secret_id()
    finally:
        client.close()
    assert w.wrapped_file.exists()


def test_vault_client_reads_version_and_metadata(vault, worker_factory):
    w = worker_factory(vault)
    w.set_metadata({"rotation_state": "propagating", "new_version": "1"})
    cfg = parse_config(w.make_config(), environ={})
    client = VaultClient(cfg.vault)
    try:
        secret = client.read_kv(KV_MOUNT, w.key_path)
    finally:
        client.close()
    assert secret.version == 1
    assert secret.data["api_key"] == w.keys[0]
    assert secret.custom_metadata == {"rotation_state": "propagating", "new_version": "1"}
    assert w.keys[0] not in repr(secret)


def test_all_addresses_down(vault, worker_factory):
    w = worker_factory(vault)
    nowhere = f"https://127.0.0.1:{free_port()}"
    cfg = parse_config(w.make_config(vault={"addrs": [nowhere], "retries": 1}), environ={})
    client = VaultClient(cfg.vault)
    try:
        with pytest.raises(VaultUnavailable):
            client.read_kv(KV_MOUNT, w.key_path)
    finally:
        client.close()


def test_sd_notify_ready_after_the_key_is_loaded(vault, worker_factory, tmp_path):
    w = worker_factory(vault)
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        w.start(wait=False, extra_env={"NOTIFY_SOCKET": str(path)})
        assert sock.recv(64) == b"READY=1"
        status, health = w.healthz()  # ready means: listening, and the key is loaded
        assert status == 200
        assert health["key_version"] == 1
        w.signal(signal.SIGTERM)
        assert sock.recv(64) == b"STOPPING=1"
    assert w.stop() == 0


def _self_signed_ca() -> str:
    from cryptography.hazmat.primitives import serialization
    from testkit.vault import new_ca

    _, cert = new_ca("not the kit CA")
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_tls_is_verified(vault, worker_factory, tmp_path):
    """With the system store or a foreign CA the server is not trusted: no login is sent."""
    w = worker_factory(vault)
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text(_self_signed_ca())
    for ca in (None, str(other_ca)):
        raw = w.make_config(vault={"retries": 1})
        if ca:
            raw["vault"]["ca_file"] = ca
        else:
            del raw["vault"]["ca_file"]
        client = VaultClient(parse_config(raw, environ={}).vault)
        try:
            with pytest.raises(VaultUnavailable, match="SSLError"):
                client.login()
        finally:
            client.close()
        assert not client.has_token


def test_wrapped_secret_id_dropped_in_later_is_picked_up(vault, worker_factory):
    """Started before its credentials: unhealthy with the reason, then fine without a restart."""
    w = worker_factory(vault)
    w.secret_id_file.unlink()
    w.start(wait=False)
    health = w.wait_health(lambda h: h["error"] is not None, within=10)
    assert health["status"] == "unhealthy"
    assert "secret-id file" in health["error"]
    token, _ = w.new_secret_id(wrap_ttl="60s")
    w.keys.append(token)
    w.wrapped_file.write_text(token + "\n")
    w.wait_health(lambda h: h["status"] == "ok", within=10)
    assert not w.wrapped_file.exists()
    assert w.solve().status_code == 200


def test_sighup_while_the_first_vault_read_hangs_does_not_kill_the_worker(vault, worker_factory):
    """The rotation's nudge can reach a worker that is still starting: /healthz already answers
    (503) while the first Vault read waits. SIGHUP must then mean "re-read the key", never death
    by signal (which systemd counts as a clean stop and does not restart)."""
    with socket.socket() as silent:  # accepts the connection, never answers: a hung Vault
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        hung = f"https://127.0.0.1:{silent.getsockname()[1]}"
        w = worker_factory(vault)
        w.start(wait=False, vault={"addrs": [hung], "timeout": 5.0, "retries": 1})
        health = w.wait_health(lambda h: h["status"] != "ok" and h["env"] == "dev", within=15)
        assert health["key_version"] is None
        w.signal(signal.SIGHUP)
        time.sleep(1.0)
        assert w.proc is not None
        assert w.proc.poll() is None, f"worker died on SIGHUP:\n{w.log_tail()}"
        status, _ = w.healthz()
        assert status == 503
        w.signal(signal.SIGTERM)
        assert w.proc.wait(timeout=30) == 0


def test_take_secret_id_unwraps_at_delivery_and_the_worker_uses_it(vault, worker_factory):
    """`captcha-solver take-secret-id` (the role, right after delivering the token) unwraps the
    token at once, so it never waits for the restart; a rerun finds nothing; a used token is
    refused (78) with the host's secret-id kept and the token set aside for the role."""
    w = worker_factory(vault, wrapped=True)
    wrapping_token = w.wrapped_file.read_text().strip()
    w.write_config()
    taken = w.run_cli("take-secret-id")
    assert taken.returncode == 0, taken.stderr
    assert "secret-id unwrapped" in taken.stdout
    assert not w.wrapped_file.exists()
    secret_id = w.secret_id_file.read_text().strip()
    w.keys.append(secret_id)
    assert stat.S_IMODE(w.secret_id_file.stat().st_mode) == 0o600
    again = w.run_cli("take-secret-id")
    assert (again.returncode, again.stdout.strip()) == (0, "no wrapped secret-id waiting")

    w.wrapped_file.write_text(wrapping_token + "\n")  # a replayed (used) token
    refused = w.run_cli("take-secret-id")
    assert refused.returncode == 78
    assert "possible tampering" in refused.stderr
    assert w.wrapped_file.with_name("secret-id.wrapped.refused").exists()
    assert w.secret_id_file.read_text().strip() == secret_id

    w.start()  # the worker logs in with the secret-id taken at delivery
    assert w.solve().status_code == 200
    assert w.stop() == 0
