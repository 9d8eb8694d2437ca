"""The demo: the whole story of the kit on local parts, from nothing.

    python -m tools.demo up      # (make demo) provision → deploy → load → rotate → summary
    python -m tools.demo status  # each worker's /healthz
    python -m tools.demo down    # (make demo-down) stop the containers, the emulator and Vault

``up`` starts a real OpenBao server (TLS, raft; testkit.vault) and the CaptchaAI emulator on
127.0.0.1, provisions dev/staging/prod with first keys made here, starts the worker containers of
``inventories/local`` (systemd as PID 1, host network), deploys the solver on them, puts solve
load on every worker, rotates the dev key unattended with the rotator AppRole (stopping at
"awaiting revocation"), revokes the old key at the emulator as an operator would at CaptchaAI,
confirms, and prints a summary. Everything is left running for a look around.

Keys are made at run time and never printed, passed on a command line, or written outside the
0600 files of the git-ignored state directory (``.state/demo-<inventory>``), deleted after use.
Running ``up`` again on a running demo is safe: provisioning and deployment change nothing and a
new rotation runs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import yaml
from captcha_solver.cli import read_health

from testkit.creds import secret_vars_file
from testkit.emulator import EmulatorAdmin, start_detached, stop_detached
from testkit.hosts import start_host
from testkit.tokens import playbook_token
from testkit.vault import LocalVault
from testkit.vault_ops import rotator_credentials

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INVENTORY = REPO / "inventories" / "local"
LOAD_CLIENTS_PER_WORKER = 4


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def masked(key: str) -> str:
    return "***" + key[-4:]


# --- inventory --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Where the demo runs, all taken from one inventory (the single source of truth): the
    Vault port and state dir from ``captcha_kit_vault_addr`` and ``captcha_kit_vault_cacert``,
    the emulator from ``captcha_kit_provider_url`` (admin API on the next port), the worker
    containers (names, envs, ports) from its hosts and host_vars."""

    inventory: Path
    vault_state: Path
    vault_port: int
    emulator_port: int
    verbosity: int = 0
    rotate_env: str = "dev"

    @property
    def demo_dir(self) -> Path:
        """Per inventory, so demos of two inventories on one Vault keep their files apart."""
        return self.vault_state.parent / f"demo-{self.inventory.name}"

    @property
    def emulator_admin_port(self) -> int:
        return self.emulator_port + 1

    @classmethod
    def from_inventory(cls, inventory: Path, verbosity: int = 0, rotate_env: str = "dev") -> Site:
        kv = kit_vars(inventory)
        vault_url = urllib.parse.urlsplit(str(kv["captcha_kit_vault_addr"]))
        provider = urllib.parse.urlsplit(str(kv["captcha_kit_provider_url"]))
        cacert = str(kv["captcha_kit_vault_cacert"]).replace(
            "{{ inventory_dir }}", str(inventory.resolve())
        )
        local = {vault_url.hostname, provider.hostname} <= {"127.0.0.1", "localhost"}
        if "{{" in cacert or not local or not vault_url.port or not provider.port:
            raise SystemExit(
                f"demo: {inventory} is not a local testbed inventory (Vault and provider on "
                "127.0.0.1 with explicit ports, a CA path under the state directory)"
            )
        return cls(
            inventory=inventory.resolve(),
            vault_state=Path(cacert).resolve().parent,
            vault_port=vault_url.port,
            emulator_port=provider.port,
            verbosity=verbosity,
            rotate_env=rotate_env,
        )


def load_inventory(inventory: Path) -> dict[str, dict[str, Any]]:
    """Worker hosts of the inventory with their env and port (from host_vars)."""
    hosts_yml = yaml.safe_load((inventory / "hosts.yml").read_text())
    names: list[str] = []

    def walk(group: Mapping[str, Any]) -> None:
        names.extend((group.get("hosts") or {}).keys())
        for child in (group.get("children") or {}).values():
            walk(child or {})

    walk(hosts_yml["all"]["children"]["workers"])
    workers = {}
    for name in names:
        host_vars = yaml.safe_load((inventory / "host_vars" / f"{name}.yml").read_text())
        workers[name] = {
            "env": host_vars["captcha_worker_env"],
            "port": int(host_vars["captcha_worker_port"]),
            "ssh_port": int(host_vars["ansible_port"]),
        }
    return workers


def kit_vars(inventory: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((inventory / "group_vars" / "all" / "main.yml").read_text()))


# --- local parts ------------------------------------------------------------------------------


def vault(site: Site) -> LocalVault:
    return LocalVault(site.vault_state, site.vault_port)


def emulator_admin(site: Site) -> EmulatorAdmin:
    return EmulatorAdmin(f"http://127.0.0.1:{site.emulator_admin_port}")


def start_emulator(site: Site) -> None:
    """Start the emulator detached (it outlives this command) unless it already answers."""
    try:
        start_detached(
            site.emulator_port,
            site.emulator_admin_port,
            site.demo_dir,
            ["--solve-delay", "uniform:2:5"],
        )
    except RuntimeError as exc:
        raise SystemExit(f"demo: {exc}") from None


def start_containers(workers: Mapping[str, Mapping[str, Any]]) -> None:
    """Start (or reuse) each worker host, reachable over SSH on its inventory port."""
    for name, w in workers.items():
        start_host(name, ssh_port=w["ssh_port"], labels={"owner": "captcha-kit-demo"})


def ansible_env(site: Site) -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    if site.verbosity:
        env["ANSIBLE_VERBOSITY"] = str(site.verbosity)
    return env


def playbook(site: Site, name: str, *args: str, env: Mapping[str, str]) -> None:
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(site.inventory)]
    cmd += [str(REPO / "playbooks" / name), *args]
    result = subprocess.run(cmd, cwd=REPO, env={**ansible_env(site), **env}, check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo: {name} failed (exit {result.returncode}); see the output above")


def healthz(port: int) -> dict[str, Any]:
    try:
        return read_health(f"http://127.0.0.1:{port}")[1]
    except OSError as err:
        return {"status": "unreachable", "error": str(err)}


def show_workers(workers: Mapping[str, Mapping[str, Any]]) -> None:
    for name, w in workers.items():
        h = healthz(w["port"])
        keep = ("status", "env", "key_version", "key_fingerprint", "key_age_seconds")
        shown = {k: h.get(k) for k in keep} | {
            "vault_reachable": h.get("vault_reachable"),
            "rotation_state": (h.get("rotation") or {}).get("rotation_state"),
        }
        print(f"  {name} (127.0.0.1:{w['port']}): {json.dumps(shown)}")


# --- the story --------------------------------------------------------------------------------


def ensure_keys(site: Site, client: hvac.Client, envs: list[str]) -> dict[str, str]:
    """First keys for envs that have none yet; keys already in Vault are made known to the
    emulator (it keeps keys in memory only). Returns the new first keys to provision."""
    kv = kit_vars(site.inventory)
    admin = emulator_admin(site)
    first: dict[str, str] = {}
    for env in envs:
        path = f"{kv['captcha_kit_key_path_prefix']}/{env}"
        try:
            data = client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=kv["captcha_kit_kv_mount"], raise_on_deleted_version=True
            )
            key = str(data["data"]["data"]["api_key"])
        except (hvac.exceptions.InvalidPath, hvac.exceptions.Forbidden):
            key = first[env] = secrets.token_hex(16)
        if not admin.counters(key).get("exists"):
            admin.add_key(key, balance=1000.0)
    return first


def rotate(site: Site, args: list[str]) -> tuple[int, dict[str, Any]]:
    status_file = site.demo_dir / "rotation-status.json"
    status_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tools.rotate_unattended", "--env", site.rotate_env]
    cmd += ["-i", str(site.inventory), "--status-file", str(status_file), *args]
    rc = subprocess.run(cmd, cwd=REPO, env=ansible_env(site), check=False).returncode
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    return rc, status


def revoke(site: Site, key: str) -> None:
    """Revoke a key at the provider (the emulator), as an operator does at CaptchaAI."""
    admin = emulator_admin(site)
    if admin.counters(key).get("exists"):
        admin.revoke_key(key)


def finish_pending_rotation(site: Site, client: hvac.Client, creds: list[str]) -> None:
    """A rerun of the demo first finishes a rotation an earlier run left pending."""
    kv = kit_vars(site.inventory)
    path = f"{kv['captcha_kit_key_path_prefix']}/{site.rotate_env}"
    mount = kv["captcha_kit_kv_mount"]
    meta = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount)["data"]
    record = meta.get("custom_metadata") or {}
    if record.get("rotation_state") not in ("propagating", "awaiting_revocation"):
        return
    say(f"Finish rotation {record.get('rotation_id')} left pending by an earlier run")
    old = client.secrets.kv.v2.read_secret_version(
        path=path, mount_point=mount, version=int(record["previous_version"])
    )["data"]["data"]["api_key"]
    revoke(site, old)
    rc, _ = rotate(site, [*creds, "--confirm-revoked", str(record.get("rotation_id"))])
    if rc != 0:
        raise SystemExit(f"demo: could not finish the pending rotation (exit {rc})")


def up(site: Site, load_seconds: int) -> int:
    site.demo_dir.mkdir(parents=True, exist_ok=True)
    workers = load_inventory(site.inventory)
    envs = list(kit_vars(site.inventory)["captcha_kit_envs"])
    t0 = time.monotonic()

    say("Start the local Vault (OpenBao: TLS, raft, file audit) and the CaptchaAI emulator")
    server = vault(site)
    if server.start() in ("started", "initialised"):
        (site.demo_dir / "vault-started-here").touch()
    start_emulator(site)
    # The operators' tokens, never the root token (docs/tokens.md): a provisioner token of
    # captcha-provisioner for this inventory's layout, and later a deployer token.
    vault_env = {k: v for k, v in server.env().items() if k != "VAULT_TOKEN"}
    client = hvac.Client(url=server.addr, token=server.root_token(), verify=str(server.ca_file))
    print(
        f"  Vault {server.addr} (CA {server.ca_file}); emulator http://127.0.0.1:{site.emulator_port}"
    )

    say(f"Provision Vault for {', '.join(envs)} (playbooks/provision-vault.yml)")
    first = ensure_keys(site, client, envs)
    first_keys = {"vault_provision_first_keys": first}
    provisioner = playbook_token(server, "provision-vault.yml", site.inventory, None)
    assert provisioner is not None
    print("  with a provisioner token (policy captcha-provisioner, docs/tokens.md)")
    with secret_vars_file(site.demo_dir, "first-keys.json", first_keys) as fk:
        playbook(
            site,
            "provision-vault.yml",
            "-e",
            f"@{fk}",
            env=vault_env | {"VAULT_TOKEN": provisioner},
        )
    ensure_keys(site, client, envs)

    say(f"Start the worker containers: {', '.join(workers)}")
    start_containers(workers)

    say("Deploy the solver workers (playbooks/deploy-workers.yml)")
    deployer = playbook_token(server, "deploy-workers.yml", site.inventory, None)
    assert deployer is not None
    print(f"  with a deployer token (captcha-deployer-<env> of {', '.join(envs)})")
    playbook(site, "deploy-workers.yml", env=vault_env | {"VAULT_TOKEN": deployer})
    show_workers(workers)

    say(f"Put solve load on every worker ({LOAD_CLIENTS_PER_WORKER} clients each)")
    load_file = site.demo_dir / "load.json"
    load_file.unlink(missing_ok=True)
    urls = [f"http://127.0.0.1:{w['port']}" for w in workers.values()]
    load = subprocess.Popen(
        [sys.executable, "-m", "testkit.loadgen", "--duration", str(load_seconds)]
        + ["--clients", str(LOAD_CLIENTS_PER_WORKER * len(urls)), "--out", str(load_file)]
        + [arg for url in urls for arg in ("--worker", url)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    time.sleep(3)

    mount = kit_vars(site.inventory)["captcha_kit_approle_mount"]
    creds = rotator_credentials(site.demo_dir, client, site.rotate_env, mount)
    finish_pending_rotation(site, client, creds)

    say(f"Stage a new {site.rotate_env} key and rotate unattended with the rotator AppRole")
    new_key = secrets.token_hex(16)
    emulator_admin(site).add_key(new_key, balance=1000.0)
    kv = kit_vars(site.inventory)
    staged = f"{kv['captcha_kit_staged_path_prefix']}/{site.rotate_env}"
    try:  # the mount requires check-and-set: stage on top of the staged path's last version
        cas = int(
            client.secrets.kv.v2.read_secret_metadata(
                path=staged, mount_point=kv["captcha_kit_kv_mount"]
            )["data"]["current_version"]
        )
    except hvac.exceptions.InvalidPath:
        cas = 0
    client.secrets.kv.v2.create_or_update_secret(
        path=staged, secret={"api_key": new_key}, cas=cas, mount_point=kv["captcha_kit_kv_mount"]
    )
    old = client.secrets.kv.v2.read_secret_version(
        path=f"{kv['captcha_kit_key_path_prefix']}/{site.rotate_env}",
        mount_point=kv["captcha_kit_kv_mount"],
        raise_on_deleted_version=True,
    )["data"]["data"]["api_key"]
    print(f"  staged {masked(new_key)} to replace {masked(old)}")
    t_rotate = time.monotonic()
    rc, first_run = rotate(site, creds)
    if rc != 75:
        load.terminate()
        raise SystemExit(f"demo: expected 'awaiting revocation' (exit 75), got {rc}")

    say(f"Revoke the old key {masked(old)} at the provider (the emulator), then confirm")
    revoke(site, old)
    # The confirmation names the rotation it confirms (its id, from the first run's status).
    rc, final = rotate(site, [*creds, "--confirm-revoked", str(first_run.get("rotation_id"))])
    rotate_seconds = time.monotonic() - t_rotate
    for path in creds[1::2]:
        Path(path).unlink(missing_ok=True)
    if rc != 0:
        load.terminate()
        raise SystemExit(f"demo: the confirmed rotation did not complete (exit {rc})")

    say("Wait for the load to finish")
    load.wait(timeout=load_seconds + 60)
    summary = json.loads(load_file.read_text()) if load_file.exists() else {}

    say("Summary")
    print(
        f"  rotation {final.get('rotation_id')} of {site.rotate_env}: {final.get('rotation_state')}"
    )
    print(f"  put → every worker on the new version: {first_run.get('put_to_converged_seconds')} s")
    print(f"  put → revocation prompt: {first_run.get('put_to_prompt_seconds')} s")
    per_worker = json.dumps(first_run.get("worker_convergence_seconds"))
    print(f"  per-worker convergence (s): {per_worker}")
    print(f"  rotation wall time incl. confirmation: {rotate_seconds:.1f} s")
    print(
        f"  solves under load during the demo: {summary.get('attempted')} attempted, "
        f"{summary.get('ok')} ok, {summary.get('failed')} failed"
    )
    show_workers(workers)
    print(f"\n  demo up in {time.monotonic() - t0:.0f} s. Left running; try:")
    print("    python -m tools.demo status")
    port = next(iter(workers.values()))["port"]
    print(f"    curl -s -H 'Content-Type: application/json' -X POST 127.0.0.1:{port}/solve \\")
    print('      -d \'{"method":"userrecaptcha","googlekey":"k","pageurl":"https://a.test"}\'')
    print('    eval "$(python -m testkit.vault env)"; bao kv metadata get secret/captchaai/dev')
    print("    make demo-down")
    failed = int(summary.get("failed", 1))
    return 1 if failed else 0


def down(site: Site) -> int:
    workers = load_inventory(site.inventory)
    for name in workers:
        subprocess.run(["podman", "rm", "-f", "-t", "5", name], check=False, capture_output=True)
    stop_detached(site.demo_dir)
    marker = site.demo_dir / "vault-started-here"
    if marker.exists():
        vault(site).stop()
        marker.unlink()
    print("demo: stopped what it started: worker containers, emulator, local Vault (state kept)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run the whole story and leave it running")
    p_up.add_argument("--load-seconds", type=int, default=60)
    p_up.add_argument("--ansible-verbosity", type=int, default=0, help="like -v, -vv, -vvv")
    p_up.add_argument("--rotate-env", default="dev", help="the environment whose key is rotated")
    p_status = sub.add_parser("status", help="print each worker's /healthz")
    p_down = sub.add_parser("down", help="stop everything the demo started")
    for p in (p_up, p_status, p_down):
        p.add_argument("--inventory", type=Path, default=DEFAULT_INVENTORY)
    args = parser.parse_args(argv)
    site = Site.from_inventory(
        args.inventory, getattr(args, "ansible_verbosity", 0), getattr(args, "rotate_env", "dev")
    )
    if args.command == "up":
        return up(site, args.load_seconds)
    if args.command == "status":
        show_workers(load_inventory(site.inventory))
        return 0
    return down(site)


if __name__ == "__main__":
    sys.exit(main())
