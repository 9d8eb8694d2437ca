"""Leak scan: the whole demo flow at ansible -vvv, then every place a secret could end up.

The demo (``python -m tools.demo up``) runs on a throw-away copy of ``inventories/local`` with the
test ports: the shared test OpenBao (https://127.0.0.1:18250), the emulator on 18380/18381 and two
worker containers of its own. While it runs, and after it, the test learns the secret values
without printing them: every version of every key and staged key (read with the root token, also
while the demo runs, because the rotation destroys the old version), the workers' secret-ids
(their 0600 files, read as root in the containers), the rotator's secret-id and the wrapped
secret-ids while they briefly exist, and the root token. Then it scans:

* the demo's own output (all ansible-playbook runs at -vvv, the rotation wrapper, the summary);
* each worker's journal (``journalctl -o verbose``) and the worker processes' argv and environ;
* every file on each worker host (``grep -r`` over / without /proc, /sys, /dev);
* the Vault audit log (values are HMAC'd there; a raw value must not be);
* the repository working tree (without .venv and .git) and the git history (``git log -p --all``).

Exact values are searched everywhere; token-shaped strings (``s.`` / ``hvs.`` + 24 characters)
too, so Vault tokens the test cannot know (the workers' and the rotator's login tokens) are
caught as well. A hit is reported with its location and a masked value only. The only places a
secret may be are the ones the design puts it: a worker's own 0600 secret-id file and the test
Vault's 0600 root-token file (both checked for their mode).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import stat
import string
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hvac
import pytest
import yaml

from testkit.creds import new_key
from testkit.hosts import CONTAINERS_CONF, DEFAULT_SSH_KEY, Recipe, build
from testkit.paths import BIN, REPO
from testkit.vault import LocalVault
from testkit.vault_ops import admin_client

# Ports of its own (docs/interfaces.md), so the scan runs beside the molecule scenarios.
WORKER_PORTS = (18481, 18482)
SSH_PORTS = (18491, 18492)
EMULATOR_PORT = 18380
LEAK_VAULT_PORT = 18286  # docs/interfaces.md
LEAK_VAULT_DIR = REPO / ".state" / "test" / "vault-leak"
LOAD_SECONDS = 20
TOKEN_RE = re.compile(rb"(?<![A-Za-z0-9_.])(?:hvs|s)\.[A-Za-z0-9]{24}(?![A-Za-z0-9])")
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
SECRET_ID_FILE = "/var/lib/captcha-solver/secret-id"  # noqa: S105 - a path
WRAPPED_FILE = "/var/lib/captcha-solver/secret-id.wrapped"


def mask(value: str) -> str:
    return f"***{value[-4:]}" if len(value) > 8 else "***"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def podman(*args: str, stdin: bytes | None = None, timeout: float = 300) -> bytes:
    proc = subprocess.run(
        ["podman", *args],
        env=PODMAN_ENV,
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return proc.stdout


def in_container(name: str, script: str, stdin: bytes | None = None) -> bytes:
    return podman("exec", "-i", name, "sh", "-c", script, stdin=stdin)


# --------------------------------------------------------------------------- what to look for


@dataclass
class Secrets:
    """Secret values learnt during the run, by kind; never printed."""

    values: dict[str, str] = field(default_factory=dict, repr=False)  # value -> kind
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, value: object) -> None:
        text = str(value or "").strip()
        if len(text) >= 16:
            with self.lock:
                self.values.setdefault(text, kind)

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind in self.values.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def learn_vault(client: hvac.Client, kv: dict, found: Secrets) -> None:
    """Every readable version of every key and staged key of the inventory's envs."""
    mount = kv["captcha_kit_kv_mount"]
    for env in kv["captcha_kit_envs"]:
        for prefix, kind in (
            (kv["captcha_kit_key_path_prefix"], "api key"),
            (kv["captcha_kit_staged_path_prefix"], "staged api key"),
        ):
            path = f"{prefix}/{env}"
            try:
                meta = client.secrets.kv.v2.read_secret_metadata(path, mount_point=mount)["data"]
            except hvac.exceptions.InvalidPath:
                continue
            for version, info in meta["versions"].items():
                if info.get("destroyed") or info.get("deletion_time"):
                    continue
                try:
                    data = client.secrets.kv.v2.read_secret_version(
                        path, version=int(version), mount_point=mount, raise_on_deleted_version=True
                    )["data"]["data"]
                except hvac.exceptions.InvalidPath:
                    continue
                found.add(kind, data.get("api_key"))
                for backup in data.get("backup_keys") or []:
                    found.add(kind, backup)


UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class HostFiles:
    """Reads a file of a running host container through ``/proc/<its init>/root``: what
    ``podman exec ... cat`` shows, without starting a podman process per read (the watcher
    reads each host twice a second for minutes). The init's mount namespace is checked on
    every read, so a host that was recreated is looked up again."""

    def __init__(self) -> None:
        self._roots: dict[str, tuple[int, str]] = {}

    def _root(self, name: str) -> Path | None:
        known = self._roots.get(name)
        if known is not None:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{known[0]}/ns/mnt") == known[1]:
                    return Path(f"/proc/{known[0]}/root")
        pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).strip() or 0)
        if pid <= 0:
            return None
        self._roots[name] = (pid, os.readlink(f"/proc/{pid}/ns/mnt"))
        return Path(f"/proc/{pid}/root")

    def read(self, name: str, path: str) -> bytes:
        """The file's bytes; empty when the host is not running or has no such file."""
        root = self._root(name)
        if root is None:
            return b""
        try:
            return (root / path.lstrip("/")).read_bytes()
        except FileNotFoundError:
            return b""


def learn_hosts(hosts: Iterable[str], found: Secrets, files: HostFiles) -> None:
    """The secret-id (a UUID) and, while it exists, the wrapping token of each worker host."""
    for name in hosts:
        out = files.read(name, SECRET_ID_FILE) + b"\n" + files.read(name, WRAPPED_FILE)
        for line in out.decode(errors="replace").split():
            if UUID_RE.match(line):
                found.add("worker secret-id", line)
            elif TOKEN_RE.fullmatch(line.encode()):
                found.add("wrapping token", line)


class Watcher(threading.Thread):
    """Learns secrets while the demo runs (some exist only for seconds)."""

    def __init__(self, client: hvac.Client, kv: dict, hosts: list[str], demo_dir: Path):
        super().__init__(daemon=True)
        self.client, self.kv, self.hosts, self.demo_dir = client, kv, hosts, demo_dir
        self.found = Secrets()
        self.files = HostFiles()
        self.stop = threading.Event()
        self.errors = 0
        self.argv: set[bytes] = set()  # controller command lines seen while the demo ran
        # this run's processes only (other sessions share the machine)
        self.marks = [b"tools.demo", b"leak-worker-", b"testkit.loadgen", b"rotate_unattended"]
        self.marks += [str(demo_dir).encode(), *(f":{p}".encode() for p in WORKER_PORTS)]

    def sample_argv(self) -> None:
        """Command lines of the controller's processes (ansible-playbook, the rotation wrapper,
        the load generator, podman exec ...): a secret must never be passed as an argument."""
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = (proc / "cmdline").read_bytes()
                    if any(mark in cmdline for mark in self.marks):
                        self.argv.add(cmdline)

    def learn_once(self) -> None:
        learn_vault(self.client, self.kv, self.found)
        with contextlib.suppress(OSError):
            self.found.add("rotator secret-id", (self.demo_dir / "rotator-secret-id").read_text())
        try:
            for value in re.findall(
                r"[0-9a-f]{32}", (self.demo_dir / "first-keys.json").read_text()
            ):
                self.found.add("api key", value)
        except OSError:
            pass
        learn_hosts(self.hosts, self.found, self.files)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample_argv()
                self.learn_once()
            except Exception:  # keep watching; counted and reported
                self.errors += 1
            self.stop.wait(0.5)


# --------------------------------------------------------------------------- where to look


@dataclass
class Hit:
    source: str
    location: str
    kind: str
    masked: str


@dataclass
class Scan:
    secrets: dict[str, str] = field(repr=False)
    allowed: set[tuple[str, str]] = field(default_factory=set, repr=False)  # (location, value)
    bytes_by_source: dict[str, int] = field(default_factory=dict)
    items_by_source: dict[str, int] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    allowed_seen: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        needles = sorted(self.secrets, key=len, reverse=True)
        self.pattern = re.compile(b"|".join(re.escape(n.encode()) for n in needles))

    def scan(self, source: str, location: str, data: bytes) -> None:
        self.bytes_by_source[source] = self.bytes_by_source.get(source, 0) + len(data)
        self.items_by_source[source] = self.items_by_source.get(source, 0) + 1
        seen: set[str] = set()
        for match in self.pattern.finditer(data):
            seen.add(match.group().decode())
        for match in TOKEN_RE.finditer(data):
            seen.add(match.group().decode())
        for value in sorted(seen):
            hit = Hit(source, location, self.secrets.get(value, "token-shaped"), mask(value))
            if (location, value) in self.allowed:
                self.allowed_seen.append(hit)
            else:
                self.hits.append(hit)


def repo_files() -> Iterator[Path]:
    skip = {REPO / ".venv", REPO / ".git", LEAK_VAULT_DIR / "audit.log"}  # scanned on its own
    for root, dirs, files in os.walk(REPO):
        here = Path(root)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in files:
            path = here / name
            if path not in skip and path.is_file() and not path.is_symlink():
                yield path


def scan_host(scan: Scan, name: str) -> None:
    """Files (grep inside the container, fed the values on stdin), journal, process argv/env."""
    needles = b"\n".join(v.encode() for v in scan.secrets) + b"\n"
    prune = r"\( -path /proc -o -path /sys -o -path /dev \) -prune -o"
    sizes = in_container(name, f"find / {prune} -type f -printf '%s\\n'").split()
    scan.bytes_by_source["host files"] = scan.bytes_by_source.get("host files", 0) + sum(
        int(s) for s in sizes
    )
    scan.items_by_source["host files"] = scan.items_by_source.get("host files", 0) + len(sizes)
    grep = "grep -r -a -l -D skip --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev"
    listed = in_container(name, f"{grep} -F -f - / 2>/dev/null", stdin=needles)
    token_ere = r"(^|[^A-Za-z0-9_.])(hvs|s)\.[A-Za-z0-9]{24}([^A-Za-z0-9]|$)"  # noqa: S105
    tokens = in_container(name, f"{grep} -E '{token_ere}' / 2>/dev/null")
    for path in sorted(set(listed.decode().split()) | set(tokens.decode().split())):
        scan.scan("host files with a match", f"{name}:{path}", in_container(name, f"cat '{path}'"))
    journal = in_container(name, "journalctl --no-pager -o verbose")
    scan.scan("worker journal", f"{name}:journal", journal)
    pids = in_container(
        name, "pgrep -u captcha-solver; systemctl show -p MainPID --value captcha-solver"
    ).split()
    for pid in sorted({p.decode() for p in pids if p != b"0"}):
        for what, source in (("cmdline", "worker argv"), ("environ", "worker environ")):
            data = in_container(name, f"cat /proc/{pid}/{what}")
            scan.scan(source, f"{name}:/proc/{pid}/{what}", data)


# --------------------------------------------------------------------------- the inventory


def leak_inventory(dest: Path, vault_addr: str, ca_file: Path, audit_log: Path) -> list[str]:
    """A copy of inventories/local on the test ports with worker hosts of its own."""
    shutil.copytree(REPO / "inventories" / "local", dest)
    main = dest / "group_vars" / "all" / "main.yml"
    kv = yaml.safe_load(main.read_text())
    kv |= {
        "captcha_kit_vault_addr": vault_addr,
        "captcha_kit_vault_cacert": str(ca_file),
        "captcha_kit_provider_url": f"http://127.0.0.1:{EMULATOR_PORT}",
        "vault_provision_audit_file_path": str(audit_log),
    }
    main.write_text("---\n" + yaml.safe_dump(kv, sort_keys=False))
    hosts_file = dest / "hosts.yml"
    hosts = yaml.safe_load(hosts_file.read_text())
    names: list[str] = []

    def rename(group: dict) -> None:
        if group.get("hosts"):
            renamed = {}
            for old in group["hosts"]:
                old_vars = yaml.safe_load((dest / "host_vars" / f"{old}.yml").read_text())
                env = old_vars["captcha_worker_env"]
                same_env = sum(n.startswith(f"leak-worker-{env}-") for n in names)
                new = f"leak-worker-{env}-{same_env + 1}"
                old_vars["captcha_worker_port"] = WORKER_PORTS[len(names)]
                old_vars["ansible_port"] = SSH_PORTS[len(names)]
                old_vars["ansible_ssh_private_key_file"] = str(DEFAULT_SSH_KEY)
                (dest / "host_vars" / f"{old}.yml").unlink()
                (dest / "host_vars" / f"{new}.yml").write_text(
                    "---\n" + yaml.safe_dump(old_vars, sort_keys=False)
                )
                renamed[new] = None
                names.append(new)
            group["hosts"] = renamed
        for child in (group.get("children") or {}).values():
            rename(child)

    rename(hosts["all"]["children"]["workers"])
    hosts_file.write_text("---\n" + yaml.safe_dump(hosts, sort_keys=False))
    return names


def demo(*args: str, timeout: float) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in PODMAN_ENV.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_NOCOLOR"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "tools.demo", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- the test


def test_scanner_finds_planted_values_and_reports_them_masked():
    """The scanner itself: an exact value and an unknown token-shaped string are both found,
    reported with their location and masked; an allowed location is kept apart."""
    key = new_key()
    token = "s." + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))
    scan = Scan({key: "api key"})
    scan.allowed.add(("vault/root-token", token))
    scan.scan("demo", "demo stdout", f"x {key} y\n{token}\n".encode())
    scan.scan("demo", "vault/root-token", token.encode())
    scan.scan("demo", "clean", b"nothing " * 100)
    assert [(h.location, h.kind, h.masked) for h in scan.hits] == [
        ("demo stdout", "api key", mask(key)),  # sorted by value: hex before "s."
        ("demo stdout", "token-shaped", mask(token)),
    ]
    assert [h.location for h in scan.allowed_seen] == ["vault/root-token"]
    assert scan.bytes_by_source["demo"] > 800
    assert key not in repr(scan)
    assert token not in repr(scan)


@pytest.fixture(scope="module")
def leak_vault() -> Iterator[LocalVault]:
    """An OpenBao of the scan's own. Vault policy names are global, not per mount: on the shared
    test server the demo would rewrite the policies of the molecule scenarios' dev and prod
    workers (which run at the same time in another lane), and its rotation's census would see
    their hosts."""
    server = LocalVault(LEAK_VAULT_DIR, LEAK_VAULT_PORT)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.containers
def test_demo_flow_leaks_no_secret(leak_vault, tmp_path):
    """Run the demo at -vvv; no API key, secret-id, wrapping token or Vault token may be found
    anywhere but a worker's own 0600 secret-id file and the test Vault's 0600 root-token file."""
    for port in (*WORKER_PORTS, *SSH_PORTS, EMULATOR_PORT, EMULATOR_PORT + 1):
        assert _port_free(port), f"port {port} is taken: another leak scan running?"
    build(Recipe.load())
    vault = leak_vault
    vault_client = admin_client(vault)
    inventory = tmp_path / "inventory"
    hosts = leak_inventory(inventory, vault.addr, vault.ca_file, vault.audit_log)
    kv = yaml.safe_load((inventory / "group_vars" / "all" / "main.yml").read_text())
    # tools/demo.py keeps its files per inventory: <state>/demo-<inventory dir name>
    demo_dir = Path(vault.ca_file).resolve().parent.parent / f"demo-{inventory.name}"
    audit_start = vault.audit_log.stat().st_size

    watcher = Watcher(vault_client, kv, hosts, demo_dir)
    watcher.marks.append(str(inventory).encode())
    watcher.start()
    try:
        run = demo(
            "up",
            "--inventory",
            str(inventory),
            "--ansible-verbosity",
            "3",
            "--load-seconds",
            str(LOAD_SECONDS),
            timeout=1500,
        )
        watcher.stop.set()
        watcher.join(30)
        watcher.learn_once()  # the final state: new key, secret-ids on the hosts
        found = watcher.found
        found.add("root token", vault.root_token())
        tail = run.stdout[-4000:] + run.stderr[-2000:]

        assert found.values, "no secret learnt"
        scan = Scan(dict(found.values))
        for name in hosts:
            scan.allowed |= {
                (f"{name}:{SECRET_ID_FILE}", v)
                for v, k in found.values.items()
                if k == "worker secret-id"
            }
            mode = in_container(name, f"stat -c '%a %U' {SECRET_ID_FILE}").decode().strip()
            assert mode == "600 captcha-solver", (name, mode)
        root_token_file = Path(vault.ca_file).resolve().parent / "root-token"
        assert stat.S_IMODE(root_token_file.stat().st_mode) == 0o600
        root_loc = str(root_token_file.relative_to(REPO))
        scan.allowed.add((root_loc, vault.root_token()))

        for cmdline in sorted(watcher.argv):
            scan.scan("controller argv (sampled)", "controller /proc/*/cmdline", cmdline)
        scan.scan("demo output (ansible -vvv)", "demo stdout", run.stdout)
        scan.scan("demo output (ansible -vvv)", "demo stderr", run.stderr)
        for name in hosts:
            scan_host(scan, name)
        audit = vault.audit_log.read_bytes()
        scan.scan("Vault audit log", str(vault.audit_log.relative_to(REPO)), audit)
        audit_run_bytes = len(audit) - audit_start
        # positive control: the workers' reads of the new dev key are in the log, as HMACs
        current = vault_client.secrets.kv.v2.read_secret_version(
            f"{kv['captcha_kit_key_path_prefix']}/dev",
            mount_point=kv["captcha_kit_kv_mount"],
            raise_on_deleted_version=True,
        )["data"]["data"]["api_key"]
        devices = vault_client.sys.list_enabled_audit_devices()["data"]
        device = next(
            path.rstrip("/")
            for path, dev in devices.items()
            if Path(dev["options"].get("file_path", "")).resolve() == vault.audit_log.resolve()
        )
        hmac = vault_client.adapter.post(f"/v1/sys/audit-hash/{device}", json={"input": current})
        audit_hmac_seen = hmac["data"]["hash"].encode() in audit[audit_start:]
        del audit
        for path in repo_files():
            rel = str(path.relative_to(REPO))
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if rel.startswith(".state/") and path.name in ("root-token", "unseal-keys.json"):
                # other Vault servers' own 0600 credential files (not ours): check the mode only
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, rel
                if rel != root_loc:
                    scan.bytes_by_source["repo working tree"] = scan.bytes_by_source.get(
                        "repo working tree", 0
                    ) + len(data)
                    continue
            scan.scan("repo working tree", rel, data)
        history = subprocess.run(
            ["git", "log", "-p", "--all", "--no-color", "--no-ext-diff"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=300,
        ).stdout
        scan.scan("git history (log -p --all)", "git log -p --all", history)
    finally:
        watcher.stop.set()
        down = demo("down", "--inventory", str(inventory), timeout=300)
        for name in hosts:
            podman("rm", "--force", "--time", "0", name)

    print("\nleak scan coverage (counts only):")
    for source in sorted(scan.bytes_by_source):
        print(
            f"  {source}: {scan.items_by_source.get(source, 0)} items, "
            f"{scan.bytes_by_source[source]} bytes"
        )
    print(f"  audit log written during the run: {audit_run_bytes} bytes")
    print(f"  HMAC of the new dev key in the run's audit log: {audit_hmac_seen}")
    print(f"  secret values searched: {len(found.values)} {found.kinds()} + token pattern")
    print(f"  allowed locations holding their secret: {len(scan.allowed_seen)}")
    print(f"  watcher errors: {watcher.errors}")
    for hit in scan.hits:
        print(f"  LEAK {hit.kind} {hit.masked} in {hit.source}: {hit.location}")

    assert run.returncode == 0, f"demo up failed (exit {run.returncode}):\n{_masked(tail, found)}"
    assert down.returncode == 0
    kinds = found.kinds()
    # at least each env's key (the rotated-away dev key is destroyed by the finalize, so whether
    # it is learnt depends on the watcher's timing; the new one is also proved by the HMAC below)
    assert kinds.get("api key", 0) >= len(kv["captcha_kit_envs"]), kinds
    assert kinds.get("worker secret-id", 0) >= 2, kinds
    assert scan.bytes_by_source["worker journal"] > 0
    assert b"ESTABLISH" in run.stdout, "ansible did not run at -vvv"
    assert any(b"ansible-playbook" in c for c in watcher.argv)
    assert audit_run_bytes > 0
    assert audit_hmac_seen, "the HMAC of the new dev key is not in the audit log of the run"
    assert len(scan.allowed_seen) >= len(hosts) + 1  # the secret-id files and the root token
    assert not scan.hits, [f"{h.kind} {h.masked} in {h.location}" for h in scan.hits]


def _masked(text: bytes, found: Secrets) -> str:
    out = text.decode(errors="replace")
    for value in found.values:
        out = out.replace(value, mask(value))
    return TOKEN_RE.sub(lambda m: mask(m.group().decode()).encode(), out.encode()).decode()
