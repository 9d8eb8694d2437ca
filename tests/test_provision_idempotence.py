"""vault_provision against the real test server: first run, second run, check mode, drift."""

from __future__ import annotations

import time

from testkit.creds import new_key, new_tag
from testkit.playbook import provision_vars, run_playbook

PLAYBOOK = "playbooks/provision-vault.yml"


def _policy_names(tag: str) -> list[str]:
    return [
        f"{kind}-{tag}-{env}"
        for env in ("dev", "staging", "prod")
        for kind in ("captcha-worker", "captcha-rotator", "captcha-stager")
    ]


def test_check_mode_on_empty_state_reports_changes_and_changes_nothing(vault, snapshot):
    """--check on names that do not exist yet shows the work and leaves Vault as it was."""
    tag = new_tag("c")
    before = snapshot(tag)
    assert before["policies"] == {}
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=provision_vars(vault, tag), check=True)
    assert result.rc == 0, result.failure_messages()
    assert result.changed > 0
    assert snapshot(tag) == before


def test_first_run_creates_everything_and_second_run_changes_nothing(vault, vault_client, snapshot):
    """Three envs from nothing; the rerun reports changed=0 and Vault stays identical."""
    tag = new_tag("i")
    extra = provision_vars(vault, tag)
    started = time.monotonic()
    first = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    first_wall = time.monotonic() - started
    assert first.rc == 0, first.failure_messages()
    assert first.changed > 0

    mounts = vault_client.sys.list_mounted_secrets_engines()["data"]
    assert mounts[f"kv-{tag}/"]["type"] == "kv"
    assert mounts[f"kv-{tag}/"]["options"]["version"] == "2"
    kv = vault_client.secrets.kv.v2
    for env in ("dev", "staging", "prod"):  # per key path, never the mount (see shared mount)
        meta = kv.read_secret_metadata(f"captchaai/{tag}-{env}", mount_point=f"kv-{tag}")["data"]
        assert (meta["max_versions"], meta["cas_required"]) == (10, True)
    policies = vault_client.sys.list_acl_policies()["data"]["keys"]
    assert set(_policy_names(tag)) <= set(policies)
    for env in ("dev", "staging", "prod"):
        role = vault_client.auth.approle.read_role(
            f"captcha-worker-{tag}-{env}", mount_point=f"approle-{tag}"
        )["data"]
        assert role["token_policies"] == [f"captcha-worker-{tag}-{env}"]
        assert role["token_ttl"] == 3600
        assert role["token_max_ttl"] == 4 * 3600
        assert role["secret_id_ttl"] == 720 * 3600
        rotator = vault_client.auth.approle.read_role(
            f"captcha-rotator-{tag}-{env}", mount_point=f"approle-{tag}"
        )["data"]
        assert rotator["token_policies"] == [f"captcha-rotator-{tag}-{env}"]

    state = snapshot(tag)
    started = time.monotonic()
    second = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    second_wall = time.monotonic() - started
    assert second.rc == 0, second.failure_messages()
    assert second.changed == 0, second.changed_results()
    assert snapshot(tag) == state
    print(
        f"\nprovision 3 envs: first run {first_wall:.1f}s changed={first.changed}, "
        f"second run {second_wall:.1f}s changed={second.changed}"
    )


def test_drift_is_shown_by_check_diff_and_repaired_by_a_normal_run(vault, vault_client, snapshot):
    """A hand-edited policy and role: --check --diff shows exactly those two, a run repairs them."""
    tag = new_tag("d")
    extra = provision_vars(vault, tag)
    assert run_playbook(PLAYBOOK, vault=vault, extra_vars=extra).rc == 0
    mount = f"approle-{tag}"
    vault_client.sys.create_or_update_acl_policy(
        f"captcha-worker-{tag}-dev", 'path "*" {\n  capabilities = ["read", "list"]\n}\n'
    )
    vault_client.auth.approle.create_or_update_approle(
        f"captcha-worker-{tag}-staging", token_ttl=7200, mount_point=mount
    )
    drifted = snapshot(tag)

    check = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, check=True, diff=True)
    assert check.rc == 0, check.failure_messages()
    changed = dict(check.changed_results())
    roles_task = "vault_provision : Configure the worker and rotator roles"
    policies_task = "vault_provision : Write the worker, rotator and stager policies"
    assert sorted(changed) == [roles_task, policies_task], sorted(changed)
    policies = changed[policies_task]
    assert [p["name"] for p in policies["policies"] if p["changed"]] == [
        f"captcha-worker-{tag}-dev"
    ]
    [policy_diff] = policies["diff"]  # one diff per policy that differs
    assert policy_diff["before_header"] == f"policy captcha-worker-{tag}-dev (current)"
    assert 'path "*"' in policy_diff["before"]
    assert f'path "kv-{tag}/data/captchaai/{tag}-dev"' in policy_diff["after"]
    roles = changed[roles_task]
    assert [(r["name"], r["changed_keys"]) for r in roles["roles"] if r["changed"]] == [
        (f"captcha-worker-{tag}-staging", ["token_ttl"])
    ]
    [role_diff] = roles["diff"]
    assert role_diff["before"]["token_ttl"] == 7200
    assert role_diff["after"]["token_ttl"] == 3600
    assert snapshot(tag) == drifted, "check mode changed Vault"

    repair = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert repair.rc == 0, repair.failure_messages()
    assert repair.changed == 2  # the policies task and the roles task, one item each
    policy = vault_client.sys.read_acl_policy(f"captcha-worker-{tag}-dev")["data"]["policy"]
    assert 'path "*"' not in policy
    role = vault_client.auth.approle.read_role(f"captcha-worker-{tag}-staging", mount_point=mount)
    assert role["data"]["token_ttl"] == 3600
    again = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert again.rc == 0
    assert again.changed == 0


def test_approle_user_lockout_is_set_deliberately_and_drift_is_reset(vault, vault_client):
    """The AppRole mount's user lockout (refused logins lock a role-id that every worker of an
    env shares) is set to the documented values, a hand-made change is shown by --check --diff
    and reset, and a rerun changes nothing."""
    tag = new_tag("l")
    extra = provision_vars(vault, tag)
    assert run_playbook(PLAYBOOK, vault=vault, extra_vars=extra).rc == 0
    mount = f"approle-{tag}"

    def lockout() -> tuple[int, int, int]:
        tune = vault_client.sys.read_auth_method_tuning(mount)
        tune = tune.get("data", tune)
        return (
            tune["user_lockout_threshold"],
            tune["user_lockout_duration"],
            tune["user_lockout_counter_reset_duration"],
        )

    assert lockout() == (5, 900, 900)
    vault_client.adapter.post(
        f"/v1/sys/auth/{mount}/tune", json={"user_lockout_config": {"lockout_threshold": "50"}}
    )
    assert lockout()[0] == 50
    check = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, check=True, diff=True)
    assert check.rc == 0, check.failure_messages()
    task = "vault_provision : Enable AppRole auth and keep its user lockout settings"
    [(_, result)] = [(n, r) for n, r in check.changed_results() if n == task]
    assert result["diff"]["before"]["user_lockout"]["threshold"] == 50
    assert result["diff"]["after"]["user_lockout"]["threshold"] == 5
    assert lockout()[0] == 50, "check mode changed Vault"
    repair = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert repair.rc == 0, repair.failure_messages()
    assert lockout() == (5, 900, 900)
    again = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert again.rc == 0
    assert again.changed == 0


def test_first_key_is_created_once_and_never_shown(vault, vault_client):
    """A first key is written with check-and-set 0; a second run with another key keeps the
    first; neither key appears in any output."""
    tag = new_tag("k")
    key, other_key = new_key(), new_key()
    extra = provision_vars(vault, tag, vault_provision_first_keys={f"{tag}-dev": key})
    first = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, diff=True)
    assert first.rc == 0, first.failure_messages()
    assert key not in first.output
    secret = vault_client.secrets.kv.v2.read_secret_version(
        f"captchaai/{tag}-dev", mount_point=f"kv-{tag}", raise_on_deleted_version=True
    )
    assert secret["data"]["data"] == {"api_key": key}
    assert secret["data"]["metadata"]["version"] == 1

    extra["vault_provision_first_keys"] = {f"{tag}-dev": other_key}
    second = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra, diff=True)
    assert second.rc == 0, second.failure_messages()
    assert second.changed == 0
    assert other_key not in second.output
    assert vault.root_token() not in first.output + second.output
    secret = vault_client.secrets.kv.v2.read_secret_version(
        f"captchaai/{tag}-dev", mount_point=f"kv-{tag}", raise_on_deleted_version=True
    )
    assert secret["data"]["data"] == {"api_key": key}
    assert secret["data"]["metadata"]["version"] == 1
