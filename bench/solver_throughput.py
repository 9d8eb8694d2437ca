"""Throughput benchmark: the baseline's baseline client vs the captcha-solver worker.

Everything runs on 127.0.0.1 with real parts: the CaptchaAI emulator (subprocess), a real
OpenBao (``testkit.vault``, its own state directory) holding the key, and the worker as a
real ``captcha-solver serve`` process that logs in with AppRole. Load goes to the worker's
``POST /solve`` from closed-loop clients (each sends its next solve when the previous returns).

Time is scaled by ``--scale`` everywhere at once: the emulator's solve delays, the baseline's
15 s / 5 s waits and the worker's ``first_poll_delay`` / ``poll_interval`` / ``task_timeout``.
Figures in seconds are given both as measured and divided by the scale ("as real").

Phases (each with a fresh counter snapshot of the emulator):

* ``baseline x1``     the guide literally: one task at a time
* ``baseline x100``   100 copies of the guide's loop at once (100 in flight)
* ``worker @100``     the worker with 100 solves in flight
* ``worker @500``     the worker with 500 solves in flight (RSS sampled here)

    .venv/bin/python -m bench.solver_throughput --write-results bench/results-solver.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from captcha_solver.config import DEFAULT_FIRST_POLL_DELAY

from bench.baseline import run_baseline
from testkit.emulator import EmulatorAdmin, EmulatorProcess
from testkit.paths import REPO
from testkit.worker import WorkerProc, worker_config

METHOD = "userrecaptcha"
PARAMS = {"googlekey": "6Le-bench-site-key", "pageurl": "https://bench.test/login"}
ENV = "bench"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---------------------------------------------------------------------------
# measurements


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(rest.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


@dataclass
class Phase:
    name: str
    in_flight: int
    solved: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    res_requests: int = 0
    in_requests: int = 0
    added_latency: list[float] = field(default_factory=list)
    rss_at_target: float | None = None
    rss_peak: float | None = None
    max_in_flight_seen: int = 0

    @property
    def per_minute(self) -> float:
        return self.solved / self.wall * 60 if self.wall else 0.0

    @property
    def res_per_solve(self) -> float:
        return self.res_requests / self.solved if self.solved else float("nan")


def emulator_figures(
    admin: EmulatorAdmin, key: str, before: Mapping[str, Any], ids: set[str], phase: Phase
) -> None:
    after = admin.counters(key)
    phase.res_requests = after["res_get"] - before["res_get"]
    phase.in_requests = after["in_php"] - before["in_php"]
    phase.added_latency = [
        t["added_latency"]
        for t in admin.tasks(key)
        if str(t["id"]) in ids and t["added_latency"] is not None and not t["unsolvable"]
    ]


# ---------------------------------------------------------------------------
# the worker: real OpenBao + AppRole + `captcha-solver serve`


def provision_vault(state_dir: Path, port: int, key: str) -> dict[str, Any]:
    """Start the bench OpenBao, store the key, make an AppRole; return paths and address."""
    import hvac  # type: ignore[import-untyped]

    from testkit.vault import LocalVault

    vault = LocalVault(state_dir / "vault", port)
    vault.start()
    client = hvac.Client(url=vault.addr, token=vault.root_token(), verify=str(vault.ca_file))
    mounts = client.sys.list_mounted_secrets_engines()
    if "secret/" not in mounts.get("data", mounts):
        client.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    client.secrets.kv.v2.create_or_update_secret(
        path=f"captchaai/{ENV}", secret={"api_key": key}, mount_point="secret"
    )
    policy = f'path "secret/data/captchaai/{ENV}" {{ capabilities = ["read"] }}\n'
    client.sys.create_or_update_policy(name=f"captcha-worker-{ENV}", policy=policy)
    auths = client.sys.list_auth_methods()
    if "approle/" not in auths.get("data", auths):
        client.sys.enable_auth_method("approle")
    role = f"captcha-worker-{ENV}"
    client.auth.approle.create_or_update_approle(
        role_name=role,
        token_policies=[role],
        token_ttl="1h",  # noqa: S106 (a TTL)
        token_max_ttl="4h",  # noqa: S106 (TTLs)
    )
    role_id = client.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    creds = state_dir / "worker"
    creds.mkdir(parents=True, exist_ok=True)
    creds.chmod(0o700)
    for name, value in (("role-id", role_id), ("secret-id", secret_id)):
        path = creds / name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
    return {
        "addr": vault.addr,
        "ca_file": vault.ca_file,
        "role_id_file": creds / "role-id",
        "secret_id_file": creds / "secret-id",
        "vault": vault,
    }


@contextmanager
def worker_process(
    vault: Mapping[str, Any], provider_url: str, port: int, scale: float, directory: Path
) -> Iterator[WorkerProc]:
    """The worker under test with the provider's real timings scaled by ``scale``."""
    config = worker_config(
        env=ENV,
        port=port,
        vault_addrs=[vault["addr"]],
        ca_file=vault["ca_file"],
        role_id_file=vault["role_id_file"],
        secret_id_file=vault["secret_id_file"],
        provider_url=provider_url,
        refresh_interval=300.0,
        settings={
            "provider": {
                "poll_interval": 5.0 * scale,
                "first_poll_delay": {m: s * scale for m, s in DEFAULT_FIRST_POLL_DELAY.items()},
                "task_timeout": max(180.0 * scale, 30.0),
                "request_timeout": 30.0,
                "backoff_base": 1.0,
                "backoff_max": 30.0,
                "max_in_flight": 2000,
            },
            "logging": {"level": "WARNING"},
        },
    )
    worker = WorkerProc("bench", directory, config)
    try:
        worker.spawn()
        worker.wait_health(lambda h: h.get("status") == "ok", within=30)
        yield worker
    finally:
        worker.stop()


async def drive_worker(
    port: int, pid: int, clients: int, tasks_per_client: int, phase: Phase
) -> set[str]:
    """Closed-loop clients against POST /solve; samples the worker's RSS and in-flight count."""
    ids: set[str] = set()
    url = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one_client() -> None:
            for _ in range(tasks_per_client):
                async with session.post(
                    f"{url}/solve", json={"method": METHOD, "params": PARAMS}
                ) as resp:
                    doc = await resp.json()
                if resp.status == 200 and doc.get("status") == "ok":
                    phase.solved += 1
                    ids.add(str(doc["task_id"]))
                else:
                    code = str((doc.get("error") or {}).get("code", resp.status))
                    phase.failed[code] = phase.failed.get(code, 0) + 1

        async def sampler() -> None:
            while True:
                try:
                    async with session.get(f"{url}/healthz") as resp:
                        in_flight = int((await resp.json()).get("tasks_in_flight") or 0)
                except (aiohttp.ClientError, ValueError):
                    in_flight = 0
                rss, hwm = rss_mb(pid)
                phase.max_in_flight_seen = max(phase.max_in_flight_seen, in_flight)
                if in_flight >= clients:
                    phase.rss_at_target = max(phase.rss_at_target or 0.0, rss)
                phase.rss_peak = max(phase.rss_peak or 0.0, hwm, rss)
                await asyncio.sleep(0.1)

        sample = asyncio.create_task(sampler())
        start = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        phase.wall = time.monotonic() - start
        sample.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sample
    return ids


# ---------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace) -> tuple[list[Phase], dict[str, Any]]:
    scale = args.scale
    key = secrets.token_hex(16)  # generated per run; only its fingerprint is ever printed
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    phases: list[Phase] = []
    info: dict[str, Any] = {}
    with EmulatorProcess(
        args.emulator_port,
        args.emulator_port + 1,
        solve_delay=args.solve_delay,
        time_scale=scale,
        seed=args.seed,
        price=0.0,
        log_level="WARNING",
    ) as emu:
        admin = emu.admin
        admin.add_key(key, balance=1_000_000.0, max_slots=0)

        # -- baseline ---------------------------------------------------------
        for clients, per_client, name in (
            (1, args.serial_tasks, "baseline x1"),
            (args.low, args.tasks_per_client, f"baseline x{args.low}"),
        ):
            before = admin.counters(key)
            print(f"[bench] {name}: {clients} client(s) x {per_client} task(s)", flush=True)
            b = asyncio.run(
                run_baseline(
                    emu.url,
                    key,
                    METHOD,
                    PARAMS,
                    clients=clients,
                    tasks_per_client=per_client,
                    scale=scale,
                )
            )
            phase = Phase(name, clients, solved=len(b.solves), failed=b.errors, wall=b.wall)
            emulator_figures(admin, key, before, {s.task_id for s in b.solves}, phase)
            phases.append(phase)

        # -- worker -----------------------------------------------------------
        print("[bench] starting OpenBao and the worker", flush=True)
        vault = provision_vault(state, args.vault_port, key)
        directory = state / "worker"
        with worker_process(vault, emu.url, args.worker_port, scale, directory) as worker:
            assert worker.proc is not None
            pid = worker.proc.pid
            info["worker_rss_idle_mb"] = round(rss_mb(pid)[0], 1)
            for clients in (args.low, args.high):
                name = f"worker @{clients}"
                print(f"[bench] {name}: {clients} clients x {args.tasks_per_client}", flush=True)
                phase = Phase(name, clients)
                before = admin.counters(key)
                ids = asyncio.run(
                    drive_worker(args.worker_port, pid, clients, args.tasks_per_client, phase)
                )
                emulator_figures(admin, key, before, ids, phase)
                phases.append(phase)
        if not args.keep_vault:
            vault["vault"].stop()
    return phases, info


def render(phases: Sequence[Phase], args: argparse.Namespace, info: Mapping[str, Any]) -> str:
    s = args.scale
    rows = [
        "| phase | in flight | solved | failed | solves/min (as real) | res.php per solve "
        "| added latency p50 / p95 (as real, s) | worker RSS at target / peak (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        lat = p.added_latency
        p50, p95 = percentile(lat, 0.5) / s, percentile(lat, 0.95) / s
        rss = (
            f"{p.rss_at_target:.1f} / {p.rss_peak:.1f}"
            if p.rss_at_target is not None and p.rss_peak is not None
            else (f"n/a / {p.rss_peak:.1f}" if p.rss_peak is not None else "n/a")
        )
        failed = ", ".join(f"{k}: {v}" for k, v in p.failed.items()) or "0"
        rows.append(
            f"| {p.name} | {p.in_flight} | {p.solved} | {failed} | "
            f"{p.per_minute * s:.1f} | {p.res_per_solve:.3f} | {p50:.2f} / {p95:.2f} | {rss} |"
        )
    by_name = {p.name: p for p in phases}
    lines = ["\n".join(rows), ""]
    pairs = [
        (f"baseline x{args.low}", f"worker @{args.low}"),
        ("baseline x1", f"worker @{args.high}"),
    ]
    for base_name, work_name in pairs:
        b, w = by_name.get(base_name), by_name.get(work_name)
        if b is None or w is None or not b.solved or not w.solved:
            continue
        lines.append(
            f"- {work_name} vs {base_name}: solves/min x{w.per_minute / b.per_minute:.1f}, "
            f"res.php per solve x{w.res_per_solve / b.res_per_solve:.3f} "
            f"({w.res_per_solve:.3f} vs {b.res_per_solve:.3f})"
        )
    high = by_name.get(f"worker @{args.high}")
    if high is not None:
        lines.append(
            f"- worker @{args.high}: max tasks in flight seen {high.max_in_flight_seen}; "
            f"idle RSS {info.get('worker_rss_idle_mb')} MiB"
        )
    return "\n".join(lines)


def machine() -> str:
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return (
        f"{os.cpu_count()} CPUs (nproc), {mem_kb / 1024 / 1024:.1f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def solver_revision() -> str:
    """Which solver code ran: HEAD, and whether solver/ differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "solver"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"git {head}" + (" + uncommitted changes under solver/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.solver_throughput", description=__doc__)
    p.add_argument("--scale", type=float, default=0.1, help="time factor (default %(default)s)")
    p.add_argument(
        "--solve-delay", default="uniform:10:30", help="emulator delay, nominal s (%(default)s)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--low", type=int, default=100, help="in flight for the comparison")
    p.add_argument("--high", type=int, default=500, help="in flight for the RSS figure")
    p.add_argument("--tasks-per-client", type=int, default=5)
    p.add_argument("--serial-tasks", type=int, default=20, help="tasks of baseline x1")
    p.add_argument("--emulator-port", type=int, default=18360, help="and +1 for admin")
    p.add_argument("--vault-port", type=int, default=18240, help="and +1 for cluster")
    p.add_argument("--worker-port", type=int, default=18499)
    p.add_argument("--state-dir", default=str(REPO / ".state" / "bench"))
    p.add_argument("--keep-vault", action="store_true", help="leave the bench OpenBao running")
    p.add_argument("--write-results", type=Path, help="write a results markdown file")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    phases, info = run(args)
    table = render(phases, args, info)
    duration = time.monotonic() - t0
    command = "python -m bench.solver_throughput " + " ".join(argv or sys.argv[1:])
    header = (
        f"date: {started:%Y-%m-%d %H:%M} UTC; run took {duration:.0f} s\n"
        f"machine: {machine()}\n"
        f"solver: {solver_revision()}\n"
        f"emulator solve delay {args.solve_delay} (nominal s), time scale {args.scale:g} "
        f"(every delay and wait runs {1 / args.scale:g}x faster; '(as real)' figures are "
        f"divided by the scale)\n"
    )
    print()
    print(header)
    print(table)
    if args.write_results:
        args.write_results.write_text(
            "# Benchmark: captcha-solver worker vs the naive baseline client"
            " (bench/baseline.py)\n\n"
            f"Command: `{command.strip()}`\n\n```\n{header}```\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
