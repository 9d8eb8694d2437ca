"""captcha_worker on a real systemd host that already runs a worker (deployed once for the
module, each test but the last leaves it healthy): Vault unreachable from the host fails the
play before any change and the worker keeps running; a config change restarts the worker (the
handler) and keeps its secret-id; a bad setting is refused before it replaces the config; last,
a deploy names Vault's user lockout when it is why the worker cannot log in. When a secret-id
is re-issued: tests/test_secret_id_plan.py (the decision) and molecule captcha_worker (delivery
on first deploy and forced rotation).

Real parts: a container of the kit's host image (testkit/worker_hosts.py), the test OpenBao,
ansible-playbook with playbooks/deploy-workers.yml.
"""

from __future__ import annotations

from collections.abc import Iterator

import hvac
import pytest

from testkit.creds import assert_no_secrets, new_key
from testkit.hosts import CONTAINERS_CONF
from testkit.net import free_port, wait_for
from testkit.playbook import run_playbook
from testkit.worker_hosts import (
    PLAYBOOK,
    Deployment,
    Host,
    deploy,
    deployed_host,
)

pytestmark = pytest.mark.containers

ACCESSOR_FILE = "/var/lib/captcha-solver/secret-id.accessor"
CONFIG = "/etc/captcha-solver/config.toml"


@pytest.fixture(scope="module")
def deployed(vault, tmp_path_factory) -> Iterator[tuple[Host, Deployment]]:
    with deployed_host(vault, "kit-lifecycle", tmp_path_factory.mktemp("lifecycle")) as made:
        yield made


def _plan(result, host: Host) -> str:
    [msg] = [
        r["msg"]
        for n, r in result.task_results(host.name)
        if n == "captcha_worker : Report the secret-id plan"
    ]
    return str(msg)


def test_vault_unreachable_from_host_fails_and_the_running_worker_keeps_running(
    vault, deployed: tuple[Host, Deployment]
):
    """With a Vault address the host cannot reach, the play fails before touching the host:
    the worker deployed before keeps running (same PID, same config, still healthy)."""
    host, deployment = deployed
    pid = host.main_pid()
    config_before = host.sh(f"sha256sum {CONFIG}").stdout

    dead = f"https://127.0.0.1:{free_port()}"
    result = deploy(vault, deployment, captcha_kit_vault_addrs=[dead])
    assert result.rc != 0
    message = result.failure_messages(host.name)
    assert "Vault is unreachable from" in message
    assert dead in message
    assert "keeps running" in message
    assert result.count("changed", host.name) == 0
    assert host.main_pid() == pid
    assert host.sh(f"sha256sum {CONFIG}").stdout == config_before
    health = host.health()
    assert health["env"] == deployment.dev
    assert health["key_version"] == 1


def test_config_change_restarts_the_worker_and_keeps_its_secret_id(
    vault, deployed: tuple[Host, Deployment]
):
    """A changed setting rewrites the config and restarts the worker (new PID), which comes
    back with its key; the secret-id is kept (the plan says so, the accessor is unchanged)."""
    host, deployment = deployed
    pid = host.main_pid()
    accessor = host.sh(f"cat {ACCESSOR_FILE}").stdout.strip()

    changed = deploy(vault, deployment, captcha_worker_max_staleness=1800)

    assert changed.rc == 0, changed.failure_messages(host.name)[-3000:]
    assert "max_staleness = 1800.0" in host.sh(f"cat {CONFIG}").stdout
    assert host.main_pid() != pid, "the config changed but the worker was not restarted"
    assert "the host's secret-id is valid" in _plan(changed, host)
    assert "keeping it" in _plan(changed, host)
    assert host.sh(f"cat {ACCESSOR_FILE}").stdout.strip() == accessor
    health = host.health()
    assert health["env"] == deployment.dev
    assert health["key_version"] == 1
    assert health["status"] == "ok"


def test_bad_setting_in_a_redeploy_is_refused_before_it_replaces_the_config(
    vault, deployed: tuple[Host, Deployment]
):
    """A typo in captcha_worker_provider_settings is checked by the solver on the host against
    the new file before it replaces the old one: the host fails with the solver's message, the
    old configuration stays, the worker is not restarted and stays healthy."""
    host, deployment = deployed
    pid = host.main_pid()
    config_before = host.sh(f"sha256sum {CONFIG}").stdout

    result = deploy(vault, deployment, captcha_worker_provider_settings={"request_timeuot": 30})

    assert result.rc != 0
    message = result.failure_messages(host.name) + str(result.failed_results(host.name))
    assert "provider.request_timeuot" in message
    assert host.sh(f"sha256sum {CONFIG}").stdout == config_before
    assert host.main_pid() == pid
    assert host.health()["status"] == "ok"


def test_check_mode_names_a_bad_setting_as_the_real_run_would(
    vault, deployed: tuple[Host, Deployment]
):
    """--check --diff with the same typo tells the truth: it fails the host with the solver's
    message (check mode does not run the template's validate; the role checks the new file with
    the installed solver instead) and changes nothing."""
    host, deployment = deployed
    pid = host.main_pid()
    config_before = host.sh(f"sha256sum {CONFIG}").stdout

    preview = run_playbook(
        PLAYBOOK,
        vault=vault,
        inventory=deployment.inventory,
        extra_vars={"captcha_worker_provider_settings": {"request_timeuot": 30}},
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        check=True,
        diff=True,
    )

    assert preview.rc != 0
    message = preview.failure_messages(host.name) + str(preview.failed_results(host.name))
    assert "provider.request_timeuot" in message
    assert host.sh(f"sha256sum {CONFIG}").stdout == config_before
    assert host.main_pid() == pid
    assert host.health()["status"] == "ok"


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


def test_a_locked_env_role_id_is_named_by_the_deploy(
    vault, vault_client, deployed: tuple[Host, Deployment]
):
    """Every worker of an env shares the env's role-id, and Vault (OpenBao) locks a role-id
    after a few refused logins: then every login of the env is refused with the same "permission
    denied" a bad secret-id gets, also a fresh, valid one. Here the host's env role-id is locked
    on purpose (a short lockout on the deployment's own AppRole mount, refused logins sent from
    the controller), and a redeploy that delivers a new secret-id must fail that host naming the
    lockout, the role, and how to unlock it, without printing the role-id. Last in the module:
    it ends with a failed deploy."""
    host, deployment = deployed
    mount = f"approle-{deployment.tag}"
    role = f"captcha-worker-{deployment.dev}"
    accessor = vault_client.sys.list_auth_methods()["data"][f"{mount}/"]["accessor"]
    role_id = vault_client.auth.approle.read_role_id(role, mount_point=mount)["data"]["role_id"]
    vault_client.adapter.post(f"/v1/sys/auth/{mount}/tune", json={"user_lockout_config": LOCKOUT})
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
