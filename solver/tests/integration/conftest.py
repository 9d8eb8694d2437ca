"""Fixtures for integration tests: the real local OpenBao and the CaptchaAI emulator.

* ``vault``: the shared test instance ``.state/test/vault`` on 127.0.0.1:18250 (started if
  needed, left running). Tests isolate themselves with their own KV mount, AppRole mount,
  policy and role names, so they do not disturb other suites using the same server.
* ``private_vault``: a second OpenBao node of our own (``.state/test/solver-vault``), for the
  tests that stop and restart Vault.
* ``emulator``: the CaptchaAI emulator on two free ports,
  one per test module, reset before each test.
* ``worker_factory``: provisions an AppRole + key in Vault and runs ``captcha-solver serve`` as
  a subprocess with its log in a file; the tests drive it over HTTP and with signals.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.captchaai_emulator import EmulatorAdmin, EmulatorProcess  # noqa: E402
from tools.local_vault import LocalVault  # noqa: E402

TEST_VAULT_PORT = 18250
PRIVATE_VAULT_PORT = 18254
KV_MOUNT = "solver-it-kv"
APPROLE_MOUNT = "solver-it-approle"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_key() -> str:
    return secrets.token_hex(16)


# --------------------------------------------------------------------------- Vault


def _admin_client(server: LocalVault) -> hvac.Client:
    return hvac.Client(url=server.addr, token=server.root_token(), verify=str(server.ca_file))


def _prepare_mounts(admin: hvac.Client) -> None:
    if f"{KV_MOUNT}/" not in admin.sys.list_mounted_secrets_engines()["data"]:
        admin.sys.enable_secrets_engine("kv", path=KV_MOUNT, options={"version": "2"})
    if f"{APPROLE_MOUNT}/" not in admin.sys.list_auth_methods()["data"]:
        admin.sys.enable_auth_method("approle", path=APPROLE_MOUNT)


@pytest.fixture(scope="session")
def vault() -> Iterator[LocalVault]:
    """The shared test Vault; stopped at the end of the session when this session started it."""
    server = LocalVault(REPO_ROOT / ".state" / "test" / "vault", TEST_VAULT_PORT)
    started_here = server.start() in ("started", "initialised")
    _prepare_mounts(_admin_client(server))
    yield server
    if started_here:
        server.stop()


@pytest.fixture(scope="module")
def private_vault() -> Iterator[LocalVault]:
    server = LocalVault(REPO_ROOT / ".state" / "test" / "solver-vault", PRIVATE_VAULT_PORT)
    server.start()
    _prepare_mounts(_admin_client(server))
    yield server
    server.stop()


# --------------------------------------------------------------------------- emulator


@pytest.fixture(scope="module")
def emulator_proc() -> Iterator[EmulatorProcess]:
    # Free ports, never the molecule scenarios' 18350/18351 (a shared emulator there would
    # hand a scenario the wrong keys).
    ports = (free_port(), free_port())
    proc = EmulatorProcess(
        *ports, solve_delay="uniform:0.2:0.4", time_scale=1.0, ban_threshold=50, seed=7
    )
    with proc:
        yield proc


@pytest.fixture
def emulator(emulator_proc: EmulatorProcess) -> EmulatorProcess:
    emulator_proc.admin.reset()
    return emulator_proc


# --------------------------------------------------------------------------- workers


@dataclass
class Worker:
    """A provisioned AppRole + key, and (once started) a ``captcha-solver serve`` process."""

    name: str
    admin: hvac.Client
    server: LocalVault
    emulator: EmulatorProcess
    dir: Path
    keys: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    config_path: Path | None = None
    extra_outputs: list[str] = field(default_factory=list)

    @property
    def key_path(self) -> str:
        return f"captchaai/{self.name}"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.dir / "worker.log"

    @property
    def secret_id_file(self) -> Path:
        return self.dir / "state" / "secret-id"

    @property
    def wrapped_file(self) -> Path:
        return self.dir / "state" / "secret-id.wrapped"

    # -- Vault side (the root token stays in this process; never in argv/env of the worker)
    def write_key(self, key: str, backups: list[str] | None = None) -> int:
        self.keys.append(key)
        data: dict[str, Any] = {"api_key": key}
        if backups:
            data["backup_keys"] = backups
            self.keys.extend(backups)
        result = self.admin.secrets.kv.v2.create_or_update_secret(
            path=self.key_path, secret=data, mount_point=KV_MOUNT
        )
        return int(result["data"]["version"])

    def set_metadata(self, custom: dict[str, str]) -> None:
        self.admin.secrets.kv.v2.update_metadata(
            path=self.key_path, custom_metadata=custom, mount_point=KV_MOUNT
        )

    def new_secret_id(self, wrap_ttl: str | None = None) -> tuple[str, str]:
        """(secret_id or wrapping token, accessor or '')"""
        if wrap_ttl:
            resp = self.admin.adapter.post(
                f"/v1/auth/{APPROLE_MOUNT}/role/{self.name}/secret-id", json={}, wrap_ttl=wrap_ttl
            )
            return resp["wrap_info"]["token"], ""
        resp = self.admin.auth.approle.generate_secret_id(self.name, mount_point=APPROLE_MOUNT)
        return resp["data"]["secret_id"], resp["data"]["secret_id_accessor"]

    def config(self, **over: Any) -> dict[str, Any]:
        vault_cfg: dict[str, Any] = {
            "addrs": [self.server.addr],
            "ca_file": str(self.server.ca_file),
            "approle_mount": APPROLE_MOUNT,
            "role_id_file": str(self.dir / "role-id"),
            "secret_id_file": str(self.secret_id_file),
            "wrapped_secret_id_file": str(self.wrapped_file),
            "kv_mount": KV_MOUNT,
            "key_path": self.key_path,
            "refresh_interval": 0.5,
            "refresh_jitter": 0.1,
            "max_staleness": 30.0,
            "timeout": 2.0,
            "retries": 2,
            "retry_delay": 0.1,
        }
        provider_cfg: dict[str, Any] = {
            "url": self.emulator.url,
            "request_timeout": 5.0,
            "task_timeout": 20.0,
            "poll_interval": 0.1,
            "first_poll_delay": {"default": 0.15, "userrecaptcha": 0.2},
            "backoff_base": 0.05,
            "backoff_max": 0.5,
            "circuit_cooldown": 60.0,
        }
        vault_cfg.update(over.pop("vault", {}))
        provider_cfg.update(over.pop("provider", {}))
        return {
            "env": "dev",
            "vault": vault_cfg,
            "provider": provider_cfg,
            "server": {"host": "127.0.0.1", "port": self.port, "shutdown_grace": 10.0},
            "logging": {"format": "json", "level": "DEBUG"},
            **over,
        }

    def write_config(self, **over: Any) -> Path:
        path = self.dir / "config.toml"
        path.write_text(_to_toml(self.config(**over)))
        self.config_path = path
        return path

    def start(
        self, wait: bool = True, extra_env: dict[str, str] | None = None, **over: Any
    ) -> None:
        self.write_config(**over)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env.update(extra_env or {})
        log = open(self.log_file, "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "captcha_solver", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
        )
        log.close()
        if wait:
            self.wait_health(lambda h: h["status"] == "ok")

    def health(self) -> tuple[int, dict[str, Any]]:
        r = requests.get(f"{self.base}/healthz", timeout=5)
        self.extra_outputs.append(r.text)
        return r.status_code, r.json()

    def metrics(self) -> str:
        text = requests.get(f"{self.base}/metrics", timeout=5).text
        self.extra_outputs.append(text)
        return text

    def wait_health(self, predicate: Any, within: float = 15.0) -> dict[str, Any]:
        end = time.monotonic() + within
        last: Any = None
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                _, last = self.health()
                if predicate(last):
                    return last
            except requests.RequestException as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise AssertionError(
            f"health condition not met within {within}s; last: {last}\n{self.log_tail()}"
        )

    def solve(self, method: str = "userrecaptcha", **params: str) -> requests.Response:
        body = {
            "method": method,
            **(params or {"googlekey": "6Le-site", "pageurl": "https://example.test/"}),
        }
        r = requests.post(f"{self.base}/solve", json=body, timeout=30)
        self.extra_outputs.append(r.text)
        return r

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def _to_toml(doc: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(i) for i in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(i)}" for k, i in v.items()) + " }"
        raise TypeError(type(v))

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def provision(
    server: LocalVault,
    emulator: EmulatorProcess,
    directory: Path,
    *,
    wrapped: bool = False,
    token_ttl: int = 60,
    backups: list[str] | None = None,
    register_keys: bool = True,
) -> Worker:
    """Key + policy + AppRole for one worker, and its role-id / secret-id files."""
    admin = _admin_client(server)
    name = f"solver-it-{uuid.uuid4().hex[:10]}"
    worker = Worker(
        name=name, admin=admin, server=server, emulator=emulator, dir=directory, keys=[]
    )
    (directory / "state").mkdir(mode=0o700)
    key = new_key()
    worker.write_key(key, backups)
    if register_keys:
        for k in [key, *(backups or [])]:
            emulator.admin.add_key(k)
    policy = f'path "{KV_MOUNT}/data/captchaai/{name}" {{ capabilities = ["read"] }}\n'
    admin.sys.create_or_update_policy(name=name, policy=policy)
    admin.auth.approle.create_or_update_approle(
        name,
        token_policies=[name],
        token_ttl=f"{token_ttl}s",
        token_max_ttl=f"{token_ttl * 4}s",
        mount_point=APPROLE_MOUNT,
    )
    role_id = admin.auth.approle.read_role_id(name, mount_point=APPROLE_MOUNT)["data"]["role_id"]
    (directory / "role-id").write_text(role_id + "\n")
    secret, _ = worker.new_secret_id(wrap_ttl="120s" if wrapped else None)
    target = worker.wrapped_file if wrapped else worker.secret_id_file
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    worker.keys.append(secret)  # treat the (wrapped) secret-id like a key: never in output
    return worker


@pytest.fixture
def worker_factory(tmp_path: Path, emulator: EmulatorProcess) -> Iterator[Any]:
    made: list[Worker] = []

    def make(server: LocalVault, **kw: Any) -> Worker:
        directory = tmp_path / f"w{len(made)}"
        directory.mkdir()
        worker = provision(server, emulator, directory, **kw)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()


def counters(emulator: EmulatorProcess, key: str) -> dict[str, Any]:
    return EmulatorAdmin(emulator.admin_url).counters(key)
