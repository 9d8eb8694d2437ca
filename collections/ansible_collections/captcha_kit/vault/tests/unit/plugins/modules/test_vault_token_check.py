# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_token_check: a valid token with the capabilities a play needs, or a list of what lacks."""

from __future__ import annotations

import secrets
from types import SimpleNamespace

import hvac.exceptions
import pytest
import requests
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
        "standby_reads": [],
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


# ---------------------------------------------------------------- standbys answering reads
# The real answers (OpenBao 2.7, bench/results-standby-reads.md, tests/faults): sys/leader tells
# a standby (is_self false); with X-Vault-No-Request-Forwarding a standby that forwards answers
# 307 to the active node, one with standby reads answers 200 itself.
NODES = ["https://vault.test:8200", "https://vault2.test:8200", "https://vault3.test:8200"]


class Nodes:
    """The HTTP answers of each node to the check's two requests (None: the node is away)."""

    def __init__(self, answers):
        self.answers = answers  # addr -> (is_self, lookup-self status) or None
        self.asked = []

    def get(self, url, headers=None, **_):
        addr, path = url.split("/v1/", 1)
        self.asked.append((addr, path, dict(headers or {})))
        if self.answers[addr] is None:
            raise requests.exceptions.ConnectionError("refused")
        is_self, lookup = self.answers[addr]
        if path == "sys/leader":
            body = {"ha_enabled": True, "is_self": is_self}
            return SimpleNamespace(status_code=200, json=lambda: body)
        return SimpleNamespace(status_code=lookup, json=dict)


@pytest.fixture
def nodes(vault, monkeypatch):
    """Set ``nodes.answers``; every client the module builds sends its raw requests there."""
    answering = Nodes({})
    make = vault.client

    def client(*args, **kwargs):
        made = make(*args, **kwargs)
        made.adapter = SimpleNamespace(session=answering)
        return made

    monkeypatch.setattr(hvac, "Client", client)
    return answering


def test_a_standby_answering_reads_itself_fails_the_check_naming_it(vault, run, nodes):
    nodes.answers = {NODES[0]: (True, 200), NODES[1]: (False, 200), NODES[2]: (False, 307)}
    result = run(MAIN, urls=NODES[1:])
    assert result["failed"] is True
    assert result["standby_reads"] == [NODES[1]]
    assert result["msg"].startswith(
        f"Vault standby {NODES[1]} answers reads from its own copy (OpenBao's standby reads, on"
        " unless disable_standby_reads = true): right after a put, and for a whole leader"
        " election, such a node answers the old key version"
    )
    assert "vault_provision_allow_standby_reads=true" in result["msg"]
    assert result["msg"].endswith("Nothing was changed.")
    assert vault.writes == []
    # The lookup asks the node itself: no forwarding, no redirect followed.
    lookups = [h for _, path, h in nodes.asked if path == "auth/token/lookup-self"]
    assert len(lookups) == 2
    assert all(h["X-Vault-No-Request-Forwarding"] == "true" for h in lookups)


def test_forwarding_standbys_pass_and_a_node_away_is_left_to_the_other_checks(run, nodes):
    nodes.answers = {NODES[0]: (False, 307), NODES[1]: (True, 200), NODES[2]: None}
    result = run(MAIN, urls=NODES[1:])
    assert result["failed"] is False
    assert result["standby_reads"] == []
    asked = [(addr, path) for addr, path, _ in nodes.asked]
    assert (NODES[1], "auth/token/lookup-self") not in asked, "the active node is not asked"


def test_standby_reads_allowed_or_a_single_address_are_not_looked_at(run, nodes):
    nodes.answers = {NODES[0]: (False, 200), NODES[1]: (False, 200)}
    assert run(MAIN, urls=NODES[1:2], allow_standby_reads=True)["failed"] is False
    assert run(MAIN)["failed"] is False
    assert nodes.asked == []
