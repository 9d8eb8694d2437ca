"""Helpers of the fault tests (fixtures are in conftest.py)."""

from __future__ import annotations

import secrets
from pathlib import Path

from bench.fleet import (
    PROVISION,
    Fleet,
    admin_client,
    ansible_env,
    new_key,
    provision_inventory,
    put_key,
    run_playbook,
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
        self.admin = admin_client(vault)
        self.keys: list[str] = []
        self.put_new_key()

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
