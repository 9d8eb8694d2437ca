"""``captcha-solver serve`` worker processes on 127.0.0.1, one or a fleet.

A worker's configuration is a mapping written by the solver's own ``render_config`` (so it is
validated like the role's template), its health is read by the solver's own status client
(``captcha_solver.cli.read_health``, what ``captcha-solver status`` prints). The child gets no
VAULT_*/BAO_*/CAPTCHA_SOLVER_* variable: what it knows comes from its config and 0600 files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import hvac
from captcha_solver.cli import read_health
from captcha_solver.config import render_config

from testkit.net import free_port
from testkit.paths import BIN
from testkit.vault_ops import approle_files

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def worker_config(
    *,
    env: str,
    port: int,
    vault_addrs: Iterable[str],
    ca_file: Path,
    role_id_file: Path,
    secret_id_file: Path,
    provider_url: str,
    refresh_interval: float = 2.0,
    refresh_jitter: float = 0.1,
    max_staleness: float = 3600.0,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A worker configuration with quick test timings; ``settings`` overrides per section."""
    config: dict[str, Any] = {
        "env": env,
        "vault": {
            "addrs": list(vault_addrs),
            "ca_file": str(ca_file),
            "role_id_file": str(role_id_file),
            "secret_id_file": str(secret_id_file),
            "key_path": f"captchaai/{env}",
            "refresh_interval": refresh_interval,
            "refresh_jitter": refresh_jitter,
            "max_staleness": max_staleness,
            "timeout": 3.0,
            "retries": 2,
            "retry_delay": 0.2,
        },
        "provider": {
            "url": provider_url,
            "poll_interval": 0.5,
            "request_timeout": 10.0,
            "task_timeout": 60.0,
            "backoff_base": 0.2,
            "backoff_max": 2.0,
            "first_poll_delay": {"default": 0.3},
        },
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace": 5.0},
        "logging": {"format": "json", "level": "INFO"},
    }
    for section, values in (settings or {}).items():
        config.setdefault(section, {}).update(values)
    return config


def solver_argv(config: Path) -> list[str]:
    exe = shutil.which("captcha-solver", path=str(BIN))
    head = [exe] if exe else [sys.executable, "-m", "captcha_solver"]
    return [*head, "serve", "--config", str(config)]


class WorkerProc:
    """One ``captcha-solver serve`` process with its own directory, config file and log."""

    def __init__(self, name: str, directory: Path, config: Mapping[str, Any]):
        self.name = name
        self.directory = directory
        self.settings: dict[str, Any] = json.loads(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> str:
        return str(self.settings["env"])

    @property
    def port(self) -> int:
        return int(self.settings["server"]["port"])

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

    def write_config(self) -> Path:
        """Write ``settings`` as the config file (through the solver's ``render_config``)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config.write_text(render_config(self.settings))
        return self.config

    def spawn(self, extra_env: Mapping[str, str] | None = None) -> None:
        """Write the config and start the process (without waiting for it)."""
        WorkerProc.write_config(self)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "BAO_", "CAPTCHA_SOLVER_"))
        }
        env.update(extra_env or {})
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                solver_argv(self.config),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
            )

    def healthz(self, timeout: float = 3.0) -> tuple[int, dict[str, Any]]:
        """``/healthz``: HTTP status and JSON (also on 503); ``OSError`` when nothing answers."""
        return read_health(self.url, timeout)

    def health(self, timeout: float = 3.0) -> dict[str, Any]:
        """The ``/healthz`` JSON alone."""
        return self.healthz(timeout)[1]

    def metrics(self, timeout: float = 3.0) -> str:
        with _OPENER.open(f"{self.url}/metrics", timeout=timeout) as resp:
            return resp.read().decode()

    def wait_health(
        self, predicate: Callable[[dict[str, Any]], bool], within: float = 60.0
    ) -> dict[str, Any]:
        """Poll ``/healthz`` until ``predicate(body)`` holds; fail early if the process exits."""
        deadline = time.monotonic() + within
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"worker {self.name} exited ({code}):\n{self.log_tail()}")
            try:
                last = self.health()
                if predicate(last):
                    return last
            except (OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise RuntimeError(
            f"worker {self.name}: not there in {within} s ({last}):\n{self.log_tail()}"
        )

    def wait_ready(self, timeout: float = 60.0, version: int | None = None) -> dict[str, Any]:
        """Wait until the worker has a key (of ``version`` when given)."""

        def ready(health: dict[str, Any]) -> bool:
            got = health.get("key_version")
            return got is not None and (version is None or got == version)

        return self.wait_health(ready, timeout)

    def start(self, timeout: float = 60.0) -> dict[str, Any]:
        """Spawn and wait until the worker has a key."""
        self.spawn()
        return self.wait_ready(timeout)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def sighup(self) -> None:
        self.signal(signal.SIGHUP)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit status (None: never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines, parsed (other lines skipped)."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records


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
                self.admin,
                f"captcha-worker-{self.env}",
                self.directory / "creds",
                mount=self.approle_mount,
            )
        new: list[WorkerProc] = []
        for _ in range(n):
            i = len(self.workers) + 1
            config = worker_config(
                env=self.env,
                port=next(self.ports) if self.ports is not None else free_port(),
                vault_addrs=self.vault_addrs,
                ca_file=self.ca_file,
                role_id_file=self._creds[0],
                secret_id_file=self._creds[1],
                provider_url=self.provider_url,
                **self.worker_opts,
            )
            worker = WorkerProc(f"w{i}-{self.env}", self.directory / f"w{i}", config)
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
            w.signal(signal.SIGTERM)
        for w in self.workers:
            w.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
