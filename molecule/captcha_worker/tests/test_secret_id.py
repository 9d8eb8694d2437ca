"""Secret-id delivery on a deployed worker: rotation on request, and a replayed wrapping token.

These tests run the converge playbook again against one host (the dev worker), so they do not
take the per-host ``host`` fixture; they leave the worker healthy on a fresh secret-id.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest
import testbed
import testinfra
from conftest import converge
from hvac.exceptions import InvalidPath

from testkit.worker_hosts import STATUS_COMMAND, status_json

SERVICE = "captcha-solver.service"
STATE_DIR = "/var/lib/captcha-solver"
ACCESSOR = f"{STATE_DIR}/secret-id.accessor"
WRAPPED = f"{STATE_DIR}/secret-id.wrapped"


def _converge(name: str, *extra: str) -> dict[str, Any]:
    """Run the scenario's converge on one host; returns the json callback's document."""
    return converge("--limit", name, *extra)


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


def test_a_refused_wrapping_token_keeps_the_worker_up_and_the_next_run_heals_it(dev):
    """A wrapping token someone else unwrapped first (interception) reaches the worker, which
    still holds a valid secret-id: the worker keeps serving on that secret-id, sets the token
    aside and says why loudly. The next ordinary run sees the refused token, delivers a new
    secret-id and destroys the intercepted one; nothing is left to trip a later start."""
    name, _ = dev
    host = testinfra.get_host(f"podman://{name}")
    client = testbed.vault_client()
    # As the role issues one (the token's secret-id accessor kept on the host) ...
    wrapped = client.auth.approle.generate_secret_id(
        "captcha-worker-dev", metadata={"host": name}, wrap_ttl="60s"
    )
    token = wrapped["wrap_info"]["token"]
    intercepted = wrapped["wrap_info"]["wrapped_accessor"]
    assert _known_to_vault(intercepted)
    client.sys.unwrap(token)  # ... but an attacker unwraps it first
    subprocess.run(
        ["podman", "exec", "-i", name, "sh", "-c",
         f"umask 077; cat > {WRAPPED} && chown captcha-solver: {WRAPPED}"
         f" && echo {intercepted} > {WRAPPED}.accessor"],
        input=token + "\n", text=True, check=True,
    )  # fmt: skip
    before = _accessor(host)
    host.run(f"systemctl restart {SERVICE}")
    deadline = time.monotonic() + 30
    while not host.file(f"{WRAPPED}.refused").exists and time.monotonic() < deadline:
        time.sleep(0.5)
    assert host.file(f"{WRAPPED}.refused").exists
    assert not host.file(WRAPPED).exists
    journal = host.check_output(f"journalctl -u {SERVICE} --no-pager -o cat -n 200")
    assert "wrapped secret-id refused; keeping the secret-id this host already has" in journal
    assert "possible tampering" in journal
    status = ""
    while status != "ok" and time.monotonic() < deadline + 30:
        status = status_json(host.run(STATUS_COMMAND).stdout).get("status", "")
        time.sleep(0.5)
    assert status == "ok"
    assert _accessor(host) == before

    healed = _converge(name)
    assert healed["rc"] == 0, _failure_messages(healed, name)
    plans = [
        str(task["hosts"][name].get("msg", ""))
        for play in healed["plays"]
        for task in play["tasks"]
        if task["task"]["name"] == "captcha_worker : Report the secret-id plan"
    ]
    assert any("refused a wrapped secret-id" in p for p in plans), plans
    assert not host.file(f"{WRAPPED}.refused").exists
    assert not _known_to_vault(intercepted)
    assert not _known_to_vault(before)
    assert _known_to_vault(_accessor(host))
    assert host.service("captcha-solver").is_running
