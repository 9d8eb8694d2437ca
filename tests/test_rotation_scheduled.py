"""Scheduled rotation: tools/rotate-unattended with the rotator AppRole from files, exit codes."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from testkit.creds import assert_no_secrets, new_key, write_private
from testkit.net import free_port
from testkit.rotation import WRAPPER, RotEnv, run_wrapper, write_inventory


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    Hook.received = []
    server = HTTPServer(("127.0.0.1", free_port()), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", Hook.received
    server.shutdown()


def wrapper(rot_env: RotEnv, inventory, *args: str) -> tuple[int, str]:
    return run_wrapper(rot_env, "--env", rot_env.name, "-i", str(inventory), *args)


def test_scheduled_rotation_exit_codes_and_webhook(rot_env: RotEnv, start_workers, webhook):
    """75 awaiting revocation (+ webhook notice), 0 after confirmation, 0 with nothing staged."""
    url, received = webhook
    workers = start_workers(2)
    inv = write_inventory(rot_env, workers)
    hook_file = write_private(rot_env.tmp / "webhook-url", url + "\n")
    key = rot_env.next_key()
    rot_env.stage(key)

    rc, out = wrapper(rot_env, inv, "--webhook-url-file", str(hook_file))

    assert rc == 75, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("key-rotation: awaiting_revocation exit=75")
    assert url not in out, "the webhook URL must never be logged"
    assert len(received) == 1
    assert "AWAITING REVOCATION" in received[0]["text"]
    assert received[0]["content"]
    assert_no_secrets(json.dumps(received), rot_env.secrets)
    assert rot_env.record()["actor"] == f"approle (captcha-rotator-{rot_env.name})"

    rc, out = wrapper(rot_env, inv)
    assert rc == 75, "still awaiting: a scheduled rerun without confirmation reports it again"

    rot_env.emulator.admin.revoke_key(rot_env.old_key)
    rid = rot_env.record()["rotation_id"]
    rc, out = wrapper(rot_env, inv, "--confirm-revoked")  # passes the env name: names no rotation
    assert rc == 1, out[-3000:]
    assert f"pass --confirm-revoked {rid}" in out  # the wrapper's own flag
    assert rot_env.record()["rotation_state"] == "awaiting_revocation"
    # The confirmation that names the rotation: --confirm-revoked <rotation id>.
    rc, out = wrapper(rot_env, inv, "--confirm-revoked", rid)
    assert rc == 0, out[-3000:]
    assert "key-rotation: complete exit=0" in out
    assert rot_env.record()["rotation_state"] == "complete"

    rc, out = wrapper(rot_env, inv)
    assert rc == 0, out[-3000:]
    assert "key-rotation: noop exit=0" in out
    assert "no staged key at" in out


def test_scheduled_failures_map_to_distinct_codes(rot_env: RotEnv, start_workers):
    """1 = refused before any change; 3 = failed mid-rotation (worker did not converge)."""
    (worker,) = start_workers(1)
    bad = new_key()[:20]
    rot_env.secrets.append(bad)
    rot_env.stage(bad)
    inv = write_inventory(rot_env, [worker], {"key_rotation_window_margin": 1})
    rc, out = wrapper(rot_env, inv)
    assert rc == 1, out[-3000:]
    assert "is malformed" in out

    rot_env.admin.secrets.kv.v2.delete_metadata_and_all_versions(
        rot_env.staged_path, mount_point="secret"
    )
    worker.stop()
    worker.settings["vault"]["refresh_interval"] = 3600.0
    worker.start()
    key = rot_env.next_key()
    rot_env.stage(key)
    rc, out = wrapper(rot_env, inv)
    assert rc == 3, out[-3000:]
    assert "state=propagating" in out
    assert worker.name in out


def test_the_login_moves_past_a_dead_node_and_a_refused_one_is_named(rot_env: RotEnv):
    """The rotator's AppRole login tries every node address: with the first one dead (a node
    down, or restarted and not serving yet) a scheduled run logs in on the next one and gets
    through (nothing staged: noop). A refused secret-id stops the run before any change with
    Vault's reason and what to do, never the credential."""
    dead = f"https://127.0.0.1:{free_port()}"
    inv = write_inventory(
        rot_env,
        [],
        {"key_rotation_vault_addr": dead, "key_rotation_vault_addrs": [rot_env.vault.addr]},
    )
    rc, out = wrapper(rot_env, inv)
    assert rc == 0, out[-3000:]
    assert "key-rotation: noop exit=0" in out

    role_id, _ = rot_env.approle_files(f"captcha-rotator-{rot_env.name}")
    wrong = new_key()
    rot_env.secrets.append(wrong)
    bad = write_private(rot_env.tmp / "wrong-secret-id", wrong + "\n")
    rc, out = run_wrapper(
        rot_env, "--env", rot_env.name, "-i", str(write_inventory(rot_env)), creds=(role_id, bad)
    )
    assert rc == 1, out[-3000:]
    assert f"AppRole login at {rot_env.vault.addr}/v1/auth/approle/login refused (" in out
    assert "invalid role or secret ID" in out
    assert "An expired or used-up secret-id needs a new one" in out
    assert "nothing changed" in out


def test_wrapper_usage_error(rot_env: RotEnv):
    """Half the AppRole credentials is a usage error (64) before anything runs."""
    proc = subprocess.run(
        [str(WRAPPER), "--env", rot_env.name, "--role-id-file", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 64
    assert "go together" in proc.stderr
