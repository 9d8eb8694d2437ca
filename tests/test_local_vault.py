"""testkit.vault: a real OpenBao node that starts idempotently, survives its caller,
recovers from kill -9 and seal, and keeps its secrets in 0600 files."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import hvac
import pytest
import requests

from testkit.creds import new_key
from testkit.net import free_port
from testkit.paths import REPO, TEST_VAULT_DIR, TEST_VAULT_PORT
from testkit.vault import LocalVault, LocalVaultError, ensure_tls

# The destructive checks (kill -9, seal, stop) use a private instance so that other test sessions
# sharing the test server on 18250 are not disturbed.
PRIVATE_PORT = 18290
PRIVATE_DIR = REPO / ".state" / "test" / "vault-lifecycle"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testkit.vault", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def private():
    """A private server, fresh, started through the CLI (whose process then exits)."""
    state = PRIVATE_DIR
    LocalVault(state, PRIVATE_PORT).stop()  # a leftover of an interrupted session
    shutil.rmtree(state, ignore_errors=True)
    result = _cli("start", "--state-dir", str(state), "--port", str(PRIVATE_PORT))
    assert result.returncode == 0, result.stderr
    server = LocalVault(state, PRIVATE_PORT)
    yield server
    server.stop()
    shutil.rmtree(state, ignore_errors=True)


def _client(server: LocalVault) -> hvac.Client:
    return hvac.Client(url=server.addr, token=server.root_token(), verify=str(server.ca_file))


def test_second_start_of_the_test_server_is_a_no_op(vault):
    """start() on a running, unsealed server changes nothing and keeps the same process."""
    pid = vault.status()["pid"]
    again = LocalVault(TEST_VAULT_DIR, TEST_VAULT_PORT)
    assert again.start() == "running"
    assert again.status()["pid"] == pid
    assert _client(again).sys.read_health_status(method="GET")["sealed"] is False


def test_secret_files_are_private(vault):
    """Root token, unseal keys and private keys are 0600; the state dir is 0700."""
    assert stat.S_IMODE(vault.state_dir.stat().st_mode) == 0o700
    for name in ("root-token", "unseal-keys.json", "ca.key", "server.key", "audit.log"):
        mode = stat.S_IMODE((vault.state_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"


def test_tls_is_verified_with_the_kit_ca(vault):
    """The server certificate verifies with ca.pem (IP and localhost) and not with system CAs."""
    session = requests.Session()
    session.trust_env = False
    response = session.get(f"{vault.addr}/v1/sys/health", verify=str(vault.ca_file), timeout=5)
    assert response.status_code == 200
    response = session.get(
        f"https://localhost:{TEST_VAULT_PORT}/v1/sys/health", verify=str(vault.ca_file), timeout=5
    )
    assert response.status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        session.get(f"{vault.addr}/v1/sys/health", verify=True, timeout=5)


def test_server_config_is_real_not_dev_mode(vault):
    """Raft storage with fast timing, TLS listener and a declared file audit device."""
    config = (vault.state_dir / "bao.hcl").read_text()
    assert 'storage "raft"' in config
    assert "performance_multiplier = 1" in config
    assert "tls_cert_file" in config
    assert 'audit "file" "file"' in config
    cmdline = Path(f"/proc/{vault.status()['pid']}/cmdline").read_bytes().decode()
    assert "-dev" not in cmdline
    devices = _client(vault).sys.list_enabled_audit_devices()["data"]
    assert devices["file/"]["options"]["file_path"] == str(vault.audit_log)


def test_env_prints_exports_without_the_token(vault):
    """`env` prints VAULT_ADDR / VAULT_CACERT and the token only as $(cat file)."""
    result = _cli("env", "--state-dir", str(TEST_VAULT_DIR), "--port", str(TEST_VAULT_PORT))
    assert result.returncode == 0
    assert f'export VAULT_ADDR="{vault.addr}"' in result.stdout
    assert f'export VAULT_CACERT="{vault.ca_file}"' in result.stdout
    assert f'export VAULT_TOKEN="$(cat {vault.token_file})"' in result.stdout
    assert vault.root_token() not in result.stdout + result.stderr


def test_server_survives_the_cli_that_started_it(private):
    """The CLI process has exited; the server runs on in its own process group."""
    status = private.status()
    assert status["running"]
    assert status["sealed"] is False
    assert os.getpgid(status["pid"]) == status["pid"]
    assert os.getpgid(status["pid"]) != os.getpgid(0)


def test_kill_9_then_start_restarts_and_unseals_with_data_kept(private):
    """After kill -9, start() restarts the server, unseals it from the stored keys, data intact."""
    client = _client(private)
    if "kv/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
    value = new_key()
    _write_when_ready(client, value)
    old_pid = private.status()["pid"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while private.status()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not private.status()["running"]

    assert private.start() == "started"
    status = private.status()
    assert status["running"]
    assert status["sealed"] is False
    assert status["pid"] != old_pid
    read = _client(private).secrets.kv.v2.read_secret_version(
        "probe", mount_point="kv", raise_on_deleted_version=True
    )
    assert read["data"]["data"]["v"] == value


def test_a_starting_server_is_never_taken_for_dead(tmp_path):
    """The `bao` entry point execs the binary; while it does, the kernel shows an empty
    cmdline. pid() must still name the process then, or start() reports a live server as
    "exited during start-up" (seen in CI after a kill -9)."""
    server = LocalVault(tmp_path / "vault", free_port())
    server.state_dir.mkdir()
    ensure_tls(server.state_dir)
    node = server.nodes[0]
    for _ in range(5):
        pid = node.spawn()
        try:
            deadline = time.monotonic() + 30
            execed = False  # until the binary itself runs (not the Python entry point)
            while not execed and time.monotonic() < deadline:
                stat_line = Path(f"/proc/{pid}/stat").read_text()
                alive = stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
                assert node.pid() == pid or not alive, f"pid() lost a live server {node.log_tail()}"
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                program = os.path.basename(argv[0])
                execed = not alive or (program != b"" and b"python" not in program)
            node.wait_answering()
        finally:
            node.stop()


def test_sealed_server_is_unsealed_by_start(private):
    """A sealed server is unsealed by start() without a restart."""
    pid = private.status()["pid"]
    _client(private).sys.seal()
    assert private.status()["sealed"] is True
    assert private.start() == "unsealed"
    assert private.status()["sealed"] is False
    assert private.status()["pid"] == pid


def test_stop_then_start(private):
    """stop() ends the process and frees the port; start() brings it back unsealed."""
    pid = private.status()["pid"]
    assert private.stop() is True
    assert not private.status()["running"]
    assert not os.path.exists(f"/proc/{pid}/cmdline") or private.nodes[0].pid() is None
    assert private.stop() is False
    assert private.start() == "started"
    assert private.status()["sealed"] is False


# --------------------------------------------------------------------------- HA cluster
HA_DIR = REPO / ".state" / "test" / "vault-ha"
HA_PORT = 18260  # nodes on 18260, 18270, 18280 (docs/interfaces.md)


@pytest.fixture(scope="module")
def cluster():
    """A fresh 3-node raft cluster on the test HA ports, stopped afterwards."""
    server = LocalVault(HA_DIR, HA_PORT, nodes=3)
    server.stop()
    shutil.rmtree(HA_DIR, ignore_errors=True)
    assert server.start() == "initialised"
    yield server
    server.stop()
    shutil.rmtree(HA_DIR, ignore_errors=True)


def _active_client(server: LocalVault, timeout: float = 30) -> hvac.Client:
    node = server.wait_active_node(timeout)
    return hvac.Client(url=node.addr, token=server.root_token(), verify=str(server.ca_file))


def test_cluster_has_one_active_node_and_three_voters(cluster):
    """Three unsealed nodes, exactly one active, all raft voters, the audit device on each."""
    status = cluster.status()
    assert [n["sealed"] for n in status["nodes"]] == [False, False, False]
    assert sum(n["active"] for n in status["nodes"]) == 1
    client = _active_client(cluster)
    servers = client.sys.read_raft_config()["data"]["config"]["servers"]
    assert sorted(s["node_id"] for s in servers) == ["node1", "node2", "node3"]
    assert all(s["voter"] for s in servers)
    for node in cluster.nodes:
        assert 'audit "file" "file"' in node.config_file.read_text()
    assert cluster.start() == "running"


def test_leader_killed_another_takes_over_and_start_rejoins_it(cluster):
    """kill -9 of the active node: a standby becomes active with the data; start() brings the
    dead node back as an unsealed standby."""
    client = _active_client(cluster)
    if "kv/" not in client.sys.list_mounted_secrets_engines()["data"]:
        client.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
    value = new_key()
    _write_when_ready(client, value)
    leader = cluster.active_node()
    assert leader is not None
    os.kill(leader.pid(), signal.SIGKILL)
    deadline = time.monotonic() + 60
    new_leader = None
    while time.monotonic() < deadline:
        new_leader = cluster.active_node()
        if new_leader is not None and new_leader is not leader:
            break
        time.sleep(0.2)
    assert new_leader is not None
    assert new_leader is not leader
    read = _active_client(cluster).secrets.kv.v2.read_secret_version(
        "probe", mount_point="kv", raise_on_deleted_version=True
    )
    assert read["data"]["data"]["v"] == value
    assert cluster.start() == "started"
    status = cluster.status()
    assert all(n["running"] for n in status["nodes"])
    assert [n["sealed"] for n in status["nodes"]] == [False, False, False]


def _write_when_ready(client: hvac.Client, value: str, timeout: float = 30) -> None:
    """Write the probe; a fresh KV v2 mount answers 'upgrading' for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.secrets.kv.v2.create_or_update_secret(
                "probe", secret={"v": value}, mount_point="kv"
            )
            return
        except hvac.exceptions.VaultError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_a_leftover_server_of_another_checkout_is_stopped_under_the_port_lock(
    tmp_path, monkeypatch
):
    """A test OpenBao that another checkout left running (its run was killed) holds a fixed
    test port. Holding the machine's test-port lock, no other test run can be using it: start()
    stops it (naming it) and starts this checkout's own. Without the lock it refuses, naming
    the process on the port."""
    port = free_port()
    other = LocalVault(tmp_path / "other-checkout" / ".state" / "vault", port)
    mine = LocalVault(tmp_path / "this-checkout" / ".state" / "vault", port)
    other.start()
    try:
        monkeypatch.delenv("CAPTCHA_KIT_PORTS_HELD", raising=False)
        with pytest.raises(LocalVaultError, match="bao server -config="):
            mine.start()
        assert other.status()["running"]
        monkeypatch.setenv("CAPTCHA_KIT_PORTS_HELD", "a test run")
        assert mine.start() == "initialised"
        assert not other.status()["running"]
        assert _client(mine).sys.read_health_status(method="GET")["sealed"] is False
    finally:
        mine.stop()
        other.stop()
