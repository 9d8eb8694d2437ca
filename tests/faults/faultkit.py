"""Helpers of the fault tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import hvac
import yaml

from bench.fleet import (
    PROVISION,
    Fleet,
    admin_client,
    ansible_env,
    new_key,
    provision_inventory,
    put_key,
    run_playbook,
    write_private,
)
from tools.captchaai_emulator import EmulatorProcess
from tools.local_vault import LocalVault

SESSION = secrets.token_hex(2)  # names of this session's envs: f<SESSION>-...


def provision(vault: LocalVault, envs: list[str], tmp: Path, addrs: list[str] | None = None):
    """Run the kit's provision playbook for ``envs``; returns the ``PlaybookRun``."""
    inventory = provision_inventory(vault, envs, tmp)
    env = ansible_env(vault, token=vault.root_token(), addrs=addrs or [])
    return run_playbook(PROVISION, inventory, env)


class Env:
    """A provisioned environment with its first key in Vault and at the emulator."""

    def __init__(self, vault: LocalVault, name: str, emulator: EmulatorProcess, tmp: Path):
        self.vault = vault
        self.name = name
        self.emulator = emulator
        self.tmp = tmp
        self.keys: list[str] = []
        self.put_new_key()

    @property
    def admin(self):
        """Root client of the active node (of the only node for a single server)."""
        node = self.vault.active_node() if len(self.vault.nodes) > 1 else None
        if node is None:
            return admin_client(self.vault)
        return hvac.Client(
            url=node.addr, token=self.vault.root_token(), verify=str(node.tls_dir / "ca.pem")
        )

    def put_new_key(self, *, at_emulator: bool = True) -> int:
        key = new_key()
        self.keys.append(key)
        if at_emulator:
            self.emulator.admin.add_key(key, balance=1000.0)
        return put_key(self.admin, self.name, key)

    @property
    def key(self) -> str:
        return self.keys[-1]

    def fleet(self, addrs: list[str] | None = None, **opts) -> Fleet:
        return Fleet(
            admin=self.admin,
            env=self.name,
            directory=self.tmp / f"fleet-{secrets.token_hex(2)}",
            vault_addrs=addrs or self.vault.addrs,
            ca_file=self.vault.ca_file,
            provider_url=self.emulator.url,
            **opts,
        )

    def current_version(self) -> int:
        meta = self.admin.secrets.kv.v2.read_secret_metadata(
            f"captchaai/{self.name}", mount_point="secret"
        )
        return int(meta["data"]["current_version"])


def assert_no_secret(text: str, values: list[str]) -> None:
    for value in values:
        assert value not in text, f"a secret (…{value[-4:]}) appeared in the output"


def rotation_inventory(
    env: Env, workers, tmp: Path, *, vault_addr: str | None = None, extra: dict | None = None
) -> Path:
    """Inventory for playbooks/rotate-key.yml: localhost plus each worker process as a host with
    a local connection (the role polls its /healthz "from the worker host"). The workers are
    processes, not systemd units: no nudge; they pick the key up on their 2 s refresh."""
    hosts = {
        w.name: {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "captcha_worker_env": env.name,
            "captcha_worker_port": w.port,
        }
        for w in workers
    }
    inventory = {
        "all": {
            "hosts": {
                "localhost": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                }
            },
            "children": {"workers": {"hosts": hosts}},
            "vars": {
                "captcha_kit_envs": [env.name],
                "captcha_kit_vault_addr": vault_addr or env.vault.addr,
                "captcha_kit_vault_cacert": str(env.vault.ca_file),
                "captcha_kit_refresh_interval": 2.0,
                "captcha_kit_refresh_jitter": 0.1,
                "captcha_kit_provider_url": env.emulator.url,
                "key_rotation_nudge": False,
                "key_rotation_window_margin": 20,
                "key_rotation_poll_delay": 1,
                **(extra or {}),
            },
        }
    }
    path = tmp / f"rotation-{secrets.token_hex(3)}.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


ROTATE = PROVISION.parent / "rotate-key.yml"


def rotation_vars(env: Env, tmp: Path, variables: dict) -> tuple[Path, Path]:
    """A 0600 extra-vars file for a rotation run and the path of its status file."""
    status = tmp / f"status-{secrets.token_hex(3)}.json"
    data = {"key_rotation_env": env.name, "key_rotation_status_file": str(status)} | variables
    return write_private(tmp / f"vars-{secrets.token_hex(3)}.json", json.dumps(data)), status
