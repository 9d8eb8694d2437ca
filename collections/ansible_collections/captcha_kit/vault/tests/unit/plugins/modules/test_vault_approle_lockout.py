# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_approle_lockout: whether an env's role-id is locked, without ever showing it."""

from __future__ import annotations

import json

from ansible_collections.captcha_kit.vault.plugins.modules import vault_approle_lockout

MAIN = vault_approle_lockout.main


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_approle_lockout) == []


def test_a_locked_role_id_is_named_and_never_shown(vault, run):
    vault.add_auth("approle")
    vault.add_role("captcha-worker-prod")
    vault.add_role("captcha-worker-dev")
    role_id = vault.role_ids[("approle", "captcha-worker-prod")]
    vault.locked["approle"] = [role_id]
    result = run(MAIN, role_name="captcha-worker-prod", check_mode=True)
    assert result["locked"] is True
    assert result["changed"] is False
    assert result["locked_aliases"] == 1
    assert result["mount_accessor"] == vault.auth_methods["approle/"]["accessor"]
    assert role_id not in json.dumps(result)
    assert vault.writes == []
    other = run(MAIN, role_name="captcha-worker-dev")
    assert other["locked"] is False


def test_nothing_locked(vault, run):
    vault.add_auth("approle-x")
    vault.add_role("captcha-worker-dev", mount="approle-x")
    result = run(MAIN, mount="approle-x", role_name="captcha-worker-dev")
    assert result["locked"] is False
    assert result["locked_aliases"] == 0


def test_a_mount_that_is_not_there_is_named(vault, run):
    result = run(MAIN, mount="nowhere", role_name="captcha-worker-dev")
    assert result["failed"] is True
    assert result["msg"] == "No auth method is enabled at auth/nowhere/"
