"""HA: provisioning against the 3-node raft cluster survives the leader being killed mid-run,
and refuses a cluster whose standbys answer reads from their own copy."""

from __future__ import annotations

import contextlib
import json

import hvac
import pytest
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    RetryingAdapter,
    read_kv2_metadata,
)

from testkit.creds import assert_no_secrets
from testkit.faults import SESSION, kill_leader_mid_run, provision
from testkit.paths import PROVISION
from testkit.playbook import (
    ansible_env,
    playbook_argv,
    provision_inventory,
    run_playbook,
    start_argv,
)
from testkit.tokens import playbook_token
from testkit.vault_ops import admin_client


@pytest.mark.slow_faults
def test_provisioning_survives_a_leader_kill_and_the_rerun_changes_nothing(ha, tmp_path):
    """VAULT_ADDR is the leader; it is SIGKILLed while the playbook writes policies and roles:
    the modules move to the other addresses, wait out the election and finish; a rerun (with
    the killed node back) reports no change."""
    envs = [f"f{SESSION}-p{i}" for i in range(1, 7)]
    leader = ha.active_node()
    assert leader is not None
    others = [n.addr for n in ha.nodes if n is not leader]
    inventory = provision_inventory(ha, envs, tmp_path, {"captcha_kit_vault_addr": leader.addr})
    token = playbook_token(ha, PROVISION, inventory, None)  # the provisioner's, never root
    env = ansible_env(ha, token=token, addrs=others) | {"VAULT_ADDR": leader.addr}
    admin = admin_client(ha)

    def policy_written() -> bool:
        with contextlib.suppress(hvac.exceptions.VaultError, OSError):
            return any(envs[0] in p for p in admin.sys.list_acl_policies()["data"]["keys"])
        return False

    proc = start_argv(
        playbook_argv(PROVISION, inventory), env | {"ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}
    )
    text = kill_leader_mid_run(proc, leader, policy_written, "a policy written", 300)
    assert_no_secrets(text, [ha.root_token(), str(token)])
    assert proc.returncode == 0, text[-4000:]
    stats = json.loads(text[text.find("{") :])["stats"]["localhost"]
    assert stats["failures"] == 0
    # The run kept writing after the kill: the last env's worker role exists.
    survivor = hvac.Client(url=others[0], token=ha.root_token(), verify=str(ha.ca_file))
    role = survivor.auth.approle.read_role(f"captcha-worker-{envs[-1]}")
    assert role["data"]["token_policies"] == [f"captcha-worker-{envs[-1]}"]

    ha.start()  # the killed node restarts, unseals and rejoins as a standby
    rerun = provision(ha, envs, tmp_path, ha.addrs)
    assert rerun.rc == 0, rerun.output[-3000:]
    assert rerun.changed == 0, rerun.output[-3000:]


def test_a_cluster_whose_standbys_answer_reads_is_refused_before_any_change(
    standby_reads_vault, tmp_path
):
    """OpenBao's default lets standbys answer reads from their own copy: an old key version
    after a put and through a whole election (bench/results-standby-reads.md). Provisioning
    with every node address stops at its preflight, names each such standby and the setting
    to change, and changes nothing."""
    cluster = standby_reads_vault
    envs = [f"f{SESSION}-sr"]
    inventory = provision_inventory(cluster, envs, tmp_path)
    token = playbook_token(cluster, PROVISION, inventory, None)  # the provisioner's
    admin = admin_client(cluster)

    def state() -> tuple:
        return (
            sorted(admin.sys.list_acl_policies()["data"]["keys"]),
            sorted(admin.sys.list_mounted_secrets_engines()["data"]),
            sorted(admin.sys.list_auth_methods()["data"]),
        )

    before = state()
    run = run_playbook(
        PROVISION, inventory=inventory, env=ansible_env(cluster, token=token, addrs=cluster.addrs)
    )
    assert run.rc == 2, run.output[-3000:]
    assert_no_secrets(run.output, [cluster.root_token(), str(token)])
    standbys = cluster.standby_addrs()
    assert len(standbys) == 2
    named = f"Vault standbys {', '.join(standbys)} answer reads from their own copies"
    assert named in run.output, run.output[-3000:]
    assert "disable_standby_reads = true" in run.output
    assert "Nothing was changed." in run.output
    assert state() == before


def test_a_cluster_whose_standby_reads_are_accepted_is_provisioned_and_the_rerun_changes_nothing(
    standby_reads_vault, tmp_path
):
    """With vault_provision_allow_standby_reads=true (the operator accepts the risk), the same
    cluster is provisioned with a standby as the first address: writes are forwarded to the
    active node while reads come from the standby's own copy, and still every write is read
    back as written and a rerun reports no change."""
    cluster = standby_reads_vault
    standby = cluster.standby_addrs()[0]
    envs = [f"f{SESSION}-sa"]
    inventory = provision_inventory(
        cluster,
        envs,
        tmp_path,
        {"vault_provision_allow_standby_reads": True, "captcha_kit_vault_addr": standby},
    )
    token = playbook_token(cluster, PROVISION, inventory, None)  # the provisioner's
    env = ansible_env(cluster, token=token, addrs=cluster.addrs) | {"VAULT_ADDR": standby}

    first = run_playbook(PROVISION, inventory=inventory, env=env)
    assert first.rc == 0, first.output[-3000:]
    assert first.changed > 0
    rerun = run_playbook(PROVISION, inventory=inventory, env=env)
    assert rerun.rc == 0, rerun.output[-3000:]
    assert rerun.changed == 0, rerun.output[-3000:]
    assert_no_secrets(first.output + rerun.output, [cluster.root_token(), str(token)])
    role = admin_client(cluster).auth.approle.read_role(f"captcha-worker-{envs[0]}")
    assert role["data"]["token_policies"] == [f"captcha-worker-{envs[0]}"]


def _client_on_a_standby(cluster) -> hvac.Client:
    """The Vault modules' client (root token) with a standby as its first address."""
    standby = cluster.standby_addrs()[0]
    return hvac.Client(
        url=standby,
        token=cluster.root_token(),
        verify=str(cluster.ca_file),
        adapter=RetryingAdapter,
        addrs=[a for a in cluster.addrs if a != standby],
    )


def test_the_modules_client_reads_its_own_writes_through_a_standby(standby_reads_vault):
    """The Vault modules' client, pointed at a standby that answers reads from its own copy:
    each policy it writes (forwarded to the active node) it reads back at once, 20 times out of
    20 (without X-Vault-Index a standby answers such a read with 404 before it applied the
    write; bench/results-standby-reads.md)."""
    client = _client_on_a_standby(standby_reads_vault)
    seen = []
    for i in range(20):
        name = f"f{SESSION}-ryw-{i}"
        rules = f'path "secret/data/ryw-{i}" {{ capabilities = ["read"] }}'
        client.sys.create_or_update_acl_policy(name=name, policy=rules)
        try:
            seen.append(client.sys.read_acl_policy(name)["data"]["policy"] == rules)
        except hvac.exceptions.InvalidPath:
            seen.append(False)
    assert seen == [True] * 20, f"{seen.count(False)} of 20 writes not seen by the next read"


class _Module:
    """What module_utils needs of an AnsibleModule to report a failure."""

    def fail_json(self, msg: str, **_: object) -> None:
        raise AssertionError(msg)


def test_the_modules_client_waits_for_a_fresh_kv_mount_on_a_standby(standby_reads_vault):
    """A KV v2 mount enabled through a standby that answers reads, and read at once through it:
    the standby's own copy of the new mount answers "Waiting for the primary to upgrade from
    non-versioned to versioned data" (a 400) for a moment, which the modules' client waits out
    as it waits out the active node's "Upgrading ..." (the accepted-standby-reads provisioning
    failed on it in CI)."""
    client = _client_on_a_standby(standby_reads_vault)
    for i in range(10):
        mount = f"f{SESSION}-kv-{i}"
        client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
        assert read_kv2_metadata(_Module(), client, mount, "captchaai/dev") is None
