"""A fleet of systemd worker hosts over SSH against a 3-node raft OpenBao (`make fleet`).

    python -m bench.fleet_hosts up [--hosts 20] [--write-results bench/results-fleet.md]
    python -m bench.fleet_hosts down

`up` removes what an earlier run left (hosts, servers, `.state/fleet`), then starts a 3-node
raft OpenBao (TLS, raft, file audit; 18610/18620/18630), the CaptchaAI emulator (18640/18641)
and N hosts of the kit's image (workers on 18700+i, sshd on 18800+i),
split over two envs (fleet-a, fleet-b), and then measures, on this one machine:

1. provisioning both envs;
2. deploy wall time to 1 host, then to all N (the other N-1 fresh), and an idempotent rerun;
3. the cost of one trivial task over SSH as `deploy` with become against the same task through
   `podman exec` as root (10 tasks each, the same host);
4. under solve load on every host (clients retry a 503 or refused solve for up to 30 s, as a
   scraper does): a rolling redeploy with a config change (batches of 25 %), solves attempted
   and failed during it, and the wall time of each batch;
5. under the same load: an unattended rotation of fleet-a with the raft leader killed right
   after the put (a watcher sees the new version and SIGKILLs the active node): put -> a new
   active node (the election), put -> last worker on the new version, put -> revocation
   prompt, solves attempted and failed; then the
   old key is revoked at the emulator and a confirming run completes the rotation;
6. worker RSS per host and Vault requests per worker-hour (from the audit log).

Everything stays up for a look around until `down`. Everything runs on 127.0.0.1. Keys are made
here at run time and reach Vault and the emulator only (0600 extra-vars files that are deleted
after use). This is a benchmark: no figure is asserted; `--write-results` records them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import hvac
import yaml

from bench.audit import audit_requests
from testkit.creds import secret_vars_file
from testkit.emulator import EmulatorAdmin
from testkit.hosts import (
    Recipe,
    build,
    podman_env,
    remove_host,
    ssh_host_vars,
    start_host,
)
from testkit.loadgen import LoadGenerator
from testkit.tokens import playbook_token, token_with
from testkit.vault import LocalVault
from testkit.vault_ops import rotator_credentials

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".state" / "fleet"
VAULT_PORT = 18610  # nodes on 18610, 18620, 18630 (cluster port = API port + 1)
EMULATOR_PORT = 18640
WORKER_PORT = 18700
SSH_PORT = 18800
ENVS = ("fleet-a", "fleet-b")
REFRESH_INTERVAL = 300  # the role's default: the figures are at the default refresh
BATCH = "25%"
LABEL = "owner=captcha-kit-fleet"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def host_names(n: int) -> list[str]:
    return [f"fleet-{i + 1:02d}" for i in range(n)]


def env_of(index: int) -> str:
    return ENVS[index % len(ENVS)]


# --------------------------------------------------------------------------- local parts


def vault() -> LocalVault:
    return LocalVault(STATE / "vault", VAULT_PORT, nodes=3)


def emulator_admin() -> EmulatorAdmin:
    return EmulatorAdmin(f"http://127.0.0.1:{EMULATOR_PORT + 1}")


def start_emulator() -> None:
    """The emulator, detached (it outlives `up`; `down` stops it)."""
    if emulator_admin().health():
        return
    log = STATE / "emulator.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "testkit.emulator", "--port", str(EMULATOR_PORT)),
                *("--admin-port", str(EMULATOR_PORT + 1), "--solve-delay", "fixed:0.3"),
                *("--ban-threshold", "0"),
            ],
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (STATE / "emulator.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 15
    while not emulator_admin().health():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"fleet: the emulator did not start; see {log}")
        time.sleep(0.1)


def active_client(server: LocalVault) -> hvac.Client:
    """A root client of the active node (after a restart the first node may be a standby)."""
    node = server.wait_active_node()
    return hvac.Client(url=node.addr, token=server.root_token(), verify=str(server.ca_file))


def write_inventory(names: list[str], server: LocalVault) -> Path:
    inv = STATE / "inventory"
    inv.mkdir(parents=True, exist_ok=True)
    groups: dict[str, Any] = {f"workers_{env.replace('-', '_')}": {"hosts": {}} for env in ENVS}
    for i, name in enumerate(names):
        groups[f"workers_{env_of(i).replace('-', '_')}"]["hosts"][name] = {
            **ssh_host_vars(SSH_PORT + i),
            "captcha_worker_env": env_of(i),
            "captcha_worker_port": WORKER_PORT + i,
        }
    data = {
        "all": {
            "hosts": {
                "localhost": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                }
            },
            "children": {"workers": {"children": groups}},
            "vars": {
                "captcha_kit_envs": list(ENVS),
                "vault_provision_known_envs": list(ENVS),
                "captcha_kit_vault_addr": server.addr,
                "captcha_kit_vault_addrs": server.addrs,
                "captcha_kit_vault_cacert": str(server.ca_file),
                "captcha_kit_kv_mount": "secret",
                "captcha_kit_key_path_prefix": "captchaai",
                "captcha_kit_staged_path_prefix": "captchaai-staged",
                "captcha_kit_approle_mount": "approle",
                "captcha_kit_refresh_interval": REFRESH_INTERVAL,
                "captcha_kit_refresh_jitter": 0.1,
                "captcha_kit_provider_url": f"http://127.0.0.1:{EMULATOR_PORT}",
                "vault_provision_audit_file_path": str(server.audit_log),
                "captcha_worker_ip_address_allow": ["localhost"],
                "captcha_worker_provider_settings": {
                    "poll_interval": 0.5,
                    "first_poll_delay": {"default": 0.3},
                },
            },
        }
    }
    path = inv / "hosts.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


CPU: dict[str, list[tuple[float, float]]] = {}  # playbook -> [(controller, whole machine) CPU s]


def _cpu() -> tuple[float, float]:
    """CPU seconds so far: of this process's children (ansible-playbook, its forks and ssh:
    the controller side), and of the whole machine (controller and every host)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # all but idle, iowait
    return children.ru_utime + children.ru_stime, busy / os.sysconf("SC_CLK_TCK")


def playbook(
    name: str, inventory: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, float, dict[str, Any]]:
    """Run a playbook with the json callback: (rc, wall seconds, the callback's document)."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    run_env |= {
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory)]
    cmd += [str(REPO / "playbooks" / name), *args]
    started = time.monotonic()
    cpu_before = _cpu()
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    controller, machine = (after - before for after, before in zip(_cpu(), cpu_before, strict=True))
    CPU[name] = [*CPU.get(name, []), (round(controller, 1), round(machine, 1))]
    doc: dict[str, Any] = {}
    if "{" in proc.stdout:
        try:
            doc = json.loads(proc.stdout[proc.stdout.index("{") :])
        except ValueError:
            doc = {}
    if proc.returncode != 0:
        (STATE / f"failed-{name}.log").write_text(proc.stdout + proc.stderr)
    return proc.returncode, seconds, doc


def changed(doc: dict[str, Any]) -> int:
    return sum(int(s.get("changed", 0)) for s in doc.get("stats", {}).values())


def stage_key(server: LocalVault, env: str, key: str) -> None:
    """Stage ``key`` as a stager does: with a token of ``captcha-stager-<env>`` only."""
    token = token_with(server, [f"captcha-stager-{env}"])
    client = hvac.Client(
        url=server.wait_active_node().addr, token=token, verify=str(server.ca_file)
    )
    path = f"captchaai-staged/{env}"
    try:
        meta = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")
        cas = int(meta["data"]["current_version"])
    except hvac.exceptions.InvalidPath:
        cas = 0
    client.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"api_key": key}, cas=cas, mount_point="secret"
    )


def rotator_files(client: hvac.Client, env: str) -> list[str]:
    """The rotator credentials of ``env`` in a directory of their own (rotations run at once)."""
    directory = STATE / f"rotator-{env}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return rotator_credentials(directory, client, env)


def rotate(
    inventory: Path, env: str, creds: list[str], *extra: str, log_name: str = ""
) -> tuple[int, dict[str, Any]]:
    """An unattended rotation; its output, with each task's start time (profile_tasks), in
    ``.state/fleet/<log_name>`` (``rotation-<env>.log`` by default)."""
    status_file = STATE / f"rotation-{env}.json"
    status_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tools.rotate_unattended", "--env", env, "-i", str(inventory)]
    cmd += ["--status-file", str(status_file), *creds, *extra]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    run_env["ANSIBLE_CONFIG"] = str(REPO / "ansible.cfg")
    run_env["ANSIBLE_CALLBACKS_ENABLED"] = "ansible.posix.profile_tasks"
    log = STATE / (log_name or f"rotation-{env}.log")
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, env=run_env, stdout=fh, stderr=fh, check=False)
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    return rc.returncode, status


class LeaderKiller(threading.Thread):
    """Watches the key's current version; once it passes ``version``, SIGKILLs the active node,
    then polls the other nodes (every 0.1 s) until one of them is active: the election."""

    def __init__(self, server: LocalVault, client: hvac.Client, env: str, version: int):
        super().__init__(daemon=True)
        self.server, self.client, self.env, self.version = server, client, env, version
        self.killed: str | None = None
        self.killed_after_put_s: float | None = None
        self.new_active_after_put_s: float | None = None
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                meta = self.client.secrets.kv.v2.read_secret_metadata(
                    path=f"captchaai/{self.env}", mount_point="secret"
                )["data"]
            except Exception:  # a node away: look again
                time.sleep(0.05)
                continue
            if int(meta["current_version"]) > self.version:
                seen = time.time()
                node = self.server.active_node()
                pid = node.pid() if node else None
                if node is not None and pid:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = node.node_id
                    created = meta["versions"][str(meta["current_version"])]["created_time"]
                    put_at = _ts(created)
                    self.killed_after_put_s = round(seen - put_at, 2)
                    self._wait_election(node.node_id, put_at)
                return
            time.sleep(0.05)

    def _wait_election(self, killed: str, put_at: float) -> None:
        others = [n for n in self.server.nodes if n.node_id != killed]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(n.health_code() == 200 for n in others):
                self.new_active_after_put_s = round(time.time() - put_at, 2)
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()


def _ts(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 time as Vault and the callback print it (any
    number of fraction digits, Z or an offset)."""
    from datetime import datetime

    m = re.match(r"^([0-9-]+T[0-9:]+)(?:\.([0-9]+))?(Z|[+-][0-9:]+)?$", text.strip())
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    base, fraction, zone = m.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    stamp = datetime.fromisoformat(f"{base}.{(fraction or '0')[:6].ljust(6, '0')}{zone}")
    return stamp.timestamp()


def worker_rss_kib(name: str) -> int:
    script = "ps -o rss= -p $(systemctl show --property=MainPID --value captcha-solver)"
    out = subprocess.run(
        ["podman", "exec", name, "sh", "-c", script],
        env=podman_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    return int(out.stdout.strip() or 0)


def nudge_timeline(name: str, since: float, version: int) -> dict[str, float | None]:
    """From the host's journal (epoch seconds): when systemd began the reload (the rotation's
    nudge), the worker's first failed key read after it, and when it loaded ``version``."""
    out = subprocess.run(
        [
            "podman",
            "exec",
            name,
            "journalctl",
            "-u",
            "captcha-solver",
            "-o",
            "json",
            "--no-pager",
            "--since",
            f"@{int(since) - 1}",
        ],
        env=podman_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    seen: dict[str, float | None] = {"reload": None, "failed_read": None, "loaded": None}
    for line in out.stdout.splitlines():
        try:
            entry = json.loads(line)
            when = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
            text = str(entry.get("MESSAGE", ""))
        except (ValueError, KeyError, TypeError):
            continue
        if when < since:
            continue
        if text.startswith("Reloading") and seen["reload"] is None:
            seen["reload"] = when
            continue
        if not text.startswith("{") or seen["reload"] is None:
            continue
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if record.get("msg") == "key refresh failed" and seen["failed_read"] is None:
            seen["failed_read"] = when
        if record.get("msg") == "key loaded" and record.get("key_version") == version:
            seen["loaded"] = seen["loaded"] or when
    return seen


def nudge_figures(server: LocalVault, env: str, version: int, names: list[str]) -> dict[str, Any]:
    """Put -> the nudge reaching the env's hosts (first / last), put -> the last of them loading
    ``version``, the longest nudge -> loaded on one host, and how many hosts saw a failed read
    after the nudge (the election), from the hosts' journals."""
    meta = active_client(server).secrets.kv.v2.read_secret_metadata(
        path=f"captchaai/{env}", mount_point="secret"
    )["data"]
    put_at = _ts(meta["versions"][str(version)]["created_time"])
    rows = [nudge_timeline(n, put_at, version) for i, n in enumerate(names) if env_of(i) == env]
    reloads = [r["reload"] - put_at for r in rows if r["reload"] is not None]
    loaded = [r["loaded"] - put_at for r in rows if r["loaded"] is not None]
    spans = [r["loaded"] - r["reload"] for r in rows if r["loaded"] and r["reload"]]
    return {
        "put_to_nudge_first_s": round(min(reloads), 2) if reloads else None,
        "put_to_nudge_last_s": round(max(reloads), 2) if reloads else None,
        "put_to_loaded_last_s": round(max(loaded), 2) if loaded else None,
        "nudge_to_loaded_max_s": round(max(spans), 2) if spans else None,
        "hosts_with_failed_read": sum(1 for r in rows if r["failed_read"] is not None),
        "hosts_timed": len(rows),
    }


def worker_requests(server: LocalVault, since: float) -> int:
    """Audit-log requests made with worker AppRole tokens (or their logins) since ``since``."""
    count = 0
    if not server.audit_log.exists():
        return 0
    for entry in audit_requests(server.audit_log):
        if _ts(entry.get("time", "1970-01-01T00:00:00Z")) < since:
            continue
        auth = entry.get("auth") or {}
        role = (auth.get("metadata") or {}).get("role_name", "")
        path = (entry.get("request") or {}).get("path", "")
        if str(role).startswith("captcha-worker-") or path.startswith("auth/approle/login"):
            count += 1
    return count


def per_task_cost(inventory: Path, host: str) -> dict[str, float]:
    """Seconds per trivial task: SSH as deploy with become vs podman exec as root."""
    pb = STATE / "ten-tasks.yml"
    kinds: list[dict[str, Any]] = [
        {"ansible.builtin.command": "true"},
        {"ansible.builtin.copy": {"content": "x\n", "dest": "/root/ten-tasks", "mode": "0600"}},
        {"ansible.builtin.stat": {"path": "/etc/hostname"}},
    ]
    tasks = [{"name": f"Task {i}", **kinds[i % 3]} for i in range(10)]
    play = {"name": "Ten tasks", "hosts": host, "gather_facts": False, "tasks": tasks}
    pb.write_text(yaml.safe_dump([play]))
    out = {}
    for label, extra in (
        ("ssh", []),
        (
            "podman",
            [
                "-e",
                f"ansible_connection=containers.podman.podman ansible_host={host}"
                " ansible_user=root ansible_become=false",
            ],
        ),
    ):
        cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(pb)]
        env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), **podman_env()}
        subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, check=False)  # warm
        started = time.monotonic()
        rc = subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, check=False)
        out[label] = (time.monotonic() - started) / 10 if rc.returncode == 0 else float("nan")
    return out


# --------------------------------------------------------------------------- the run


def up(n: int, results: Path | None) -> int:
    # Every run starts from nothing: a Vault left by an earlier run would hold keys the new
    # emulator does not know (provisioning writes first keys only where none exist).
    down()
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True, exist_ok=True)
    names = host_names(n)
    fig: dict[str, Any] = {"hosts": n, "envs": list(ENVS), "cpus": os.cpu_count()}

    say("Build the host image (a no-op when current)")
    build(Recipe.load())

    say("Start a 3-node raft OpenBao and the CaptchaAI emulator")
    server = vault()
    server.start()
    start_emulator()
    client = hvac.Client(url=server.addr, token=server.root_token(), verify=str(server.ca_file))
    inventory = write_inventory(names, server)

    # Each playbook runs with the smallest token its docs name (docs/tokens.md), as in the tests:
    # provisioning with the provisioner's, the deploys with the deployers' of both envs (their
    # policies are written by provisioning); the rotations log in with the rotator's AppRole.
    def env_for(name: str) -> dict[str, str]:
        return server.env() | {"VAULT_TOKEN": str(playbook_token(server, name, inventory, None))}

    say("Provision fleet-a and fleet-b")
    keys = {env: secrets.token_hex(16) for env in ENVS}
    for key in keys.values():
        emulator_admin().add_key(key, balance=1000.0)
    with secret_vars_file(STATE, "first-keys.json", {"vault_provision_first_keys": keys}) as fk:
        rc, fig["provision_s"], _ = playbook(
            "provision-vault.yml", inventory, "-e", f"@{fk}", env=env_for("provision-vault.yml")
        )
    if rc:
        raise SystemExit("fleet: provisioning failed; see .state/fleet/failed-*.log")

    say(f"Start {n} hosts (systemd, sshd on 127.0.0.1, the deploy user)")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            pool.submit(start_host, name, ssh_port=SSH_PORT + i, labels=dict([LABEL.split("=")]))
            for i, name in enumerate(names)
        ]
        for future in futures:
            future.result()
    fig["hosts_start_s"] = round(time.monotonic() - started, 1)

    deploy_env = env_for("deploy-workers.yml")
    say(f"Deploy to 1 host, then to all {n}, then again (idempotence)")
    rc, t1, _ = playbook(
        "deploy-workers.yml", inventory, "--limit", f"{names[0]},localhost", env=deploy_env
    )
    if rc:
        raise SystemExit("fleet: deploy to one host failed; see .state/fleet/failed-*.log")
    rc, tn, docn = playbook("deploy-workers.yml", inventory, env=deploy_env)
    if rc:
        raise SystemExit("fleet: deploy to the fleet failed; see .state/fleet/failed-*.log")
    rc, tr, docr = playbook("deploy-workers.yml", inventory, env=deploy_env)
    deploys = CPU["deploy-workers.yml"]
    fig["deploy_cpu_s"] = {
        label: {"controller": c, "machine": m}
        for label, (c, m) in zip(("one_host", "all_hosts", "rerun"), deploys[:3], strict=True)
    }
    fig |= {
        "deploy_1_s": round(t1, 1),
        "deploy_n_s": round(tn, 1),
        "deploy_ratio": round(tn / t1, 2),
        "deploy_rerun_s": round(tr, 1),
        "deploy_rerun_changed": changed(docr),
        "deploy_n_changed": changed(docn),
    }

    (STATE / "figures.json").write_text(json.dumps(fig, indent=2) + "\n")  # so far
    say("Per-task cost: SSH as deploy with become vs podman exec as root")
    fig["per_task_s"] = {k: round(v, 2) for k, v in per_task_cost(inventory, names[0]).items()}

    urls = [f"http://127.0.0.1:{WORKER_PORT + i}" for i in range(n)]
    load = LoadGenerator(urls, clients=2 * n, duration=3600, pause=0.2, timeout=60, retry_for=30)
    load_started = time.time()
    load.start()
    time.sleep(5)

    say(f"Rolling redeploy with a config change (batches of {BATCH}) under load")
    before = load.snapshot()
    change = {
        "captcha_kit_deploy_batch": BATCH,
        "captcha_worker_provider_settings": {
            "poll_interval": 0.6,
            "first_poll_delay": {"default": 0.3},
        },
    }
    with secret_vars_file(STATE, "redeploy.json", change) as cv:
        rc, tre, docre = playbook("deploy-workers.yml", inventory, "-e", f"@{cv}", env=deploy_env)
    after = load.snapshot()
    batches = [
        round(_ts(p["play"]["duration"]["end"]) - _ts(p["play"]["duration"]["start"]), 1)
        for p in docre.get("plays", [])
    ]
    fig["redeploy"] = {
        "rc": rc,
        "wall_s": round(tre, 1),
        "batch_s": batches,
        "attempted": after["attempted"] - before["attempted"],
        "failed": after["failed"] - before["failed"],
    }

    (STATE / "figures.json").write_text(json.dumps(fig, indent=2) + "\n")  # so far
    say("Rotate both envs at once, unattended; kill the raft leader right after the first put")
    new_keys = {env: secrets.token_hex(16) for env in ENVS}
    creds: dict[str, list[str]] = {}
    current = {}
    for env in ENVS:
        emulator_admin().add_key(new_keys[env], balance=1000.0)
        stage_key(server, env, new_keys[env])
        creds[env] = rotator_files(client, env)
        meta = client.secrets.kv.v2.read_secret_metadata(
            path=f"captchaai/{env}", mount_point="secret"
        )
        current[env] = int(meta["data"]["current_version"])
    killer = LeaderKiller(server, client, ENVS[0], current[ENVS[0]])
    killer.start()
    before = load.snapshot()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(ENVS)) as pool:
        runs = {
            e: r
            for e, r in zip(
                ENVS, pool.map(lambda e: rotate(inventory, e, creds[e]), ENVS), strict=True
            )
        }
    killer.stop()
    after = load.snapshot()
    per_env = {}
    for env, (rc, status) in runs.items():
        conv = status.get("worker_convergence_seconds") or {}
        per_env[env] = {
            "rc": rc,
            "outcome": status.get("outcome"),
            "put_to_last_worker_s": max(conv.values()) if conv else None,
            "workers_converged": len(conv),
            "put_to_converged_s": status.get("put_to_converged_seconds"),
            "put_to_prompt_s": status.get("put_to_prompt_seconds"),
            **nudge_figures(server, env, current[env] + 1, names),
        }
    fig["rotation"] = {
        "per_env": per_env,
        "rc": sorted({v["rc"] for v in per_env.values()}),
        "outcome": sorted({str(v["outcome"]) for v in per_env.values()}),
        "leader_killed": killer.killed,
        "killed_after_put_s": killer.killed_after_put_s,
        "new_active_after_put_s": killer.new_active_after_put_s,
        "put_to_last_worker_s": max((v["put_to_last_worker_s"] or 0) for v in per_env.values()),
        "workers_converged": sum(v["workers_converged"] for v in per_env.values()),
        "put_to_prompt_s": max((v["put_to_prompt_s"] or 0) for v in per_env.values()),
        "attempted": after["attempted"] - before["attempted"],
        "failed": after["failed"] - before["failed"],
    }
    (STATE / "figures.json").write_text(json.dumps(fig, indent=2) + "\n")  # so far
    say("Restart the killed node; revoke the old keys at the emulator; confirm")
    server.start()
    client = active_client(server)  # the node the client used may be a standby now
    finals = []
    for env in ENVS:
        emulator_admin().revoke_key(keys[env])
        rotation_id = str(runs[env][1].get("rotation_id"))  # a confirmation names its rotation
        rc2, status2 = rotate(
            inventory,
            env,
            rotator_files(client, env),
            "--confirm-revoked",
            rotation_id,
            log_name=f"rotation-{env}-confirm.log",
        )
        finals.append((rc2, status2.get("outcome")))
    fig["rotation"]["confirm_rc"] = sorted({rc for rc, _ in finals})
    fig["rotation"]["final_outcome"] = sorted({str(o) for _, o in finals})

    summary = load.summary()
    hours = (time.time() - load_started) / 3600
    fig["load"] = {k: summary[k] for k in ("attempted", "ok", "failed", "retries")}
    fig["load"]["latency_s"] = summary["latency_s"]
    fig["load"]["first_failures"] = summary["first_failures"][:5]
    rss = [worker_rss_kib(name) for name in names]
    fig["worker_rss_mib"] = {
        "min": round(min(rss) / 1024, 1),
        "max": round(max(rss) / 1024, 1),
        "mean": round(sum(rss) / len(rss) / 1024, 1),
    }
    requests = worker_requests(server, load_started)
    fig["vault_requests_per_worker_hour_observed"] = round(requests / n / hours, 1)
    fig["load_window_s"] = round(hours * 3600)

    print(json.dumps(fig, indent=2))
    (STATE / "figures.json").write_text(json.dumps(fig, indent=2) + "\n")
    if results is not None:
        write_results(results, fig)
    print("\nfleet: up; `make fleet-down` removes it")
    return 0


def write_results(path: Path, fig: dict[str, Any]) -> None:
    r, d, ld, rss = fig["rotation"], fig["redeploy"], fig["load"], fig["worker_rss_mib"]
    n = fig["hosts"]
    rows = [
        ("what", "figure", "goal"),
        ("---", "---", "---"),
        ("provision 2 envs (3-node cluster)", f"{fig['provision_s']:.1f} s", ""),
        (f"start {n} hosts (boot + sshd)", f"{fig['hosts_start_s']} s", ""),
        (
            f"deploy: 1 host / {n} hosts",
            f"{fig['deploy_1_s']} s / {fig['deploy_n_s']} s (ratio {fig['deploy_ratio']})",
            "ratio ≤ 3",
        ),
        (
            f"deploy rerun, {n} hosts",
            f"{fig['deploy_rerun_s']} s, changed={fig['deploy_rerun_changed']}",
            "changed=0",
        ),
        (
            f"CPU of the deploy: controller / whole machine, 1 host; {n} hosts; rerun",
            "; ".join(
                f"{c['controller']} / {c['machine']} s" for c in fig["deploy_cpu_s"].values()
            ),
            "",
        ),
        (
            "one trivial task: SSH + become / podman exec (root)",
            f"{fig['per_task_s']['ssh']} s / {fig['per_task_s']['podman']} s",
            "",
        ),
        (
            f"rolling redeploy with a config change (batches of {BATCH})",
            f"{d['wall_s']} s, batches {d['batch_s']} s; exit {d['rc']}",
            "",
        ),
        (
            "solves during the redeploy: attempted / failed",
            f"{d['attempted']} / {d['failed']}",
            "0 failed",
        ),
        (
            "rotation of both envs at once: raft leader killed after the first put",
            f"{r['leader_killed']}, {r['killed_after_put_s']} s after the put",
            "",
        ),
        (
            "rotation: put → a new active node (the election, polled every 0.1 s)",
            f"{r.get('new_active_after_put_s')} s",
            "",
        ),
        (
            "rotation: put → the nudge (systemd `Reloading`) on the first / last host, per env",
            ", ".join(
                f"{e} {v.get('put_to_nudge_first_s')} / {v.get('put_to_nudge_last_s')} s"
                for e, v in r["per_env"].items()
            ),
            "",
        ),
        (
            "rotation: longest nudge → new version loaded on one host; hosts that saw a failed"
            " read after the nudge",
            ", ".join(
                f"{e} {v.get('nudge_to_loaded_max_s')} s, {v.get('hosts_with_failed_read')} of"
                f" {v.get('hosts_timed')}"
                for e, v in r["per_env"].items()
            ),
            "",
        ),
        (
            "rotation: put → the last host loaded the new version, from the journals (Vault's"
            " clock), per env",
            ", ".join(f"{e} {v.get('put_to_loaded_last_s')} s" for e, v in r["per_env"].items()),
            "",
        ),
        (
            f"rotation: put → last of {r['workers_converged']} workers on the new version",
            f"{r['put_to_last_worker_s']} s (per env: "
            + ", ".join(f"{e} {v['put_to_last_worker_s']} s" for e, v in r["per_env"].items())
            + ")",
            "≤ 5 s",
        ),
        (
            "rotation: put → revocation prompt",
            f"{r['put_to_prompt_s']} s (per env: "
            + ", ".join(f"{e} {v['put_to_prompt_s']} s" for e, v in r["per_env"].items())
            + f"); outcome {r['outcome']}, exit {r['rc']}",
            "≤ 15 s",
        ),
        (
            "solves during the rotation: attempted / failed",
            f"{r['attempted']} / {r['failed']}",
            "0 failed",
        ),
        (
            "confirming runs after the old keys' revocation",
            f"exit {r['confirm_rc']}, {r['final_outcome']}",
            "complete",
        ),
        (
            "whole load: attempted / ok / failed / retried",
            f"{ld['attempted']} / {ld['ok']} / {ld['failed']} / {ld['retries']}",
            "",
        ),
        (
            "worker RSS per host (min / mean / max)",
            f"{rss['min']} / {rss['mean']} / {rss['max']} MiB",
            "",
        ),
        (
            f"Vault requests per worker-hour, observed over {fig['load_window_s']} s",
            f"{fig['vault_requests_per_worker_hour_observed']}",
            "",
        ),
    ]
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    text = f"""# Fleet benchmark: {fig["hosts"]} hosts over SSH against a 3-node raft OpenBao

Recorded by `make fleet` (`python -m bench.fleet_hosts up --write-results {path.name}`) on one
machine with {fig["cpus"]} CPUs: {fig["hosts"]} systemd hosts of the kit's image (podman, host
network), reached over SSH as `deploy` with become (pipelining, ControlPersist, `forks = 25`),
split over {", ".join(fig["envs"])}; a 3-node raft OpenBao (TLS, file audit); the CaptchaAI
emulator (0.3 s per solve). Refresh interval {REFRESH_INTERVAL} s (the default). The solve load:
{2 * fig["hosts"]} clients over all workers, each waiting 0.2 s between solves and retrying a
503 or refused solve on the same worker for up to 30 s (as a scraper does).

{table}

The observed Vault requests include what the run itself causes (the restart of every worker by
the redeploy: a login and a read each; the rotation's nudge: a read each); docs/scale.md derives
the steady state at the default refresh from the worker's schedule.
"""
    path.write_text(text)
    print(f"fleet: wrote {path}")


def down() -> int:
    names = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}"],
        env=podman_env(),
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for name in names:
        remove_host(name)
    pid_file = STATE / "emulator.pid"
    if pid_file.exists():
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        pid_file.unlink()
    vault().stop()
    print(f"fleet: removed {len(names)} hosts, stopped the emulator and the Vault cluster")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_hosts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the fleet and measure")
    p_up.add_argument("--hosts", type=int, default=20)
    p_up.add_argument("--write-results", type=Path, default=None)
    sub.add_parser("down", help="remove everything `up` started")
    p_report = sub.add_parser("report", help="write the results file again from the last run")
    p_report.add_argument("--write-results", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "report":
        write_results(args.write_results, json.loads((STATE / "figures.json").read_text()))
        return 0
    os.environ.setdefault("CONTAINERS_CONF", podman_env()["CONTAINERS_CONF"])
    if args.command == "up":
        if args.hosts < 2:
            parser.error("--hosts must be at least 2 (two envs)")
        return up(args.hosts, args.write_results)
    return down()


if __name__ == "__main__":
    sys.exit(main())
