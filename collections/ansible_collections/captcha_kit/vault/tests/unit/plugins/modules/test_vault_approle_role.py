# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_approle_role: normalise, compare and write only the settings that differ."""

from __future__ import annotations

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
    assert result["role_id"] == vault.role_ids[("approle", "captcha-worker-dev")]
    assert vault.writes == [
        (
            "adapter.post",
            {"url": "/v1/auth/approle/role/captcha-worker-dev", "json": WORKER_NORMALISED},
        )
    ]


def test_check_mode_on_an_absent_role_has_no_role_id_and_writes_nothing(vault, run):
    result = run(MAIN, check_mode=True, diff=True, name="captcha-worker-dev", **WORKER)
    assert result["changed"] is True
    assert result["role_id"] == ""
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
    assert result["role_id"] == vault.role_ids[("approle", "captcha-worker-dev")]
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
    result = run(MAIN, name="r", local_secret_ids=True)
    assert result["failed"] is True
    assert result["msg"].startswith(
        "AppRole role r: local_secret_ids can only be set when the role"
    )
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
