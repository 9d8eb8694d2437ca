"""Test helpers: config builders, a fake Vault reader and a fake provider HTTP server.

The fakes serve the unit tests only; the integration tests use the real OpenBao server and the
CaptchaAI emulator.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from testkit.creds import new_key
from testkit.net import free_port

from captcha_solver.config import Config, parse_config
from captcha_solver.vault import KvSecret, VaultUnavailable

__all__ = ["free_port", "new_key"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_config(tmp: Path, **over: Any) -> Config:
    raw: dict[str, Any] = {
        "env": "dev",
        "vault": {
            "addrs": ["https://127.0.0.1:1"],
            "role_id_file": str(tmp / "role-id"),
            "secret_id_file": str(tmp / "secret-id"),
            "refresh_interval": 0.2,
            "refresh_jitter": 0.1,
            "max_staleness": 5.0,
            "retry_delay": 0.01,
            "retries": 1,
        },
        "provider": {
            "url": "http://127.0.0.1:1",
            "request_timeout": 2.0,
            "task_timeout": 5.0,
            "poll_interval": 0.05,
            "first_poll_delay": {"default": 0.05, "userrecaptcha": 0.05},
            "backoff_base": 0.02,
            "backoff_max": 0.1,
            "circuit_cooldown": 1.0,
            "zero_balance_cooldown": 5.0,
        },
        "server": {"host": "127.0.0.1", "port": free_port(), "shutdown_grace": 2.0},
        "logging": {"format": "json", "level": "DEBUG"},
    }
    for dotted, value in over.items():
        section, _, name = dotted.partition("__")
        if name:
            raw[section][name] = value
        else:
            raw[section] = value
    return parse_config(raw, environ={})


@dataclass
class FakeVault:
    """A VaultReader for unit tests: holds one KV v2 secret; ``down`` simulates an outage."""

    data: dict[str, Any]
    version: int = 1
    custom_metadata: dict[str, str] = field(default_factory=dict)
    down: bool = False
    reads: int = 0
    read_delay: float = 0.0  # seconds between taking the answer and returning it (on the wire)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read_kv(self, mount: str, path: str, *, prompt: bool = False) -> KvSecret:
        with self.lock:
            self.reads += 1
            if self.down:
                raise VaultUnavailable("read: no Vault address answered (fake)")
            answer = KvSecret(dict(self.data), self.version, dict(self.custom_metadata), "")
        time.sleep(self.read_delay)
        return answer

    def write(self, data: dict[str, Any]) -> None:
        with self.lock:
            self.data = data
            self.version += 1


@dataclass
class FakeProvider:
    """A programmable in.php / res.php server (2captcha json=1 wire format)."""

    valid_keys: set[str] = field(default_factory=set)
    zero_balance: set[str] = field(default_factory=set)
    ready_after: int = 1  # polls answered NOT_READY before the token
    submit_errors: list[str] = field(default_factory=list)  # popped per submit
    poll_status: list[int] = field(default_factory=list)  # HTTP statuses to answer res.php with
    unsolvable: bool = False
    submit_delay: float = 0.0  # seconds each in.php answer takes (requests pile up meanwhile)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    next_id: int = 1000
    url: str = ""

    def _err(self, code: str) -> web.Response:
        return web.json_response({"status": 0, "request": code})

    def _key_error(self, key: str) -> str | None:
        if key not in self.valid_keys:
            return "ERROR_KEY_DOES_NOT_EXIST"
        if key in self.zero_balance:
            return "ERROR_ZERO_BALANCE"
        return None

    async def in_php(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.requests.append({"endpoint": "in", **{k: str(v) for k, v in form.items()}})
        self.urls.append(str(request.url))
        if self.submit_delay:
            await asyncio.sleep(self.submit_delay)
        key = str(form.get("key", ""))
        err = self._key_error(key)
        if err:
            return self._err(err)
        if self.submit_errors:
            code = self.submit_errors.pop(0)
            if code.startswith("HTTP_"):
                return web.Response(status=int(code[5:]), text="oops")
            if code == "GARBAGE":
                return web.Response(text="<html>")
            return self._err(code)
        task_id = str(self.next_id)
        self.next_id += 1
        self.tasks[task_id] = {"key": key, "polls": 0, "method": form.get("method")}
        return web.json_response({"status": 1, "request": task_id})

    async def res_php(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.requests.append({"endpoint": "res", **{k: str(v) for k, v in form.items()}})
        self.urls.append(str(request.url))
        if self.poll_status:
            return web.Response(status=self.poll_status.pop(0), text="busy")
        key = str(form.get("key", ""))
        err = self._key_error(key)
        if err:
            return self._err(err)
        ids = str(form["ids"]).split(",") if "ids" in form else [str(form.get("id"))]
        answers = []
        for task_id in ids:
            task = self.tasks.get(task_id)
            if task is None or task["key"] != key:
                answers.append("ERROR_WRONG_CAPTCHA_ID")
                continue
            task["polls"] += 1
            if task["polls"] <= self.ready_after:
                answers.append("CAPCHA_NOT_READY")
            elif self.unsolvable:
                answers.append("ERROR_CAPTCHA_UNSOLVABLE")
            else:
                answers.append(f"token-{task_id}")
        if len(ids) == 1:
            answer = answers[0]
            ok = not answer.startswith(("ERROR_", "CAPCHA_"))
            return web.json_response({"status": 1 if ok else 0, "request": answer})
        return web.json_response({"status": 1, "request": "|".join(answers)})

    def res_calls(self) -> int:
        return sum(1 for r in self.requests if r["endpoint"] == "res")


@asynccontextmanager
async def serve_posts(routes: Mapping[str, Handler]) -> AsyncIterator[tuple[str, web.AppRunner]]:
    """An HTTP server on a free loopback port answering POSTs to *routes* (path -> handler):
    its base URL and its runner (``runner.cleanup()`` takes it down early)."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", runner
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve_fake_provider(fake: FakeProvider) -> AsyncIterator[FakeProvider]:
    async with serve_posts({"/in.php": fake.in_php, "/res.php": fake.res_php}) as (url, _):
        fake.url = url
        yield fake


async def wait_for(predicate: Any, within: float = 5.0, interval: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


def serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    """``captcha-solver serve`` run to its exit (a start that must fail), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "captcha_solver.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
