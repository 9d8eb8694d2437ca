"""Benchmark: what a raft standby answers for a key just put, with OpenBao's standby reads on.

    .venv/bin/python -m bench.standby_reads [--trials 8] [--json F]
                                            [--write-results bench/results-standby-reads.md]

OpenBao (2.5 and later) lets the standbys of a raft cluster answer reads from their own copy
(``disable_standby_reads = false``, its default). The kit's servers turn that off, and
provisioning refuses a cluster whose standbys answer reads (docs/provisioning.md). This bench
measures why, on a 3-node cluster of its own with standby reads on:

1. **Lag after a put.** A new version is put through the active node; each standby is read every
   few milliseconds until it answers that version. Figure: put answered -> each standby on the
   new version (the followers learn the commit with the leader's next message).
2. **A put followed by the leader's death** (the fleet bench's rotation case). A new version is
   put, the active node is SIGKILLed at once, and each surviving node is read every 50 ms with
   a read-only token, and its health polled: what the survivors answer meanwhile (the old
   version, an error) and when they first answer the new one, against when a new active node
   appears. Then the killed node is restarted and rejoined for the next trial.

A worker nudged by a rotation that reads the old version from a standby keeps it until its next
refresh (300 s by default): the rotation waits that long for it instead of seconds. And the
second part shows what bounds a rotation's put -> last worker when the leader dies after the
put: the survivors hold the put in their logs but apply it only once a new leader has committed
an entry of its own, so no client setting gets the new version to a worker before the election
is over.

Ports: 18900 / 18910 / 18920 (cluster ports +1), ``.state/bench/standby-reads`` (stopped at the
end); all on 127.0.0.1. Nothing is asserted: it measures.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import requests

from bench.report import report, write_results
from testkit.creds import new_key
from testkit.paths import REPO
from testkit.vault import BaoNode, LocalVault

STATE_DIR = REPO / ".state" / "bench" / "standby-reads"
PORT = 18900  # nodes on 18900, 18910, 18920
PATH = "captchaai/standby-reads-bench"
READ_POLICY = f'path "secret/data/{PATH}" {{ capabilities = ["read"] }}'


class Api:
    """Requests to one cluster's nodes (TLS with the kit's CA, never through a proxy)."""

    def __init__(self, cluster: LocalVault):
        self.cluster = cluster
        self.session = requests.Session()
        self.session.verify = str(cluster.ca_file)
        self.session.trust_env = False

    def call(
        self, node: BaoNode, method: str, path: str, token: str, body: dict | None = None
    ) -> requests.Response:
        return self.session.request(
            method,
            f"{node.addr}/v1/{path}",
            json=body,
            headers={"X-Vault-Token": token},
            timeout=2,
        )

    def version_on(self, node: BaoNode, token: str) -> int | str:
        """The key's version as ``node`` answers it, or what it answered instead."""
        try:
            response = self.call(node, "GET", f"secret/data/{PATH}", token)
        except requests.RequestException as exc:
            return type(exc).__name__
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        return int(response.json()["data"]["metadata"]["version"])

    def put(self, node: BaoNode, token: str) -> int:
        response = self.call(node, "POST", f"secret/data/{PATH}", token, {"data": {"k": new_key()}})
        response.raise_for_status()
        return int(response.json()["data"]["version"])


def set_up(api: Api) -> str:
    """KV v2 and a read-only token for the bench path; returns the token."""
    root = api.cluster.root_token()
    active = api.cluster.wait_active_node()
    mounts = api.call(active, "GET", "sys/mounts", root).json()
    if "secret/" not in mounts.get("data", mounts):
        api.call(
            active, "POST", "sys/mounts/secret", root, {"type": "kv", "options": {"version": "2"}}
        ).raise_for_status()
    api.call(
        active, "PUT", "sys/policies/acl/standby-reads-bench", root, {"policy": READ_POLICY}
    ).raise_for_status()
    created = api.call(
        active,
        "POST",
        "auth/token/create",
        root,
        {"policies": ["standby-reads-bench"], "ttl": "1h", "no_default_policy": True},
    )
    created.raise_for_status()
    token = str(created.json()["auth"]["client_token"])
    api.put(active, root)
    return token


def lag_trial(api: Api, token: str) -> dict[str, Any]:
    """Put, then read each standby every few ms until it answers the new version."""
    active = api.cluster.wait_active_node()
    standbys = [n for n in api.cluster.nodes if n is not active]
    version = api.put(active, api.cluster.root_token())
    answered = time.monotonic()
    lag: dict[str, float] = {}
    stale: dict[str, int] = {n.node_id: 0 for n in standbys}
    while len(lag) < len(standbys) and time.monotonic() - answered < 10:
        for node in standbys:
            if node.node_id in lag:
                continue
            seen = api.version_on(node, token)
            if seen == version:
                lag[node.node_id] = round((time.monotonic() - answered) * 1000)
            elif isinstance(seen, int):
                stale[node.node_id] += 1
    return {"lag_ms": sorted(lag.values()), "old_answers": sum(stale.values())}


def kill_trial(api: Api, token: str) -> dict[str, Any]:
    """Put, SIGKILL the active node, watch the survivors until both answer the new version."""
    api.cluster.start()  # every node up, unsealed, a voter (restarts the one killed last time)
    active = api.cluster.wait_active_node()
    survivors = [n for n in api.cluster.nodes if n is not active]
    version = api.put(active, api.cluster.root_token())
    put_at = time.monotonic()
    pid = active.pid()
    assert pid is not None, "the active node has no process"
    os.killpg(pid, signal.SIGKILL)
    first_new: dict[str, float] = {}
    new_active: float | None = None
    answers: dict[str, int] = {}
    while (
        len(first_new) < len(survivors) or new_active is None
    ) and time.monotonic() - put_at < 60:
        for node in survivors:
            if node.node_id in first_new:
                continue
            seen = api.version_on(node, token)
            if seen == version:
                first_new[node.node_id] = time.monotonic() - put_at
            else:
                label = f"v{seen} (old)" if isinstance(seen, int) else str(seen)
                answers[label] = answers.get(label, 0) + 1
        if new_active is None and any(n.health_code() == 200 for n in survivors):
            new_active = time.monotonic() - put_at
        time.sleep(0.05)
    return {
        "killed": active.node_id,
        "new_active_s": None if new_active is None else round(new_active, 2),
        "first_new_version_s": round(min(first_new.values()), 2) if first_new else None,
        "all_survivors_new_s": (
            round(max(first_new.values()), 2) if len(first_new) == len(survivors) else None
        ),
        "answers_meanwhile": answers,
    }


def run(trials: int) -> dict[str, Any]:
    cluster = LocalVault(STATE_DIR, PORT, nodes=3, standby_reads=True)
    cluster.start()
    try:
        api = Api(cluster)
        token = set_up(api)
        lags = []
        for _ in range(trials):
            lags.append(lag_trial(api, token))
            time.sleep(0.3)
        kills = []
        for _ in range(trials):
            row = kill_trial(api, token)
            print(row, file=sys.stderr)
            kills.append(row)
    finally:
        cluster.stop()  # the bench's own cluster
    return {"trials": trials, "lag": lags, "kill": kills}


def markdown(result: dict[str, Any]) -> str:
    lags = [ms for row in result["lag"] for ms in row["lag_ms"]]
    old = sum(row["old_answers"] for row in result["lag"])
    lines = [
        f"{result['trials']} trials of each part; a 3-node raft OpenBao with standby reads on"
        " (OpenBao's default), `performance_multiplier = 1`.",
        "",
        "**1. Lag after a put** (put answered by the active node -> a standby answers the new"
        " version):",
        "",
        f"min {min(lags)} ms, median {statistics.median(lags):g} ms, max {max(lags)} ms over"
        f" {len(lags)} standby reads-until-new; {old} reads answered the old version meanwhile.",
        "",
        "**2. The leader SIGKILLed right after the put** (times from the put's answer):",
        "",
        "| trial | killed | new active node | a survivor answers the new version (first / both)"
        " | what the survivors answered meanwhile (50 ms polls) |",
        "|---:|---|---:|---:|---|",
    ]
    for i, row in enumerate(result["kill"], 1):
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(row["answers_meanwhile"].items()))
        lines.append(
            f"| {i} | {row['killed']} | {row['new_active_s']} s | {row['first_new_version_s']}"
            f" / {row['all_survivors_new_s']} s | {answers} |"
        )
    gaps = [
        row["first_new_version_s"] - row["new_active_s"]
        for row in result["kill"]
        if row["first_new_version_s"] is not None and row["new_active_s"] is not None
    ]
    if gaps:
        lines += [
            "",
            "A survivor's first answer of the new version, minus the new active node's"
            f" appearance: {min(gaps):+.2f} to {max(gaps):+.2f} s (the poll is 50 ms).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standby_reads", description=__doc__)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write-results", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.trials)
    if args.write_results:
        write_results(
            args.write_results,
            "Standby reads: what a raft standby answers for a key just put",
            f"python -m bench.standby_reads --trials {args.trials}"
            f" --write-results {args.write_results}",
            " (docs/provisioning.md says what the kit makes of it)",
            markdown(result),
        )
    return report(result, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
