"""captcha_worker: bad input fails with a clear error before anything changes on the host.

Real parts: a systemd container of the kit's host image (podman, host network, SYS_ADMIN), the
test OpenBao, ansible-playbook with playbooks/deploy-workers.yml. Each test provisions names of
its own on the shared test server (``provision_vars``) and uses its own container and port.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hvac
import pytest
import yaml
from harness import new_tag, provision_vars, random_key, run_playbook

from tools.host_image import CONTAINERS_CONF, IMAGE, Recipe, build, wait_for_systemd

pytestmark = pytest.mark.containers

PLAYBOOK = "playbooks/deploy-workers.yml"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
# Host paths the role creates; none of them may appear when it fails validation.
ROLE_PATHS = (
    "/etc/captcha-solver",
    "/opt/captcha-solver",
    "/var/lib/captcha-solver",
    "/etc/systemd/system/captcha-solver.service",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Host:
    """A worker host: a systemd container on the host network."""

    name: str

    def sh(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", "exec", self.name, "sh", "-c", command],
            env=PODMAN_ENV,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def exists(self, path: str) -> bool:
        return self.sh(f"test -e {path}", check=False).returncode == 0

    def role_footprint(self) -> dict[str, bool]:
        """Which of the role's paths and its user exist."""
        state = {path: self.exists(path) for path in ROLE_PATHS}
        state["user"] = self.sh("getent passwd captcha-solver", check=False).returncode == 0
        return state

    def main_pid(self) -> int:
        out = self.sh("systemctl show --property=MainPID --value captcha-solver.service")
        return int(out.stdout.strip())


@pytest.fixture(scope="module")
def host_image() -> str:
    build(Recipe.load())
    return IMAGE


@pytest.fixture
def host(host_image: str) -> Iterator[Host]:
    name = f"kit-bad-input-{secrets.token_hex(3)}"
    subprocess.run(
        [
            "podman", "run", "--detach", "--name", name, "--hostname", name,
            "--network=host", "--systemd=always", "--cap-add=SYS_ADMIN", host_image,
        ],
        env=PODMAN_ENV, check=True, capture_output=True, text=True,
    )  # fmt: skip
    try:
        wait_for_systemd(name)
        yield Host(name)
    finally:
        subprocess.run(
            ["podman", "rm", "--force", "--time", "0", name],
            env=PODMAN_ENV, check=False, capture_output=True,
        )  # fmt: skip


@dataclass
class Deployment:
    """Inventory and extra vars for one worker host against names of its own in Vault."""

    tag: str
    inventory: Path
    provision: dict

    @property
    def dev(self) -> str:
        return f"{self.tag}-dev"


@pytest.fixture
def deployment(vault, host: Host, tmp_path: Path) -> Deployment:
    """`<tag>-dev` provisioned with a first key; `<tag>-staging` known but not provisioned."""
    tag = new_tag("w")
    envs = [f"{tag}-dev", f"{tag}-staging", f"{tag}-prod"]
    provision = provision_vars(
        vault,
        tag,
        vault_provision_envs=[f"{tag}-dev"],
        vault_provision_first_keys={f"{tag}-dev": random_key()},
    )
    result = run_playbook("playbooks/provision-vault.yml", vault=vault, extra_vars=provision)
    assert result.rc == 0, result.failure_messages()
    inventory = {
        "all": {
            "hosts": {
                "localhost": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                }
            },
            "children": {
                "workers": {
                    "hosts": {
                        host.name: {
                            "ansible_connection": "containers.podman.podman",
                            "ansible_python_interpreter": "/usr/bin/python3",
                            "captcha_worker_env": f"{tag}-dev",
                            "captcha_worker_port": _free_port(),
                        }
                    }
                }
            },
            "vars": {
                "captcha_kit_envs": envs,
                "captcha_kit_vault_addr": vault.addr,
                "captcha_kit_vault_addrs": [vault.addr],
                "captcha_kit_vault_cacert": str(vault.ca_file),
                "captcha_kit_kv_mount": f"kv-{tag}",
                "captcha_kit_key_path_prefix": "captchaai",
                "captcha_kit_approle_mount": f"approle-{tag}",
                "captcha_kit_refresh_interval": 30,
                "captcha_kit_refresh_jitter": 0.1,
                "captcha_kit_provider_url": "http://127.0.0.1:18350",
            },
        }
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return Deployment(tag, path, provision)


def _deploy(vault, deployment: Deployment, **extra):
    return run_playbook(
        PLAYBOOK,
        vault=vault,
        inventory=deployment.inventory,
        extra_vars=extra or None,
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        timeout=600,
    )


def _failure(result, host: Host) -> str:
    return result.failure_messages(host.name)


def test_unknown_env_fails_before_any_change(vault, host: Host, deployment: Deployment):
    """An env the inventory does not list is refused, naming it and the known ones."""
    before = host.role_footprint()
    result = _deploy(vault, deployment, captcha_worker_env="qa")
    assert result.rc != 0
    message = _failure(result, host)
    assert 'captcha_worker_env="qa" is not a known environment' in message
    assert f"{deployment.tag}-dev" in message
    assert "Nothing was changed" in message
    assert result.count("changed", host.name) == 0
    assert host.role_footprint() == before


def test_env_without_approle_fails_before_any_change(vault, host: Host, deployment: Deployment):
    """A known env that Vault was not provisioned for (no AppRole, no role-id) is refused."""
    before = host.role_footprint()
    env = f"{deployment.tag}-staging"
    result = _deploy(vault, deployment, captcha_worker_env=env)
    assert result.rc != 0
    message = _failure(result, host)
    assert f"AppRole role captcha-worker-{env} does not exist" in message
    assert "not provisioned" in message
    assert result.count("changed", host.name) == 0
    assert host.role_footprint() == before


def test_port_taken_on_the_host_fails_before_any_change(vault, host: Host, deployment: Deployment):
    """Another process listening on the worker's port is named in the error; nothing changes."""
    port = _free_port()
    host.sh(
        f"setsid python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 & "
        f"for i in $(seq 50); do ss -Htln 'sport = :{port}' | grep -q . && exit 0; sleep 0.1; done;"
        " exit 1"
    )
    before = host.role_footprint()
    result = _deploy(vault, deployment, captcha_worker_port=port)
    assert result.rc != 0
    message = _failure(result, host)
    assert f"Port {port} is already taken" in message
    assert f"127.0.0.1:{port}" in message
    assert result.count("changed", host.name) == 0
    assert host.role_footprint() == before


def test_vault_unreachable_from_host_fails_and_the_running_worker_keeps_running(
    vault, host: Host, deployment: Deployment
):
    """With a Vault address the host cannot reach, the play fails before touching the host:
    the worker deployed before keeps running (same PID, same config, still healthy)."""
    first = _deploy(vault, deployment)
    assert first.rc == 0, first.failure_messages(host.name)[-3000:]
    pid = host.main_pid()
    config_before = host.sh("sha256sum /etc/captcha-solver/config.toml").stdout

    dead = f"https://127.0.0.1:{_free_port()}"
    result = _deploy(vault, deployment, captcha_kit_vault_addrs=[dead])
    assert result.rc != 0
    message = _failure(result, host)
    assert "Vault is unreachable from" in message
    assert dead in message
    assert "keeps running" in message
    assert result.count("changed", host.name) == 0
    assert host.main_pid() == pid
    assert host.sh("sha256sum /etc/captcha-solver/config.toml").stdout == config_before
    port = yaml.safe_load(deployment.inventory.read_text())["all"]["children"]["workers"]["hosts"][
        host.name
    ]["captcha_worker_port"]
    health = json.loads(
        host.sh(
            "python3 -c 'import urllib.request;"
            f'print(urllib.request.urlopen("http://127.0.0.1:{port}/healthz").read().decode())\''
        ).stdout
    )
    assert health["env"] == deployment.dev
    assert health["key_version"] == 1


def test_check_mode_on_a_fresh_host_reports_changes_and_changes_nothing(
    vault, vault_client, host: Host, deployment: Deployment
):
    """--check --diff on a host without the worker runs every validation, reports the work
    (a secret-id included) and changes neither the host nor Vault."""
    role = f"captcha-worker-{deployment.dev}"
    mount = f"approle-{deployment.tag}"

    def accessors() -> list[str]:
        try:
            listed = vault_client.auth.approle.list_secret_id_accessors(role, mount_point=mount)
        except hvac.exceptions.InvalidPath:  # no secret-id at all
            return []
        return sorted(listed["data"]["keys"])

    accessors_before = accessors()
    before = host.role_footprint()
    result = run_playbook(
        PLAYBOOK,
        vault=vault,
        inventory=deployment.inventory,
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        check=True,
        diff=True,
        timeout=600,
    )
    assert result.rc == 0, result.failure_messages(host.name)[-3000:]
    assert result.count("changed", host.name) > 0
    assert host.role_footprint() == before
    assert accessors() == accessors_before
