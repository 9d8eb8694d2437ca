"""One ``ansible-playbook`` runner and the inventories and variables it is given.

``run_playbook`` runs the real ``ansible-playbook`` of the venv with the ``ansible.posix.json``
callback and returns a ``PlaybookResult`` (rc, per-host stats, task results, output, seconds).
Extra vars travel in a 0600 temporary file (``-e @file``), never in argv, so keys in them stay
out of ``ps``; the child's environment has no VAULT_*/BAO_* variable but those given.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testkit.creds import write_private
from testkit.paths import BIN, REPO
from testkit.tokens import playbook_token
from testkit.vault import LocalVault

LOCALHOST = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
# Cheaper module runs in the test runs (testkit/ansible_plugins/callback/module_runs.py): bytecode
# beside the source in the payloads, and local module processes that read their code buffered.
MODULE_RUNS_ENV = {
    "ANSIBLE_CALLBACK_PLUGINS": str(REPO / "testkit" / "ansible_plugins" / "callback"),
    "ANSIBLE_CALLBACKS_ENABLED": "module_runs",
}


@dataclass
class PlaybookResult:
    """Outcome of one ``ansible-playbook`` run (json callback)."""

    rc: int
    stdout: str
    stderr: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per-host recap counts: ``{"localhost": {"ok": .., "changed": .., "failures": ..}}``."""
        return self.data.get("stats", {})

    def count(self, what: str, host: str = "localhost") -> int:
        return int(self.stats.get(host, {}).get(what, 0))

    def total(self, what: str) -> int:
        """A recap count summed over every host."""
        return sum(int(h.get(what, 0)) for h in self.stats.values())

    @property
    def changed(self) -> int:
        return self.count("changed")

    @property
    def failures(self) -> int:
        """Failed plus unreachable, over every host."""
        return self.total("failures") + self.total("unreachable")

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


def ansible_env(
    vault: LocalVault | None = None, *, token: str | None = None, addrs: Iterable[str] = ()
) -> dict[str, str]:
    """The environment of an ``ansible-playbook`` child: this venv first on PATH, the kit's
    ansible.cfg, no colour, cheaper module runs, no VAULT_*/BAO_* of the caller; with
    ``vault`` its address and CA (and ``token``, and more node addresses for the kit's
    failover)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(MODULE_RUNS_ENV)
    if vault is not None:
        env.update(VAULT_ADDR=vault.addr, VAULT_CACERT=str(vault.ca_file))
        more = [a for a in addrs if a != vault.addr]
        if more:
            env["CAPTCHA_KIT_VAULT_ADDRS"] = ",".join(more)
    if token is not None:
        env["VAULT_TOKEN"] = token
    return env


def playbook_argv(
    playbook: str | Path,
    inventory: str | Path | None = None,
    extra_vars_file: Path | None = None,
    args: Iterable[str] = (),
) -> list[str]:
    """The argv of one run (``playbook`` relative to the repository unless absolute)."""
    argv = [str(BIN / "ansible-playbook"), str(REPO / playbook)]
    if inventory is not None:
        argv += ["-i", str(inventory)]
    if extra_vars_file is not None:
        argv += ["-e", f"@{extra_vars_file}"]
    return argv + list(args)


def run_argv(
    argv: list[str], env: Mapping[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run an argv (``ansible-playbook``, or a kit tool that runs it) from the repository, no
    stdin, output captured."""
    return subprocess.run(
        argv,
        cwd=REPO,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_argv(argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start an ``ansible-playbook`` argv in a process group of its own (so a test can kill
    the whole run), stdout and stderr in one pipe."""
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_playbook(
    playbook: str | Path,
    *,
    vault: LocalVault | None = None,
    extra_vars: Mapping[str, Any] | None = None,
    args: Iterable[str] = (),
    env: Mapping[str, Any] | None = None,
    inventory: str | Path | None = None,
    check: bool = False,
    diff: bool = False,
    timeout: float = 300,
) -> PlaybookResult:
    """Run ``ansible-playbook`` and return its result.

    ``vault`` puts VAULT_ADDR / VAULT_CACERT of that server in the environment, and as
    VAULT_TOKEN the smallest token the playbook documents (``testkit.tokens.playbook_token``:
    the provisioner's or the deployers', never the root token); ``env`` then sets single
    variables (``None`` removes one).
    """
    run_env = ansible_env()
    run_env["ANSIBLE_STDOUT_CALLBACK"] = "ansible.posix.json"
    if vault is not None:
        run_env.update(vault.env())
        del run_env["VAULT_TOKEN"]
        if "VAULT_TOKEN" not in (env or {}):
            token = playbook_token(vault, playbook, inventory, extra_vars)
            if token is not None:
                run_env["VAULT_TOKEN"] = token
    for key, value in (env or {}).items():
        if value is None:
            run_env.pop(key, None)
        else:
            run_env[key] = str(value)
    flags = [*(["--check"] if check else []), *(["--diff"] if diff else []), *args]
    with tempfile.TemporaryDirectory(prefix="kit-pb-") as tmp:
        vars_file = None
        if extra_vars:
            vars_file = write_private(Path(tmp) / "extra-vars.json", json.dumps(dict(extra_vars)))
        started = time.monotonic()
        proc = run_argv(playbook_argv(playbook, inventory, vars_file, flags), run_env, timeout)
        seconds = time.monotonic() - started
    data: dict[str, Any] = {}
    start = proc.stdout.find("{")
    if start >= 0:
        try:
            data = json.loads(proc.stdout[start:])
        except json.JSONDecodeError:
            data = {}
    return PlaybookResult(proc.returncode, proc.stdout, proc.stderr, data, seconds)


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


def inventory_data(groups: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, Any]:
    """An inventory: localhost (local connection) plus ``groups`` (name -> {host: vars}),
    ``variables`` for all."""
    return {
        "all": {
            "hosts": {"localhost": dict(LOCALHOST)},
            "children": {name: {"hosts": dict(hosts)} for name, hosts in groups.items()},
            "vars": dict(variables),
        }
    }


def write_inventory(
    directory: Path, groups: Mapping[str, Any], variables: Mapping[str, Any]
) -> Path:
    """``inventory_data`` as a YAML file in ``directory`` (a new file name each call)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"inventory-{secrets.token_hex(3)}.yml"
    path.write_text(yaml.safe_dump(inventory_data(groups, variables)))
    return path


def provision_inventory(
    vault: LocalVault, envs: list[str], directory: Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """An inventory for playbooks/provision-vault.yml against ``vault`` (localhost only)."""
    return write_inventory(
        directory,
        {},
        {
            "captcha_kit_envs": envs,
            "vault_provision_known_envs": envs,
            "captcha_kit_vault_addr": vault.addr,
            "captcha_kit_vault_cacert": str(vault.ca_file),
            "vault_provision_audit_file_path": str(vault.audit_log),
            "vault_provision_worker_secret_id_bound_cidrs": ["127.0.0.1"],
            "vault_provision_worker_token_bound_cidrs": ["127.0.0.1/32"],
            **(extra or {}),
        },
    )


def process_host(env: str, port: int) -> dict[str, Any]:
    """Inventory vars of a worker that is a ``captcha-solver serve`` process on the controller:
    a local connection, so the role polls its /healthz "from the worker host"."""
    return {**LOCALHOST, "captcha_worker_env": env, "captcha_worker_port": port}
