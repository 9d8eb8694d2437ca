# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_approle_role: normalise, compare and write only the settings that differ; hand-made
changes to any security-relevant setting are reset with a diff; never a role-id in a result."""

from __future__ import annotations

import json

import pytest
from ansible_collections.captcha_kit.vault.plugins.modules import vault_approle_role

MAIN = vault_approle_role.main
WORKER = {
    "token_policies": ["captcha-worker-dev"],
    "token_ttl": "1h",
    "token_max_ttl": "4h",
    "secret_id_ttl": "720h",
    "secret_id_bound_cidrs": ["127.0.0.1"],
    "token_bound_cidrs": ["10.0.0.0/8", "127.0.0.1"],
}
WORKER_NORMALISED = {
    "token_policies": ["captcha-worker-dev"],
    "token_ttl": 3600,
    "token_max_ttl": 14400,
    "secret_id_ttl": 2592000,
    "secret_id_bound_cidrs": ["127.0.0.1/32"],
    "token_bound_cidrs": ["10.0.0.0/8", "127.0.0.1/32"],
}


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_approle_role) == []


@pytest.mark.parametrize(
    ("field", "value", "normalised"),
    [
        ("token_ttl", "1h30m", 5400),
        ("token_ttl", 60, 60),
        ("secret_id_ttl", None, 0),
        ("token_bound_cidrs", "127.0.0.1, 10.0.0.0/8", ["10.0.0.0/8", "127.0.0.1/32"]),
        ("secret_id_bound_cidrs", None, []),
        ("token_policies", ["b", "a", "b", " "], ["a", "b"]),
        ("token_num_uses", None, 0),
        ("bind_secret_id", None, False),
        ("token_type", None, ""),
        ("token_type", "batch", "batch"),
    ],
)
def test_each_setting_is_normalised_by_its_kind(field, value, normalised):
    assert vault_approle_role.normalize(field, value) == normalised


def test_an_absent_role_is_created_with_normalised_settings(vault, run):
    result = run(MAIN, name="captcha-worker-dev", **WORKER)
    assert result["changed"] is True
    assert result["changed_keys"] == sorted(WORKER)
    assert result["role"] == WORKER_NORMALISED
    assert "role_id" not in result
    assert vault.writes == [
        (
            "adapter.post",
            {"url": "/v1/auth/approle/role/captcha-worker-dev", "json": WORKER_NORMALISED},
        )
    ]


def test_check_mode_on_an_absent_role_writes_nothing(vault, run):
    result = run(MAIN, check_mode=True, diff=True, name="captcha-worker-dev", **WORKER)
    assert result["changed"] is True
    assert result["diff"]["before"] == {}
    assert result["diff"]["after"] == WORKER_NORMALISED
    assert vault.writes == []
    assert vault.roles == {}


def test_server_values_in_another_notation_are_no_change(vault, run):
    """The server answers seconds, addresses without /32, policies in its own order."""
    vault.add_role(
        "captcha-worker-dev",
        token_policies=["captcha-worker-dev"],
        token_ttl=3600,
        token_max_ttl=14400,
        secret_id_ttl=2592000,
        secret_id_bound_cidrs=["127.0.0.1"],
        token_bound_cidrs=["127.0.0.1", "10.0.0.0/8"],
    )
    result = run(MAIN, name="captcha-worker-dev", **WORKER)
    assert result["changed"] is False
    assert result["changed_keys"] == []
    assert vault.writes == []


def test_only_the_differing_settings_are_written_with_a_diff(vault, run):
    vault.add_role("captcha-worker-dev", **(WORKER_NORMALISED | {"token_ttl": 7200}))
    result = run(MAIN, diff=True, name="captcha-worker-dev", **WORKER)
    assert result["changed"] is True
    assert result["changed_keys"] == ["token_ttl"]
    assert result["diff"]["before"]["token_ttl"] == 7200
    assert result["diff"]["after"]["token_ttl"] == 3600
    assert result["diff"]["before_header"] == "auth/approle/role/captcha-worker-dev (current)"
    assert vault.writes == [
        (
            "adapter.post",
            {"url": "/v1/auth/approle/role/captcha-worker-dev", "json": {"token_ttl": 3600}},
        )
    ]


def test_drift_in_check_mode_is_reported_and_not_written(vault, run):
    vault.add_role("captcha-worker-dev", **(WORKER_NORMALISED | {"token_ttl": 7200}))
    result = run(MAIN, check_mode=True, name="captcha-worker-dev", **WORKER)
    assert result["changed"] is True
    assert result["changed_keys"] == ["token_ttl"]
    assert vault.writes == []
    assert vault.roles[("approle", "captcha-worker-dev")]["token_ttl"] == 7200


def test_omitted_settings_are_not_managed(vault, run):
    vault.add_role("r", token_ttl=7200, token_num_uses=3)
    result = run(MAIN, name="r", token_policies=[])
    assert result["changed"] is False
    assert result["role"]["token_ttl"] == 7200


def test_local_secret_ids_cannot_change_on_an_existing_role(vault, run):
    vault.add_role("r", local_secret_ids=False)
    result = run(MAIN, name="r", local_secret_ids=True, token_num_uses=1)
    assert result["failed"] is True
    assert result["msg"].startswith(
        "AppRole role r at auth/approle: local_secret_ids is false on the server, true is "
        "wanted, and Vault/OpenBao set it only when a role is created (a create-time setting)."
    )
    assert "delete the role (auth/approle/role/r) and provision again" in result["msg"]
    assert result["msg"].endswith("No AppRole role was changed.")
    assert vault.writes == []


def test_state_absent_deletes_an_existing_role(vault, run):
    vault.add_role("r", token_ttl=60, mount="workers")
    result = run(MAIN, name="r", mount_point="/workers/", state="absent", diff=True)
    assert result["changed"] is True
    assert result["changed_keys"] == sorted(vault_approle_role.ALL_FIELDS)
    assert result["diff"]["after"] == {}
    assert vault.writes == [("approle.delete_role", {"role_name": "r", "mount_point": "workers"})]


def test_state_absent_on_a_missing_role_is_no_change(vault, run):
    result = run(MAIN, name="r", state="absent")
    assert result == {
        "failed": False,
        "name": "r",
        "changed": False,
        "changed_keys": [],
        "warnings": [],
    }


def test_many_roles_report_each_and_diff_only_those_that_changed(vault, run):
    vault.add_role("same", token_ttl=3600)
    vault.add_role("drifted", token_ttl=7200)
    result = run(
        MAIN,
        diff=True,
        roles=[
            {"name": "same", "token_ttl": "1h"},
            {"name": "drifted", "token_ttl": "1h"},
        ],
    )
    assert result["changed"] is True
    assert [(r["name"], r["changed"], r["changed_keys"]) for r in result["roles"]] == [
        ("same", False, []),
        ("drifted", True, ["token_ttl"]),
    ]
    assert all("diff" not in r for r in result["roles"])
    [diff] = result["diff"]
    assert diff["before"]["token_ttl"] == 7200


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"name": "r", "token_ttl": "an hour"}, "AppRole role r: token_ttl: not a duration"),
        (
            {"name": "r", "token_bound_cidrs": ["10.0.0.1/8"]},
            "AppRole role r: token_bound_cidrs: malformed CIDR '10.0.0.1/8'",
        ),
        (
            {"roles": [{"name": "a"}, {"name": "b", "secret_id_bound_cidrs": ["nowhere"]}]},
            "AppRole role b: secret_id_bound_cidrs: malformed CIDR 'nowhere'",
        ),
        ({"roles": [{"name": "a"}, {"name": "a"}]}, "roles: each name once; repeated: a"),
    ],
)
def test_bad_input_fails_before_any_vault_call(vault, run, params, message):
    result = run(MAIN, **params)
    assert result["failed"] is True
    assert result["msg"].startswith(message)
    assert vault.calls == []


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"roles": [{"name": "a"}], "token_ttl": "1h"}, "mutually exclusive: roles|token_ttl"),
        ({"token_ttl": "1h"}, "one of the following is required: name, roles"),
        ({"name": "r", "token_type": "forever"}, "value of token_type must be one of"),
    ],
)
def test_option_combinations_are_checked_by_the_argument_spec(vault, run, params, words):
    result = run(MAIN, **params)
    assert result["failed"] is True
    assert words in result["msg"]
    assert vault.calls == []


# --------------------------------------------------------------------------- no silent drift
KIT = {
    "token_policies": ["captcha-worker-dev"],
    "token_ttl": "1h",
    "token_max_ttl": "4h",
    "token_explicit_max_ttl": "0",
    "token_period": "0",
    "token_num_uses": 0,
    "token_no_default_policy": False,
    "token_type": "service",
    "bind_secret_id": True,
    "secret_id_ttl": "720h",
    "secret_id_num_uses": 0,
    "local_secret_ids": False,
    "secret_id_bound_cidrs": ["127.0.0.1"],
    "token_bound_cidrs": ["127.0.0.1/32"],
}
KIT_ON_SERVER = {
    "token_policies": ["captcha-worker-dev"],
    "token_ttl": 3600,
    "token_max_ttl": 14400,
    "token_explicit_max_ttl": 0,
    "token_period": 0,
    "token_num_uses": 0,
    "token_no_default_policy": False,
    "token_type": "service",
    "bind_secret_id": True,
    "secret_id_ttl": 2592000,
    "secret_id_num_uses": 0,
    "local_secret_ids": False,
    "secret_id_bound_cidrs": ["127.0.0.1"],
    "token_bound_cidrs": ["127.0.0.1"],
}
# A hand-made change on the server per setting: (setting, server value, the kit's value).
HAND_MADE = [
    ("token_period", 86400, 0),
    ("token_explicit_max_ttl", 864000, 0),
    ("token_num_uses", 5, 0),
    ("token_no_default_policy", True, False),
    ("token_type", "batch", "service"),
    ("bind_secret_id", False, True),
    ("secret_id_num_uses", 100, 0),
    ("secret_id_bound_cidrs", ["0.0.0.0/0"], ["127.0.0.1/32"]),
    ("token_bound_cidrs", [], ["127.0.0.1/32"]),
    ("token_policies", ["captcha-worker-dev", "root"], ["captcha-worker-dev"]),
    ("token_max_ttl", 31536000, 14400),
]


def test_every_security_relevant_setting_is_an_option():
    security = {
        "token_period",
        "token_explicit_max_ttl",
        "token_num_uses",
        "token_no_default_policy",
        "token_type",
        "bind_secret_id",
        "secret_id_num_uses",
        "local_secret_ids",
        "secret_id_bound_cidrs",
        "token_bound_cidrs",
        "token_policies",
    }
    assert security <= set(vault_approle_role.ALL_FIELDS)
    assert sorted(KIT) == sorted(vault_approle_role.ALL_FIELDS)


def test_the_kit_settings_as_the_server_answers_them_are_no_change(vault, run):
    vault.add_role("captcha-worker-dev", **KIT_ON_SERVER)
    result = run(MAIN, diff=True, name="captcha-worker-dev", **KIT)
    assert (result["changed"], result["changed_keys"], vault.writes) == (False, [], [])
    assert (result["diff"]["before"], result["diff"]["after"]) == ({}, {})


@pytest.mark.parametrize(("field", "hand_made", "kit"), HAND_MADE, ids=[h[0] for h in HAND_MADE])
def test_a_hand_made_change_is_reset_with_a_diff_of_that_setting_only(
    vault, run, field, hand_made, kit
):
    vault.add_role("captcha-worker-dev", **(KIT_ON_SERVER | {field: hand_made}))
    result = run(MAIN, diff=True, name="captcha-worker-dev", **KIT)
    assert result["changed"] is True
    assert result["changed_keys"] == [field]
    before = vault_approle_role.normalize(field, hand_made)
    assert result["diff"]["before"] == {field: before}
    assert result["diff"]["after"] == {field: kit}
    assert result["diff"]["after_header"] == "auth/approle/role/captcha-worker-dev (desired)"
    assert vault.writes == [
        ("adapter.post", {"url": "/v1/auth/approle/role/captcha-worker-dev", "json": {field: kit}})
    ]
    assert vault.roles[("approle", "captcha-worker-dev")][field] == kit
    again = run(MAIN, name="captcha-worker-dev", **KIT)
    assert again["changed"] is False


@pytest.mark.parametrize(("field", "hand_made", "kit"), HAND_MADE, ids=[h[0] for h in HAND_MADE])
def test_check_mode_reports_the_same_reset_and_writes_nothing(vault, run, field, hand_made, kit):
    vault.add_role("captcha-worker-dev", **(KIT_ON_SERVER | {field: hand_made}))
    result = run(MAIN, check_mode=True, diff=True, name="captcha-worker-dev", **KIT)
    assert (result["changed"], result["changed_keys"]) == (True, [field])
    assert result["diff"]["after"] == {field: kit}
    assert vault.writes == []
    assert vault.roles[("approle", "captcha-worker-dev")][field] == hand_made


def test_several_hand_made_changes_are_reset_in_one_write(vault, run):
    drift = {"token_period": 86400, "bind_secret_id": False, "token_num_uses": 5}
    vault.add_role("captcha-worker-dev", **(KIT_ON_SERVER | drift))
    result = run(MAIN, diff=True, name="captcha-worker-dev", **KIT)
    assert result["changed_keys"] == sorted(drift)
    assert result["diff"]["before"] == drift
    reset = {"bind_secret_id": True, "token_num_uses": 0, "token_period": 0}
    assert result["diff"]["after"] == reset
    [(_, written)] = vault.writes
    assert written["json"] == reset


def test_the_legacy_aliases_the_server_answers_are_not_compared(vault, run):
    """OpenBao answers ``policies``, ``period`` (while set) and keeps them in step with
    ``token_policies`` and ``token_period``; ``bound_cidr_list`` writes secret_id_bound_cidrs."""
    vault.add_role(
        "captcha-worker-dev",
        **KIT_ON_SERVER,
        policies=["captcha-worker-dev", "root"],
        period=86400,
        bound_cidr_list=["0.0.0.0/0"],
        token_strictly_bind_ip=False,
    )
    result = run(MAIN, name="captcha-worker-dev", **KIT)
    assert (result["changed"], vault.writes) == (False, [])
    assert not {"policies", "period", "bound_cidr_list"} & set(result["role"])


def test_an_equal_local_secret_ids_is_never_sent_on_an_update(vault, run):
    """The server refuses local_secret_ids in any update, even with its own value."""
    vault.add_role("captcha-worker-dev", **(KIT_ON_SERVER | {"token_num_uses": 5}))
    run(MAIN, name="captcha-worker-dev", **KIT)
    [(_, written)] = vault.writes
    assert written["json"] == {"token_num_uses": 0}


def test_a_new_role_gets_local_secret_ids_at_creation(vault, run):
    result = run(MAIN, name="captcha-worker-dev", **KIT)
    [(_, written)] = vault.writes
    assert written["json"]["local_secret_ids"] is False
    assert result["role"]["local_secret_ids"] is False


def test_a_local_secret_ids_mismatch_in_a_batch_writes_no_role(vault, run):
    """Every role is read and compared before the first write: an earlier drifted role is not
    reset when a later one cannot be changed."""
    vault.add_role("a", **(KIT_ON_SERVER | {"token_period": 86400}))
    vault.add_role("b", **(KIT_ON_SERVER | {"local_secret_ids": True}))
    result = run(MAIN, roles=[{"name": "a", **KIT}, {"name": "b", **KIT}])
    assert result["failed"] is True
    assert result["msg"].startswith("AppRole role b at auth/approle: local_secret_ids is true")
    assert vault.writes == []
    assert vault.roles[("approle", "a")]["token_period"] == 86400


def test_no_result_holds_a_role_id(vault, run):
    vault.add_role("a", **KIT_ON_SERVER)
    vault.add_role("b", **(KIT_ON_SERVER | {"token_num_uses": 5}))
    single = run(MAIN, diff=True, name="a", **KIT)
    many = run(MAIN, diff=True, roles=[{"name": "a", **KIT}, {"name": "b", **KIT}])
    check = run(MAIN, check_mode=True, diff=True, name="c", **KIT)
    for role_id in vault.role_ids.values():
        for result in (single, many, check):
            assert role_id not in json.dumps(result)
    assert "approle.read_role_id" not in vault.calls
