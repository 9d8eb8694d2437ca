# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_mount: what it plans (enable / tune the difference / nothing) and what it writes."""

from __future__ import annotations

import hvac.exceptions
import pytest
from ansible_collections.captcha_kit.vault.plugins.modules import vault_mount

MAIN = vault_mount.main


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_mount) == []


def test_an_absent_kv2_mount_is_enabled_then_configured(vault, run):
    result = run(MAIN, path="/secret/", max_versions=10, cas_required=True)
    assert result["changed"] is True
    assert result["path"] == "secret"
    assert result["changed_keys"] == ["cas_required", "kv_version", "max_versions", "type"]
    assert result["mount"] == {
        "type": "kv",
        "kv_version": 2,
        "max_versions": 10,
        "cas_required": True,
    }
    assert [name for name, _ in vault.writes] == ["sys.enable_secrets_engine", "adapter.post"]
    assert vault.writes[0][1] == {
        "backend_type": "kv",
        "path": "secret",
        "description": None,
        "options": {"version": "2"},
    }
    assert vault.writes[1][1] == {
        "url": "/v1/secret/config",
        "json": {"max_versions": 10, "cas_required": True},
    }
    assert vault.mounts["secret/"]["options"] == {"version": "2"}
    assert vault.kv2_config["secret"]["cas_required"] is True


def test_the_second_run_changes_nothing(vault, run):
    params = {"path": "secret", "max_versions": 10, "delete_version_after": "1h"}
    run(MAIN, **params)
    writes = list(vault.writes)
    result = run(MAIN, **params)
    assert result["changed"] is False
    assert result["changed_keys"] == []
    assert vault.writes == writes


def test_server_durations_are_compared_in_seconds(vault, run):
    """Vault answers ``1h0m0s``; the module asked for ``60m``: the same."""
    vault.add_mount("secret", delete_version_after=3600)
    result = run(MAIN, path="secret", delete_version_after="60m")
    assert result["changed"] is False
    assert vault.writes == []


def test_only_the_differing_settings_are_written(vault, run):
    vault.add_mount("secret", description="old", max_versions=5, cas_required=True)
    result = run(MAIN, path="secret", description="new", max_versions=10, cas_required=True)
    assert result["changed"] is True
    assert result["changed_keys"] == ["description", "max_versions"]
    assert vault.writes == [
        ("sys.tune_mount_configuration", {"path": "secret", "description": "new"}),
        ("adapter.post", {"url": "/v1/secret/config", "json": {"max_versions": 10}}),
    ]
    assert vault.mounts["secret/"]["description"] == "new"
    assert vault.kv2_config["secret"]["max_versions"] == 10


def test_omitted_settings_are_not_managed(vault, run):
    vault.add_mount("secret", description="kept", max_versions=3, cas_required=True)
    result = run(MAIN, path="secret")
    assert result["changed"] is False
    assert result["mount"]["max_versions"] == 3
    assert vault.writes == []


def test_check_mode_reports_the_change_with_a_diff_and_writes_nothing(vault, run):
    vault.add_mount("secret", max_versions=5)
    result = run(MAIN, check_mode=True, diff=True, path="secret", max_versions=10)
    assert result["changed"] is True
    assert result["changed_keys"] == ["max_versions"]
    assert result["diff"]["before"]["max_versions"] == 5
    assert result["diff"]["after"]["max_versions"] == 10
    assert vault.writes == []
    assert vault.kv2_config["secret"]["max_versions"] == 5


def test_check_mode_on_an_absent_mount_shows_it_from_nothing(vault, run):
    result = run(MAIN, check_mode=True, diff=True, path="kv", description="keys")
    assert result["changed"] is True
    assert result["diff"] == {
        "before": {},
        "after": {"type": "kv", "kv_version": 2, "description": "keys"},
    }
    assert vault.writes == []
    assert "kv/" not in vault.mounts


def test_without_diff_mode_there_is_no_diff(vault, run):
    assert "diff" not in run(MAIN, path="secret")


def test_another_engine_type_is_enabled_without_kv_options(vault, run):
    result = run(MAIN, path="transit", type="transit")
    assert result["changed_keys"] == ["type"]
    assert result["mount"] == {"type": "transit"}
    assert vault.writes == [
        (
            "sys.enable_secrets_engine",
            {"backend_type": "transit", "path": "transit", "description": None, "options": None},
        )
    ]


def test_a_mount_of_another_type_is_refused_and_left_alone(vault, run):
    vault.add_mount("secret", "transit")
    result = run(MAIN, path="secret")
    assert result["failed"] is True
    assert result["msg"].startswith(
        "A secrets engine of type 'transit' is mounted at secret/, not 'kv'. Nothing was changed"
    )
    assert vault.writes == []


def test_a_kv1_mount_where_kv2_is_wanted_is_refused(vault, run):
    vault.add_mount("secret", version=1)
    result = run(MAIN, path="secret", max_versions=10)
    assert result["failed"] is True
    assert "secret/ is a KV version 1 mount, not version 2. Nothing was changed" in result["msg"]
    assert vault.writes == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"path": "/"}, "path must not be empty"),
        (
            {"path": "secret", "delete_version_after": "soon"},
            "delete_version_after: not a duration: 'soon'",
        ),
        (
            {"path": "transit", "type": "transit", "max_versions": 3},
            "max_versions, cas_required and delete_version_after need type=kv v2",
        ),
        (
            {"path": "old", "kv_version": 1, "cas_required": True},
            "max_versions, cas_required and delete_version_after need type=kv v2",
        ),
    ],
)
def test_bad_input_fails_before_any_vault_call(vault, run, params, message):
    result = run(MAIN, **params)
    assert result["failed"] is True
    assert result["msg"].startswith(message)
    assert vault.clients == []
    assert vault.calls == []


def test_a_token_without_rights_gets_a_message_naming_the_action(vault, run):
    vault.fail("sys.enable_secrets_engine", hvac.exceptions.Forbidden("permission denied"))
    result = run(MAIN, path="secret")
    assert result["failed"] is True
    assert result["msg"].startswith(
        "Permission denied to enable the kv secrets engine at secret/: the token lacks the rights"
    )


def test_a_fresh_mount_still_upgrading_is_waited_for(vault, run):
    vault.add_mount("secret", max_versions=5)
    vault.upgrading_answers = 1
    result = run(MAIN, path="secret", max_versions=5)
    assert result["changed"] is False
    assert vault.calls.count("kv2.read_configuration") == 2
