"""No silent drift (issue 13): vault_provision against the real test server.

A hand-made change to any security-relevant setting of a kit AppRole role (made with the root
token, as an operator would by hand) is shown by --check --diff without a write, reset by the
next run with a diff of the changed settings, and a rerun changes nothing. local_secret_ids,
which the server takes only when a role is created, fails the run with what to do. An audit
device that logs secrets (log_raw) or token accessors (hmac_accessor off) in clear text stops
the run before any change (an OpenBao node that allows API audit devices, as in
test_provision_audit_api.py). No role-id appears in a -v run's output.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hvac
import pytest

from testkit.creds import new_tag
from testkit.paths import REPO
from testkit.playbook import PlaybookResult, provision_vars, run_playbook
from testkit.vault import LocalVault
from testkit.vault_ops import admin_client, vault_snapshot

PLAYBOOK = "playbooks/provision-vault.yml"
ROLES_TASK = "vault_provision : Configure the worker and rotator roles"
AUDIT_STATE_DIR = REPO / ".state" / "test" / "vault-api-audit"
AUDIT_PORT = 18296
UNSAFE_MARK = "test_provision_drift: unsafe on purpose"


def _roles_result(result: PlaybookResult) -> dict[str, Any]:
    [roles] = [r for name, r in result.task_results() if name == ROLES_TASK]
    return roles


def test_hand_made_changes_to_every_security_setting_are_shown_and_reset(
    vault, vault_client, snapshot
):
    tag = new_tag("s")
    extra = provision_vars(vault, tag)
    first = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert first.rc == 0, first.failure_messages()
    kit_state = snapshot(tag)
    mount = f"approle-{tag}"
    worker_dev, worker_staging = f"captcha-worker-{tag}-dev", f"captcha-worker-{tag}-staging"
    rotator_prod = f"captcha-rotator-{tag}-prod"
    assert kit_state["roles"][f"{mount}/{worker_dev}"]["token_type"] == "service"  # noqa: S105

    def hand_change(role: str, settings: dict[str, Any]) -> None:
        vault_client.adapter.post(f"/v1/auth/{mount}/role/{role}", json=settings)

    hand_change(
        worker_dev,
        {
            "token_period": "24h",
            "bind_secret_id": False,  # the server allows it: a secret-id CIDR binding is left
            "token_no_default_policy": True,
            "token_num_uses": 5,
        },
    )
    hand_change(
        worker_staging,
        {
            "token_explicit_max_ttl": "240h",
            "token_type": "batch",
            "secret_id_num_uses": 100,
            "secret_id_bound_cidrs": ["0.0.0.0/0"],
            "token_bound_cidrs": [],
        },
    )
    # The legacy aliases: the server keeps them in step with token_period and token_policies
    # (and keeps only root of a list that holds it).
    hand_change(rotator_prod, {"period": "1h", "policies": [rotator_prod, "root"]})
    drifted = snapshot(tag)
    assert drifted["roles"][f"{mount}/{rotator_prod}"]["token_policies"] == ["root"]

    check = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, check=True, diff=True)
    assert check.rc == 0, check.failure_messages()
    assert [name for name, _ in check.changed_results()] == [ROLES_TASK]
    roles = _roles_result(check)
    expected = {
        worker_dev: ["bind_secret_id", "token_no_default_policy", "token_num_uses", "token_period"],
        worker_staging: [
            "secret_id_bound_cidrs",
            "secret_id_num_uses",
            "token_bound_cidrs",
            "token_explicit_max_ttl",
            "token_type",
        ],
        rotator_prod: ["token_period", "token_policies"],
    }
    assert {r["name"]: r["changed_keys"] for r in roles["roles"] if r["changed"]} == expected
    dev_diff, staging_diff, rotator_diff = roles["diff"]
    assert dev_diff["before"] == {
        "bind_secret_id": False,
        "token_no_default_policy": True,
        "token_num_uses": 5,
        "token_period": 86400,
    }
    assert dev_diff["after"] == {
        "bind_secret_id": True,
        "token_no_default_policy": False,
        "token_num_uses": 0,
        "token_period": 0,
    }
    assert dev_diff["before_header"] == f"auth/{mount}/role/{worker_dev} (current)"
    assert staging_diff["before"] == {
        "secret_id_bound_cidrs": ["0.0.0.0/0"],
        "secret_id_num_uses": 100,
        "token_bound_cidrs": [],
        "token_explicit_max_ttl": 864000,
        "token_type": "batch",
    }
    assert staging_diff["after"] == {
        "secret_id_bound_cidrs": ["127.0.0.1/32"],
        "secret_id_num_uses": 0,
        "token_bound_cidrs": ["127.0.0.1/32"],
        "token_explicit_max_ttl": 0,
        "token_type": "service",
    }
    assert rotator_diff["before"] == {
        "token_period": 3600,
        "token_policies": ["root"],
    }
    assert rotator_diff["after"] == {"token_period": 0, "token_policies": [rotator_prod]}
    assert snapshot(tag) == drifted, "check mode changed Vault"

    repair = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, diff=True)
    assert repair.rc == 0, repair.failure_messages()
    assert [name for name, _ in repair.changed_results()] == [ROLES_TASK]
    assert len(_roles_result(repair)["diff"]) == 3
    assert snapshot(tag) == kit_state, "a setting was not reset to the kit's value"
    rotator = vault_client.auth.approle.read_role(rotator_prod, mount_point=mount)["data"]
    assert (rotator["token_period"], rotator["token_policies"]) == (0, [rotator_prod])
    assert "period" not in rotator, "the legacy alias is reset with token_period"
    assert "policies" not in rotator, "the legacy alias is reset with token_policies"

    again = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert again.rc == 0, again.failure_messages()
    assert again.changed == 0, again.changed_results()


def test_local_secret_ids_set_at_creation_fails_with_what_to_do(vault, vault_client):
    """The server refuses local_secret_ids in any update; the run says so, names the role,
    writes no role, and deleting the role lets the next run recreate it."""
    tag = new_tag("o")
    extra = provision_vars(vault, tag)
    mount = f"approle-{tag}"
    role = f"captcha-worker-{tag}-dev"
    vault_client.sys.enable_auth_method("approle", path=mount)
    vault_client.adapter.post(
        f"/v1/auth/{mount}/role/{role}", json={"local_secret_ids": True, "token_policies": [role]}
    )
    with pytest.raises(hvac.exceptions.InvalidRequest, match="only be modified during role creat"):
        vault_client.adapter.post(f"/v1/auth/{mount}/role/{role}", json={"local_secret_ids": True})

    failed = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert failed.rc != 0
    messages = failed.failure_messages()
    assert (
        f"AppRole role {role} at auth/{mount}: local_secret_ids is true on the server, false is "
        "wanted, and Vault/OpenBao set it only when a role is created (a create-time setting)."
    ) in messages
    assert f"delete the role (auth/{mount}/role/{role}) and provision again" in messages
    assert vault_client.auth.approle.list_roles(mount_point=mount)["data"]["keys"] == [role]
    assert vault_client.auth.approle.read_role(role, mount_point=mount)["data"]["local_secret_ids"]

    vault_client.auth.approle.delete_role(role, mount_point=mount)
    fixed = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert fixed.rc == 0, fixed.failure_messages()
    settings = vault_client.auth.approle.read_role(role, mount_point=mount)["data"]
    assert settings["local_secret_ids"] is False


def test_no_role_id_is_printed_at_verbose(vault, vault_client):
    """-v (default callback) prints every task result: creation, and a reset with --diff."""
    tag = new_tag("r")
    extra = provision_vars(vault, tag)
    verbose = {"env": {"ANSIBLE_STDOUT_CALLBACK": "default"}, "args": ["-v"]}
    first = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, diff=True, **verbose)
    assert first.rc == 0, first.output[-3000:]
    mount = f"approle-{tag}"
    vault_client.adapter.post(
        f"/v1/auth/{mount}/role/captcha-worker-{tag}-dev", json={"token_num_uses": 5}
    )
    reset = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, diff=True, **verbose)
    assert reset.rc == 0, reset.output[-3000:]
    output = first.output + reset.output
    assert "changed_keys:" in output, "-v did not print the roles task's result"
    assert "token_num_uses" in reset.output
    role_ids = [
        vault_client.auth.approle.read_role_id(f"{kind}-{env}", mount_point=mount)["data"][
            "role_id"
        ]
        for env in extra["vault_provision_envs"]
        for kind in ("captcha-worker", "captcha-rotator")
    ]
    assert len(set(role_ids)) == 6
    printed = [role_id for role_id in role_ids if role_id in output]
    assert printed == [], "role-ids in the -v output"


# --------------------------------------------------------------------------- audit devices
@pytest.fixture(scope="module")
def api_audit_vault() -> Iterator[LocalVault]:
    """The test OpenBao node that lets the API enable audit devices (as HashiCorp Vault does),
    without devices this suite left behind (every device is checked, so one would fail other
    suites' runs on this node)."""
    server = LocalVault(AUDIT_STATE_DIR, AUDIT_PORT, api_audit=True)
    server.start()
    client = admin_client(server)
    try:
        _disable_unsafe(client)
        yield server
    finally:
        _disable_unsafe(client)
        server.stop()


def _disable_unsafe(client: hvac.Client) -> None:
    for path, device in client.sys.list_enabled_audit_devices()["data"].items():
        if device.get("description") == UNSAFE_MARK:
            client.sys.disable_audit_device(path.rstrip("/"))
    for leftover in AUDIT_STATE_DIR.glob("audit-u*.log"):  # files of unsafe devices
        leftover.unlink()


@pytest.mark.parametrize(
    ("options", "managed_externally", "shown"),
    [
        ({"log_raw": "true"}, False, "(log_raw=true, the kit's device)"),
        ({"hmac_accessor": "false"}, False, "(hmac_accessor=false, the kit's device)"),
        ({"log_raw": "1"}, True, "(log_raw=1)"),
    ],
    ids=["log_raw", "hmac_accessor_off", "managed_externally_log_raw"],
)
def test_an_audit_device_logging_in_clear_text_stops_the_run_before_any_change(
    api_audit_vault, options, managed_externally, shown
):
    tag = new_tag("u")
    path = f"audit-{tag}"
    client = admin_client(api_audit_vault)
    client.sys.enable_audit_device(
        "file",
        description=UNSAFE_MARK,
        options={"file_path": str(AUDIT_STATE_DIR / f"{path}.log"), **options},
        path=path,
    )
    try:
        assert client.sys.list_enabled_audit_devices()["data"][f"{path}/"]["options"] == {
            "file_path": str(AUDIT_STATE_DIR / f"{path}.log"),
            **options,
        }, "the server answers the options as strings, as given"
        before = vault_snapshot(client, tag)
        extra = provision_vars(
            api_audit_vault,
            tag,
            vault_provision_audit_path=path if not managed_externally else "file",
            vault_provision_audit_file_path=str(AUDIT_STATE_DIR / f"{path}.log"),
            vault_provision_audit_managed_externally=managed_externally,
        )
        result = run_playbook(PLAYBOOK, vault=api_audit_vault, extra_vars=extra)
        assert result.rc != 0, "the run should have failed"
        assert result.changed == 0, result.changed_results()
        messages = result.failure_messages()
        assert (
            f"Audit devices that write secrets or token accessors in clear text: {path}/ {shown}."
        ) in messages, messages
        assert "Nothing was changed." in messages
        [(failed_task, _)] = result.failed_results()
        assert failed_task.endswith("Make sure an audit device is on")
        assert vault_snapshot(client, tag) == before
        assert before["mounts"] == {}
        assert before["auth"] == {}
    finally:
        client.sys.disable_audit_device(path)
        # An unsafe device wrote tokens (log_raw) or accessors in clear text: its file goes too,
        # or the leak scan of the working tree finds them.
        (AUDIT_STATE_DIR / f"{path}.log").unlink(missing_ok=True)
