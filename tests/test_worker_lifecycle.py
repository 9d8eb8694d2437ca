"""captcha_worker on a real systemd host that already runs a worker (deployed once for the
module, each test but the last leaves it healthy): a deploy to it and four broken hosts (the
production transport's bad inputs: no SSH, wrong key, sudo asks a password, no Python) fails
each broken host alone and leaves it untouched; Vault unreachable from the host fails the
play before any change and the worker keeps running; a package removed by hand is put back
and nothing else changes; a config change restarts the worker (the handler) and keeps its
secret-id, and starts no package manager where every package is in place; a bad setting is
refused before it replaces the config; last, a deploy names Vault's user lockout when it is why
the worker cannot log in. When a secret-id is re-issued: tests/test_secret_id_plan.py (the
decision) and molecule captcha_worker (delivery on first deploy and forced rotation).

Real parts: a container of the kit's host image (testkit/worker_hosts.py), the test OpenBao,
ansible-playbook with playbooks/deploy-workers.yml.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import yaml

from testkit.creds import assert_no_secrets, new_key
from testkit.hosts import CONTAINERS_CONF, IMAGE, ssh_host_vars
from testkit.net import free_port, wait_for
from testkit.playbook import run_playbook
from testkit.worker_hosts import (
    PLAYBOOK,
    Deployment,
    Host,
    deploy,
    deployed_host,
    worker_container,
)

pytestmark = pytest.mark.containers

ACCESSOR_FILE = "/var/lib/captcha-solver/secret-id.accessor"
APT_TASKS = (
    "captcha_worker : Refresh the package index when it is older than a day",
    "captcha_worker : Install the system packages the virtualenv needs",
)
CONFIG = "/etc/captcha-solver/config.toml"


@pytest.fixture(scope="module")
def deployed(vault, tmp_path_factory) -> Iterator[tuple[Host, Deployment]]:
    with deployed_host(vault, "kit-lifecycle", tmp_path_factory.mktemp("lifecycle")) as made:
        yield made


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Iterator[tuple[Host, Path]]:
    """A second host with a password-only sudo user and no /usr/bin/python3; a stray key."""
    with worker_container(IMAGE, "kit-transport-bad") as host:
        host.sh(
            "useradd --create-home asks && install -d -m 0700 -o asks -g asks /home/asks/.ssh"
            " && install -m 0600 -o asks -g asks /home/deploy/.ssh/authorized_keys"
            " /home/asks/.ssh/authorized_keys"
            " && echo 'asks ALL=(ALL:ALL) ALL' >/etc/sudoers.d/asks"
            " && chmod 0440 /etc/sudoers.d/asks"
            " && sed -i 's/^AllowUsers .*/AllowUsers deploy asks/'"
            " /etc/ssh/sshd_config.d/10-captcha-kit.conf && systemctl restart ssh"
            " && mv /usr/bin/python3 /usr/bin/python3.away"
        )
        stray = tmp_path_factory.mktemp("stray-key") / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stray)],
            check=True,
            capture_output=True,
        )
        yield host, stray


def test_each_broken_host_fails_alone_and_the_healthy_worker_is_untouched(
    vault, deployed: tuple[Host, Deployment], broken: tuple[Host, Path]
):
    """The production transport's bad inputs: one deploy over SSH to the module's healthy host
    and four broken ones. Each broken host fails alone with a clear message; the healthy host's
    running worker is left untouched (changed=0, same PID, still healthy). First in the module:
    the healthy host still has the variables of its first deploy. The broken hosts:

    * unreachable: an inventory entry whose SSH port has nobody listening;
    * wrong SSH key: the second container, with a key its `deploy` user does not authorise;
    * sudo asks for a password: the second container as a user whose sudo rule needs one;
    * no Python 3: the second container as `deploy`, after /usr/bin/python3 was taken away.
    """
    host, deployment = deployed
    bad, stray_key = broken
    pid = host.main_pid()
    inventory = yaml.safe_load(deployment.inventory.read_text())
    workers = inventory["all"]["children"]["workers"]["hosts"]
    env_vars = {
        "captcha_worker_env": workers[host.name]["captcha_worker_env"],
        "captcha_worker_port": free_port(),
    }
    workers["unreachable"] = {**ssh_host_vars(free_port()), **env_vars}
    workers["wrong-key"] = {
        **ssh_host_vars(bad.ssh_port, stray_key),
        **env_vars,
    }
    workers["sudo-password"] = {**ssh_host_vars(bad.ssh_port), "ansible_user": "asks", **env_vars}
    workers["no-python"] = {**ssh_host_vars(bad.ssh_port), **env_vars}
    path = deployment.inventory.with_name("hosts-transport.yml")
    path.write_text(yaml.safe_dump(inventory))

    result = deploy(vault, Deployment(deployment.tag, path, deployment.provision))

    assert result.rc != 0
    stats = result.stats
    assert stats["unreachable"]["unreachable"] == 1
    assert "Connection refused" in result.failure_messages("unreachable") + str(
        list(result.task_results("unreachable"))
    )
    assert stats["wrong-key"]["unreachable"] == 1
    assert "Permission denied (publickey)" in str(list(result.task_results("wrong-key")))
    assert stats["sudo-password"]["failures"] == 1
    assert "Missing sudo password" in result.failure_messages("sudo-password")
    assert stats["no-python"]["failures"] == 1
    assert "no-python has no Python 3 at /usr/bin/python3" in result.failure_messages("no-python")
    assert "Nothing was changed on no-python" in result.failure_messages("no-python")

    # The healthy host was deployed in the same run and left exactly as it was.
    assert stats[host.name]["failures"] == 0
    assert stats[host.name]["unreachable"] == 0
    assert stats[host.name]["changed"] == 0, result.changed_results(host.name)
    assert host.main_pid() == pid
    assert host.health()["status"] == "ok"
    # Nothing of the role reached the broken host.
    assert not any(bad.role_footprint().values())


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


def test_a_package_removed_by_hand_is_put_back_and_the_worker_keeps_running(
    vault, deployed: tuple[Host, Deployment]
):
    """The probe names the missing package; apt puts it back and nothing else changes."""
    host, deployment = deployed
    pid = host.main_pid()
    host.sh("dpkg --remove python3-packaging >/dev/null")

    repaired = deploy(vault, deployment)

    assert repaired.rc == 0, repaired.failure_messages(host.name)[-3000:]
    status = "dpkg-query --show --showformat='${Status}' python3-packaging"
    assert host.sh(status).stdout == "install ok installed"
    assert [n for n, _ in repaired.changed_results(host.name)] == [
        "captcha_worker : Install the system packages the virtualenv needs"
    ]
    assert host.main_pid() == pid


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
    # Every package the role needs is installed: no package manager ran.
    assert {n: r.get("skipped") for n, r in changed.task_results(host.name) if n in APT_TASKS} == {
        n: True for n in APT_TASKS
    }


@pytest.mark.parametrize("check", [False, True], ids=["run", "check_mode"])
def test_bad_setting_in_a_redeploy_is_refused_before_it_replaces_the_config(
    vault, deployed: tuple[Host, Deployment], check: bool
):
    """A typo in captcha_worker_provider_settings is checked by the solver on the host against
    the new file before it replaces the old one: the host fails with the solver's message, the
    old configuration stays, the worker is not restarted and stays healthy. --check --diff tells
    the same truth (check mode does not run the template's validate; the role checks the new
    file with the installed solver instead)."""
    host, deployment = deployed
    pid = host.main_pid()
    config_before = host.sh(f"sha256sum {CONFIG}").stdout

    result = run_playbook(
        PLAYBOOK,
        vault=vault,
        inventory=deployment.inventory,
        extra_vars={"captcha_worker_provider_settings": {"request_timeuot": 30}},
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        check=check,
        diff=check,
        timeout=600,
    )

    assert result.rc != 0
    message = result.failure_messages(host.name) + str(result.failed_results(host.name))
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
