# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_approle_login: the credential files are checked before any Vault call. The login
itself (failover across nodes, refusals) runs against a real OpenBao in
tests/test_rotation_scheduled.py."""

from __future__ import annotations

import pytest
import requests
from ansible_collections.captcha_kit.vault.plugins.modules import vault_approle_login

MAIN = vault_approle_login.main


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_approle_login) == []


def test_a_missing_or_empty_credential_file_fails_before_any_vault_call(vault, run, tmp_path):
    role_id = tmp_path / "role-id"
    role_id.write_text("a-role-id\n")
    empty = tmp_path / "secret-id"
    empty.write_text("\n")
    missing = run(MAIN, role_id_file=str(tmp_path / "nope"), secret_id_file=str(empty), token="")
    assert missing["failed"] is True
    assert missing["msg"] == (
        f"Cannot read the role-id file {tmp_path / 'nope'} (No such file or directory);"
        " nothing changed"
    )
    blank = run(MAIN, role_id_file=str(role_id), secret_id_file=str(empty), token="")
    assert blank["msg"] == f"The secret-id file {empty} is empty; nothing changed"
    assert "a-role-id" not in str(blank)
    assert vault.writes == []


@pytest.fixture
def credentials(tmp_path):
    role_id, secret_id = tmp_path / "role-id", tmp_path / "secret-id"
    role_id.write_text("a-role-id\n")
    secret_id.write_text("a-secret-id\n")
    return {"role_id_file": str(role_id), "secret_id_file": str(secret_id)}


def test_an_unreachable_vault_is_named_for_the_login_and_the_logout(vault, run, credentials):
    refused = requests.exceptions.ConnectionError("connection refused")
    vault.fail("approle.login", refused)
    login = run(MAIN, token="", **credentials)
    assert login["failed"] is True
    assert login["msg"].startswith("AppRole login failed: Cannot reach Vault at ")
    assert login["msg"].endswith("; nothing changed")
    assert "a-secret-id" not in str(login)
    vault.fail("token.revoke_self", refused)
    logout = run(MAIN, state="absent")
    assert logout["msg"].startswith("Revoking the login token failed: Cannot reach Vault at ")


def test_an_error_that_is_no_connection_error_is_not_hidden(vault, run, credentials):
    vault.fail("approle.login", KeyError("a bug"))
    with pytest.raises(KeyError):
        run(MAIN, token="", **credentials)
