"""Bad input to vault_provision: each case is a clear error, and Vault is left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from testkit.creds import new_key, new_tag
from testkit.paths import REPO
from testkit.playbook import provision_vars, run_playbook
from testkit.vault import new_ca

PLAYBOOK = "playbooks/provision-vault.yml"


def _assert_refused(result, *phrases: str) -> None:
    assert result.rc != 0, "the run should have failed"
    assert result.changed == 0, result.changed_results()
    messages = result.failure_messages()
    for phrase in phrases:
        assert phrase in messages, f"{phrase!r} not in:\n{messages}"


def _other_ca(path: Path) -> Path:
    _, cert = new_ca("some other CA")
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize(
    ("case", "phrases"),
    [
        ("unknown_env", ["unknown", "qa", "vault_provision_known_envs"]),
        ("bad_env_name", ["do not match", "Dev_1"]),
        ("empty_envs", ["non-empty list"]),
        ("malformed_cidr", ["Malformed CIDR", "10.0.0.300"]),
        ("cidr_with_host_bits", ["Malformed CIDR", "10.1.2.3/8", "host bits"]),
        ("malformed_ttl", ["Malformed durations", "an hour"]),
        ("first_key_malformed", ["do not match", "(values not shown)"]),
        ("first_key_unknown_env", ["vault_provision_first_keys"]),
        ("production_env_unbound", ["must bind", "rotator-v", "-prod: secret_id_bound_cidrs"]),
        ("production_env_unbound_by_override", ["must bind", "worker-v", "-prod: token_bound"]),
        ("production_env_blank_waiver", ["must bind", "vault_provision_unbound_cidrs_waivers"]),
        ("first_key_trailing_newline", ["do not match", "(values not shown)"]),
    ],
)
def test_bad_variables_fail_before_any_change(vault, snapshot, case, phrases):
    """Bad variables fail in validation with a message naming the problem; nothing changes."""
    tag = new_tag("v")
    extra = provision_vars(vault, tag)
    envs = extra["vault_provision_envs"]
    secret_value = new_key()
    if case == "unknown_env":
        extra["vault_provision_envs"] = [envs[0], "qa"]
    elif case == "bad_env_name":
        extra["vault_provision_envs"] = [envs[0], "Dev_1"]
        extra["vault_provision_known_envs"] = [*envs, "Dev_1"]
    elif case == "empty_envs":
        extra["vault_provision_envs"] = []
    elif case == "malformed_cidr":
        extra["vault_provision_worker_secret_id_bound_cidrs"] = ["127.0.0.1", "10.0.0.300"]
    elif case == "cidr_with_host_bits":
        extra["vault_provision_worker_role_overrides"] = {
            envs[1]: {"token_bound_cidrs": ["10.1.2.3/8"]}
        }
    elif case == "malformed_ttl":
        extra["vault_provision_worker_token_ttl"] = "an hour"  # noqa: S105 - a duration
    elif case == "first_key_malformed":
        secret_value = "not-a-key-" + new_key()  # pragma: allowlist secret
        extra["vault_provision_first_keys"] = {envs[0]: secret_value}
    elif case == "first_key_trailing_newline":  # `$` alone would let the newline into Vault
        secret_value = new_key() + "\n"
        extra["vault_provision_first_keys"] = {envs[0]: secret_value}
    elif case == "first_key_unknown_env":
        extra["vault_provision_first_keys"] = {"elsewhere": secret_value}
    elif case == "production_env_unbound":  # the rotator roles have no CIDRs here
        extra["vault_provision_production_envs"] = [envs[2]]
    elif case == "production_env_unbound_by_override":
        extra.update(_rotator_bound())
        extra["vault_provision_production_envs"] = [envs[2]]
        extra["vault_provision_worker_role_overrides"] = {envs[2]: {"token_bound_cidrs": []}}
    elif case == "production_env_blank_waiver":
        extra["vault_provision_production_envs"] = [envs[2]]
        extra["vault_provision_unbound_cidrs_waivers"] = {envs[2]: " "}
    before = snapshot(tag)
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    _assert_refused(result, *phrases)
    assert snapshot(tag) == before
    assert before["policies"] == {}
    assert secret_value not in result.output


def _rotator_bound() -> dict[str, list[str]]:
    return {
        "vault_provision_rotator_secret_id_bound_cidrs": ["127.0.0.1"],
        "vault_provision_rotator_token_bound_cidrs": ["127.0.0.1/32"],
    }


def test_production_env_with_bindings_or_a_waiver_is_provisioned(vault, vault_client):
    """A production env whose roles are all bound is provisioned; one whose rotator is not, with
    a reason in the waivers, is provisioned too and the run says so."""
    tag = new_tag("w")
    extra = provision_vars(vault, tag, **_rotator_bound())
    prod = extra["vault_provision_envs"][2]
    extra["vault_provision_production_envs"] = [prod]
    bound = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert bound.rc == 0, bound.failure_messages()
    role = vault_client.auth.approle.read_role(
        f"captcha-rotator-{prod}", mount_point=f"approle-{tag}"
    )
    assert role["data"]["token_bound_cidrs"] == ["127.0.0.1"]

    tag = new_tag("w")
    extra = provision_vars(vault, tag)
    prod = extra["vault_provision_envs"][2]
    extra["vault_provision_production_envs"] = [prod]
    extra["vault_provision_unbound_cidrs_waivers"] = {prod: "the scheduler moves, TICKET-1"}
    waived = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert waived.rc == 0, waived.failure_messages()
    warnings = [r.get("msg", "") for _, r in waived.task_results() if "waived" in str(r.get("msg"))]
    assert warnings
    assert f"Production env {prod} is provisioned without network bindings" in warnings[0]
    assert "TICKET-1" in warnings[0]


@pytest.mark.parametrize("kind", ["transit", "kv1"])
def test_mount_of_another_type_is_refused(vault, vault_client, snapshot, kind):
    """A transit engine or a KV v1 mount at the KV path: clear error, nothing changed."""
    tag = new_tag("t")
    extra = provision_vars(vault, tag)
    mount = extra["vault_provision_kv_mount"]
    if kind == "transit":
        vault_client.sys.enable_secrets_engine("transit", path=mount)
        phrases = ["type 'transit'", f"{mount}/", "Nothing was changed"]
    else:
        vault_client.sys.enable_secrets_engine("kv", path=mount, options={"version": "1"})
        phrases = ["KV version 1", f"{mount}/", "Nothing was changed"]
    before = snapshot(tag)
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    _assert_refused(result, *phrases)
    assert snapshot(tag) == before


def test_missing_token_is_refused(vault, snapshot):
    """No VAULT_TOKEN: says so, nothing changed."""
    tag = new_tag("n")
    before = snapshot(tag)
    result = run_playbook(
        PLAYBOOK, vault=vault, extra_vars=provision_vars(vault, tag), env={"VAULT_TOKEN": None}
    )
    _assert_refused(result, "No Vault token", "VAULT_TOKEN")
    assert snapshot(tag) == before


def test_token_without_rights_is_refused(vault, vault_client, snapshot):
    """A valid token with only the default policy: missing rights listed, nothing changed."""
    tag = new_tag("r")
    token = vault_client.auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    before = snapshot(tag)
    result = run_playbook(
        PLAYBOOK, vault=vault, extra_vars=provision_vars(vault, tag), env={"VAULT_TOKEN": token}
    )
    _assert_refused(result, "lacks rights", f"sys/mounts/kv-{tag}", "captcha-provisioner.hcl")
    assert snapshot(tag) == before
    assert token not in result.output
    vault_client.auth.token.revoke(token)


def test_invalid_token_is_refused(vault, snapshot):
    """A token the server does not know: says it is not valid, nothing changed."""
    tag = new_tag("x")
    bogus = "s." + new_key()[:24]
    before = snapshot(tag)
    result = run_playbook(
        PLAYBOOK, vault=vault, extra_vars=provision_vars(vault, tag), env={"VAULT_TOKEN": bogus}
    )
    _assert_refused(result, "not valid")
    assert snapshot(tag) == before
    assert bogus not in result.output


@pytest.mark.parametrize("kind", ["other_ca", "missing_file"])
def test_wrong_ca_file_is_refused(vault, snapshot, tmp_path, kind):
    """A CA that did not sign the server certificate, or no CA file: clear error, no change."""
    tag = new_tag("a")
    if kind == "other_ca":
        ca = _other_ca(tmp_path / "other-ca.pem")
        phrases = ["TLS verification", str(ca)]
    else:
        ca = tmp_path / "nowhere.pem"
        phrases = ["does not exist", str(ca)]
    extra = provision_vars(vault, tag, captcha_kit_vault_cacert=str(ca))
    before = snapshot(tag)
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, env={"VAULT_CACERT": str(ca)})
    _assert_refused(result, *phrases)
    assert snapshot(tag) == before


def test_unreachable_server_is_refused(vault, snapshot):
    """Nothing listens at the address: says the server cannot be reached, nothing changed."""
    tag = new_tag("u")
    addr = "https://127.0.0.1:18299"
    extra = provision_vars(vault, tag, captcha_kit_vault_addr=addr)
    before = snapshot(tag)
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, env={"VAULT_ADDR": addr})
    _assert_refused(result, "Cannot reach Vault", addr)
    assert snapshot(tag) == before


@pytest.mark.parametrize("kind", ["syntax_error", "not_a_policy"])
def test_broken_policy_template_is_refused(vault, snapshot, tmp_path, kind):
    """A template that does not render, or renders to something that is no policy: clear error
    naming the template, nothing changed."""
    tag = new_tag("p")
    templates = tmp_path / "policies"
    shutil.copytree(REPO / "policies", templates)
    broken = templates / "captcha-rotator.hcl.j2"
    if kind == "syntax_error":
        broken.write_text(broken.read_text() + "\n{% if captcha_env %}\n")
        phrases = ["captcha-rotator.hcl.j2"]
    else:
        broken.write_text("{{ ansible_managed | comment }}\n# nothing here for {{ captcha_env }}\n")
        phrases = ["captcha-rotator.hcl.j2", "is not a policy"]
    extra = provision_vars(vault, tag, vault_provision_policy_template_dir=str(templates))
    before = snapshot(tag)
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    _assert_refused(result, *phrases)
    assert snapshot(tag) == before
    assert before["policies"] == {}


def test_undeclared_audit_device_fails_with_the_stanza_to_declare(vault, snapshot):
    """OpenBao refuses API-created audit devices: the run fails before any change and says how to
    declare the device in the server configuration."""
    tag = new_tag("w")
    extra = provision_vars(
        vault,
        tag,
        vault_provision_audit_path=f"audit-{tag}",
        vault_provision_audit_file_path=f"/var/log/vault/audit-{tag}.log",
    )
    before = snapshot(tag)
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    _assert_refused(
        result,
        "refuses to enable audit devices through the API",
        f'audit "file" "audit-{tag}"',
        f'file_path = "/var/log/vault/audit-{tag}.log"',
        "vault_provision_audit_managed_externally",
    )
    assert snapshot(tag) == before


def test_audit_managed_externally_only_checks_that_one_is_on(vault, vault_client):
    """With audit managed outside the kit, the same settings pass because a device is on."""
    tag = new_tag("e")
    extra = provision_vars(
        vault,
        tag,
        vault_provision_audit_path=f"audit-{tag}",
        vault_provision_audit_managed_externally=True,
    )
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert result.rc == 0, result.failure_messages()
    assert f"audit-{tag}/" not in vault_client.sys.list_enabled_audit_devices()["data"]
