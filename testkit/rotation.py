"""Fixtures and helpers of the key rotation suites (tests/test_rotation_*.py).

Everything is real and on 127.0.0.1: the test OpenBao (``.state/test/vault``, port 18250)
provisioned once per session by the kit's own ``playbooks/provision-vault.yml`` for a few
rotation-only environments named per session (``r<4 hex>-<n>``, so neither other suites nor a
concurrent session of this one are touched; each test resets the env it takes), the CaptchaAI
emulator, and workers that are real ``captcha-solver serve`` processes on the controller, each
logged in with its env's worker AppRole. Emulator and workers listen on free 127.0.0.1 ports.
The workers are inventory hosts with a local connection, so the role polls their /healthz "from
the worker host".

Keys are generated at run time and reach ansible-playbook only through 0600 extra-vars files;
every playbook run is checked for leaked keys and tokens.

The rotation takes a census of the env's worker secret-ids in Vault (the host named in each
one's metadata must be a worker of the env in the inventory): each worker of ``start_workers``
gets a secret-id of its own with the metadata ``host``/``env`` the kit's deploy writes, and the
reset of an env destroys every secret-id of its worker role. An inventory without workers sets
``key_rotation_allow_no_workers`` (an env that really has none) unless the test says otherwise.

Faults on the wire, for the rotation's bad-key suite: ``DroppingProxy`` (HTTPS in front of the
test Vault that drops the answer of one request Vault applied) and ``ProviderStandIn`` (a
getbalance for the controller that lets a test act between the plan's validation and the put).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import pty
import secrets
import select
import signal
import ssl
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import hvac
import pytest
import requests
import yaml

from testkit.creds import assert_no_secrets, new_key, write_private
from testkit.emulator import EmulatorProcess
from testkit.net import free_port
from testkit.paths import BIN, PROVISION, REPO, ROTATE
from testkit.playbook import (
    ansible_env,
    playbook_argv,
    process_host,
    provision_inventory,
    run_argv,
    run_playbook,
)
from testkit.playbook import (
    write_inventory as write_yaml_inventory,
)
from testkit.vault import LocalVault
from testkit.vault_ops import approle_files
from testkit.worker import WorkerProc, worker_config

# Several sessions (a developer, CI, a molecule run with workers on 18451+) may share this
# machine and the test OpenBao: each session has its own env names and free loopback ports.
SESSION = secrets.token_hex(2)
WRAPPER = REPO / "tools" / "rotate-unattended"
# The settings provisioning keeps on each env's staged key path (roles/vault_provision defaults):
# the reset of an env puts them back, as a provisioned env has them.
_PROVISION_DEFAULTS = yaml.safe_load(
    (REPO / "roles" / "vault_provision" / "defaults" / "main.yml").read_text()
)
STAGED_PATH_SETTINGS = {
    "cas_required": _PROVISION_DEFAULTS["vault_provision_kv_cas_required"],
    "max_versions": _PROVISION_DEFAULTS["vault_provision_kv_max_versions"],
}
ENVS = [f"r{SESSION}-{i}" for i in range(1, 5)]
_ENV_POOL = itertools.cycle(ENVS)
REFRESH_INTERVAL = 2.0
REFRESH_JITTER = 0.1


# --------------------------------------------------------------------------- session parts


# ``vault`` and ``vault_client`` (the test OpenBao, a root client) come from testkit.fixtures.
@pytest.fixture(scope="session")
def admin(vault_client: hvac.Client) -> hvac.Client:
    return vault_client


@pytest.fixture(scope="session")
def provisioned(vault: LocalVault, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Run the kit's provision playbook once for the rotation env pool (real policies, roles)."""
    inventory = provision_inventory(
        vault,
        ENVS,
        tmp_path_factory.mktemp("provision-inventory"),
        {"vault_provision_audit_managed_externally": True},
    )
    run = run_playbook(PROVISION, vault=vault, inventory=inventory)
    assert run.rc == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return ENVS


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(free_port(), free_port(), solve_delay="fixed:0.2", ban_threshold=0) as emu:
        yield emu


# --------------------------------------------------------------------------- one environment


@dataclass
class RotEnv:
    """A freshly reset rotation environment with its first key in Vault and at the emulator."""

    name: str
    old_key: str
    admin: hvac.Client
    vault: LocalVault
    emulator: EmulatorProcess
    tmp: Path
    secrets: list[str] = field(default_factory=list)

    key_path = property(lambda self: f"captchaai/{self.name}")
    staged_path = property(lambda self: f"captchaai-staged/{self.name}")

    def metadata(self) -> dict[str, Any]:
        return self.admin.secrets.kv.v2.read_secret_metadata(self.key_path, mount_point="secret")[
            "data"
        ]

    def record(self) -> dict[str, str]:
        return dict(self.metadata().get("custom_metadata") or {})

    def current_version(self) -> int:
        return int(self.metadata()["current_version"])

    def read(self, version: int | None = None) -> dict[str, Any]:
        return self.admin.secrets.kv.v2.read_secret_version(
            self.key_path, version=version, mount_point="secret", raise_on_deleted_version=True
        )["data"]["data"]

    def current_key(self) -> str:
        return self.read()["api_key"]

    def stage(self, key: str) -> None:
        """Stage a key the way a stager does: with a token of the captcha-stager-<env> policy."""
        token = self.token(f"captcha-stager-{self.name}")
        stager = hvac.Client(url=self.vault.addr, token=token, verify=str(self.vault.ca_file))
        stager.secrets.kv.v2.create_or_update_secret(
            self.staged_path, {"api_key": key}, cas=0, mount_point="secret"
        )

    def next_key(self, *, at_provider: bool = True) -> str:
        """A key made now, kept among the secrets no output may show, and (unless
        ``at_provider`` is false) known to the emulator as a valid key."""
        key = new_key()
        self.secrets.append(key)
        if at_provider:
            self.emulator.admin.add_key(key)
        return key

    def snapshot(self) -> dict[str, Any]:
        """What a refused run must leave as it was: versions, record, staged key, key hash."""
        meta = self.metadata()
        return {
            "current_version": meta["current_version"],
            "custom_metadata": meta.get("custom_metadata"),
            "versions": sorted(meta["versions"]),
            "staged": self.staged_exists(),
            "key_sha256": hashlib.sha256(self.current_key().encode()).hexdigest(),
        }

    def staged_exists(self) -> bool:
        """Whether a staged key can be read (a provisioned path without one has settings only)."""
        try:
            self.admin.secrets.kv.v2.read_secret_version(
                self.staged_path, mount_point="secret", raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return False
        return True

    def staged_settings(self) -> dict[str, Any]:
        """The staged path's check-and-set and version limit (those provisioning sets)."""
        try:
            meta = self.admin.secrets.kv.v2.read_secret_metadata(
                self.staged_path, mount_point="secret"
            )["data"]
        except hvac.exceptions.InvalidPath:
            return {}
        return {name: meta[name] for name in STAGED_PATH_SETTINGS}

    def token(self, *policies: str) -> str:
        tok = self.admin.auth.token.create(policies=list(policies), ttl="30m", no_parent=True)
        value = tok["auth"]["client_token"]
        self.secrets.append(value)
        return value

    def rotator_token(self) -> str:
        return self.token(f"captcha-rotator-{self.name}")

    def approle_files(self, role: str) -> tuple[Path, Path]:
        """role-id and a fresh secret-id of an AppRole, in 0600 files."""
        files = approle_files(self.admin, role, self.tmp / f"creds-{role}")
        self.secrets.append(files[1].read_text().strip())
        return files

    def worker_secret_id(self, host: str, env: str | None = None) -> tuple[str, str]:
        """A secret-id of the env's worker role issued the way the kit's deploy issues one (the
        metadata ``host`` and ``env``): ``(secret_id, accessor)``; the secret-id is kept among
        the secrets no output may show."""
        resp = self.admin.auth.approle.generate_secret_id(
            f"captcha-worker-{self.name}",
            metadata={"host": host, "env": env or self.name},
            mount_point="approle",
        )["data"]
        self.secrets.append(resp["secret_id"])
        return resp["secret_id"], resp["secret_id_accessor"]

    def bao(
        self, command: str, token: str, stdin: str = "", *, shell: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run an operator's shell command line (``bao`` of the venv first on PATH) against the
        test Vault with ``token`` in VAULT_TOKEN, as the docs and messages print it."""
        env = rotation_env(self, token) | {"PATH": f"{BIN}:/usr/bin:/bin"}
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            input=stdin,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def rot_env(
    provisioned: list[str],
    admin: hvac.Client,
    vault: LocalVault,
    emulator: EmulatorProcess,
    tmp_path: Path,
) -> RotEnv:
    name = next(_ENV_POOL)  # reused in turn: reset below, workers of earlier tests stopped
    for path in (f"captchaai/{name}", f"captchaai-staged/{name}"):
        with contextlib.suppress(hvac.exceptions.InvalidPath):
            admin.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point="secret")
    admin.secrets.kv.v2.update_metadata(
        f"captchaai-staged/{name}", mount_point="secret", **STAGED_PATH_SETTINGS
    )
    # The secret-ids of earlier tests' workers (their hosts are not in this test's inventory).
    role = f"captcha-worker-{name}"
    with contextlib.suppress(hvac.exceptions.InvalidPath):
        for accessor in admin.auth.approle.list_secret_id_accessors(role)["data"]["keys"]:
            admin.auth.approle.destroy_secret_id_accessor(role, accessor)
    old = new_key()
    admin.secrets.kv.v2.create_or_update_secret(
        f"captchaai/{name}", {"api_key": old}, cas=0, mount_point="secret"
    )
    emulator.admin.add_key(old, balance=10.0)
    return RotEnv(name, old, admin, vault, emulator, tmp_path, secrets=[old])


# --------------------------------------------------------------------------- workers


@pytest.fixture
def start_workers(rot_env: RotEnv) -> Iterator[Any]:
    """``start_workers(n)`` -> n running ``captcha-solver serve`` workers of the env."""
    started: list[WorkerProc] = []

    def factory(n: int) -> list[WorkerProc]:
        role_id_file, _ = rot_env.approle_files(f"captcha-worker-{rot_env.name}")
        workers = []
        for i in range(n):
            name = f"worker-{rot_env.name}-{i + 1}"
            secret_id, _ = rot_env.worker_secret_id(name)
            secret_id_file = write_private(rot_env.tmp / f"secret-id-{name}", secret_id + "\n")
            config = worker_config(
                env=rot_env.name,
                port=free_port(),
                vault_addrs=[rot_env.vault.addr],
                ca_file=rot_env.vault.ca_file,
                role_id_file=role_id_file,
                secret_id_file=secret_id_file,
                provider_url=rot_env.emulator.url,
                refresh_interval=REFRESH_INTERVAL,
                refresh_jitter=REFRESH_JITTER,
                settings={"logging": {"level": "WARNING"}},
            )
            worker = WorkerProc(name, rot_env.tmp / name, config)
            started.append(worker)
            worker.start(timeout=30)
            workers.append(worker)
        return workers

    yield factory
    for w in started:
        w.stop()


# --------------------------------------------------------------------------- playbook runs


def rotation_inventory(
    directory: Path,
    *,
    env: str,
    envs: list[str],
    vault: LocalVault,
    provider_url: str,
    workers: Sequence[WorkerProc | tuple[str, int]] = (),
    vault_addr: str | None = None,
    window_margin: float = 8,
    extra_vars: dict[str, Any] | None = None,
) -> Path:
    """An inventory for playbooks/rotate-key.yml: localhost plus each worker process as a host
    of ``workers`` with a local connection. The workers are processes, not systemd units: no
    nudge; they pick the key up on their refresh. Without workers the env is one that really
    has none (``key_rotation_allow_no_workers``; ``extra_vars`` may say otherwise)."""
    hosts = {}
    for w in workers:
        name, port = (w.name, w.port) if isinstance(w, WorkerProc) else w
        hosts[name] = process_host(env, port)
    return write_yaml_inventory(
        directory,
        {"workers": hosts},
        {
            "captcha_kit_envs": envs,
            "captcha_kit_vault_addr": vault_addr or vault.addr,
            "captcha_kit_vault_cacert": str(vault.ca_file),
            "captcha_kit_refresh_interval": REFRESH_INTERVAL,
            "captcha_kit_refresh_jitter": REFRESH_JITTER,
            "captcha_kit_provider_url": provider_url,
            "key_rotation_nudge": False,
            "key_rotation_window_margin": window_margin,
            "key_rotation_poll_delay": 1,
            **({"key_rotation_allow_no_workers": True} if not workers else {}),
            **(extra_vars or {}),
        },
    )


def rotation_vars(directory: Path, env: str, variables: dict[str, Any]) -> tuple[Path, Path]:
    """A 0600 extra-vars file for a rotation run of ``env`` and the path of its status file."""
    status = directory / f"status-{secrets.token_hex(3)}.json"
    data = {"key_rotation_env": env, "key_rotation_status_file": str(status)} | variables
    vars_file = write_private(directory / f"vars-{secrets.token_hex(3)}.json", json.dumps(data))
    return vars_file, status


def write_inventory(
    rot_env: RotEnv,
    workers: Sequence[WorkerProc | tuple[str, int]] = (),
    extra_vars: dict[str, Any] | None = None,
) -> Path:
    """The rotation inventory of a ``RotEnv`` (the env pool's names, the session emulator)."""
    return rotation_inventory(
        rot_env.tmp,
        env=rot_env.name,
        envs=ENVS,
        vault=rot_env.vault,
        provider_url=rot_env.emulator.url,
        workers=workers,
        extra_vars=extra_vars,
    )


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    status: dict[str, Any]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def rotation_argv(
    rot_env: RotEnv, inventory: Path, variables: dict[str, Any], check: bool
) -> tuple[list[str], Path]:
    vars_file, status_file = rotation_vars(rot_env.tmp, rot_env.name, variables)
    return playbook_argv(ROTATE, inventory, vars_file, ["--check", "--diff"] if check else []), (
        status_file
    )


def rotation_env(rot_env: RotEnv, token: str | None = None) -> dict[str, str]:
    """The environment of a rotation run: the test Vault's address and CA, ``token`` if any."""
    return ansible_env(rot_env.vault, token=token)


def run_rotation(
    rot_env: RotEnv,
    inventory: Path,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    check: bool = False,
    timeout: float = 300,
) -> Run:
    """Run playbooks/rotate-key.yml unattended-style (no TTY); check the output for secrets."""
    argv, status_file = rotation_argv(rot_env, inventory, variables or {}, check)
    proc = run_argv(argv, rotation_env(rot_env, token), timeout)
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    run = Run(proc.returncode, proc.stdout, proc.stderr, status)
    assert_no_secrets(run.output + json.dumps(status), rot_env.secrets)
    return run


def run_unattended(
    rot_env: RotEnv, inventory: Path, variables: dict[str, Any] | None = None, **kwargs: Any
) -> Run:
    """A scheduler's run: ``key_rotation_unattended`` with a rotator token of the env."""
    variables = {**(variables or {}), "key_rotation_unattended": True}
    return run_rotation(rot_env, inventory, variables, token=rot_env.rotator_token(), **kwargs)


def run_wrapper(
    rot_env: RotEnv, *args: str, creds: tuple[Path, Path] | None = None
) -> tuple[int, str]:
    """``tools/rotate-unattended *args`` as a scheduler runs it: with the env's rotator AppRole
    files (or ``creds``; no VAULT_TOKEN: they are the only credential), from the env's
    directory, no stdin. Returns the exit status and stdout + stderr, checked for secrets."""
    role_id, secret_id = creds or rot_env.approle_files(f"captcha-rotator-{rot_env.name}")
    proc = subprocess.run(
        [str(WRAPPER), *args, "--role-id-file", str(role_id), "--secret-id-file", str(secret_id)],
        cwd=rot_env.tmp,
        env=rotation_env(rot_env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert_no_secrets(out, rot_env.secrets)
    return proc.returncode, out


def _wait_reading(fd: int, deadline: float) -> None:
    """Wait until the program on the terminal reads its answer itself: Ansible's ``pause`` turns
    the terminal's echo off (it echoes a visible answer itself, a hidden one never), so a reply
    typed before that could be echoed by the terminal."""
    while time.monotonic() < deadline:
        if not termios.tcgetattr(fd)[3] & termios.ECHO:
            return
        time.sleep(0.05)


def run_in_terminal(
    argv: list[str],
    env: dict[str, str],
    answers: Sequence[tuple[str, str | Callable[[], str]]],
    *,
    cwd: Path,
    timeout: float = 240,
) -> tuple[int, str, list[str]]:
    """Run ``argv`` on a pseudo-terminal as an operator at a shell would; answer each (prompt
    text, reply) in turn (a callable reply is called when its prompt shows). Returns ``(exit
    code, output, prompts never shown)``; a run still going at ``timeout`` is killed."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal
        os.chdir(cwd)
        os.execve(argv[0], argv, env)  # noqa: S606 (fixed argv, no shell)
    out = b""
    seen = 0
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if pending and pending[0][0].encode() in out[seen:]:
                seen = out.index(pending[0][0].encode(), seen) + len(pending[0][0])
                reply = pending.pop(0)[1]
                _wait_reading(fd, deadline)
                os.write(fd, (reply() if callable(reply) else reply).encode() + b"\r")
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, wait_status = os.waitpid(pid, 0)
        os.close(fd)
    return (
        os.waitstatus_to_exitcode(wait_status),
        out.decode(errors="replace"),
        [p for p, _ in pending],
    )


# --------------------------------------------------------------------------- faults on the wire


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _LocalServer:
    """A loopback server on a free port, served by a thread from ``_serve`` to ``__exit__``."""

    _server: _Server | None = None

    def _serve(self, server: _Server) -> None:
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def _url(self, scheme: str) -> str:
        assert self._server is not None
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class DroppingProxy(_LocalServer):
    """HTTPS in front of the test Vault (its own server certificate, so the kit's CA verifies
    it) that forwards every request, except that it drops the answer of the first ``method``
    request to ``path``: Vault applies the request, the client sees the connection close without
    an answer (as when a load balancer or the network drops it). ``dropped`` counts them; point
    ``captcha_kit_vault_addr`` at ``addr``.
    """

    def __init__(self, vault: LocalVault, method: str, path: str) -> None:
        self.vault = vault
        self.method = method
        self.path = path
        self.dropped = 0
        self.forwarded: list[tuple[str, str, int]] = []

    @property
    def addr(self) -> str:
        return self._url("https")

    def __enter__(self) -> DroppingProxy:
        proxy = self
        upstream = requests.Session()

        class Handler(_QuietHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                answer = upstream.request(
                    self.command,
                    proxy.vault.addr + self.path,
                    data=body,
                    headers=headers,
                    timeout=30,
                    verify=str(proxy.vault.ca_file),  # per request: REQUESTS_CA_BUNDLE loses
                )
                path = self.path.split("?", 1)[0]
                proxy.forwarded.append((self.command, path, answer.status_code))
                if self.command == proxy.method and path == proxy.path and not proxy.dropped:
                    proxy.dropped += 1
                    self.close_connection = True  # applied by Vault; the answer never leaves
                    return
                content_type = answer.headers.get("Content-Type", "text/plain")
                self.reply(answer.status_code, content_type, answer.content)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_LIST = _forward

        server = _Server(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(
            self.vault.state_dir / "server.pem", self.vault.state_dir / "server.key"
        )
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._serve(server)
        return self


class ProviderStandIn(_LocalServer):
    """A provider for the controller's getbalance check only (``captcha_kit_provider_url``):
    it accepts every well-formed key and calls ``on_check()`` before it answers, so a test can
    act in the window between the plan's validation of a key and the put."""

    def __init__(self, on_check: Callable[[], None]) -> None:
        self.on_check = on_check
        self.checks = 0

    @property
    def url(self) -> str:
        return self._url("http")

    def __enter__(self) -> ProviderStandIn:
        stand_in = self

        class Handler(_QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                if form.get("action") == ["getbalance"]:
                    stand_in.checks += 1
                    stand_in.on_check()
                    body = json.dumps({"status": 1, "request": "10.00000"}).encode()
                else:
                    body = json.dumps({"status": 0, "request": "ERROR_EMPTY_ACTION"}).encode()
                self.reply(200, "application/json", body)

        self._serve(_Server(("127.0.0.1", 0), Handler))
        return self
