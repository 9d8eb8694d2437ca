"""A deploy names Vault's user lockout when it is why a worker cannot log in.

Every worker of an env shares the env's role-id, and Vault (OpenBao) locks a role-id after a few
refused logins: then every login of the env is refused with the same "permission denied" a bad
secret-id gets, also a fresh, valid one. Here a host's env role-id is locked on purpose (a short
lockout on the deployment's own AppRole mount, refused logins sent from the controller), and a
redeploy that delivers a new secret-id must fail that host naming the lockout, the role, and how
to unlock it, without printing the role-id.

Real parts: a container of the kit's host image (testkit/worker_hosts.py), the test OpenBao,
ansible-playbook with playbooks/deploy-workers.yml.
"""

from __future__ import annotations

import hvac
import pytest

from testkit.creds import assert_no_secrets, new_key
from testkit.net import wait_for
from testkit.worker_hosts import deploy, deployed_host

pytestmark = pytest.mark.containers

LOCKOUT = {
    "lockout_threshold": "2",
    "lockout_duration": "10m",
    "lockout_counter_reset": "10m",
    "lockout_counter_reset_duration": "10m",
}


def _locked_role_ids(admin: hvac.Client, accessor: str) -> list[str]:
    data = (admin.adapter.get("/v1/sys/locked-users") or {}).get("data") or {}
    return [
        role_id
        for namespace in data.get("by_namespace") or []
        for mount in namespace.get("mount_accessors") or []
        if mount.get("mount_accessor") == accessor
        for role_id in mount.get("alias_identifiers") or []
    ]


def test_a_locked_env_role_id_is_named_by_the_deploy(vault, vault_client, tmp_path):
    with deployed_host(vault, "kit-lockout", tmp_path) as (host, deployment):
        mount = f"approle-{deployment.tag}"
        role = f"captcha-worker-{deployment.dev}"
        accessor = vault_client.sys.list_auth_methods()["data"][f"{mount}/"]["accessor"]
        role_id = vault_client.auth.approle.read_role_id(role, mount_point=mount)["data"]["role_id"]
        vault_client.adapter.post(
            f"/v1/sys/auth/{mount}/tune", json={"user_lockout_config": LOCKOUT}
        )
        # Refused logins with the env's role-id until Vault locks it.
        login = hvac.Client(url=vault.addr, verify=str(vault.ca_file))
        for _ in range(3):
            with pytest.raises(hvac.exceptions.VaultError):
                login.auth.approle.login(role_id=role_id, secret_id=new_key(), mount_point=mount)
        wait_for(lambda: role_id in _locked_role_ids(vault_client, accessor), 30, "the lockout")

        locked = deploy(
            vault,
            deployment,
            captcha_worker_secret_id_rotate=True,
            captcha_worker_health_timeout=15,
        )

        assert locked.rc != 0
        message = locked.failure_messages(host.name)
        assert "user lockout holds the role-id of " + role in message, message[-3000:]
        assert f"sys/locked-users/{accessor}/unlock/" in message
        assert_no_secrets(locked.output, [role_id])

        vault_client.adapter.post(f"/v1/sys/locked-users/{accessor}/unlock/{role_id}")
        assert role_id not in _locked_role_ids(vault_client, accessor)
