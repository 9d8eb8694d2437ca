"""Benchmark: provisioning N environments with playbooks/provision-vault.yml (first run and the
idempotent rerun): wall time and changed-task count.

    .venv/bin/python -m bench.provisioning [--sizes 3 30] [--json out.json]

Against the bench OpenBao (``.state/bench/vault``, 127.0.0.1:18240; started if needed, and
stopped again at the end when this run started it). Every measured run gets a KV mount, an
AppRole mount and env names of its own (``kv-<tag>``, ``approle-<tag>``, ``<tag>-e<i>``), so
the first run really creates everything.
Goal (issue 6): rerun 0 changes, <= 10 s for 3 envs. Nothing is asserted: it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.report import report
from testkit.paths import PROVISION, REPO
from testkit.playbook import ansible_env, provision_inventory, run_playbook
from testkit.tokens import playbook_token
from testkit.vault import LocalVault

BENCH_VAULT_DIR = REPO / ".state" / "bench" / "vault"
BENCH_VAULT_PORT = 18240


@contextlib.contextmanager
def bench_vault() -> Iterator[LocalVault]:
    """The bench OpenBao, started if needed; stopped at the end when this call started it (a
    server that was already running, e.g. for a series of benchmarks, is left running)."""
    vault = LocalVault(BENCH_VAULT_DIR, BENCH_VAULT_PORT)
    started = vault.start() != "running"
    try:
        yield vault
    finally:
        if started:
            vault.stop()


def provision_envs(vault: LocalVault, n: int, tmp: Path) -> dict[str, Any]:
    tag = f"b{secrets.token_hex(2)}"
    envs = [f"{tag}-e{i}" for i in range(1, n + 1)]
    inventory = provision_inventory(
        vault,
        envs,
        tmp,
        {
            "vault_provision_kv_mount": f"kv-{tag}",
            "vault_provision_approle_mount": f"approle-{tag}",
        },
    )
    # The provisioner's token for this layout (docs/tokens.md), never the root token.
    env = ansible_env(vault, token=playbook_token(vault, PROVISION, inventory, None))
    first = run_playbook(PROVISION, inventory=inventory, env=env)
    if first.rc != 0:
        raise RuntimeError(f"provisioning {n} envs failed:\n{first.output[-3000:]}")
    rerun = run_playbook(PROVISION, inventory=inventory, env=env)
    if rerun.rc != 0:
        raise RuntimeError(f"rerun for {n} envs failed:\n{rerun.output[-3000:]}")
    return {
        "envs": n,
        "first_s": round(first.seconds, 2),
        "first_changed": first.changed,
        "rerun_s": round(rerun.seconds, 2),
        "rerun_changed": rerun.changed,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| envs | first run (s) | changed tasks | rerun (s) | changed tasks | rerun s per env |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['envs']} | {r['first_s']:.1f} | {r['first_changed']} | {r['rerun_s']:.1f} "
            f"| {r['rerun_changed']} | {r['rerun_s'] / r['envs']:.2f} |"
        )
    return "\n".join(lines)


def run(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    with bench_vault() as vault, tempfile.TemporaryDirectory(prefix="bench-prov-") as tmp:
        for n in sizes:
            rows.append(provision_envs(vault, n, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.provisioning", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 30])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.sizes)
    return report(rows, markdown, args.json)


if __name__ == "__main__":
    sys.exit(main())
