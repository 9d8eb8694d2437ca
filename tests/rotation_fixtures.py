"""Fixtures and helpers of the key rotation suites (tests/test_rotation_*.py).

Everything is real and on 127.0.0.1: the test OpenBao (``.state/test/vault``, port 18250)
provisioned once per session by the kit's own ``playbooks/provision-vault.yml`` for a few
rotation-only environments named per session (``r<4 hex>-<n>``, so neither other suites nor a
concurrent session of this one are touched; each test resets the env it takes), the CaptchaAI
emulator, and workers that are real ``captcha-solver serve`` processes on the controller, each
logged in with its env's worker AppRole. Emulator and workers listen on free 127.0.0.1 ports.
The workers are inventory hosts with a local connection, so the role polls their /healthz "from
the worker host".

Keys are generated at run time and reach ansible-playbook only through 0600 extra-vars files;
every playbook run is checked for leaked keys and tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.captchaai_emulator import EmulatorProcess  # noqa: E402
from tools.local_vault import LocalVault  # noqa: E402

VAULT_PORT = 18250
# Several sessions (a developer, CI, a molecule run with workers on 18451+) may share this
# machine and the test OpenBao: each session has its own env names and free loopback ports.
SESSION = secrets.token_hex(2)
ENVS = [f"r{SESSION}-{i}" for i in range(1, 5)]
_ENV_POOL = itertools.cycle(ENVS)
REFRESH_INTERVAL = 2.0
REFRESH_JITTER = 0.1
PLAYBOOK = REPO / "playbooks" / "rotate-key.yml"
PROVISION = str(REPO / "playbooks" / "provision-vault.yml")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_key() -> str:
    return secrets.token_hex(16)


def write_private(path: Path, text: str) -> Path:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def _base_env(vault: LocalVault) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PYTHONUNBUFFERED="1",
        VAULT_ADDR=vault.addr,
        VAULT_CACERT=str(vault.ca_file),
    )
    env.pop("VAULT_TOKEN", None)
    return env


# --------------------------------------------------------------------------- session parts


# ``vault`` and ``vault_client`` (the test OpenBao and a root hvac client) come from harness.py.
@pytest.fixture(scope="session")
def admin(vault_client: hvac.Client) -> hvac.Client:
    return vault_client


@pytest.fixture(scope="session")
def provisioned(vault: LocalVault, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Run the kit's provision playbook once for the rotation env pool (real policies, roles)."""
    inv = tmp_path_factory.mktemp("provision-inventory")
    (inv / "hosts.yml").write_text(
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
                        "captcha_kit_envs": ENVS,
                        "vault_provision_known_envs": ENVS,
                        "captcha_kit_vault_addr": vault.addr,
                        "captcha_kit_vault_cacert": str(vault.ca_file),
                        "vault_provision_audit_managed_externally": True,
                    },
                }
            }
        )
    )
    env = _base_env(vault)
    env["VAULT_TOKEN"] = vault.root_token()
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv / "hosts.yml"), PROVISION],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return ENVS


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(free_port(), free_port(), solve_delay="fixed:0.2", ban_threshold=0) as emu:
        yield emu


# --------------------------------------------------------------------------- one environment


@dataclass
class RotEnv:
    """A freshly reset rotation environment with its first key in Vault and at the emulator."""

    name: str
    old_key: str
    admin: hvac.Client
    vault: LocalVault
    emulator: EmulatorProcess
    tmp: Path
    secrets: list[str] = field(default_factory=list)

    key_path = property(lambda self: f"captchaai/{self.name}")
    staged_path = property(lambda self: f"captchaai-staged/{self.name}")

    def metadata(self) -> dict[str, Any]:
        return self.admin.secrets.kv.v2.read_secret_metadata(self.key_path, mount_point="secret")[
            "data"
        ]

    def record(self) -> dict[str, str]:
        return dict(self.metadata().get("custom_metadata") or {})

    def current_version(self) -> int:
        return int(self.metadata()["current_version"])

    def read(self, version: int | None = None) -> dict[str, Any]:
        return self.admin.secrets.kv.v2.read_secret_version(
            self.key_path, version=version, mount_point="secret", raise_on_deleted_version=True
        )["data"]["data"]

    def current_key(self) -> str:
        return self.read()["api_key"]

    def stage(self, key: str) -> None:
        """Stage a key the way a stager does: with a token of the captcha-stager-<env> policy."""
        token = self.token(f"captcha-stager-{self.name}")
        stager = hvac.Client(url=self.vault.addr, token=token, verify=str(self.vault.ca_file))
        stager.secrets.kv.v2.create_or_update_secret(
            self.staged_path, {"api_key": key}, cas=0, mount_point="secret"
        )

    def staged_exists(self) -> bool:
        try:
            self.admin.secrets.kv.v2.read_secret_metadata(self.staged_path, mount_point="secret")
        except hvac.exceptions.InvalidPath:
            return False
        return True

    def token(self, *policies: str) -> str:
        tok = self.admin.auth.token.create(policies=list(policies), ttl="30m", no_parent=True)
        value = tok["auth"]["client_token"]
        self.secrets.append(value)
        return value

    def rotator_token(self) -> str:
        return self.token(f"captcha-rotator-{self.name}")

    def approle_files(self, role: str) -> tuple[Path, Path]:
        """role-id and a fresh secret-id of an AppRole, in 0600 files."""
        role_id = self.admin.auth.approle.read_role_id(role)["data"]["role_id"]
        secret_id = self.admin.auth.approle.generate_secret_id(role)["data"]["secret_id"]
        self.secrets.append(secret_id)
        d = self.tmp / f"creds-{role}"
        d.mkdir(mode=0o700, exist_ok=True)
        return (
            write_private(d / "role-id", role_id + "\n"),
            write_private(d / "secret-id", secret_id + "\n"),
        )


@pytest.fixture
def rot_env(
    provisioned: list[str],
    admin: hvac.Client,
    vault: LocalVault,
    emulator: EmulatorProcess,
    tmp_path: Path,
) -> RotEnv:
    name = next(_ENV_POOL)  # reused in turn: reset below, workers of earlier tests stopped
    for path in (f"captchaai/{name}", f"captchaai-staged/{name}"):
        with contextlib.suppress(hvac.exceptions.InvalidPath):
            admin.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point="secret")
    old = new_key()
    admin.secrets.kv.v2.create_or_update_secret(
        f"captchaai/{name}", {"api_key": old}, cas=0, mount_point="secret"
    )
    emulator.admin.add_key(old, balance=10.0)
    return RotEnv(name, old, admin, vault, emulator, tmp_path, secrets=[old])


# --------------------------------------------------------------------------- workers


@dataclass
class Worker:
    name: str
    port: int
    env: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def health(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def start(self) -> None:
        exe = shutil.which("captcha-solver", path=str(BIN))
        argv = (
            [exe, "serve", "--config", str(self.config)]
            if exe
            else [sys.executable, "-m", "captcha_solver", "serve", "--config", str(self.config)]
        )
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if self.health().get("key_version") is not None:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def start_workers(rot_env: RotEnv) -> Iterator[Any]:
    """``start_workers(n)`` -> n running ``captcha-solver serve`` workers of the env."""
    started: list[Worker] = []

    def factory(n: int) -> list[Worker]:
        role_id_file, secret_id_file = rot_env.approle_files(f"captcha-worker-{rot_env.name}")
        workers = []
        for i in range(n):
            port = free_port()
            name = f"worker-{rot_env.name}-{i + 1}"
            d = rot_env.tmp / name
            d.mkdir(mode=0o700)
            config = d / "config.toml"
            config.write_text(
                f"""env = "{rot_env.name}"
[vault]
addrs = ["{rot_env.vault.addr}"]
ca_file = "{rot_env.vault.ca_file}"
role_id_file = "{role_id_file}"
secret_id_file = "{secret_id_file}"
key_path = "captchaai/{rot_env.name}"
refresh_interval = {REFRESH_INTERVAL}
refresh_jitter = {REFRESH_JITTER}
[provider]
url = "{rot_env.emulator.url}"
[server]
host = "127.0.0.1"
port = {port}
[logging]
format = "json"
level = "WARNING"
"""
            )
            w = Worker(name, port, rot_env.name, config, d / "worker.log")
            w.start()
            started.append(w)
            workers.append(w)
        return workers

    yield factory
    for w in started:
        w.stop()


# --------------------------------------------------------------------------- playbook runs


def write_inventory(
    rot_env: RotEnv,
    workers: list[Worker] | list[tuple[str, int]] = (),
    extra_vars: dict[str, Any] | None = None,
) -> Path:
    hosts: dict[str, Any] = {}
    for w in workers:
        name, port = (w.name, w.port) if isinstance(w, Worker) else w
        hosts[name] = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "captcha_worker_env": rot_env.name,
            "captcha_worker_port": port,
        }
    inv = {
        "all": {
            "hosts": {
                "localhost": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                }
            },
            "children": {"workers": {"hosts": hosts}},
            "vars": {
                "captcha_kit_envs": ENVS,
                "captcha_kit_vault_addr": rot_env.vault.addr,
                "captcha_kit_vault_cacert": str(rot_env.vault.ca_file),
                "captcha_kit_refresh_interval": REFRESH_INTERVAL,
                "captcha_kit_refresh_jitter": REFRESH_JITTER,
                "captcha_kit_provider_url": rot_env.emulator.url,
                # workers are processes, not systemd units: they pick the key up on refresh
                "key_rotation_nudge": False,
                "key_rotation_window_margin": 8,
                "key_rotation_poll_delay": 1,
                **(extra_vars or {}),
            },
        }
    }
    path = rot_env.tmp / f"inventory-{secrets.token_hex(3)}.yml"
    path.write_text(yaml.safe_dump(inv))
    return path


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    status: dict[str, Any]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def rotation_argv(rot_env: RotEnv, inventory: Path, variables: dict[str, Any], check: bool):
    status_file = rot_env.tmp / f"status-{secrets.token_hex(3)}.json"
    vars_file = write_private(
        rot_env.tmp / f"vars-{secrets.token_hex(3)}.json",
        json.dumps(
            {"key_rotation_env": rot_env.name, "key_rotation_status_file": str(status_file)}
            | variables
        ),
    )
    argv = [
        str(BIN / "ansible-playbook"),
        "-i",
        str(inventory),
        str(PLAYBOOK),
        "-e",
        f"@{vars_file}",
    ]
    if check:
        argv += ["--check", "--diff"]
    return argv, status_file


def run_rotation(
    rot_env: RotEnv,
    inventory: Path,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    check: bool = False,
    timeout: float = 300,
) -> Run:
    """Run playbooks/rotate-key.yml unattended-style (no TTY); check the output for secrets."""
    argv, status_file = rotation_argv(rot_env, inventory, variables or {}, check)
    env = _base_env(rot_env.vault)
    if token:
        env["VAULT_TOKEN"] = token
    proc = subprocess.run(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    run = Run(proc.returncode, proc.stdout, proc.stderr, status)
    assert_no_secrets(run.output + json.dumps(status), rot_env.secrets)
    return run


def assert_no_secrets(text: str, values: list[str]) -> None:
    for value in values:
        assert value not in text, f"a secret ({value[-4:]}) leaked into the output"
