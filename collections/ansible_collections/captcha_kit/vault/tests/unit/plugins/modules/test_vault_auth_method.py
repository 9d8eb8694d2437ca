# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_auth_method: enable, keep the description and the user lockout, never disable."""

from __future__ import annotations

import pytest
from ansible_collections.captcha_kit.vault.plugins.modules import vault_auth_method

MAIN = vault_auth_method.main
LOCKOUT = {"threshold": 5, "duration": "15m", "counter_reset": "900s"}
LOCKOUT_SECONDS = {"threshold": 5, "duration": 900, "counter_reset": 900, "disable": False}


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_auth_method) == []


def test_an_absent_method_is_enabled_at_its_type_by_default(vault, run):
    result = run(MAIN, type="approle", description="worker logins", diff=True)
    assert result["changed"] is True
    assert result["path"] == "approle"
    assert result["accessor"] == vault.auth_methods["approle/"]["accessor"]
    assert result["diff"] == {
        "before": {},
        "after": {"type": "approle", "description": "worker logins"},
    }
    assert vault.writes == [
        (
            "sys.enable_auth_method",
            {"method_type": "approle", "description": "worker logins", "path": "approle"},
        )
    ]


def test_check_mode_reports_the_new_method_and_writes_nothing(vault, run):
    result = run(MAIN, check_mode=True, type="approle", path="/workers/")
    assert result["changed"] is True
    assert result["path"] == "workers"
    assert result["accessor"] == ""
    assert vault.writes == []


def test_an_unchanged_method_is_left_alone(vault, run):
    vault.add_auth("approle", description="worker logins")
    result = run(MAIN, type="approle", description="worker logins")
    assert result["changed"] is False
    assert result["accessor"] == vault.auth_methods["approle/"]["accessor"]
    assert vault.writes == []


def test_an_omitted_description_is_not_managed(vault, run):
    vault.add_auth("approle", description="set by hand")
    assert run(MAIN, type="approle")["changed"] is False


def test_a_differing_description_is_tuned_with_a_diff(vault, run):
    vault.add_auth("approle", description="old")
    result = run(MAIN, type="approle", description="new", diff=True)
    assert result["changed"] is True
    assert result["diff"]["before"]["description"] == "old"
    assert result["diff"]["after"]["description"] == "new"
    assert vault.writes == [("sys.tune_auth_method", {"path": "approle", "description": "new"})]


def test_a_method_of_another_type_is_refused(vault, run):
    vault.add_auth("approle", "userpass")
    result = run(MAIN, type="approle")
    assert result["failed"] is True
    assert result["msg"] == (
        "An auth method of type 'userpass' is enabled at auth/approle/, not 'approle'. "
        "Nothing was changed: choose another path."
    )
    assert vault.writes == []


def test_user_lockout_at_the_wanted_values_is_no_change(vault, run):
    vault.add_auth("approle")
    result = run(MAIN, type="approle", user_lockout=LOCKOUT, diff=True)
    assert result["changed"] is False
    assert result["diff"]["after"]["user_lockout"] == LOCKOUT_SECONDS
    assert vault.writes == []


def test_user_lockout_drift_is_shown_and_reset(vault, run):
    vault.add_auth("approle", threshold=50)
    result = run(MAIN, type="approle", user_lockout=LOCKOUT, diff=True)
    assert result["changed"] is True
    assert result["diff"]["before"]["user_lockout"]["threshold"] == 50
    assert result["diff"]["after"]["user_lockout"]["threshold"] == 5
    [(name, sent)] = vault.writes
    assert name == "adapter.post"
    assert sent["url"] == "/v1/sys/auth/approle/tune"
    assert sent["json"] == {
        "user_lockout_config": {
            "lockout_threshold": "5",
            "lockout_duration": "900s",
            "lockout_counter_reset": "900s",
            "lockout_counter_reset_duration": "900s",
            "lockout_disable": False,
        }
    }
    assert vault.lockout["approle"]["threshold"] == 5


def test_user_lockout_drift_in_check_mode_writes_nothing(vault, run):
    vault.add_auth("approle", threshold=50)
    result = run(MAIN, check_mode=True, type="approle", user_lockout=LOCKOUT)
    assert result["changed"] is True
    assert vault.writes == []
    assert vault.lockout["approle"]["threshold"] == 50


def test_a_new_method_gets_its_user_lockout_right_away(vault, run):
    result = run(MAIN, type="approle", user_lockout=LOCKOUT | {"threshold": 3})
    assert result["changed"] is True
    assert [name for name, _ in vault.writes] == ["sys.enable_auth_method", "adapter.post"]
    assert vault.lockout["approle"]["threshold"] == 3


def test_a_mount_never_tuned_for_lockout_gets_the_settings(vault, run):
    """An existing approle mount (another team's, or the kit's before lockout was managed)
    reports no user lockout until tuned: shown as unset in the diff, then written."""
    vault.add_auth("approle")
    vault.lockout_unset.add("approle")
    result = run(MAIN, type="approle", user_lockout=LOCKOUT | {"threshold": 3}, diff=True)
    assert result["changed"] is True
    assert result["diff"]["before"]["user_lockout"] is None
    assert result["diff"]["after"]["user_lockout"]["threshold"] == 3
    assert [name for name, _ in vault.writes] == ["adapter.post"]
    assert vault.lockout["approle"]["threshold"] == 3
    again = run(MAIN, type="approle", user_lockout=LOCKOUT | {"threshold": 3})
    assert again["changed"] is False


def test_a_mount_never_tuned_in_check_mode_writes_nothing(vault, run):
    vault.add_auth("approle")
    vault.lockout_unset.add("approle")
    result = run(MAIN, type="approle", user_lockout=LOCKOUT, check_mode=True)
    assert result["changed"] is True
    assert vault.writes == []


def test_a_server_without_user_lockout_is_named(vault, run):
    vault.add_auth("approle")
    vault.lockout_supported = False
    result = run(MAIN, type="approle", user_lockout=LOCKOUT)
    assert result["failed"] is True
    assert result["msg"].startswith("auth/approle/ did not take the user lockout settings")


def test_a_server_that_does_not_take_the_settings_fails_after_checking(vault, run):
    vault.add_auth("approle", disable=False)
    vault.lockout_ignored = {"disable"}
    result = run(MAIN, type="approle", user_lockout=LOCKOUT | {"disable": True})
    assert result["failed"] is True
    assert result["msg"].startswith("auth/approle/ did not take the user lockout settings")
    assert result["msg"].endswith("this server does not support them all")


@pytest.mark.parametrize(
    ("lockout", "message"),
    [
        (LOCKOUT | {"duration": "a while"}, "user_lockout: not a duration: 'a while'"),
        (LOCKOUT | {"counter_reset": "-5"}, "user_lockout: not a duration: '-5'"),
        (
            LOCKOUT | {"threshold": 0},
            "user_lockout: threshold must be at least 1, duration and counter_reset positive",
        ),
        (
            LOCKOUT | {"duration": "0s"},
            "user_lockout: threshold must be at least 1, duration and counter_reset positive",
        ),
    ],
)
def test_bad_user_lockout_fails_before_any_vault_call(vault, run, lockout, message):
    result = run(MAIN, type="approle", user_lockout=lockout)
    assert result["failed"] is True
    assert result["msg"].startswith(message)
    assert vault.calls == []


def test_an_incomplete_user_lockout_is_refused_by_the_argument_spec(vault, run):
    result = run(MAIN, type="approle", user_lockout={"threshold": 5})
    assert result["failed"] is True
    assert "missing required arguments" in result["msg"]
    assert vault.calls == []
