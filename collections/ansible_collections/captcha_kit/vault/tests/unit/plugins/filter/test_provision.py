# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filters that build vault_provision's data (plugins/filter/provision.py).

The expected values are what the role's Jinja loops produced before these filters replaced them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ansible_collections.captcha_kit.vault.plugins.filter import provision
from ansible_collections.captcha_kit.vault.plugins.filter.provision import (
    FilterModule,
    approle_roles,
    approle_summary,
    env_paths,
    per_env,
    policy_items,
    provision_capabilities,
    unbound_production_roles,
)

POLICY_KINDS = ["captcha-worker", "captcha-rotator", "captcha-stager"]
ROLE_KINDS = ["captcha-worker", "captcha-rotator"]
WORKER = {
    "bind_secret_id": True,
    "token_type": "service",
    "token_ttl": "1h",
    "token_max_ttl": "4h",
    "secret_id_ttl": "720h",
    "secret_id_num_uses": 0,
    "secret_id_bound_cidrs": [],
    "token_bound_cidrs": [],
}


def test_the_filters_are_registered_and_documented():
    filters = FilterModule().filters()
    functions = [per_env, env_paths, approle_roles, policy_items, provision_capabilities]
    assert filters == {
        f.__name__: f for f in [*functions, approle_summary, unbound_production_roles]
    }
    here = Path(provision.__file__).parent
    for name, function in filters.items():
        assert function.__doc__, name
        doc = yaml.safe_load((here / f"{name}.yml").read_text())
        assert doc["DOCUMENTATION"]["name"] == name
        assert doc["EXAMPLES"].count(f"captcha_kit.vault.{name}") >= 1


# --------------------------------------------------------------------------- per_env


def test_per_env_goes_env_by_env_then_kind_by_kind():
    assert per_env(["dev", "prod"], POLICY_KINDS) == [
        {"name": "captcha-worker-dev", "kind": "captcha-worker", "env": "dev"},
        {"name": "captcha-rotator-dev", "kind": "captcha-rotator", "env": "dev"},
        {"name": "captcha-stager-dev", "kind": "captcha-stager", "env": "dev"},
        {"name": "captcha-worker-prod", "kind": "captcha-worker", "env": "prod"},
        {"name": "captcha-rotator-prod", "kind": "captcha-rotator", "env": "prod"},
        {"name": "captcha-stager-prod", "kind": "captcha-stager", "env": "prod"},
    ]


def test_per_env_takes_any_iterable_of_kinds_once_for_every_env():
    kinds = (k for k in ROLE_KINDS)  # a generator, as Jinja's map() hands over
    assert [i["name"] for i in per_env(["a", "b"], kinds)] == [
        "captcha-worker-a",
        "captcha-rotator-a",
        "captcha-worker-b",
        "captcha-rotator-b",
    ]


@pytest.mark.parametrize(("envs", "kinds"), [([], POLICY_KINDS), (["dev"], [])])
def test_per_env_of_nothing_is_empty(envs, kinds):
    assert per_env(envs, kinds) == []


# --------------------------------------------------------------------------- approle_roles


def test_approle_roles_name_each_role_and_its_only_policy_after_the_env():
    assert approle_roles(["dev", "prod"], "captcha-rotator", WORKER) == [
        {**WORKER, "name": "captcha-rotator-dev", "token_policies": ["captcha-rotator-dev"]},
        {**WORKER, "name": "captcha-rotator-prod", "token_policies": ["captcha-rotator-prod"]},
    ]


def test_approle_roles_apply_each_envs_overrides_to_that_env_only():
    overrides = {"prod": {"secret_id_bound_cidrs": ["10.20.0.0/16"], "token_ttl": "30m"}}
    dev, prod = approle_roles(["dev", "prod"], "captcha-worker", WORKER, overrides)
    assert dev == {**WORKER, "name": "captcha-worker-dev", "token_policies": ["captcha-worker-dev"]}
    assert prod == {
        **WORKER,
        "secret_id_bound_cidrs": ["10.20.0.0/16"],
        "token_ttl": "30m",
        "name": "captcha-worker-prod",
        "token_policies": ["captcha-worker-prod"],
    }


def test_approle_roles_keep_name_and_policy_whatever_the_overrides_say():
    overrides = {"dev": {"name": "other", "token_policies": ["root"]}}
    [role] = approle_roles(["dev"], "captcha-worker", WORKER, overrides)
    assert role["name"] == "captcha-worker-dev"
    assert role["token_policies"] == ["captcha-worker-dev"]


def test_approle_roles_leave_the_shared_settings_untouched():
    settings = dict(WORKER)
    approle_roles(["dev", "prod"], "captcha-worker", settings, {"dev": {"token_ttl": "2h"}})
    assert settings == WORKER


def test_approle_roles_merge_shallowly_like_combine():
    """A list in an override replaces the shared list, it is not appended to."""
    settings = {**WORKER, "token_bound_cidrs": ["10.0.0.0/8"]}
    overrides = {"dev": {"token_bound_cidrs": ["127.0.0.1"]}}
    [role] = approle_roles(["dev"], "captcha-worker", settings, overrides)
    assert role["token_bound_cidrs"] == ["127.0.0.1"]


@pytest.mark.parametrize("overrides", [None, {}, {"dev": None}, {"dev": {}}])
def test_approle_roles_without_overrides_use_the_settings(overrides):
    [role] = approle_roles(["dev"], "captcha-worker", WORKER, overrides)
    assert role == {
        **WORKER,
        "name": "captcha-worker-dev",
        "token_policies": ["captcha-worker-dev"],
    }


# --------------------------------------------------------------------------- policy_items


def test_policy_items_pair_each_policy_with_its_text_in_order():
    policies = per_env(["dev"], POLICY_KINDS)
    texts = {p["name"]: f'path "{p["name"]}" {{}}' for p in reversed(policies)}
    assert policy_items(policies, texts) == [
        {"name": "captcha-worker-dev", "policy": 'path "captcha-worker-dev" {}'},
        {"name": "captcha-rotator-dev", "policy": 'path "captcha-rotator-dev" {}'},
        {"name": "captcha-stager-dev", "policy": 'path "captcha-stager-dev" {}'},
    ]


def test_policy_items_refuse_a_policy_without_text():
    with pytest.raises(KeyError, match="captcha-rotator-dev"):
        policy_items(per_env(["dev"], POLICY_KINDS), {"captcha-worker-dev": "x"})


# --------------------------------------------------------------------------- capabilities


def _capabilities(envs, first_key_envs=()):
    return provision_capabilities(
        envs,
        kv_mount="secret",
        approle_mount="approle",
        policy_kinds=POLICY_KINDS,
        role_kinds=ROLE_KINDS,
        key_path_prefix="captchaai",
        first_key_envs=first_key_envs,
        staged_path_prefix="captchaai-staged",
    )


def test_capabilities_of_one_env_with_a_first_key():
    rw = ["create", "read", "update"]
    caps = _capabilities(["dev"], first_key_envs=["dev"])
    assert caps == {
        "sys/mounts": ["read"],
        "sys/mounts/secret": rw,
        "secret/config": ["read"],
        "sys/auth": ["read"],
        "sys/auth/approle": [*rw, "sudo"],
        "sys/audit": ["read", "sudo"],
        "sys/policy/captcha-worker-dev": rw,
        "sys/policy/captcha-rotator-dev": rw,
        "sys/policy/captcha-stager-dev": rw,
        "auth/approle/role/captcha-worker-dev": rw,
        "auth/approle/role/captcha-rotator-dev": rw,
        "secret/metadata/captchaai/dev": rw,
        "secret/metadata/captchaai-staged/dev": rw,
        "secret/data/captchaai/dev": ["create"],
    }
    assert list(caps)[-4:] == [
        "auth/approle/role/captcha-rotator-dev",
        "secret/metadata/captchaai/dev",
        "secret/metadata/captchaai-staged/dev",
        "secret/data/captchaai/dev",
    ]


def test_capabilities_grow_with_the_envs_and_only_first_keys_write_a_key():
    caps = _capabilities(["dev", "staging", "prod"])
    assert len(caps) == 6 + 3 * 3 + 3 * 2 + 3 * 2
    assert [p for p in caps if "captchaai" in p] == [
        f"secret/metadata/{prefix}/{env}"
        for env in ("dev", "staging", "prod")
        for prefix in ("captchaai", "captchaai-staged")
    ]


def test_capabilities_use_the_mounts_and_key_prefix_given():
    caps = provision_capabilities(
        ["t1-prod"],
        kv_mount="kv-t1",
        approle_mount="approle-t1",
        policy_kinds=["captcha-worker"],
        role_kinds=["captcha-rotator"],
        key_path_prefix="keys",
        first_key_envs={"t1-prod": "not read"},  # a dict of first keys: only its envs count
    )
    assert list(caps) == [
        "sys/mounts",
        "sys/mounts/kv-t1",
        "kv-t1/config",
        "sys/auth",
        "sys/auth/approle-t1",
        "sys/audit",
        "sys/policy/captcha-worker-t1-prod",
        "auth/approle-t1/role/captcha-rotator-t1-prod",
        "kv-t1/metadata/keys/t1-prod",
        "kv-t1/data/keys/t1-prod",
    ]
    assert caps["kv-t1/metadata/keys/t1-prod"] == ["create", "read", "update"]


def test_capabilities_lists_are_not_shared_between_paths():
    caps = _capabilities(["dev"])
    caps["sys/policy/captcha-worker-dev"].append("delete")
    assert caps["sys/policy/captcha-rotator-dev"] == ["create", "read", "update"]
    assert caps["sys/mounts/secret"] == ["create", "read", "update"]


# --------------------------------------------------------------------------- approle_summary


def test_approle_summary_of_a_full_role():
    role = {
        "token_policies": ["captcha-worker-dev"],
        "token_ttl": 3600,
        "token_max_ttl": 14400,
        "secret_id_ttl": 2592000,
        "secret_id_num_uses": 0,
        "secret_id_bound_cidrs": ["127.0.0.1/32"],
        "token_bound_cidrs": ["127.0.0.1/32", "10.0.0.0/8"],
    }
    assert approle_summary([{"name": "captcha-worker-dev", "role": role}], "approle") == [
        "auth/approle/role/captcha-worker-dev: policies=captcha-worker-dev token_ttl=3600s"
        " token_max_ttl=14400s secret_id_ttl=2592000s secret_id_num_uses=0"
        " secret_id_bound_cidrs=127.0.0.1/32 token_bound_cidrs=127.0.0.1/32,10.0.0.0/8"
    ]


@pytest.mark.parametrize(
    "result", [{"name": "r"}, {"name": "r", "role": {}}, {"name": "r", "role": None}]
)
def test_approle_summary_marks_what_the_result_lacks(result):
    assert approle_summary([result], "m") == [
        "auth/m/role/r: policies= token_ttl=?s token_max_ttl=?s secret_id_ttl=?s"
        " secret_id_num_uses=? secret_id_bound_cidrs=- token_bound_cidrs=-"
    ]


def test_approle_summary_shows_several_policies_and_keeps_the_order():
    results = [
        {"name": "b", "role": {"token_policies": ["p1", "p2"], "secret_id_num_uses": 3}},
        {"name": "a", "role": {"token_policies": []}},
    ]
    lines = approle_summary(results, "approle")
    assert [line.split(":")[0] for line in lines] == ["auth/approle/role/b", "auth/approle/role/a"]
    assert "policies=p1,p2 " in lines[0]
    assert "secret_id_num_uses=3 " in lines[0]
    assert "policies= " in lines[1]


@pytest.mark.parametrize("roles", [None, []])
def test_approle_summary_of_no_roles_is_empty(roles):
    assert approle_summary(roles, "approle") == []


def test_approle_summary_never_shows_a_role_id_or_secret():
    result = {"name": "r", "role_id": "rid-1234", "role": {"secret_id": "sec-5678"}}
    [line] = approle_summary([result], "approle")
    assert "rid-1234" not in line
    assert "sec-5678" not in line


def test_env_paths_go_env_by_env_then_prefix_by_prefix():
    assert env_paths(["dev", "prod"], ["captchaai", "/captchaai-staged/"]) == [
        "captchaai/dev",
        "captchaai-staged/dev",
        "captchaai/prod",
        "captchaai-staged/prod",
    ]


# ------------------------------------------------------------------ unbound_production_roles


def test_unbound_production_roles_lists_each_empty_binding_of_a_production_role():
    bound = {"secret_id_bound_cidrs": ["10.0.0.0/8"], "token_bound_cidrs": ["10.0.0.0/8"]}
    roles = [
        {"name": "captcha-worker-dev"},
        {"name": "captcha-worker-prod", "secret_id_bound_cidrs": ["10.0.0.0/8"]},
        {"name": "captcha-rotator-prod", **bound},
        {"name": "captcha-stager-prod"},
    ]
    assert unbound_production_roles(roles, ["prod"], ROLE_KINDS) == [
        "captcha-worker-prod: token_bound_cidrs"
    ]


def test_unbound_production_roles_skips_an_env_waived_with_a_reason():
    roles = [{"name": "captcha-worker-prod"}, {"name": "captcha-worker-live"}]
    waivers = {"prod": "lab network, no fixed addresses", "live": "  "}
    assert unbound_production_roles(roles, ["prod", "live"], ROLE_KINDS, waivers) == [
        "captcha-worker-live: secret_id_bound_cidrs",
        "captcha-worker-live: token_bound_cidrs",
    ]
