"""Unattended rotation of the staging key on three systemd workers under continuous solve load.

The load generator posts to every worker's /solve (127.0.0.1, host network) during the whole
rotation; the rotation runs the way a scheduler runs it (tools/rotate-unattended with the rotator
AppRole from 0600 files), stops at awaiting revocation, the old key is revoked at the emulator,
and a confirmation run finishes it. Keys are made at run time and never printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import hvac
import pytest
import testbed
from captcha_solver.cli import read_health
from conftest import Secret

ENV = "staging"
WRAPPER = testbed.REPO / "tools" / "rotate-unattended"
SOLVE = {"method": "userrecaptcha", "googlekey": "6Le-site-key", "pageurl": "https://a.test/"}


def _ports(inventory: dict) -> dict[str, int]:
    hostvars = inventory["_meta"]["hostvars"]
    return {
        name: int(hv["captcha_worker_port"])
        for name, hv in hostvars.items()
        if hv.get("captcha_worker_env") == ENV
    }


def _healthz(port: int) -> dict:
    return read_health(f"http://127.0.0.1:{port}")[1]


class Load:
    """Threads posting /solve to every worker until stopped; counts every failed solve."""

    def __init__(self, ports: list[int], per_worker: int = 3) -> None:
        self.ports = ports
        self.per_worker = per_worker
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failed: list[str] = []
        self.versions: set[int] = set()
        self.threads = [
            threading.Thread(target=self._run, args=(port,), daemon=True)
            for port in ports
            for _ in range(per_worker)
        ]

    def _run(self, port: int) -> None:
        body = json.dumps(SOLVE).encode()
        while not self.stop_flag.is_set():
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/solve",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 (loopback)
                    doc = json.loads(r.read())
                with self.lock:
                    self.ok += 1
                    self.versions.add(int(doc["key_version"]))
            except (urllib.error.URLError, OSError, ValueError) as exc:
                detail = exc.read().decode()[:200] if hasattr(exc, "read") else str(exc)[:200]
                with self.lock:
                    self.failed.append(f"{port}: {detail}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(90)


@pytest.fixture(scope="module")
def admin() -> hvac.Client:
    return testbed.vault_client()


@pytest.fixture(scope="module")
def rotator_files(admin: hvac.Client, tmp_path_factory: pytest.TempPathFactory):
    role = f"captcha-rotator-{ENV}"
    role_id = admin.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    d = tmp_path_factory.mktemp("rotator")
    files = []
    for name, value in (("role-id", role_id), ("secret-id", secret_id)):
        path = d / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
        files.append(path)
    return files, Secret(secret_id)


def _rotate(inventory_dir: Path, files: list[Path], *args: str) -> tuple[int, str, dict]:
    status_file = files[0].parent / "status.json"
    proc = subprocess.run(
        [
            str(WRAPPER),
            "--env",
            ENV,
            "-i",
            str(inventory_dir),
            "--role-id-file",
            str(files[0]),
            "--secret-id-file",
            str(files[1]),
            "--status-file",
            str(status_file),
            *args,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr, json.loads(status_file.read_text())


def _sighup_reads(port: int) -> float:
    """How many key reads the worker made because of a reload (SIGHUP), from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    prefix = 'captcha_solver_key_refreshes_total{reason="sighup",result="ok"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def _stage(admin: hvac.Client, key: Secret) -> None:
    tok = admin.auth.token.create(policies=[f"captcha-stager-{ENV}"], ttl="10m")["auth"]
    server = testbed.vault()
    stager = hvac.Client(url=server.addr, token=tok["client_token"], verify=str(server.ca_file))
    stager.secrets.kv.v2.create_or_update_secret(
        f"captchaai-staged/{ENV}", {"api_key": key.reveal()}, cas=0, mount_point="secret"
    )


def _stage_new_key(admin: hvac.Client) -> tuple[int, Secret, Secret]:
    """Stage a key made now (known to the emulator) for the next rotation of ENV; the current
    version, the current key and the staged one."""
    old_version, old_key_raw = testbed.current_key(ENV)
    new_key = Secret(os.urandom(16).hex())
    testbed.emulator_admin().add_key(new_key.reveal(), balance=100.0)
    _stage(admin, new_key)
    return old_version, Secret(old_key_raw), new_key


def test_unattended_rotation_under_load_with_confirmation(inventory, admin, rotator_files):
    """0 failed solves; all workers on the new version; old key revoked and destroyed; complete."""
    files, secret_id = rotator_files
    ports = _ports(inventory)
    assert len(ports) >= 3
    inventory_dir = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    old_version, old_key, new_key = _stage_new_key(admin)
    secrets_ = [old_key.reveal(), new_key.reveal(), secret_id.reveal()]
    nudged_before = {name: _sighup_reads(port) for name, port in ports.items()}

    with Load(list(ports.values())) as load:
        time.sleep(3)
        rc, out, first = _rotate(inventory_dir, files)
        for s in secrets_:
            assert s not in out
        assert rc == 75, out[-4000:]
        health = {name: _healthz(port) for name, port in ports.items()}
        assert {h["key_version"] for h in health.values()} == {old_version + 1}, health
        testbed.emulator_admin().revoke_key(old_key.reveal())
        rc, out, done = _rotate(inventory_dir, files, "--confirm-revoked", first["rotation_id"])
        for s in secrets_:
            assert s not in out
        assert rc == 0, out[-4000:]
        time.sleep(3)

    print("unattended run:", json.dumps(first, indent=1))
    print("confirmation run:", json.dumps(done, indent=1))
    print(f"solves during the rotation: {load.ok} ok, {len(load.failed)} failed")
    evidence = testbed.REPO / ".state" / "test" / "key-rotation-molecule.json"
    evidence.write_text(
        json.dumps(
            {
                "unattended": first,
                "confirm": done,
                "solves_ok": load.ok,
                "solves_failed": len(load.failed),
            },
            indent=1,
        )
    )
    assert first["outcome"] == "awaiting_revocation"
    assert set(first["worker_convergence_seconds"]) == set(ports)
    assert load.ok > 0
    assert load.failed == [], load.failed[:5]
    assert load.versions == {old_version, old_version + 1}
    meta = admin.secrets.kv.v2.read_secret_metadata(f"captchaai/{ENV}", mount_point="secret")
    record = meta["data"]["custom_metadata"]
    assert record["rotation_state"] == "complete"
    assert record["previous_version"] == str(old_version)
    assert record["new_version"] == str(old_version + 1)
    assert meta["data"]["versions"][str(old_version)]["destroyed"] is True
    counters = testbed.emulator_admin().counters(old_key.reveal())
    assert counters["revoked"] is True
    assert done["outcome"] == "complete"
    assert "old key rejected by the provider: True" in done["message"]
    for port in ports.values():
        assert _healthz(port)["key_version"] == old_version + 1
    # The nudge reached every worker: each read the key again on SIGHUP (systemctl reload).
    assert all(_sighup_reads(port) > nudged_before[name] for name, port in ports.items()), (
        nudged_before,
        {name: _sighup_reads(port) for name, port in ports.items()},
    )


def test_a_nudge_that_fails_is_named_and_the_workers_move_on_their_own_refresh(
    inventory, admin, rotator_files, tmp_path
):
    """A reload that cannot go through (here: a unit name no host has) is named per host, in the
    run's output and the summary's nudge_failed; the workers still move on their own refresh
    (30 s here) within the window, so the rotation still proves every one of them."""
    files, secret_id = rotator_files
    ports = _ports(inventory)
    inventory_dir = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    old_version, old_key, new_key = _stage_new_key(admin)
    secrets_ = [old_key.reveal(), new_key.reveal(), secret_id.reveal()]
    renamed = tmp_path / "renamed-unit.yml"
    renamed.write_text("key_rotation_worker_service: captcha-solver-renamed\n")
    nudged_before = {name: _sighup_reads(port) for name, port in ports.items()}

    rc, out, first = _rotate(inventory_dir, files, "--extra-vars-file", str(renamed))

    for s in secrets_:
        assert s not in out
    assert rc == 75, out[-4000:]
    assert first["outcome"] == "awaiting_revocation"
    assert set(first["nudge_failed"]) == set(ports), first["nudge_failed"]
    assert all(
        "captcha-solver-renamed.service not found" in e for e in first["nudge_failed"].values()
    )
    assert "The nudge (systemctl reload captcha-solver-renamed) failed on" in out
    assert set(first["worker_convergence_seconds"]) == set(ports)
    assert {_healthz(port)["key_version"] for port in ports.values()} == {old_version + 1}
    # No worker was nudged: each moved on its own refresh.
    assert {name: _sighup_reads(port) for name, port in ports.items()} == nudged_before

    testbed.emulator_admin().revoke_key(old_key.reveal())
    rc, out, done = _rotate(inventory_dir, files, "--confirm-revoked", first["rotation_id"])
    assert rc == 0, out[-4000:]
    assert done["outcome"] == "complete"
