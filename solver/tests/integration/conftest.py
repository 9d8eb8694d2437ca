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
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests
from testkit.creds import new_key, write_private
from testkit.emulator import EmulatorAdmin, EmulatorProcess
from testkit.net import free_port
from testkit.paths import STATE, TEST_VAULT_DIR, TEST_VAULT_PORT
from testkit.vault import LocalVault
from testkit.vault_ops import admin_client
from testkit.worker import WorkerProc

PRIVATE_VAULT_PORT = 18254
KV_MOUNT = "solver-it-kv"
APPROLE_MOUNT = "solver-it-approle"
__all__ = ["APPROLE_MOUNT", "KV_MOUNT", "counters", "free_port", "new_key"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------- Vault


def _prepare_mounts(admin: hvac.Client) -> None:
    if f"{KV_MOUNT}/" not in admin.sys.list_mounted_secrets_engines()["data"]:
        admin.sys.enable_secrets_engine("kv", path=KV_MOUNT, options={"version": "2"})
    if f"{APPROLE_MOUNT}/" not in admin.sys.list_auth_methods()["data"]:
        admin.sys.enable_auth_method("approle", path=APPROLE_MOUNT)


@pytest.fixture(scope="session")
def vault() -> Iterator[LocalVault]:
    """The shared test Vault; stopped at the end of the session when this session started it."""
    server = LocalVault(TEST_VAULT_DIR, TEST_VAULT_PORT)
    started_here = server.start() in ("started", "initialised")
    _prepare_mounts(admin_client(server))
    yield server
    if started_here:
        server.stop()


@pytest.fixture(scope="module")
def private_vault() -> Iterator[LocalVault]:
    server = LocalVault(STATE / "test" / "solver-vault", PRIVATE_VAULT_PORT)
    server.start()
    _prepare_mounts(admin_client(server))
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


class Worker(WorkerProc):
    """A provisioned AppRole + key of its own, and (once started) a ``captcha-solver serve``
    process. Every response it reads is kept in ``extra_outputs`` for the leak checks."""

    def __init__(
        self,
        name: str,
        admin: hvac.Client,
        server: LocalVault,
        emulator: EmulatorProcess,
        directory: Path,
    ):
        super().__init__(name, directory, {"env": "dev", "server": {"port": free_port()}})
        self.admin = admin
        self.server = server
        self.emulator = emulator
        self.keys: list[str] = []
        self.extra_outputs: list[str] = []

    @property
    def dir(self) -> Path:
        return self.directory

    @property
    def key_path(self) -> str:
        return f"captchaai/{self.name}"

    @property
    def base(self) -> str:
        return self.url

    @property
    def log_file(self) -> Path:
        return self.log

    @property
    def config_path(self) -> Path:
        return self.config

    @property
    def secret_id_file(self) -> Path:
        return self.directory / "state" / "secret-id"

    @property
    def wrapped_file(self) -> Path:
        return self.directory / "state" / "secret-id.wrapped"

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

    def make_config(self, **over: Any) -> dict[str, Any]:
        vault_cfg: dict[str, Any] = {
            "addrs": [self.server.addr],
            "ca_file": str(self.server.ca_file),
            "approle_mount": APPROLE_MOUNT,
            "role_id_file": str(self.directory / "role-id"),
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

    def write_config(self, **over: Any) -> Path:  # type: ignore[override]
        self.settings = self.make_config(**over)
        return super().write_config()

    def start(  # type: ignore[override]
        self, wait: bool = True, extra_env: dict[str, str] | None = None, **over: Any
    ) -> None:
        self.settings = self.make_config(**over)
        self.spawn(extra_env)
        if wait:
            self.wait_health(lambda h: h["status"] == "ok", within=15.0)

    def spawn(self, extra_env: dict[str, str] | None = None) -> None:
        """Start with the config as it is (``write_config`` or ``start`` made it)."""
        if not self.settings.get("vault"):
            self.settings = self.make_config()
        super().spawn(extra_env)

    def healthz(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        status, body = super().healthz(timeout)
        self.extra_outputs.append(json.dumps(body))
        return status, body

    def metrics(self, timeout: float = 5.0) -> str:
        text = super().metrics(timeout)
        self.extra_outputs.append(text)
        return text

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

    def run_cli(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``captcha-solver ARGS --config <this worker's>`` run to its exit, output captured and
        kept in ``extra_outputs``; by default without the ``VAULT_*`` environment."""
        result = subprocess.run(
            [sys.executable, "-m", "captcha_solver", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
            if env is None
            else dict(env),
        )
        self.extra_outputs += [result.stdout, result.stderr]
        return result


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
    admin = admin_client(server)
    name = f"solver-it-{uuid.uuid4().hex[:10]}"
    worker = Worker(name, admin, server, emulator, directory)
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
    write_private(directory / "role-id", role_id + "\n")
    secret, _ = worker.new_secret_id(wrap_ttl="120s" if wrapped else None)
    target = worker.wrapped_file if wrapped else worker.secret_id_file
    write_private(target, secret + "\n")
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
