"""vault_provision against a server that lets the API enable audit devices (as HashiCorp Vault
does): the kit enables its file device itself, a rerun changes nothing, and check mode only says
it would. Real parts: an OpenBao node of its own with ``unsafe_allow_api_audit_creation``
(``.state/test/vault-api-audit``, 127.0.0.1:18296), ansible-playbook.
"""

from __future__ import annotations

from collections.abc import Iterator

import hvac
import pytest

from testkit.creds import new_tag
from testkit.paths import REPO
from testkit.playbook import provision_vars, run_playbook
from testkit.vault import LocalVault

PLAYBOOK = "playbooks/provision-vault.yml"
STATE_DIR = REPO / ".state" / "test" / "vault-api-audit"
PORT = 18296


@pytest.fixture(scope="module")
def api_audit_vault() -> Iterator[LocalVault]:
    server = LocalVault(STATE_DIR, PORT, api_audit=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _devices(server: LocalVault) -> dict:
    client = hvac.Client(url=server.addr, token=server.root_token(), verify=str(server.ca_file))
    return client.sys.list_enabled_audit_devices()["data"]


def test_kit_enables_its_audit_device_through_the_api_where_allowed(api_audit_vault):
    tag = new_tag("a")
    path = f"audit-{tag}"
    log = STATE_DIR / f"{path}.log"
    extra = provision_vars(
        api_audit_vault,
        tag,
        vault_provision_audit_path=path,
        vault_provision_audit_file_path=str(log),
    )

    check = run_playbook(PLAYBOOK, vault=api_audit_vault, extra_vars=extra, check=True, diff=True)
    assert check.rc == 0, check.failure_messages()
    [(_, planned)] = [
        (n, r) for n, r in check.changed_results() if n.endswith("Make sure an audit device is on")
    ]
    assert planned["changed"] is True
    assert f"{path}/" not in _devices(api_audit_vault), "check mode enabled the device"

    first = run_playbook(PLAYBOOK, vault=api_audit_vault, extra_vars=extra)
    assert first.rc == 0, first.failure_messages()
    device = _devices(api_audit_vault)[f"{path}/"]
    assert device["type"] == "file"
    assert device["options"]["file_path"] == str(log)
    assert log.exists(), "the server writes the kit's audit log"

    again = run_playbook(PLAYBOOK, vault=api_audit_vault, extra_vars=extra)
    assert again.rc == 0, again.failure_messages()
    assert again.changed == 0
    assert {"file/", f"{path}/"} <= set(_devices(api_audit_vault))
