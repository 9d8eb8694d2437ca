"""Helpers of the fault tests (tests/faults/; their fixtures are in its conftest.py)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import hvac

from testkit.creds import assert_no_secrets, new_key
from testkit.emulator import EmulatorProcess
from testkit.net import wait_for
from testkit.paths import PROVISION
from testkit.playbook import PlaybookResult, ansible_env, provision_inventory, run_playbook
from testkit.rotation import rotation_inventory as _rotation_inventory
from testkit.rotation import rotation_vars as _rotation_vars
from testkit.tokens import playbook_token
from testkit.vault import BaoNode, LocalVault
from testkit.vault_ops import admin_client, put_key
from testkit.worker import Fleet, WorkerProc

SESSION = secrets.token_hex(2)  # names of this session's envs: f<SESSION>-...


def kill_leader_mid_run(
    proc: subprocess.Popen[bytes],
    leader: BaoNode,
    reached: Callable[[], object],
    what: str,
    timeout: float,
) -> str:
    """While the playbook run ``proc`` goes on: wait (two minutes at most) until ``reached``
    (``what`` names it), SIGKILL the HA ``leader`` node, and return the run's output once it
    ends (``timeout`` at most). The run is killed when anything before fails."""
    try:
        wait_for(lambda: proc.poll() is not None or reached(), 120, what)
        assert proc.poll() is None, "the run ended before the leader could be killed"
        pid = leader.pid()
        assert pid is not None, "the leader has no process to kill"
        os.killpg(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return out.decode()


def provision(
    vault: LocalVault, envs: list[str], tmp: Path, addrs: list[str] | None = None
) -> PlaybookResult:
    """Run the kit's provision playbook for ``envs`` with the provisioner's token."""
    inventory = provision_inventory(vault, envs, tmp)
    token = playbook_token(vault, PROVISION, inventory, None)
    env = ansible_env(vault, token=token, addrs=addrs or [])
    return run_playbook(PROVISION, inventory=inventory, env=env)


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


assert_no_secrets = assert_no_secrets


def rotation_inventory(
    env: Env,
    workers: list[WorkerProc],
    tmp: Path,
    *,
    vault_addr: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Inventory for playbooks/rotate-key.yml of one fault env (see testkit.rotation)."""
    return _rotation_inventory(
        tmp,
        env=env.name,
        envs=[env.name],
        vault=env.vault,
        provider_url=env.emulator.url,
        workers=workers,
        vault_addr=vault_addr,
        window_margin=20,
        extra_vars=extra,
    )


def rotation_vars(env: Env, tmp: Path, variables: dict) -> tuple[Path, Path]:
    """A 0600 extra-vars file for a rotation run and the path of its status file."""
    return _rotation_vars(tmp, env.name, variables)
