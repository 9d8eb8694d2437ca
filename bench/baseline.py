"""The baseline's client, as the benchmark's baseline.

Algorithm (per task, one task at a time): submit to ``in.php``, wait a fixed 15 s, then ask
``res.php`` for that one id, and again every 5 s until the answer is there. Both waits are
multiplied by ``scale`` — the same factor the emulator's solve delays are scaled by — so a
scaled run keeps the proportions of a real one.

``run_baseline(..., clients=N)`` runs N independent copies of that loop at once (N scripts
following the guide): N tasks in flight, each polled on its own.

One-off use (the key comes from the environment, never from the command line)::

    CAPTCHAAI_KEY=... python -m bench.baseline --url http://127.0.0.1:18300 \\
        --param googlekey=6Le... --param pageurl=https://example.test/
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

FIRST_WAIT = 15.0  # seconds, as in the naive baseline
POLL_EVERY = 5.0
NOT_READY = "CAPCHA_NOT_READY"


class BaselineError(RuntimeError):
    """An error answer from in.php or res.php (the code only; never the key)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Solve:
    task_id: str
    token: str
    elapsed: float
    polls: int


@dataclass
class BaselineRun:
    solves: list[Solve] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0


class BaselineClient:
    """The guide's loop over an aiohttp session (plain-text answers, POST forms)."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, key: str, scale: float = 1.0
    ) -> None:
        self._session = session
        self._url = url.rstrip("/")
        self._key = key
        self.first_wait = FIRST_WAIT * scale
        self.poll_every = POLL_EVERY * scale

    def __repr__(self) -> str:
        return f"BaselineClient(url={self._url!r}, key=***{self._key[-4:]})"

    async def _post(self, endpoint: str, form: Mapping[str, str]) -> str:
        async with self._session.post(f"{self._url}/{endpoint}", data=dict(form)) as resp:
            return (await resp.text()).strip()

    async def solve(self, method: str, params: Mapping[str, str]) -> Solve:
        start = time.monotonic()
        answer = await self._post("in.php", {"key": self._key, "method": method, **params})
        if not answer.startswith("OK|"):
            raise BaselineError(answer[:64])
        task_id = answer[3:]
        await asyncio.sleep(self.first_wait)
        polls = 0
        while True:
            polls += 1
            answer = await self._post("res.php", {"key": self._key, "action": "get", "id": task_id})
            if answer.startswith("OK|"):
                return Solve(task_id, answer[3:], time.monotonic() - start, polls)
            if answer != NOT_READY:
                raise BaselineError(answer[:64])
            await asyncio.sleep(self.poll_every)


async def run_baseline(
    url: str,
    key: str,
    method: str,
    params: Mapping[str, str],
    *,
    clients: int = 1,
    tasks_per_client: int = 1,
    scale: float = 1.0,
) -> BaselineRun:
    """``clients`` copies of the guide's loop, each solving ``tasks_per_client`` in a row."""
    run = BaselineRun()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        client = BaselineClient(session, url, key, scale)

        async def one_client() -> None:
            for _ in range(tasks_per_client):
                try:
                    run.solves.append(await client.solve(method, params))
                except BaselineError as exc:
                    run.errors[exc.code] = run.errors.get(exc.code, 0) + 1

        start = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        run.wall = time.monotonic() - start
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:18300")
    p.add_argument("--method", default="userrecaptcha")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the 15 s / 5 s waits")
    args = p.parse_args(argv)
    key = os.environ.get("CAPTCHAAI_KEY", "")
    if not key:
        print("set CAPTCHAAI_KEY in the environment", file=sys.stderr)
        return 2
    params = dict(item.split("=", 1) for item in args.param)
    run = asyncio.run(run_baseline(args.url, key, args.method, params, scale=args.scale))
    if run.errors:
        print(f"error: {', '.join(run.errors)}", file=sys.stderr)
        return 1
    solve = run.solves[0]
    print(f"task {solve.task_id}: solved in {solve.elapsed:.2f} s after {solve.polls} polls")
    print(solve.token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
