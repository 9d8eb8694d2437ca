"""Provisioning into a KV v2 mount that is already there and shared with another team.

On most Vaults `secret/` exists before the kit arrives, and other teams keep their secrets in it.
The kit's check-and-set and version limit belong to its own key paths (KV v2 metadata per
secret), never to the mount: another team's plain `kv put` keeps working and its history is not
pruned, while a write to a kit key path without check-and-set is refused.
"""

from __future__ import annotations

import hvac
import pytest

from testkit.creds import new_key, new_tag
from testkit.net import wait_for
from testkit.playbook import provision_vars, run_playbook

PLAYBOOK = "playbooks/provision-vault.yml"


def _kv(client: hvac.Client):
    return client.secrets.kv.v2


def _configured(kv, mount: str, **config) -> bool:
    try:
        kv.configure(mount_point=mount, **config)
    except hvac.exceptions.VaultError:
        return False
    return (
        kv.read_configuration(mount_point=mount)["data"]["max_versions"] == config["max_versions"]
    )


def test_a_shared_mount_keeps_its_config_and_other_paths_behave_as_before(vault, vault_client):
    tag = new_tag("m")
    mount = f"kv-{tag}"
    vault_client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    kv = _kv(vault_client)
    # The other team keeps 20 versions (a fresh KV v2 mount answers a moment after it upgrades).
    wait_for(lambda: _configured(kv, mount, max_versions=20), 30, "the new mount's config")
    # Another team's secret, 12 versions, written without check-and-set.
    for i in range(12):
        kv.create_or_update_secret("team-b/db", {"value": f"v{i}"}, mount_point=mount)
    config_before = kv.read_configuration(mount_point=mount)["data"]

    extra = provision_vars(vault, tag, vault_provision_first_keys={f"{tag}-dev": new_key()})
    first = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert first.rc == 0, first.failure_messages()

    # The mount's own config is untouched.
    assert kv.read_configuration(mount_point=mount)["data"] == config_before
    # The other team goes on as before: a plain put works, its history is all there.
    kv.create_or_update_secret("team-b/db", {"value": "v12"}, mount_point=mount)
    meta = kv.read_secret_metadata("team-b/db", mount_point=mount)["data"]
    assert meta["current_version"] == 13
    assert len(meta["versions"]) == 13
    assert meta["cas_required"] is False

    # The kit's key paths carry the kit's settings, also before a first key exists.
    for env in ("dev", "staging", "prod"):
        for path in (f"captchaai/{tag}-{env}", f"captchaai-staged/{tag}-{env}"):
            meta = kv.read_secret_metadata(path, mount_point=mount)["data"]
            assert (meta["cas_required"], meta["max_versions"]) == (True, 10), path
    with pytest.raises(hvac.exceptions.InvalidRequest, match="check-and-set"):
        kv.create_or_update_secret(
            f"captchaai/{tag}-staging", {"api_key": new_key()}, mount_point=mount
        )

    rerun = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert rerun.rc == 0, rerun.failure_messages()
    assert rerun.changed == 0, rerun.changed_results()


def test_the_kit_key_settings_come_back_after_a_hand_change_and_check_mode_says_so(
    vault, vault_client
):
    tag = new_tag("n")
    mount = f"kv-{tag}"
    extra = provision_vars(vault, tag)
    assert run_playbook(PLAYBOOK, vault=vault, extra_vars=extra).rc == 0
    kv = _kv(vault_client)
    path = f"captchaai/{tag}-prod"
    kv.update_metadata(path, cas_required=False, max_versions=0, mount_point=mount)

    check = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, check=True, diff=True)
    assert check.rc == 0, check.failure_messages()
    assert check.changed == 1, check.changed_results()
    meta = kv.read_secret_metadata(path, mount_point=mount)["data"]
    assert (meta["cas_required"], meta["max_versions"]) == (False, 0)

    fixed = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert fixed.rc == 0, fixed.failure_messages()
    assert fixed.changed == 1
    meta = kv.read_secret_metadata(path, mount_point=mount)["data"]
    assert (meta["cas_required"], meta["max_versions"]) == (True, 10)
