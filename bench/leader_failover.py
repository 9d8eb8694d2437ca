"""Benchmark: a rotation's put reaching nudged workers across a raft leader election.

    .venv/bin/python -m bench.leader_failover [--workers 10] [--trials 5] [--nudge-after 1.0]
                                              [--json F] [--write-results bench/results-failover.md]

The rotation puts the new key version, and the raft leader dies right after: the nudged workers
(SIGHUP, what the rotation's ``systemctl reload`` sends) find no active node until the standbys
have elected a new leader and it has taken over. How soon after that each worker reads the new
version depends on its retry schedule. Two fleets of ``captcha-solver serve`` workers, with the
kit's default Vault timings (``retry_delay`` 0.5 s, 3 rounds over all three node addresses,
refresh every 300 s), differ in one setting:

* ``backoff``: ``vault.nudge_retry_window = 0``, the worker as it was before the setting: a
  failed read after a nudge waits as any other (rounds over the addresses 0.5 s then 1 s apart,
  refreshes 1, 2, 4 ... s apart);
* ``prompt after a nudge``: ``vault.nudge_retry_window = 30`` (the default): for 30 s after a
  nudge, rounds and refreshes are ``retry_delay`` (+-50 %) apart.

Each trial: put (check-and-set) through the active node, SIGKILL that node at once, SIGHUP every
worker of both fleets (interleaved) ``--nudge-after`` seconds later (the rotation's fan-out takes
about that long), then read each worker's own ``last_refresh`` of the new version from /healthz.
Both fleets live through the same election in the same trial, so each trial is a paired
comparison. The killed node is restarted and rejoined before the next trial. A solve load (4
clients per fleet) runs throughout: failed solves are counted.

Figures per trial and fleet: put -> last worker on the new version, put -> median worker; and
put -> a new active node (the election and take-over, polled every 0.1 s). The ratio of the
medians over the trials is the figure to read; absolute times depend on the machine.
Ports: a 3-node OpenBao on 18660 / 18670 / 18680 (``.state/bench/ha``; stopped at the end),
emulator 18360/18361, workers 18500-18599, all on 127.0.0.1. Nothing is asserted: it measures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import hvac

from bench.report import report, write_results
from testkit.creds import new_key
from testkit.emulator import EmulatorProcess
from testkit.faults import provision
from testkit.loadgen import LoadGenerator
from testkit.paths import REPO
from testkit.vault import LocalVault
from testkit.vault_ops import put_key
from testkit.worker import Fleet, WorkerProc

HA_DIR = REPO / ".state" / "bench" / "ha"
HA_PORT = 18660  # nodes on 18660, 18670, 18680
EMULATOR_PORTS = (18360, 18361)
WORKER_PORTS = range(18500, 18600)
# The kit's defaults (solver config.py), not the tests' quick timings.
DEFAULT_VAULT = {"retry_delay": 0.5, "retries": 3, "timeout": 5.0}
SCHEDULES = {"backoff": 0.0, "prompt after a nudge": 30.0}


def active_client(cluster: LocalVault) -> hvac.Client:
    node = cluster.wait_active_node(timeout=60)
    return hvac.Client(url=node.addr, token=cluster.root_token(), verify=str(cluster.ca_file))


def refreshed_at(worker: WorkerProc, version: int) -> float | None:
    """When the worker read ``version`` (its own clock, epoch seconds), or None."""
    try:
        health = worker.health(timeout=2.0)
    except (OSError, ValueError):
        return None
    when = health.get("last_refresh")
    if health.get("key_version") != version or not when:
        return None
    return dt.datetime.fromisoformat(when).timestamp()


def wait_on(workers: list[WorkerProc], version: int, timeout: float) -> dict[str, float]:
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(workers) and time.monotonic() < deadline:
        for w in workers:
            if w.name not in seen and (when := refreshed_at(w, version)) is not None:
                seen[w.name] = when
        time.sleep(0.05)
    if len(seen) < len(workers):
        raise RuntimeError(f"{len(workers) - len(seen)} workers not on v{version} in {timeout} s")
    return seen


def watch_election(cluster: LocalVault, killed: str, out: dict[str, float]) -> threading.Thread:
    """Record (epoch seconds) when a node other than ``killed`` reports active."""

    def poll() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for node in cluster.nodes:
                if node.node_id != killed and node.health_code() == 200:
                    out["active"] = time.time()
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread


def trial(
    cluster: LocalVault, env: str, fleets: dict[str, Fleet], emulator: Any, nudge_after: float
) -> dict[str, Any]:
    cluster.start()  # every node up, unsealed, a voter (restarts the one killed last time)
    admin = active_client(cluster)
    leader = next(n for n in cluster.nodes if n.health_code() == 200)
    key = new_key()
    emulator.admin.add_key(key, balance=1e6)
    t_put = time.time()
    version = put_key(admin, env, key)
    pid = leader.pid()
    assert pid is not None, "the active node has no process"
    os.killpg(pid, signal.SIGKILL)
    t_kill = time.time() - t_put
    election: dict[str, float] = {}
    watcher = watch_election(cluster, leader.node_id, election)
    time.sleep(nudge_after)
    order = [w for pair in zip(*(f.workers for f in fleets.values()), strict=True) for w in pair]
    for w in order:
        w.sighup()
    row: dict[str, Any] = {
        "version": version,
        "killed": leader.node_id,
        "kill_after_put_s": round(t_kill, 3),
    }
    for name, fleet in fleets.items():
        seen = sorted(when - t_put for when in wait_on(fleet.workers, version, 120).values())
        row[name] = {"last_s": round(seen[-1], 2), "median_s": round(statistics.median(seen), 2)}
    watcher.join(timeout=60)
    row["new_active_s"] = round(election["active"] - t_put, 2) if "active" in election else None
    return row


def run(workers: int, trials: int, nudge_after: float) -> dict[str, Any]:
    cluster = LocalVault(HA_DIR, HA_PORT, nodes=3)
    cluster.start()
    env = f"lf{secrets.token_hex(2)}"
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp_name:
            tmp = Path(tmp_name)
            done = provision(cluster, [env], tmp, cluster.addrs)
            if done.rc != 0:
                raise RuntimeError(done.output[-3000:])
            with EmulatorProcess(*EMULATOR_PORTS, solve_delay="fixed:0.2", ban_threshold=0) as emu:
                key = new_key()
                emu.admin.add_key(key, balance=1e6)
                put_key(active_client(cluster), env, key)
                ports = iter(WORKER_PORTS)
                fleets = {
                    name: Fleet(
                        admin=active_client(cluster),
                        env=env,
                        directory=tmp / f"fleet-{i}",
                        vault_addrs=cluster.addrs,
                        ca_file=cluster.ca_file,
                        provider_url=emu.url,
                        ports=ports,
                        refresh_interval=300.0,
                        refresh_jitter=0.1,
                        settings={"vault": {**DEFAULT_VAULT, "nudge_retry_window": window}},
                    )
                    for i, (name, window) in enumerate(SCHEDULES.items())
                }
                try:
                    for fleet in fleets.values():
                        fleet.start(workers, timeout=300)
                    urls = [u for f in fleets.values() for u in f.urls]
                    load = LoadGenerator(urls, clients=8, duration=3600, pause=0.1).start()
                    try:
                        for _ in range(trials):
                            row = trial(cluster, env, fleets, emu, nudge_after)
                            print(json.dumps(row), file=sys.stderr)
                            rows.append(row)
                    finally:
                        summary = load.summary()
                finally:
                    for fleet in fleets.values():
                        fleet.stop()
    finally:
        cluster.stop()  # the bench's own cluster
    return {
        "workers_per_fleet": workers,
        "nudge_after_s": nudge_after,
        "trials": rows,
        "solves": {"attempted": summary["attempted"], "failed": summary["failed"]},
    }


def markdown(result: dict[str, Any]) -> str:
    names = list(SCHEDULES)
    lines = [
        f"{result['workers_per_fleet']} workers per fleet; nudge {result['nudge_after_s']:g} s"
        " after the put; the leader SIGKILLed right after the put.",
        "",
        "| trial | put → new active node | "
        + " | ".join(f"{n}: last / median" for n in names)
        + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for i, row in enumerate(result["trials"], 1):
        cells = [f"{row[n]['last_s']:.2f} / {row[n]['median_s']:.2f} s" for n in names]
        active = row["new_active_s"]
        lines.append(
            f"| {i} | {'-' if active is None else f'{active:.2f} s'} | " + " | ".join(cells) + " |"
        )
    med = {
        n: (
            statistics.median(r[n]["last_s"] for r in result["trials"]),
            max(r[n]["last_s"] for r in result["trials"]),
        )
        for n in names
    }
    lines.append(
        "| median (max) of last | | "
        + " | ".join(f"{m:.2f} s ({mx:.2f} s)" for m, mx in med.values())
        + " |"
    )
    base, new = (med[n][0] for n in names)
    after = {
        n: [r[n]["last_s"] - r["new_active_s"] for r in result["trials"] if r["new_active_s"]]
        for n in names
    }
    lines += [
        "",
        "The last worker after the new active node: "
        + "; ".join(
            f"{n} {min(a):.2f} to {max(a):.2f} s (median {statistics.median(a):.2f} s)"
            for n, a in after.items()
            if a
        )
        + ".",
        "",
        f"Ratio of the medians, {names[1]} / {names[0]}: {new / base:.2f}. "
        f"Solves attempted / failed over the whole run: {result['solves']['attempted']} / "
        f"{result['solves']['failed']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.leader_failover", description=__doc__)
    parser.add_argument("--workers", type=int, default=10, help="per fleet (two fleets)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--nudge-after", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write-results", type=Path, default=None)
    args = parser.parse_args(argv)
    if 2 * args.workers > len(WORKER_PORTS):
        parser.error(f"at most {len(WORKER_PORTS) // 2} workers per fleet")
    result = run(args.workers, args.trials, args.nudge_after)
    if args.write_results:
        write_results(
            args.write_results,
            "Leader failover: a put reaching nudged workers across a raft election",
            f"python -m bench.leader_failover --workers {args.workers} --trials {args.trials}"
            f" --nudge-after {args.nudge_after:g} --write-results {args.write_results}",
            " (workers, the 3 OpenBao nodes, the emulator and the load share them)",
            markdown(result),
        )
    return report(result, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
