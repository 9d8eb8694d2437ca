"""A worker host for the playbook suites: a systemd container of the kit's host image (podman,
host network, SYS_ADMIN) that Ansible reaches over SSH as `deploy` with become, as production
inventories do, and a deployment of its own names in the test Vault."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from testkit.creds import new_key, new_tag
from testkit.emulator import EmulatorProcess
from testkit.hosts import (
    CONTAINERS_CONF,
    IMAGE,
    Recipe,
    build,
    remove_host,
    ssh_host_vars,
    start_host,
)
from testkit.net import free_port
from testkit.playbook import inventory_data, provision_vars, run_playbook

PLAYBOOK = "playbooks/deploy-workers.yml"
# The worker's own status client, as an operator runs it on the host (roles/captcha_worker).
STATUS_COMMAND = (
    "/opt/captcha-solver/venv/bin/captcha-solver status --config /etc/captcha-solver/config.toml"
)
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
# The shared CaptchaAI emulator's address (molecule/shared/testbed.py); a suite that needs the
# workers to solve starts its own (testkit.emulator.EmulatorProcess) and passes its URL.
EMULATOR_URL = "http://127.0.0.1:18350"
# Worker settings for solves of about half a second against an emulator of a suite's own (its
# solve delay is 0.2 s): captcha_worker_provider_settings.
FAST = {"poll_interval": 0.5, "first_poll_delay": {"default": 0.3}}
# Host paths the role creates; none of them may appear when it fails validation.
ROLE_PATHS = (
    "/etc/captcha-solver",
    "/opt/captcha-solver",
    "/var/lib/captcha-solver",
    "/etc/systemd/system/captcha-solver.service",
)


@dataclass
class Host:
    """A worker host: a systemd container on the host network, sshd on ``ssh_port``. The
    suites inspect it as root through `podman exec`; Ansible reaches it over SSH."""

    name: str
    ssh_port: int = 0

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

    def health(self) -> dict:
        """The worker's /healthz as the solver's own ``captcha-solver status`` prints it on
        the host, as an operator would ask it ({} when the worker does not answer)."""
        return status_json(self.sh(STATUS_COMMAND, check=False).stdout)

    def unit_times(self) -> dict[str, int]:
        """The worker unit's state-change times in microseconds of CLOCK_MONOTONIC
        (``ActiveEnterTimestampMonotonic`` etc., 0 = never). The host containers share the
        kernel's monotonic clock, so times of two hosts compare: which restarted first."""
        props = ("ActiveEnter", "ActiveExit", "InactiveEnter", "ExecMainStart")
        argv = " ".join(f"--property={p}TimestampMonotonic" for p in props)
        out = self.sh(f"systemctl show {argv} captcha-solver.service").stdout
        times = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {p: int(times.get(f"{p}TimestampMonotonic", "0") or 0) for p in props}

    def checksum(self, path: str) -> str:
        """The sha256 of a file on the host."""
        return self.sh(f"sha256sum {path}").stdout.split()[0]


@contextmanager
def worker_container(image: str, prefix: str = "kit-worker") -> Iterator[Host]:
    """A fresh systemd container reachable over SSH, removed afterwards."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    port = free_port()
    try:
        start_host(name, ssh_port=port, image=image)
        yield Host(name, port)
    finally:
        remove_host(name)


@dataclass
class Deployment:
    """Inventory and extra vars for one worker host against names of its own in Vault."""

    tag: str
    inventory: Path
    provision: dict

    @property
    def dev(self) -> str:
        return f"{self.tag}-dev"

    def data(self) -> dict[str, Any]:
        return yaml.safe_load(self.inventory.read_text())

    @property
    def hosts(self) -> list[str]:
        """The worker hosts in inventory order (the order of a rolling deploy's batches)."""
        return list(self.data()["all"]["children"]["workers"]["hosts"])

    def worker_url(self, host: str) -> str:
        """``http://127.0.0.1:<port>`` of the worker on ``host`` (host network)."""
        port = self.data()["all"]["children"]["workers"]["hosts"][host]["captcha_worker_port"]
        return f"http://127.0.0.1:{port}"

    def variant(
        self,
        name: str,
        *,
        host_vars: Mapping[str, Mapping[str, Any]] | None = None,
        extra_hosts: Mapping[str, Mapping[str, Any]] | None = None,
        order: Sequence[str] = (),
    ) -> Deployment:
        """A copy of this deployment's inventory (``<name>.yml`` next to it) with more vars
        for some hosts, more worker hosts after the others (e.g. one no SSH reaches), and the
        hosts named in ``order`` first, in that order (a rolling deploy's batches follow it)."""
        data = self.data()
        workers = data["all"]["children"]["workers"]["hosts"]
        for host, values in (host_vars or {}).items():
            workers[host] = {**workers[host], **values}
        workers.update({h: dict(v) for h, v in (extra_hosts or {}).items()})
        ordered = {h: workers[h] for h in order}
        data["all"]["children"]["workers"]["hosts"] = ordered | {
            h: v for h, v in workers.items() if h not in ordered
        }
        path = self.inventory.with_name(f"{name}.yml")
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return Deployment(self.tag, path, self.provision)


def status_json(stdout: str) -> dict[str, Any]:
    """The /healthz body ``captcha-solver status`` printed ({} when the worker did not answer)."""
    return json.loads(stdout) if stdout.strip() else {}


def ssh_worker(ssh_port: int, env: str, port: int) -> dict[str, Any]:
    """Inventory vars of a worker host container reached over SSH (as production hosts are)."""
    return {**ssh_host_vars(ssh_port), "captcha_worker_env": env, "captcha_worker_port": port}


def worker_inventory(
    host: Host,
    env: str,
    *,
    envs: list[str],
    vault_addr: str,
    ca_file: Path,
    kv_mount: str,
    approle_mount: str,
    more_hosts: Sequence[Host] = (),
    provider_url: str = EMULATOR_URL,
    variables: Mapping[str, Any] | None = None,
) -> dict:
    """An inventory of the controller (local) and the worker container(s) of ``env``, each on
    a free loopback port (``host`` first, then ``more_hosts``), with the kit's shared settings
    for the given Vault names, the provider at ``provider_url`` and ``variables`` for all."""
    workers = {h.name: ssh_worker(h.ssh_port, env, free_port()) for h in (host, *more_hosts)}
    return inventory_data(
        {"workers": workers},
        {
            "captcha_kit_envs": envs,
            "captcha_kit_vault_addr": vault_addr,
            "captcha_kit_vault_addrs": [vault_addr],
            "captcha_kit_vault_cacert": str(ca_file),
            "captcha_kit_kv_mount": kv_mount,
            "captcha_kit_key_path_prefix": "captchaai",
            "captcha_kit_approle_mount": approle_mount,
            "captcha_kit_refresh_interval": 30,
            "captcha_kit_refresh_jitter": 0.1,
            "captcha_kit_provider_url": provider_url,
            **(variables or {}),
        },
    )


def make_deployment(
    vault,
    host: Host,
    directory: Path,
    *,
    more_hosts: Sequence[Host] = (),
    first_key: str | None = None,
    provider_url: str = EMULATOR_URL,
    variables: Mapping[str, Any] | None = None,
) -> Deployment:
    """`<tag>-dev` provisioned with a first key (``first_key``, or one made now);
    `<tag>-staging` known but not provisioned. ``host`` and ``more_hosts`` are workers of
    `<tag>-dev`; ``provider_url`` and ``variables`` go to the inventory (``worker_inventory``)."""
    tag = new_tag("w")
    envs = [f"{tag}-dev", f"{tag}-staging", f"{tag}-prod"]
    provision = provision_vars(
        vault,
        tag,
        vault_provision_envs=[f"{tag}-dev"],
        vault_provision_first_keys={f"{tag}-dev": first_key or new_key()},
    )
    result = run_playbook("playbooks/provision-vault.yml", vault=vault, extra_vars=provision)
    assert result.rc == 0, result.failure_messages()
    inventory = worker_inventory(
        host,
        f"{tag}-dev",
        envs=envs,
        vault_addr=vault.addr,
        ca_file=vault.ca_file,
        kv_mount=f"kv-{tag}",
        approle_mount=f"approle-{tag}",
        more_hosts=more_hosts,
        provider_url=provider_url,
        variables=variables,
    )
    path = directory / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return Deployment(tag, path, provision)


def deploy(vault, deployment: Deployment, **extra):
    return run_playbook(
        PLAYBOOK,
        vault=vault,
        inventory=deployment.inventory,
        extra_vars=extra or None,
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        timeout=600,
    )


@contextmanager
def deployed_host(vault, prefix: str, directory: Path) -> Iterator[tuple[Host, Deployment]]:
    """A fresh worker host with the worker deployed by the kit's own playbook (first run)."""
    build(Recipe.load())
    with worker_container(IMAGE, prefix) as host:
        deployment = make_deployment(vault, host, directory)
        first = deploy(vault, deployment)
        assert first.rc == 0, first.failure_messages(host.name)[-3000:]
        yield host, deployment


@dataclass
class EmulatedEnv:
    """Fresh worker hosts of one env (not deployed yet) and the CaptchaAI emulator they use."""

    hosts: list[Host]
    deployment: Deployment
    emulator: EmulatorProcess
    key: str  # the env's first key, which the emulator knows


@contextmanager
def emulated_env(
    vault,
    prefix: str,
    directory: Path,
    *,
    count: int = 1,
    variables: Mapping[str, Any] | None = None,
) -> Iterator[EmulatedEnv]:
    """``count`` fresh worker hosts of one env provisioned with a first key, against an
    emulator of their own that knows the key; ``variables`` (default: FAST solves) go to the
    inventory. Nothing is deployed yet."""
    key = new_key()
    build(Recipe.load())
    with emulator_for(key) as emulator, ExitStack() as stack:
        hosts = [stack.enter_context(worker_container(IMAGE, prefix)) for _ in range(count)]
        deployment = make_deployment(
            vault,
            hosts[0],
            directory,
            more_hosts=hosts[1:],
            first_key=key,
            provider_url=emulator.url,
            variables={"captcha_worker_provider_settings": FAST}
            if variables is None
            else variables,
        )
        yield EmulatedEnv(hosts, deployment, emulator, key)


def emulator_for(key: str) -> EmulatorProcess:
    """A CaptchaAI emulator on free loopback ports that knows ``key`` (solves take 0.2 s, no
    bans); worker hosts reach it, they share the host network."""
    return EmulatorProcess(
        free_port(), free_port(), solve_delay="fixed:0.2", ban_threshold=0, keys=[key]
    )
