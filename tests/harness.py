"""Shared helpers and fixtures of the playbook test suites: the test Vault and a playbook runner.

Test modules import helpers from here (``from harness import run_playbook``); tests/conftest.py
re-exports the fixtures. (Not from ``conftest``: tests/faults has a conftest of its own, and two
modules named ``conftest`` shadow each other on import.)

- ``vault`` (session): the real local OpenBao server of the tests (``.state/test/vault``, port
  18250, see docs/interfaces.md), started (or found running) through ``tools.local_vault``. A
  session that started it stops it at its end, pass or fail; sessions that share it find it
  running (``make test`` starts it before its two lanes and stops it after them; by hand:
  ``python -m tools.local_vault start|stop --state-dir .state/test/vault --port 18250``).
- ``vault_client`` (session): an ``hvac.Client`` with the root token.
- ``run_playbook(...)``: runs ``ansible-playbook`` as a subprocess with VAULT_ADDR / VAULT_CACERT /
  VAULT_TOKEN in its environment and the ``ansible.posix.json`` callback, and returns a
  ``PlaybookResult`` (rc, per-host stats, task results, output). Extra vars go through a 0600
  temporary file (``-e @file``), never through argv, so keys in them stay out of ``ps``.
- ``provision_vars(vault, tag)``: extra vars for ``vault_provision`` against the test server with
  names of their own (KV mount, AppRole mount, env names), so tests that change Vault do not
  disturb each other and run in any order.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.local_vault import LocalVault  # noqa: E402

TEST_VAULT_DIR = REPO / ".state" / "test" / "vault"
TEST_VAULT_PORT = 18250
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def vault() -> Iterator[LocalVault]:
    """The test Vault server, running, initialised and unsealed. A server this session started
    is stopped when the session ends, pass or fail; one it found running (`make test` starts it
    for both lanes) is left to whoever started it."""
    server = LocalVault(TEST_VAULT_DIR, TEST_VAULT_PORT)
    started_here = server.start() in ("started", "initialised")
    yield server
    if started_here:
        server.stop()


@pytest.fixture(scope="session")
def vault_client(vault: LocalVault) -> hvac.Client:
    """hvac client with the root token of the test server."""
    return hvac.Client(url=vault.addr, token=vault.root_token(), verify=str(vault.ca_file))


@dataclass
class PlaybookResult:
    """Outcome of one ``ansible-playbook`` run (json callback)."""

    rc: int
    stdout: str
    stderr: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per-host recap counts: ``{"localhost": {"ok": .., "changed": .., "failures": ..}}``."""
        return self.data.get("stats", {})

    def count(self, what: str, host: str = "localhost") -> int:
        return int(self.stats.get(host, {}).get(what, 0))

    @property
    def changed(self) -> int:
        return self.count("changed")

    def task_results(self, host: str = "localhost") -> Iterator[tuple[str, dict[str, Any]]]:
        """``(task name, result)`` for every task and every loop item, in order."""
        for play in self.data.get("plays", []):
            for task in play.get("tasks", []):
                name = task["task"]["name"]
                result = task.get("hosts", {}).get(host)
                if result is None:
                    continue
                items = result.get("results")
                if isinstance(items, list) and items:
                    for item in items:
                        yield name, item
                else:
                    yield name, result

    def changed_results(self, host: str = "localhost") -> list[tuple[str, dict[str, Any]]]:
        return [(n, r) for n, r in self.task_results(host) if r.get("changed")]

    def failed_results(self, host: str = "localhost") -> list[tuple[str, dict[str, Any]]]:
        return [(n, r) for n, r in self.task_results(host) if r.get("failed")]

    def failure_messages(self, host: str = "localhost") -> str:
        """All failure messages of the run, joined (plus stderr for errors outside tasks)."""
        msgs = [str(r.get("msg", "")) for _, r in self.failed_results(host)]
        return "\n".join(msgs) + "\n" + self.stderr


def run_playbook(
    playbook: str | Path,
    *,
    vault: LocalVault | None = None,
    extra_vars: Mapping[str, Any] | None = None,
    args: list[str] | tuple[str, ...] = (),
    env: Mapping[str, Any] | None = None,
    inventory: str | Path | None = None,
    check: bool = False,
    diff: bool = False,
    timeout: float = 300,
) -> PlaybookResult:
    """Run ``ansible-playbook`` and return its result.

    ``vault`` puts VAULT_ADDR / VAULT_CACERT / VAULT_TOKEN of that server in the environment;
    ``env`` then overrides single variables (a value of ``None`` removes the variable).
    ``playbook`` is relative to the repository unless absolute.
    """
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    run_env.update(
        {
            "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    if vault is not None:
        run_env.update(vault.env())
    for key, value in (env or {}).items():
        if value is None:
            run_env.pop(key, None)
        else:
            run_env[key] = str(value)
    cmd = [str(VENV_BIN / "ansible-playbook"), str(REPO / playbook)]
    if inventory is not None:
        cmd += ["-i", str(inventory)]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    cmd += list(args)
    with tempfile.TemporaryDirectory(prefix="kit-pb-") as tmp:
        if extra_vars:
            vars_file = Path(tmp) / "extra-vars.json"
            fd = os.open(vars_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(extra_vars, fh)
            cmd += ["-e", f"@{vars_file}"]
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    data: dict[str, Any] = {}
    start = proc.stdout.find("{")
    if start >= 0:
        try:
            data = json.loads(proc.stdout[start:])
        except json.JSONDecodeError:
            data = {}
    return PlaybookResult(proc.returncode, proc.stdout, proc.stderr, data)


def new_tag(prefix: str = "t") -> str:
    """A short unique name part (letters and digits, starts with a letter)."""
    return f"{prefix}{secrets.token_hex(3)}"


def provision_vars(vault: LocalVault, tag: str, **overrides: Any) -> dict[str, Any]:
    """Extra vars for ``vault_provision`` on the test server, with names of their own.

    KV mount ``kv-<tag>``, AppRole mount ``approle-<tag>``, envs ``<tag>-dev``, ``<tag>-staging``,
    ``<tag>-prod`` (policies and roles are named after the envs, so they are unique too).
    """
    envs = [f"{tag}-dev", f"{tag}-staging", f"{tag}-prod"]
    values: dict[str, Any] = {
        "captcha_kit_vault_addr": vault.addr,
        "captcha_kit_vault_cacert": str(vault.ca_file),
        "vault_provision_envs": envs,
        "vault_provision_known_envs": envs,
        "vault_provision_kv_mount": f"kv-{tag}",
        "vault_provision_approle_mount": f"approle-{tag}",
        "vault_provision_audit_file_path": str(vault.audit_log),
        "vault_provision_worker_secret_id_bound_cidrs": ["127.0.0.1"],
        "vault_provision_worker_token_bound_cidrs": ["127.0.0.1/32"],
    }
    values.update(overrides)
    return values


def vault_snapshot(client: hvac.Client, only: str = "") -> dict[str, Any]:
    """Everything provisioning could change: mounts, auth methods, audit devices, policies,
    and every AppRole role's settings. With ``only``, just the mounts, auth methods and policies
    whose name contains it (other sessions may change other names on the shared server)."""
    mounts = {
        k: v for k, v in client.sys.list_mounted_secrets_engines()["data"].items() if only in k
    }
    auths = {k: v for k, v in client.sys.list_auth_methods()["data"].items() if only in k}
    audits = client.sys.list_enabled_audit_devices()["data"]
    policies = [p for p in client.sys.list_acl_policies()["data"]["keys"] if only in p]
    snap: dict[str, Any] = {
        "mounts": {
            k: (v["type"], v.get("options"), v.get("description")) for k, v in mounts.items()
        },
        "auth": {k: (v["type"], v.get("description")) for k, v in auths.items()},
        "audit": sorted(audits),
        "policies": {p: client.sys.read_acl_policy(p)["data"]["policy"] for p in policies},
        "roles": {},
    }
    for path, method in auths.items():
        if method["type"] != "approle":
            continue
        mount = path.rstrip("/")
        try:
            roles = client.auth.approle.list_roles(mount_point=mount)["data"]["keys"]
        except hvac.exceptions.InvalidPath:
            roles = []
        for role in roles:
            snap["roles"][f"{mount}/{role}"] = client.auth.approle.read_role(
                role, mount_point=mount
            )["data"]
    for path, mount in mounts.items():
        if mount["type"] == "kv" and (mount.get("options") or {}).get("version") == "2":
            snap["mounts"][path] += (
                client.secrets.kv.v2.read_configuration(mount_point=path.rstrip("/"))["data"],
            )
    return snap


@pytest.fixture
def snapshot(vault_client: hvac.Client):
    """``snapshot(only)`` -> the current ``vault_snapshot`` of the test server, limited to
    names containing ``only``."""
    return lambda only: vault_snapshot(vault_client, only)


def approle_login(vault: LocalVault, client: hvac.Client, mount: str, role: str) -> hvac.Client:
    """Log in with a role's real role-id and a fresh secret-id; returns a client with that token."""
    role_id = client.auth.approle.read_role_id(role, mount_point=mount)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(role, mount_point=mount)["data"]["secret_id"]
    login = hvac.Client(url=vault.addr, verify=str(vault.ca_file))
    login.auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=mount)
    return login


def random_key() -> str:
    """A CaptchaAI-shaped test key (32 hex), made at run time."""
    return secrets.token_hex(16)


@pytest.fixture
def playbook():
    """The ``run_playbook`` function as a fixture (``from harness import`` works as well)."""
    return run_playbook
