"""Benchmark: Vault requests per worker-hour at steady state, counted from the audit log.

    .venv/bin/python -m bench.vault_requests [--workers 10] [--interval 30] [--window 180]

Starts N ``captcha-solver serve`` workers (ports 18500+) against the bench OpenBao
(``.state/bench/vault``, 18240; its declared file audit device) and the emulator
(18360/18361), lets them settle, then counts over ``--window`` seconds every audit-log request
made by these workers: their AppRole logins (path ``auth/<this run's approle mount>/login``)
and everything sent with their tokens (``auth.metadata.role_name`` = the worker role): key
reads, token renewals and lookups. A light solve load runs meanwhile (it must not add Vault
requests: the key is cached). Rates are per worker-hour; key reads scale with 1/interval, so the
table also gives them at the kit's default ``refresh_interval`` of 300 s (measured x
interval / 300), next to the baseline's one read an hour.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.audit import audit_requests
from bench.report import report
from bench.rotation_propagation import WORKER_PORTS, bench_env
from testkit.loadgen import LoadGenerator
from testkit.worker import Fleet

KIT_DEFAULT_INTERVAL = 300.0


def classify(path: str, mount: str) -> str:
    if path.endswith("/login"):
        return "login"
    if path.startswith("auth/token/renew"):
        return "token renew"
    if path.startswith("auth/token/lookup"):
        return "token lookup"
    if path.startswith(f"{mount}/data/"):
        return "key read"
    if path.startswith(f"{mount}/metadata/"):
        return "metadata read"
    return "other"


def count(audit: Path, offset: int, role: str, approle: str, mount: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for entry in audit_requests(audit, offset):
        path = (entry.get("request") or {}).get("path", "")
        meta = ((entry.get("auth") or {}).get("metadata")) or {}
        if path.startswith(f"auth/{approle}/login") or meta.get("role_name") == role:
            counts[classify(path, mount)] += 1
    return counts


def run(workers: int, interval: float, window: float) -> dict[str, Any]:
    with bench_env("vr", "req") as b:
        vault, mount, approle, env = b.vault, b.mount, b.approle, b.env
        fleet = Fleet(
            admin=b.admin,
            env=env,
            directory=b.tmp / "fleet",
            vault_addrs=[vault.addr],
            ca_file=vault.ca_file,
            provider_url=b.emulator.url,
            ports=iter(WORKER_PORTS),
            approle_mount=approle,
            refresh_interval=interval,
            refresh_jitter=0.1,
            settings={"vault": {"kv_mount": mount, "approle_mount": approle}},
        )
        with fleet:
            fleet.start(workers, timeout=300)
            time.sleep(5)  # past the start-up reads
            load = LoadGenerator(fleet.urls, clients=4, duration=window, pause=0.2)
            offset = vault.audit_log.stat().st_size
            started = time.monotonic()
            load.start()
            load.wait()
            time.sleep(max(0.0, window - (time.monotonic() - started)))
            measured = time.monotonic() - started
            counts = count(vault.audit_log, offset, f"captcha-worker-{env}", approle, mount)
            solves = load.summary()
    hours = workers * measured / 3600
    per_hour = {k: round(v / hours, 1) for k, v in sorted(counts.items())}
    total = round(sum(counts.values()) / hours, 1)
    reads = per_hour.get("key read", 0.0)
    at_default = round(total - reads + reads * interval / KIT_DEFAULT_INTERVAL, 1)
    return {
        "workers": workers,
        "interval_s": interval,
        "window_s": round(measured, 1),
        "requests": dict(counts),
        "per_worker_hour": per_hour,
        "total_per_worker_hour": total,
        "total_per_worker_hour_at_300s": at_default,
        "baseline_per_worker_hour": 1.0,
        "solves_attempted": solves["attempted"],
        "solves_failed": solves["failed"],
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"{r['workers']} workers, refresh_interval {r['interval_s']:g} s (jitter 0.1), "
        f"window {r['window_s']:g} s, {r['solves_attempted']} solves meanwhile "
        f"({r['solves_failed']} failed).",
        "",
        "| request | count in window | per worker-hour (measured) |",
        "|---|---:|---:|",
    ]
    for kind, n in sorted(r["requests"].items()):
        lines.append(f"| {kind} | {n} | {r['per_worker_hour'][kind]} |")
    lines += [
        f"| **total** | {sum(r['requests'].values())} | **{r['total_per_worker_hour']}** |",
        "",
        f"At the kit's default refresh_interval of 300 s: about "
        f"**{r['total_per_worker_hour_at_300s']}** requests per worker-hour (key reads scaled "
        f"by {r['interval_s']:g}/300); the baseline's approach: 1 read per worker-hour "
        f"(ratio {r['total_per_worker_hour_at_300s'] / r['baseline_per_worker_hour']:.0f}x).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vault_requests", description=__doc__)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--window", type=float, default=180.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.workers, args.interval, args.window)
    return report(result, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
