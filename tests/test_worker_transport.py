"""The production transport's bad inputs: one deploy over SSH to a healthy host and four broken
ones. Each broken host fails alone with a clear message; the healthy host's running worker is
left untouched (changed=0, same PID, still healthy).

Real parts: two systemd containers of the kit's host image reached over SSH as `deploy` with
become (testkit/worker_hosts.py), the test OpenBao, ansible-playbook with
playbooks/deploy-workers.yml. The broken hosts:

* unreachable: an inventory entry whose SSH port has nobody listening;
* wrong SSH key: the second container, with a key its `deploy` user does not authorise;
* sudo asks for a password: the second container as a user whose sudo rule needs one;
* no Python 3: the second container as `deploy`, after /usr/bin/python3 was taken away.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from testkit.hosts import IMAGE, ssh_host_vars
from testkit.net import free_port
from testkit.worker_hosts import (
    Deployment,
    Host,
    deploy,
    deployed_host,
    worker_container,
)

pytestmark = pytest.mark.containers


@pytest.fixture(scope="module")
def healthy(vault, tmp_path_factory) -> Iterator[tuple[Host, Deployment]]:
    """A host that already runs a worker."""
    with deployed_host(vault, "kit-transport-ok", tmp_path_factory.mktemp("transport")) as made:
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
    vault, healthy: tuple[Host, Deployment], broken: tuple[Host, Path]
):
    host, deployment = healthy
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
