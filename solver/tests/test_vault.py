import os
import stat

import pytest

from captcha_solver.vault import VaultAuthError, VaultClient, VaultUnavailable, write_private_file

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
