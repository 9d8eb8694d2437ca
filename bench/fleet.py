"""Real local parts for the benchmarks and the fault tests (tests/faults/): provisioning by the
kit's own playbook, AppRole credential files, keys in Vault, and ``captcha-solver serve`` worker
processes on 127.0.0.1.

Nothing secret is printed or put in argv or the environment of a child: keys, secret-ids and
tokens travel in 0600 files (extra vars for ansible-playbook, credential files for workers) or in
memory (hvac clients). Keys are generated at run time (``new_key``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROVISION = REPO / "playbooks" / "provision-vault.yml"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_key() -> str:
    """A CaptchaAI-shaped key (32 hex), made now."""
    return secrets.token_hex(16)


def write_private(path: Path, text: str) -> Path:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def admin_client(vault: Any) -> hvac.Client:
    """Root-token client of a ``tools.local_vault.LocalVault`` (first node)."""
    return hvac.Client(url=vault.addr, token=vault.root_token(), verify=str(vault.ca_file))


def ansible_env(vault: Any, *, token: str | None = None, addrs: Iterable[str] = ()) -> dict:
    """Environment of an ``ansible-playbook`` child: Vault address, CA, token, more addresses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        PYTHONUNBUFFERED="1",
        VAULT_ADDR=vault.addr,
        VAULT_CACERT=str(vault.ca_file),
    )
    if token is not None:
        env["VAULT_TOKEN"] = token
    addrs = [a for a in addrs if a != vault.addr]
    if addrs:
        env["CAPTCHA_KIT_VAULT_ADDRS"] = ",".join(addrs)
    return env


def provision_inventory(
    vault: Any, envs: list[str], directory: Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """An inventory for playbooks/provision-vault.yml against ``vault`` (localhost only)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"provision-{secrets.token_hex(3)}.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "hosts": {
                        "localhost": {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                        }
                    },
                    "vars": {
                        "captcha_kit_envs": envs,
                        "vault_provision_known_envs": envs,
                        "captcha_kit_vault_addr": vault.addr,
                        "captcha_kit_vault_cacert": str(vault.ca_file),
                        "vault_provision_audit_file_path": str(vault.audit_log),
                        "vault_provision_worker_secret_id_bound_cidrs": ["127.0.0.1"],
                        "vault_provision_worker_token_bound_cidrs": ["127.0.0.1/32"],
                        **(extra or {}),
                    },
                }
            }
        )
    )
    return path


@dataclass
class PlaybookRun:
    rc: int
    output: str
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(int(h.get("changed", 0)) for h in self.stats.values())

    @property
    def failures(self) -> int:
        return sum(
            int(h.get("failures", 0)) + int(h.get("unreachable", 0)) for h in self.stats.values()
        )


def playbook_argv(playbook: Path, inventory: Path, extra_vars_file: Path | None = None) -> list:
    argv = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)]
    if extra_vars_file is not None:
        argv += ["-e", f"@{extra_vars_file}"]
    return argv


def run_playbook(
    playbook: Path,
    inventory: Path,
    env: Mapping[str, str],
    *,
    extra_vars: Mapping[str, Any] | None = None,
    timeout: float = 600,
) -> PlaybookRun:
    """ansible-playbook with the json callback; extra vars through a 0600 file."""
    run_env = dict(env) | {"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}
    with tempfile.TemporaryDirectory(prefix="kit-fleet-") as tmp:
        vars_file = None
        if extra_vars:
            vars_file = write_private(Path(tmp) / "vars.json", json.dumps(dict(extra_vars)))
        started = time.monotonic()
        proc = subprocess.run(
            playbook_argv(playbook, inventory, vars_file),
            cwd=REPO,
            env=run_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        seconds = time.monotonic() - started
    stats: dict[str, Any] = {}
    start = proc.stdout.find("{")
    if start >= 0:
        with contextlib.suppress(json.JSONDecodeError):
            stats = json.loads(proc.stdout[start:]).get("stats", {})
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr, seconds, stats)


def put_key(admin: hvac.Client, env: str, key: str, *, mount: str = "secret") -> int:
    """Write ``key`` as the next version of ``captchaai/<env>`` (check-and-set); its version."""
    path = f"captchaai/{env}"
    try:
        current = int(
            admin.secrets.kv.v2.read_secret_metadata(path, mount_point=mount)["data"][
                "current_version"
            ]
        )
    except hvac.exceptions.InvalidPath:
        current = 0
    result = admin.secrets.kv.v2.create_or_update_secret(
        path, {"api_key": key}, cas=current, mount_point=mount
    )
    return int(result["data"]["version"])


def approle_files(
    admin: hvac.Client, env: str, directory: Path, *, mount: str = "approle"
) -> tuple[Path, Path]:
    """role-id and a fresh secret-id of ``captcha-worker-<env>`` in 0600 files."""
    role = f"captcha-worker-{env}"
    role_id = admin.auth.approle.read_role_id(role, mount_point=mount)["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id(role, mount_point=mount)["data"]["secret_id"]
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return (
        write_private(directory / "role-id", role_id + "\n"),
        write_private(directory / "secret-id", secret_id + "\n"),
    )


# --------------------------------------------------------------------------- workers


def _solver_argv(config: Path) -> list[str]:
    exe = shutil.which("captcha-solver", path=str(BIN))
    if exe:
        return [exe, "serve", "--config", str(config)]
    return [sys.executable, "-m", "captcha_solver", "serve", "--config", str(config)]


@dataclass
class WorkerProc:
    """One ``captcha-solver serve`` process with its own config file and log."""

    name: str
    env: str
    port: int
    directory: Path
    vault_addrs: list[str]
    ca_file: Path
    role_id_file: Path
    secret_id_file: Path
    provider_url: str
    refresh_interval: float = 2.0
    refresh_jitter: float = 0.1
    max_staleness: float = 3600.0
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra TOML settings
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.directory / "config.toml"

    @property
    def log(self) -> Path:
        return self.directory / "worker.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def render(self) -> str:
        def toml(value: Any) -> str:
            return json.dumps(value)  # strings, numbers, lists of strings: JSON == TOML here

        sections: dict[str, dict[str, Any]] = {
            "vault": {
                "addrs": self.vault_addrs,
                "ca_file": str(self.ca_file),
                "role_id_file": str(self.role_id_file),
                "secret_id_file": str(self.secret_id_file),
                "key_path": f"captchaai/{self.env}",
                "refresh_interval": self.refresh_interval,
                "refresh_jitter": self.refresh_jitter,
                "max_staleness": self.max_staleness,
                "timeout": 3.0,
                "retries": 2,
                "retry_delay": 0.2,
            },
            "provider": {
                "url": self.provider_url,
                "poll_interval": 0.5,
                "request_timeout": 10.0,
                "task_timeout": 60.0,
                "backoff_base": 0.2,
                "backoff_max": 2.0,
            },
            "server": {"host": "127.0.0.1", "port": self.port, "shutdown_grace": 5.0},
            "logging": {"format": "json", "level": "INFO"},
        }
        for section, values in self.settings.items():
            sections.setdefault(section, {}).update(values)
        lines = [f"env = {toml(self.env)}"]
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml(v)}" for k, v in values.items()]
        lines += ["[provider.first_poll_delay]", "default = 0.3"]
        return "\n".join(lines) + "\n"

    def spawn(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.write_text(self.render())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env = {k: v for k, v in env.items() if not k.startswith("CAPTCHA_SOLVER_")}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                _solver_argv(self.config),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
            )

    def health(self, timeout: float = 3.0) -> dict[str, Any]:
        """``/healthz`` JSON (also on 503); ``OSError`` when nothing answers."""
        try:
            with _OPENER.open(f"{self.url}/healthz", timeout=timeout) as resp:
                data: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            data = json.loads(exc.read())
            data.setdefault("_http", exc.code)
        return data

    def metrics(self, timeout: float = 3.0) -> str:
        with _OPENER.open(f"{self.url}/metrics", timeout=timeout) as resp:
            return resp.read().decode()

    def wait_ready(self, timeout: float = 60.0, version: int | None = None) -> dict[str, Any]:
        """Wait until the worker has a key (of ``version`` when given)."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                last = self.health()
                got = last.get("key_version")
                if got is not None and (version is None or got == version):
                    return last
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready ({last}): {self.log_tail()}")

    def sighup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Fleet:
    """Several workers of one env sharing one AppRole credential pair."""

    def __init__(
        self,
        *,
        admin: hvac.Client,
        env: str,
        directory: Path,
        vault_addrs: list[str],
        ca_file: Path,
        provider_url: str,
        ports: Iterable[int] | None = None,
        approle_mount: str = "approle",
        **worker_opts: Any,
    ):
        self.admin = admin
        self.env = env
        self.directory = directory
        self.vault_addrs = vault_addrs
        self.ca_file = ca_file
        self.provider_url = provider_url
        self.ports = iter(ports) if ports is not None else None
        self.approle_mount = approle_mount
        self.worker_opts = worker_opts
        self.workers: list[WorkerProc] = []
        self._creds: tuple[Path, Path] | None = None

    def start(self, n: int, timeout: float = 120.0, stagger: float = 0.0) -> list[WorkerProc]:
        """Start ``n`` more workers (``stagger`` seconds apart) and wait until each has a key."""
        if self._creds is None:
            self._creds = approle_files(
                self.admin, self.env, self.directory / "creds", mount=self.approle_mount
            )
        new = []
        for _ in range(n):
            i = len(self.workers) + 1
            port = next(self.ports) if self.ports is not None else free_port()
            worker = WorkerProc(
                name=f"w{i}-{self.env}",
                env=self.env,
                port=port,
                directory=self.directory / f"w{i}",
                vault_addrs=list(self.vault_addrs),
                ca_file=self.ca_file,
                role_id_file=self._creds[0],
                secret_id_file=self._creds[1],
                provider_url=self.provider_url,
                **self.worker_opts,
            )
            if new and stagger:
                time.sleep(stagger)
            worker.spawn()
            self.workers.append(worker)
            new.append(worker)
        deadline = time.monotonic() + timeout + stagger * n
        for worker in new:
            worker.wait_ready(max(1.0, deadline - time.monotonic()))
        return new

    @property
    def urls(self) -> list[str]:
        return [w.url for w in self.workers]

    def versions(self) -> list[int | None]:
        out: list[int | None] = []
        for w in self.workers:
            try:
                out.append(w.health().get("key_version"))
            except (OSError, ValueError):
                out.append(None)
        return out

    def stop(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            w.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
