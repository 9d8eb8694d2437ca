"""Benchmark: key rotation propagation to 10 and 50 worker processes, at steady solve load.

    .venv/bin/python -m bench.rotation_propagation [--sizes 10 50] [--scale 60] [--json F]

For each fleet size and each approach, a new key version is put (check-and-set, as the
rotation role does) while ``testkit.loadgen`` keeps every worker solving, and it measures:

* **put -> all**: from the put until every worker serves the new version (each worker's own
  ``last_refresh`` of the new version, read from /healthz, minus the put time);
* **put -> confirm**: from the put until the rotation may ask for the old key's revocation —
  for the kit, when the /healthz poll has seen every worker on the new version and the
  ``awaiting_revocation`` record is written; for the naive baseline, the end of its fixed window;
* **failed solves** during the rotation (attempted / failed, from testkit/loadgen.py).

Approaches (same workers, same Vault, same load):

1. ``kit + nudge``: refresh_interval 300 s (the kit default), SIGHUP to every worker after the
   put (what ``systemctl reload`` sends), poll /healthz. Real time, not scaled.
2. ``kit, no nudge``: refresh_interval 300 s, jitter 0.1; the workers find the version on their
   own refresh; poll /healthz.
3. ``naive baseline``: one Vault read an hour (refresh_interval 3600 s) and a fixed refresh window
   (confirmation after 3600 s, no polling).

Without the nudge the figure depends on where each worker is in its refresh cycle, so those
fleets are started one interval / N apart (phases spread over the whole interval, as workers
started at different times are). (2) and (3) are run with every interval divided by
``--scale`` (default 60: 5 s and 60 s) and their figures are multiplied back by it ("as real");
the raw measured values are printed too.
Vault 18240 (``.state/bench/vault``), emulator 18360/18361, workers 18500-18599, 127.0.0.1.
Goal (issue 6): <= 5 s put -> all for 50 workers with the nudge; 0 failed solves.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac

from bench.provisioning import bench_vault
from bench.report import report
from testkit.creds import new_key
from testkit.emulator import EmulatorProcess
from testkit.loadgen import LoadGenerator
from testkit.paths import PROVISION
from testkit.playbook import provision_inventory, run_playbook
from testkit.vault import LocalVault
from testkit.vault_ops import admin_client, put_key
from testkit.worker import Fleet, WorkerProc

EMULATOR_PORTS = (18360, 18361)
WORKER_PORTS = range(18500, 18600)
KIT_INTERVAL = 300.0
SEED_INTERVAL = 3600.0
JITTER = 0.1


def last_refresh(w: WorkerProc) -> tuple[int | None, float | None]:
    try:
        h = w.health()
    except (OSError, ValueError):
        return None, None
    when = h.get("last_refresh")
    return h.get("key_version"), dt.datetime.fromisoformat(when).timestamp() if when else None


def wait_all(workers: list[WorkerProc], version: int, timeout: float) -> dict[str, float]:
    """Poll /healthz of every worker until all report ``version``: {name: refresh wall time}."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        while len(seen) < len(workers) and time.monotonic() < deadline:
            todo = [w for w in workers if w.name not in seen]
            for w, (got, when) in zip(todo, pool.map(last_refresh, todo), strict=True):
                if got == version and when is not None:
                    seen[w.name] = when
            if len(seen) < len(workers):
                time.sleep(0.05)
    if len(seen) < len(workers):
        raise RuntimeError(f"{len(workers) - len(seen)} workers not on v{version} in {timeout}s")
    return seen


def mark_awaiting(admin, env: str, mount: str, rotation_id: str) -> None:
    """The record write the rotation role does once every worker reported the new version."""
    admin.adapter.post(
        f"/v1/{mount}/metadata/captchaai/{env}",
        json={"custom_metadata": {"rotation_id": rotation_id, "rotation_state": "awaiting"}},
    )


def rotate(
    fleet: Fleet,
    emulator: EmulatorProcess,
    mount: str,
    *,
    nudge: bool,
    poll: bool,
    window: float,
    clients: int,
) -> dict[str, Any]:
    admin = fleet.admin
    key = new_key()
    emulator.admin.add_key(key, balance=1e6)
    load = LoadGenerator(fleet.urls, clients=clients, duration=window + 120, pause=0.05).start()
    try:
        time.sleep(2)  # steady load before the put
        t_put_wall = time.time()
        t_put = time.monotonic()
        version = put_key(admin, fleet.env, key, mount=mount)
        if nudge:
            for w in fleet.workers:
                w.sighup()
        refreshed = wait_all(fleet.workers, version, timeout=window + 60)
        t_seen = time.monotonic()
        if poll:
            mark_awaiting(admin, fleet.env, mount, secrets.token_hex(4))
            confirm = time.monotonic() - t_put
        else:
            time.sleep(max(0.0, t_put + window - time.monotonic()))  # the fixed window
            confirm = time.monotonic() - t_put
        time.sleep(1)
    finally:
        summary = load.summary()
    per_worker = sorted(max(0.0, when - t_put_wall) for when in refreshed.values())
    return {
        "version": version,
        "put_to_all_s": round(per_worker[-1], 3),
        "put_to_median_s": round(per_worker[len(per_worker) // 2], 3),
        "put_to_seen_s": round(t_seen - t_put, 3),
        "put_to_confirm_s": round(confirm, 3),
        "attempted": summary["attempted"],
        "failed": summary["failed"],
    }


def run_size(
    vault, emulator, n: int, scale: float, tmp: Path, mount: str, approle: str, env: str
) -> list[dict[str, Any]]:
    admin = admin_client(vault)
    rows = []
    # name, refresh interval, jitter, time factor, nudge, poll (else: fixed window)
    approaches = [
        ("kit + nudge", KIT_INTERVAL, JITTER, 1.0, True, True),
        ("kit, no nudge", KIT_INTERVAL / scale, JITTER, scale, False, True),
        (
            "naive baseline (1 read/h, fixed window)",
            SEED_INTERVAL / scale,
            0.0,
            scale,
            False,
            False,
        ),
    ]
    for name, interval, jitter, factor, nudge, poll in approaches:
        fleet = Fleet(
            admin=admin,
            env=env,
            directory=tmp / f"{n}-{secrets.token_hex(2)}",
            vault_addrs=[vault.addr],
            ca_file=vault.ca_file,
            provider_url=emulator.url,
            ports=iter(WORKER_PORTS),
            approle_mount=approle,
            refresh_interval=interval,
            refresh_jitter=jitter,
            settings={"vault": {"kv_mount": mount, "approle_mount": approle}},
        )
        with fleet:
            started = time.monotonic()
            # Without the nudge the result depends on where each worker is in its refresh
            # cycle: spread their starts over one interval (random phases, as in real life).
            fleet.start(n, timeout=300, stagger=0.0 if nudge else interval / n)
            startup = time.monotonic() - started
            time.sleep(1)
            # poll: an upper bound for the wait (the role's window); fixed: the window itself
            window = interval * (1 + jitter) + 5.0 if poll else interval
            result = rotate(
                fleet, emulator, mount, nudge=nudge, poll=poll, window=window, clients=min(8, n)
            )
        row = {"workers": n, "approach": name, "interval_s": interval, "factor": factor}
        row |= result
        row["fleet_start_s"] = round(startup, 1)
        for k in ("put_to_all_s", "put_to_median_s", "put_to_confirm_s"):
            row[k.replace("_s", "_real_s")] = round(result[k] * factor, 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workers | approach | put -> all workers | put -> confirmation point "
        "| measured (scaled run) | solves attempted / failed |",
        "|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        scaled = (
            f"interval {r['interval_s']:g} s: all {r['put_to_all_s']:.2f} s, "
            f"confirm {r['put_to_confirm_s']:.2f} s (x{r['factor']:g})"
            if r["factor"] != 1
            else "real time"
        )
        lines.append(
            f"| {r['workers']} | {r['approach']} | {fmt(r['put_to_all_real_s'])} "
            f"| {fmt(r['put_to_confirm_real_s'])} | {scaled} | {r['attempted']} / {r['failed']} |"
        )
    return "\n".join(lines)


def fmt(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s"
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def run(sizes: list[int], scale: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with bench_env("rp", "prop") as b:
        for n in sizes:
            rows += run_size(b.vault, b.emulator, n, scale, b.tmp, b.mount, b.approle, b.env)
    return rows


@dataclass
class BenchEnv:
    """A provisioned env of its own (mounts named after the run) with its first key in Vault
    and at the emulator."""

    vault: LocalVault
    admin: hvac.Client
    emulator: EmulatorProcess
    tmp: Path
    mount: str
    approle: str
    env: str


@contextlib.contextmanager
def bench_env(prefix: str, suffix: str) -> Iterator[BenchEnv]:
    tag = f"{prefix}{secrets.token_hex(2)}"
    mount, approle, env = f"kv-{tag}", f"approle-{tag}", f"{tag}-{suffix}"
    with (
        bench_vault() as vault,
        tempfile.TemporaryDirectory(prefix=f"bench-{suffix}-") as tmp_name,
    ):
        admin = admin_client(vault)
        tmp = Path(tmp_name)
        provision(vault, env, mount, approle, tmp)
        with EmulatorProcess(*EMULATOR_PORTS, solve_delay="fixed:0.2", ban_threshold=0) as emu:
            key = new_key()
            emu.admin.add_key(key, balance=1e6)
            put_key(admin, env, key, mount=mount)
            yield BenchEnv(vault, admin, emu, tmp, mount, approle, env)


def provision(vault, env: str, mount: str, approle: str, tmp: Path) -> None:
    """The env through the kit's own provision playbook, with mounts of this run."""
    inventory = provision_inventory(
        vault,
        [env],
        tmp,
        {"vault_provision_kv_mount": mount, "vault_provision_approle_mount": approle},
    )
    done = run_playbook(PROVISION, vault=vault, inventory=inventory)
    if done.rc != 0:
        raise RuntimeError(done.output[-3000:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rotation_propagation", description=__doc__
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--scale", type=float, default=60.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if max(args.sizes) > len(WORKER_PORTS):
        parser.error(f"at most {len(WORKER_PORTS)} workers (ports 18500-18599)")
    rows = run(args.sizes, args.scale)
    return report(rows, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
