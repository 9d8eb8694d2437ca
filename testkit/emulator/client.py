"""Python API for tests and tools: ``EmulatorProcess`` (subprocess) and ``EmulatorAdmin``.

Both are synchronous and use only the standard library, so they work from plain pytest
fixtures as well as next to an asyncio loop (the emulator runs in its own process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .core import Endpoints, Options, mask_key

REPO_ROOT = Path(__file__).resolve().parents[2]

# urllib must never route loopback admin calls through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmulatorAdminError(RuntimeError):
    """The admin API refused a call (the message never contains a full key)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"emulator admin API answered {status}: {message}")
        self.status = status


class EmulatorAdmin:
    """Client of the JSON admin API, e.g. ``EmulatorAdmin("http://127.0.0.1:18351")``."""

    def __init__(self, admin_url: str, timeout: float = 10.0) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"EmulatorAdmin({self.admin_url!r})"

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - fixed http:// loopback URL
            self.admin_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = str(exc.reason)
            raise EmulatorAdminError(exc.code, str(message)) from None

    def _key_call(
        self, path: str, key: str, balance: float | None, max_slots: int | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"key": key}
        if balance is not None:
            body["balance"] = balance
        if max_slots is not None:
            body["max_slots"] = max_slots
        result: dict[str, Any] = self._call("POST", path, body)
        return result

    # -- the contract of docs/interfaces.md ---------------------------------

    def add_key(
        self, key: str, balance: float | None = None, max_slots: int | None = None
    ) -> dict[str, Any]:
        """Register ``key`` (32 lowercase hex). ``max_slots`` 0 or None = option default."""
        return self._key_call("/keys", key, balance, max_slots)

    def revoke_key(self, key: str) -> dict[str, Any]:
        """The key answers ERROR_KEY_DOES_NOT_EXIST from now on."""
        result: dict[str, Any] = self._call("POST", "/keys/revoke", {"key": key})
        return result

    def counters(self, key: str) -> dict[str, Any]:
        """Per-key counters (see ``core.COUNTER_NAMES``) plus balance, in_flight, revoked…"""
        result: dict[str, Any] = self._call("POST", "/counters", {"key": key})
        return result

    def set_options(self, **options: Any) -> dict[str, Any]:
        """Change options (``core.Options`` field names); returns all current options."""
        result: dict[str, Any] = self._call("POST", "/options", options)
        return result

    def reset(self) -> None:
        """Forget keys, tasks, counters, bans and faults; options back to the start ones."""
        self._call("POST", "/reset", {})

    # -- extras ---------------------------------------------------------------

    def health(self) -> bool:
        try:
            return bool(self._call("GET", "/health") == {"status": "ok"})
        except (OSError, EmulatorAdminError):
            return False

    def set_key(
        self, key: str, balance: float | None = None, max_slots: int | None = None
    ) -> dict[str, Any]:
        """Change a key's balance and/or slot limit."""
        return self._key_call("/keys/update", key, balance, max_slots)

    def set_balance(self, key: str, balance: float) -> dict[str, Any]:
        return self.set_key(key, balance=balance)

    def set_max_slots(self, key: str, max_slots: int) -> dict[str, Any]:
        return self.set_key(key, max_slots=max_slots)

    def options(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/options")
        return result

    def all_counters(self) -> dict[str, Any]:
        """Every key seen (by fingerprint), global counters, stored tasks, active bans."""
        result: dict[str, Any] = self._call("GET", "/counters")
        return result

    def tasks(self, key: str) -> list[dict[str, Any]]:
        """Per-task timings of a key: delay, delivered_after, added_latency, polls."""
        result: list[dict[str, Any]] = self._call("POST", "/tasks", {"key": key})["tasks"]
        return result

    def bans(self) -> dict[str, float]:
        """Banned addresses and the seconds left."""
        result: dict[str, float] = self._call("GET", "/bans")["banned"]
        return result

    def inject(
        self, answer: str = "", endpoint: str = "any", count: int = 1, http_status: int = 200
    ) -> None:
        """Answer the next ``count`` requests to ``endpoint`` with ``answer`` (an error code),
        or with an HTTP ``http_status`` error page when it is not 200."""
        self._call(
            "POST",
            "/inject",
            {"endpoint": endpoint, "answer": answer, "count": count, "http_status": http_status},
        )


def options_to_argv(opts: Mapping[str, Any]) -> list[str]:
    """``--option NAME=JSON`` arguments for the CLI, validated against ``Options`` first."""
    Options().updated(opts)  # raises ValueError on unknown names or bad values
    argv: list[str] = []
    for name, value in opts.items():
        argv += ["--option", f"{name}={json.dumps(value)}"]
    return argv


class EmulatorProcess(Endpoints):
    """Start ``python -m testkit.emulator`` as a subprocess and wait until ready.

    ``with EmulatorProcess(18350, 18351, solve_delay="fixed:1", time_scale=0.01) as emu:``
    then ``emu.url``, ``emu.admin_url``, ``emu.admin`` (an ``EmulatorAdmin``).
    Keyword options are ``core.Options`` fields; besides them: ``host``, ``log_file``
    (default: a temporary file, see ``.log_path``), ``log_level``, ``startup_timeout``,
    ``keys`` (keys to register once ready: an iterable of keys, or a mapping of key to
    ``{"balance": …, "max_slots": …}``).
    """

    def __init__(
        self,
        port: int,
        admin_port: int,
        *,
        host: str = "127.0.0.1",
        log_file: str | os.PathLike[str] | None = None,
        log_level: str = "INFO",
        startup_timeout: float = 15.0,
        keys: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None,
        **opts: Any,
    ) -> None:
        self.port = port
        self.admin_port = admin_port
        self.host = host
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.opts = dict(opts)
        self._argv_opts = options_to_argv(self.opts)
        self._keys = keys
        self._own_log = log_file is None
        self.log_path = Path(log_file) if log_file is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = EmulatorAdmin(self.admin_url)

    def __repr__(self) -> str:
        return f"EmulatorProcess(url={self.url!r}, admin_url={self.admin_url!r})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def start(self) -> EmulatorProcess:
        if self.proc is not None:
            return self
        if self.admin.health():
            raise RuntimeError(
                f"something already answers on {self.admin_url}: stop that emulator first"
            )
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="captchaai-emulator-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        argv = [
            sys.executable,
            "-m",
            "testkit.emulator",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--log-level",
            self.log_level,
            *self._argv_opts,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        with open(self.log_path, "ab") as log_fh:
            self.proc = subprocess.Popen(
                argv, stdout=log_fh, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
            )
        deadline = time.monotonic() + self.startup_timeout
        while not self.admin.health():
            if self.proc.poll() is not None:
                tail = self.log_text()[-2000:]
                self.proc = None
                raise RuntimeError(f"emulator exited during start-up:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulator not ready within {self.startup_timeout} s")
            time.sleep(0.05)
        self._register_keys()
        return self

    def _register_keys(self) -> None:
        if not self._keys:
            return
        if isinstance(self._keys, Mapping):
            for key, spec in self._keys.items():
                self.admin.add_key(key, spec.get("balance"), spec.get("max_slots"))
        else:
            for key in self._keys:
                self.admin.add_key(key)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._own_log and self.log_path is not None and proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = ["EmulatorAdmin", "EmulatorAdminError", "EmulatorProcess", "mask_key"]


def start_detached(
    port: int, admin_port: int, directory: Path, args: Iterable[str] = (), timeout: float = 15.0
) -> str:
    """Start an emulator that outlives the caller (the demo's, the molecule scenarios'), its
    pid in ``directory/emulator.pid`` and its log beside it, unless one already answers on
    ``admin_port``: "running" or "started"."""
    admin = EmulatorAdmin(f"http://127.0.0.1:{admin_port}")
    if admin.health():
        return "running"
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "emulator.log"
    argv = [sys.executable, "-m", "testkit.emulator", "--port", str(port)]
    argv += ["--admin-port", str(admin_port), *args]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (directory / "emulator.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while not admin.health():
        if proc.poll() is not None:
            raise RuntimeError(f"the emulator exited at start-up; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the emulator did not answer within {timeout} s; see {log}")
        time.sleep(0.05)
    return "started"


def stop_detached(directory: Path) -> str:
    """Stop the emulator ``start_detached`` started in ``directory`` (by its pid file; one
    started elsewhere is left alone): "stopped", "killed", "already gone", "not started here"."""
    pid_file = directory / "emulator.pid"
    if not pid_file.exists():
        return "not started here"
    pid = int(pid_file.read_text().strip())
    pid_file.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "already gone"
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "stopped"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return "killed"
