"""Secret-id delivery on a deployed worker: rotation on request, and a replayed wrapping token.

These tests run the converge playbook again against one host (the dev worker), so they do not
take the per-host ``host`` fixture; they leave the worker healthy on a fresh secret-id.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest
import testbed
import testinfra
from hvac.exceptions import InvalidPath

SERVICE = "captcha-solver.service"
STATE_DIR = "/var/lib/captcha-solver"
ACCESSOR = f"{STATE_DIR}/secret-id.accessor"
WRAPPED = f"{STATE_DIR}/secret-id.wrapped"


def _converge(name: str, *extra: str) -> dict[str, Any]:
    """Run the scenario's converge on one host; returns the json callback's document."""
    scenario = os.environ["MOLECULE_SCENARIO_DIRECTORY"]
    res = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], "--limit", name,
         *extra, f"{scenario}/converge.yml"],
        env={**os.environ, "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"},
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    doc = json.loads(res.stdout[res.stdout.index("{") :])
    doc["rc"] = res.returncode
    return doc


def _failure_messages(doc: dict[str, Any], name: str) -> str:
    msgs = []
    for play in doc.get("plays", []):
        for task in play.get("tasks", []):
            result = task.get("hosts", {}).get(name, {})
            if result.get("failed"):
                msgs.append(str(result.get("msg", "")))
    return "\n".join(msgs)


@pytest.fixture(scope="module")
def dev(inventory: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Name and inventory vars of the dev worker."""
    hostvars = inventory["_meta"]["hostvars"]
    name = next(n for n, hv in hostvars.items() if hv.get("captcha_worker_env") == "dev")
    return name, hostvars[name]


def _accessor(host) -> str:
    return host.file(ACCESSOR).content_string.strip()


def _known_to_vault(accessor: str) -> bool:
    try:
        testbed.vault_client().auth.approle.read_secret_id_accessor("captcha-worker-dev", accessor)
    except InvalidPath:
        return False
    return True


def _main_pid(host) -> int:
    return int(host.check_output(f"systemctl show --property=MainPID --value {SERVICE}"))


def test_forced_rotation_delivers_a_new_secret_id_and_destroys_the_old(dev):
    """captcha_worker_secret_id_rotate=true: the worker restarts on a new secret-id, reports a
    key version, and the secret-id it used before no longer exists in Vault."""
    name, _ = dev
    host = testinfra.get_host(f"podman://{name}")
    old = _accessor(host)
    assert _known_to_vault(old)

    doc = _converge(name, "-e", "captcha_worker_secret_id_rotate=true")

    assert doc["rc"] == 0, _failure_messages(doc, name)
    new = _accessor(host)
    assert new != old
    assert _known_to_vault(new)
    assert not _known_to_vault(old)
    assert not host.file(WRAPPED).exists
    assert host.service("captcha-solver").is_running


def test_replayed_wrapping_token_stops_the_worker_loudly(dev):
    """A wrapping token that was already unwrapped makes the worker exit 78 without a restart
    loop, and the play fails naming possible tampering; a rotation run heals it."""
    name, hv = dev
    host = testinfra.get_host(f"podman://{name}")
    # Replay: issue a wrapped secret-id, unwrap it elsewhere (an attacker), then hand the used
    # token to the worker.
    client = testbed.vault_client()
    wrapped = client.auth.approle.generate_secret_id("captcha-worker-dev", wrap_ttl="60s")
    token = wrapped["wrap_info"]["token"]
    client.sys.unwrap(token)  # the attacker's unwrap, made with the admin client
    subprocess.run(
        ["podman", "exec", "-i", name, "sh", "-c",
         f"umask 077; cat > {WRAPPED} && chown captcha-solver: {WRAPPED}"],
        input=token + "\n", text=True, check=True,
    )  # fmt: skip
    host.run(f"systemctl restart {SERVICE}")
    deadline = time.monotonic() + 30
    while host.service("captcha-solver").is_running and time.monotonic() < deadline:
        time.sleep(0.5)
    show = host.check_output(
        f"systemctl show --property=ExecMainStatus,ActiveState,NRestarts {SERVICE}"
    )
    assert "ExecMainStatus=78" in show
    assert "ActiveState=failed" in show
    assert "NRestarts=0" in show

    failed = _converge(name)
    assert failed["rc"] != 0
    assert "possible tampering" in _failure_messages(failed, name)

    healed = _converge(name, "-e", "captcha_worker_secret_id_rotate=true")
    assert healed["rc"] == 0, _failure_messages(healed, name)
    assert host.service("captcha-solver").is_running
    assert _main_pid(host) > 0
    assert hv["captcha_worker_port"] == 18451
