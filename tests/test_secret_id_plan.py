"""When the captcha_worker role re-issues a worker's secret-id: the decision of
``captcha_kit.vault.vault_approle_secret_id`` (``issue: false``, as the role's validate step
calls it) for each state a host's secret-id can be in, against real secret-ids of a real AppRole
role on the test OpenBao. Delivering a new one end to end is proved on systemd hosts (molecule
captcha_worker: first deploy, forced rotation; tests/test_worker_lifecycle.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from testkit.creds import new_tag
from testkit.playbook import run_playbook
from testkit.tokens import own_deployer_token

MODULE = "captcha_kit.vault.vault_approle_secret_id"
MIN_TTL = 86400  # the role's default captcha_worker_secret_id_min_ttl


def _issue(vault_client, mount: str, role: str, **params) -> str:
    """A real secret-id of the role; returns its accessor (the secret-id itself is dropped)."""
    response = vault_client.adapter.post(
        f"/v1/auth/{mount}/role/{role}/secret-id", json=params or None
    )
    return response["data"]["secret_id_accessor"]


def test_secret_id_is_reissued_only_when_the_host_needs_one(vault, vault_client, tmp_path: Path):
    tag = new_tag("sp")
    mount, role = f"approle-{tag}", f"captcha-worker-{tag}"
    vault_client.sys.enable_auth_method("approle", path=mount)
    vault_client.auth.approle.create_or_update_approle(
        role,
        token_policies=["default"],
        secret_id_ttl="720h",  # noqa: S106 (a duration, not a password)
        mount_point=mount,
    )
    valid = _issue(vault_client, mount, role)
    short = _issue(vault_client, mount, role, ttl="1h")
    destroyed = _issue(vault_client, mount, role)
    vault_client.auth.approle.destroy_secret_id_accessor(role, destroyed, mount_point=mount)

    cases = {
        "no secret-id on the host": {"secret_id_present": False, "accessor": ""},
        "no accessor file": {"secret_id_present": True, "accessor": ""},
        "valid for 720h": {"secret_id_present": True, "accessor": valid},
        "expires within min_ttl": {"secret_id_present": True, "accessor": short},
        "destroyed in Vault": {"secret_id_present": True, "accessor": destroyed},
        "force": {"secret_id_present": True, "accessor": valid, "force": True},
    }
    tasks = [
        {
            "name": case,
            MODULE: {"mount": mount, "role_name": role, "min_ttl": MIN_TTL, "issue": False}
            | params,
        }
        for case, params in cases.items()
    ]
    playbook = tmp_path / "plan.yml"
    playbook.write_text(
        yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}])
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                        }
                    }
                }
            }
        )
    )
    before = sorted(
        vault_client.auth.approle.list_secret_id_accessors(role, mount_point=mount)["data"]["keys"]
    )

    # The deployer's policy for this role (as provisioning writes it): the rights the module uses.
    token = own_deployer_token(vault, tag, mount)
    result = run_playbook(playbook, vault=vault, inventory=inventory, env={"VAULT_TOKEN": token})

    assert result.rc == 0, result.failure_messages()
    plans = {name: (r["needs_issue"], r["reason"]) for name, r in result.task_results()}
    assert plans["no secret-id on the host"] == (True, "the host has no secret-id yet")
    assert plans["no accessor file"] == (True, "the host's secret-id accessor is unknown")
    needs, reason = plans["valid for 720h"]
    assert not needs
    assert reason.startswith("the host's secret-id is valid for "), reason
    needs, reason = plans["expires within min_ttl"]
    assert needs
    assert reason.startswith("the host's secret-id expires in "), reason
    assert int(reason.split()[-2]) <= 3600
    assert plans["destroyed in Vault"] == (
        True,
        "Vault does not know the host's secret-id (revoked or expired)",
    )
    assert plans["force"] == (True, "a new secret-id was requested (force)")
    assert result.changed == 0  # issue: false decides only
    after = sorted(
        vault_client.auth.approle.list_secret_id_accessors(role, mount_point=mount)["data"]["keys"]
    )
    assert after == before == sorted([valid, short])
