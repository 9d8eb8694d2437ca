"""A bounded solve-load generator for captcha-solver workers (loopback only).

N concurrent clients post CAPTCHA tasks to ``POST /solve`` of a list of worker URLs for a given
duration and count, per worker, the solves attempted, succeeded and failed (with the HTTP status
or error code of each failure). Used by the fault tests, the benchmarks and the demo.

CLI::

    python -m testkit.loadgen --worker http://127.0.0.1:18401 --worker http://127.0.0.1:18402 \\
        --clients 8 --duration 30 [--pause 0.2] [--max-requests 1000] [--timeout 60] [--out F]

prints a JSON summary (and writes it to ``--out``)::

    {"duration_s": 30.1, "clients": 8, "attempted": 412, "ok": 412, "failed": 0,
     "latency_s": {"p50": 0.41, "p95": 0.66, "max": 0.9},
     "workers": {"http://127.0.0.1:18401": {"attempted": 206, "ok": 206, "failed": 0,
                                             "errors": {}}, ...}}

Exit status: 0 when no solve failed, 1 when some did, 64 on bad arguments.

Python::

    with LoadGenerator(urls, clients=4) as load:   # runs in background threads
        ...                                          # inject a fault
    summary = load.summary()                         # stops (bounded) and returns the dict

Client ``i`` sends to worker ``i mod len(urls)`` first and then takes the next worker on each
request, so every worker gets the same share. Each request waits for its answer (a worker
answers when the task is solved); ``pause`` seconds between two requests of one client keep the
load steady. Every bound is explicit: ``duration`` (no new request after it), ``max_requests``
(in total), ``timeout`` (per request); ``summary()`` waits at most ``timeout`` more for the
requests in flight. With ``retry_for`` a client retries a solve that met a draining (503) or
restarting (refused) worker, on the same worker, for that many seconds; the retries are counted
apart and the solve counts once. Only ``http://127.0.0.1`` / ``localhost`` URLs are accepted.
The requests carry no secret: the worker holds the key.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

LOOPBACK_HOSTS = {"127.0.0.1", "localhost"}
# googlekey: Google's public reCAPTCHA demo site key (not a secret; the emulator takes any).
DEFAULT_TASK = {
    "method": "userrecaptcha",
    "googlekey": "6Le-wvkSAAAAAPBMRTvw0Q4Muexq9bi0DJwx_mJ-",  # pragma: allowlist secret
    "pageurl": "https://example.com/login",
}
# No proxy for loopback traffic, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_url(url: str) -> str:
    """The URL without a trailing slash; ``ValueError`` unless it is http on loopback."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or parsed.hostname not in LOOPBACK_HOSTS or not parsed.port:
        raise ValueError(f"worker URL must be http://127.0.0.1:PORT (loopback only), got {url!r}")
    return url.rstrip("/")


@dataclass
class WorkerStats:
    attempted: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "ok": self.ok,
            "failed": self.failed,
            "retries": self.retries,
            "errors": dict(sorted(self.errors.items())),
        }


def unavailable(reason: str) -> bool:
    """A failure a client retries: the worker is draining (503) or not listening right now."""
    return reason.startswith("http_503") or reason in {
        "ConnectionRefusedError",
        "ConnectionResetError",
        "RemoteDisconnected",
        "URLError",
    }


def solve_once(url: str, task: dict[str, Any], timeout: float) -> tuple[bool, str]:
    """One ``POST /solve``: ``(True, "")`` on a solved task, else ``(False, reason)``."""
    body = json.dumps(task).encode()
    request = urllib.request.Request(  # noqa: S310 - check_url allows http://127.0.0.1 only
        f"{url}/solve", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            answer = json.loads(response.read() or b"{}")
            if response.status == 200 and answer.get("status") == "ok":
                return True, ""
            return False, f"http_{response.status}"
    except urllib.error.HTTPError as exc:
        try:
            code = json.loads(exc.read() or b"{}").get("error", {}).get("code") or ""
        except (ValueError, AttributeError):
            code = ""
        return False, f"http_{exc.code}" + (f":{code}" if code else "")
    except (OSError, ValueError) as exc:  # refused, reset, timeout, bad JSON
        return False, type(exc).__name__


class LoadGenerator:
    """Steady solve load in background threads; see the module docstring."""

    def __init__(
        self,
        urls: list[str],
        *,
        clients: int = 4,
        duration: float = 60.0,
        pause: float = 0.0,
        max_requests: int | None = None,
        timeout: float = 60.0,
        task: dict[str, Any] | None = None,
        retry_for: float = 0.0,
    ):
        if not urls:
            raise ValueError("at least one worker URL is needed")
        if clients < 1 or duration <= 0 or timeout <= 0 or pause < 0:
            raise ValueError("clients >= 1, duration > 0, timeout > 0 and pause >= 0 are needed")
        self.urls = [check_url(u) for u in urls]
        self.clients = clients
        self.duration = duration
        self.pause = pause
        self.max_requests = max_requests
        self.timeout = timeout
        self.task = dict(task or DEFAULT_TASK)
        self.retry_for = retry_for
        self.stats = {u: WorkerStats() for u in self.urls}
        self.latencies: list[float] = []
        self.failures: list[dict[str, Any]] = []  # first 50 failures: when, worker, reason
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self._ended: float | None = None
        self._sent = 0

    # -- running

    def start(self) -> LoadGenerator:
        self._started = time.monotonic()
        for i in range(self.clients):
            thread = threading.Thread(target=self._client, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_slot(self) -> bool:
        with self._lock:
            if self.max_requests is not None and self._sent >= self.max_requests:
                return False
            self._sent += 1
            return True

    def _client(self, index: int) -> None:
        n = index
        deadline = self._started + self.duration
        while not self._stop.is_set() and time.monotonic() < deadline and self._take_slot():
            url = self.urls[n % len(self.urls)]
            n += 1
            began = time.monotonic()
            ok, reason = solve_once(url, self.task, self.timeout)
            retries = 0
            # A client that retries on 503 and refused connections (a worker restarting in a
            # rolling deploy) tries the same worker again for up to retry_for seconds.
            while not ok and unavailable(reason) and time.monotonic() - began < self.retry_for:
                retries += 1
                time.sleep(0.25)
                ok, reason = solve_once(url, self.task, self.timeout)
            elapsed = time.monotonic() - began
            with self._lock:
                stats = self.stats[url]
                stats.retries += retries
                stats.attempted += 1
                if ok:
                    stats.ok += 1
                    self.latencies.append(elapsed)
                else:
                    stats.failed += 1
                    stats.errors[reason] += 1
                    if len(self.failures) < 50:
                        self.failures.append(
                            {"at_s": round(began - self._started, 2), "worker": url, "why": reason}
                        )
            if self.pause:
                self._stop.wait(self.pause)

    def stop(self) -> None:
        """No new requests; wait (at most ``timeout`` + 5 s) for the ones in flight."""
        self._stop.set()
        limit = time.monotonic() + self.timeout + 5
        for thread in self._threads:
            thread.join(max(0.0, limit - time.monotonic()))
        if self._ended is None:
            self._ended = time.monotonic()

    def wait(self) -> None:
        """Run to the end of ``duration`` (or ``max_requests``), then stop."""
        limit = self._started + self.duration + self.timeout + 5
        for thread in self._threads:
            thread.join(max(0.0, limit - time.monotonic()))
        self.stop()

    # -- results

    def snapshot(self) -> dict[str, int]:
        """Totals so far (attempted/ok/failed), while running."""
        with self._lock:
            return {
                "attempted": sum(s.attempted for s in self.stats.values()),
                "ok": sum(s.ok for s in self.stats.values()),
                "failed": sum(s.failed for s in self.stats.values()),
            }

    def summary(self) -> dict[str, Any]:
        """Stop and return the JSON-able summary."""
        self.stop()
        with self._lock:
            lat = sorted(self.latencies)

            def pct(p: float) -> float | None:
                return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None

            attempted = sum(s.attempted for s in self.stats.values())
            ok = sum(s.ok for s in self.stats.values())
            return {
                "duration_s": round((self._ended or time.monotonic()) - self._started, 2),
                "clients": self.clients,
                "attempted": attempted,
                "ok": ok,
                "failed": attempted - ok,
                "retries": sum(s.retries for s in self.stats.values()),
                "latency_s": {"p50": pct(0.5), "p95": pct(0.95), "max": pct(1.0)},
                "workers": {u: s.as_dict() for u, s in self.stats.items()},
                "first_failures": list(self.failures),
            }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.loadgen", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--worker", action="append", required=True, help="worker base URL")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between a client's calls")
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument(
        "--retry-for", type=float, default=0.0, help="seconds to retry a 503 or refused solve"
    )
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    try:
        load = LoadGenerator(
            args.worker,
            clients=args.clients,
            duration=args.duration,
            pause=args.pause,
            max_requests=args.max_requests,
            timeout=args.timeout,
            retry_for=args.retry_for,
        )
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 64
    load.start()
    try:
        load.wait()
    except KeyboardInterrupt:
        load.stop()
    result = load.summary()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
