# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_token_check: a valid token with the capabilities a play needs, or a list of what lacks."""

from __future__ import annotations

import secrets

import hvac.exceptions
from ansible_collections.captcha_kit.vault.plugins.modules import vault_token_check

MAIN = vault_token_check.main
NEEDED = {
    "sys/mounts/secret": ["create", "read", "update", "sudo"],
    "/sys/policy/captcha-worker-dev/": "create, read",
}


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_token_check) == []


def test_a_token_with_every_capability_passes_and_changes_nothing(vault, run):
    token = vault.add_token(
        policies=["captcha-provisioner", "default"],
        caps={
            "sys/mounts/secret": ["create", "read", "update", "delete", "sudo"],
            "sys/policy/captcha-worker-dev": ["create", "read", "update"],
        },
        display_name="token-ops",
    )
    result = run(MAIN, token=token, capabilities=NEEDED, check_mode=True)
    assert result == {
        "failed": False,
        "changed": False,
        "display_name": "token-ops",
        "policies": ["captcha-provisioner", "default"],
        "missing": {},
        "warnings": [],
    }
    assert vault.writes == []


def test_missing_capabilities_are_listed_per_path(vault, run):
    token = vault.add_token(caps={"sys/mounts/secret": ["read"]})
    result = run(MAIN, token=token, capabilities=NEEDED)
    assert result["failed"] is True
    assert result["missing"] == {
        "sys/mounts/secret": ["create", "sudo", "update"],
        "sys/policy/captcha-worker-dev": ["create", "read"],
    }
    assert result["msg"] == (
        "The Vault token lacks rights this play needs (the token each playbook needs is in "
        "docs/tokens.md: policies/captcha-provisioner.hcl to provision, captcha-deployer-<env> "
        "to deploy workers, the rotator AppRole to rotate). Missing: sys/mounts/secret: create, "
        "sudo, update; "
        "sys/policy/captcha-worker-dev: create, read. Nothing was changed."
    )


def test_root_satisfies_everything_and_deny_nothing(vault, run):
    token = vault.add_token(caps={"a": ["root"], "b": ["deny", "read"]})
    result = run(MAIN, token=token, capabilities={"a": ["sudo"], "b": ["read"]})
    assert result["missing"] == {"b": ["read"]}


def test_without_capabilities_only_the_token_is_looked_up(vault, run):
    result = run(MAIN)
    assert result["changed"] is False
    assert result["policies"] == ["root"]
    assert "sys.get_capabilities" not in vault.calls


def test_an_unknown_token_fails_with_what_to_do(vault, run):
    result = run(MAIN, token=secrets.token_hex(16))
    assert result["failed"] is True
    assert result["msg"] == (
        "The Vault token in VAULT_TOKEN / token is not valid at https://vault.test:8200 "
        "(expired, revoked or from another server): log in again and export a fresh token"
    )


def test_a_token_that_may_not_read_its_capabilities_is_told_so(vault, run):
    vault.fail("sys.get_capabilities", hvac.exceptions.Forbidden("permission denied"))
    result = run(MAIN, capabilities={"a": ["read"]})
    assert result["failed"] is True
    assert result["msg"].startswith("Permission denied to read the token's capabilities")


def test_a_sealed_server_is_named(vault, run):
    vault.fail("token.lookup_self", hvac.exceptions.VaultDown("Vault is sealed"))
    result = run(MAIN)
    assert result["failed"] is True
    assert result["msg"].startswith(
        "Vault at https://vault.test:8200 is sealed or down: unseal it first"
    )
