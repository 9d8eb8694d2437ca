"""The secret-id's expiry against the real OpenBao: learnt at unwrap, kept across a restart,
shown in /healthz and /metrics, warned about in the log; "unknown" for an older deployment
whose policy (the kit's) does not allow the worker to look its accessor up."""

from __future__ import annotations

import datetime as dt
import re
import stat

from testkit.creds import write_private

from .conftest import APPROLE_MOUNT

SECRET_ID_TTL = 120  # seconds, set on the AppRole role
WARN_BEFORE = 600.0  # > the TTL: the warning is due from the start
# OpenBao tokens start with "s." (Vault: "hvs."), batch tokens "b.", then 24+ characters.
TOKEN_RE = re.compile(r"\b(?:hvs|hvb|s|b)\.[A-Za-z0-9]{20,}")


def _gauge(metrics: str, name: str) -> list[float]:
    return [float(line.split()[1]) for line in metrics.splitlines() if line.startswith(name + " ")]


def _assert_no_secrets(texts: list[str], secrets: list[str]) -> None:
    assert secrets
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[-4:]}) leaked into: {text[:200]!r}"
        assert not TOKEN_RE.search(text), f"a Vault token leaked into: {text[:200]!r}"


def test_short_secret_id_ttl_is_reported_and_warned_about(vault, worker_factory):
    """A wrapped secret-id of a role with secret_id_ttl 120 s and warn_before 600 s: /healthz
    stays ok, reports about 120 s left and the warning, the gauge says the same, the log has
    the WARNING once; a restarted worker knows the same expiry from the file it kept. No
    secret in any output."""
    w = worker_factory(vault, wrapped=True)
    w.admin.auth.approle.create_or_update_approle(
        w.name, secret_id_ttl=f"{SECRET_ID_TTL}s", mount_point=APPROLE_MOUNT
    )
    token, _ = w.new_secret_id(wrap_ttl="120s")  # issued under the short TTL
    w.keys.append(token)
    write_private(w.wrapped_file, token + "\n")

    w.start(vault={"secret_id_warn_before": WARN_BEFORE})
    assert not w.wrapped_file.exists()
    w.keys.append(w.secret_id_file.read_text().strip())
    status, health = w.healthz()
    assert status == 200
    assert health["status"] == "ok", health
    left = health["secret_id_expires_in_seconds"]
    assert SECRET_ID_TTL - 30 < left <= SECRET_ID_TTL, health
    expires_at = health["secret_id_expires_at"]
    at = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    assert abs(at - (dt.datetime.now(dt.UTC).timestamp() + left)) < 5
    [warning] = health["warnings"]
    assert warning.startswith("secret-id expires in ")
    assert f"vault.secret_id_warn_before ({WARN_BEFORE:g} s)" in warning
    [gauge] = _gauge(w.metrics(), "captcha_solver_secret_id_expires_in_seconds")
    assert SECRET_ID_TTL - 30 < gauge <= SECRET_ID_TTL

    expires_file = w.secret_id_file.with_name("secret-id.expires")
    assert expires_file.read_text().strip() == expires_at
    assert stat.S_IMODE(expires_file.stat().st_mode) == 0o600
    warned = [
        r
        for r in w.log_records()
        if r.get("level") == "WARNING" and r["msg"].startswith("secret-id expires in ")
    ]
    assert len(warned) == 1, warned  # once, not per request or per health check
    assert warned[0]["secret_id_expires"] == expires_at
    unwrapped = [r for r in w.log_records() if r["msg"] == "secret-id unwrapped"]
    assert unwrapped[0]["secret_id_expires"] == expires_at

    # A restart keeps it: the new process reads the expiry beside the secret-id.
    assert w.stop() == 0
    w.start(vault={"secret_id_warn_before": WARN_BEFORE})
    again = w.healthz()[1]
    assert again["secret_id_expires_at"] == expires_at
    assert again["secret_id_expires_in_seconds"] <= left
    assert again["warnings"]
    assert w.solve().status_code == 200
    assert w.stop() == 0
    _assert_no_secrets([w.log_text(), *w.extra_outputs, expires_file.read_text()], w.keys)


def test_older_deployment_reports_unknown_without_a_wider_policy(vault, worker_factory):
    """A secret-id with no expiry file (delivered before the worker kept it) and its accessor:
    the worker tries the accessor lookup once; the kit's worker policy refuses it, so the
    expiry is "unknown" (null seconds, no warning, no gauge sample) and the worker is ok; a
    restart does not ask again."""
    w = worker_factory(vault)
    secret_id, accessor = w.new_secret_id()
    w.keys.append(secret_id)
    write_private(w.secret_id_file, secret_id + "\n")
    write_private(w.secret_id_file.with_name("secret-id.accessor"), accessor + "\n")

    w.start(vault={"secret_id_warn_before": WARN_BEFORE})
    status, health = w.healthz()
    assert status == 200
    assert health["status"] == "ok", health
    assert health["secret_id_expires_at"] == "unknown"
    assert health["secret_id_expires_in_seconds"] is None
    assert health["warnings"] == []
    assert _gauge(w.metrics(), "captcha_solver_secret_id_expires_in_seconds") == []
    assert w.solve().status_code == 200
    lookups = [r for r in w.log_records() if r["msg"].startswith("secret-id expiry unknown")]
    assert len(lookups) == 1, lookups
    assert "permission denied" in lookups[0]["error"]
    # The refusal is remembered beside the secret-id: a restarted worker does not ask again.
    assert w.secret_id_file.with_name("secret-id.expires").read_text() == "unknown\n"
    assert w.stop() == 0
    w.start(vault={"secret_id_warn_before": WARN_BEFORE})
    assert w.healthz()[1]["secret_id_expires_at"] == "unknown"
    assert w.stop() == 0
    lookups = [r for r in w.log_records() if r["msg"].startswith("secret-id expiry unknown")]
    assert len(lookups) == 1, lookups
    _assert_no_secrets([w.log_text(), *w.extra_outputs], w.keys)
