# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_policy: write only policies whose rules differ, one or many per call."""

from __future__ import annotations

import pytest
from ansible_collections.captcha_kit.vault.plugins.modules import vault_policy

MAIN = vault_policy.main
RULES = 'path "secret/data/captchaai/dev" {\n  capabilities = ["read"]\n}\n'
OTHER = 'path "*" {\n  capabilities = ["read", "list"]\n}\n'


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_policy) == []


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        (None, None),
        (RULES, RULES),
        (
            'path "a" {   \n  capabilities = ["read"]\t\n}',
            'path "a" {\n  capabilities = ["read"]\n}\n',
        ),
        ('\n\n  path "a" {}\n\n\n', 'path "a" {}\n'),
        ("a\r\nb\r\n", "a\nb\n"),
    ],
)
def test_rules_are_compared_without_trailing_whitespace(text, normalised):
    assert vault_policy.normalize_rules(text) == normalised


def test_an_absent_policy_is_written_with_a_diff(vault, run):
    result = run(MAIN, name="captcha-worker-dev", policy=RULES, diff=True)
    assert result["changed"] is True
    assert result["name"] == "captcha-worker-dev"
    assert result["diff"] == {
        "before": "",
        "after": RULES,
        "before_header": "policy captcha-worker-dev (current)",
        "after_header": "policy captcha-worker-dev (desired)",
    }
    assert vault.writes == [
        ("sys.create_or_update_policy", {"name": "captcha-worker-dev", "policy": RULES})
    ]


def test_rules_that_differ_only_in_whitespace_are_no_change(vault, run):
    vault.policies["captcha-worker-dev"] = RULES
    result = run(MAIN, name="captcha-worker-dev", policy=RULES.replace("\n", "   \n") + "\n\n")
    assert result["changed"] is False
    assert vault.writes == []


def test_differing_rules_are_replaced(vault, run):
    vault.policies["captcha-worker-dev"] = OTHER
    result = run(MAIN, name="captcha-worker-dev", policy=RULES, diff=True)
    assert result["changed"] is True
    assert result["diff"]["before"] == OTHER
    assert result["diff"]["after"] == RULES
    assert vault.policies["captcha-worker-dev"] == RULES


def test_check_mode_shows_the_diff_and_writes_nothing(vault, run):
    vault.policies["captcha-worker-dev"] = OTHER
    result = run(MAIN, check_mode=True, diff=True, name="captcha-worker-dev", policy=RULES)
    assert result["changed"] is True
    assert result["diff"]["after"] == RULES
    assert vault.writes == []
    assert vault.policies["captcha-worker-dev"] == OTHER


def test_an_unchanged_single_policy_still_shows_its_diff(vault, run):
    vault.policies["captcha-worker-dev"] = RULES
    result = run(MAIN, diff=True, name="captcha-worker-dev", policy=RULES)
    assert result["changed"] is False
    assert result["diff"]["before"] == result["diff"]["after"] == RULES


def test_without_diff_mode_there_is_no_diff(vault, run):
    assert "diff" not in run(MAIN, name="captcha-worker-dev", policy=RULES)


def test_state_absent_deletes_an_existing_policy(vault, run):
    vault.policies["old"] = OTHER
    result = run(MAIN, name="old", state="absent", diff=True)
    assert result["changed"] is True
    assert result["diff"]["before"] == OTHER
    assert result["diff"]["after"] == ""
    assert vault.writes == [("sys.delete_policy", {"name": "old"})]


def test_state_absent_on_a_missing_policy_is_no_change(vault, run):
    result = run(MAIN, name="never-was", state="absent")
    assert result["changed"] is False
    assert vault.writes == []


def test_many_policies_report_each_and_diff_only_those_that_differ(vault, run):
    vault.policies["same"] = RULES
    vault.policies["drifted"] = OTHER
    result = run(
        MAIN,
        diff=True,
        policies=[
            {"name": "same", "policy": RULES},
            {"name": "drifted", "policy": RULES},
            {"name": "new", "policy": RULES},
        ],
    )
    assert result["changed"] is True
    assert result["policies"] == [
        {"name": "same", "changed": False},
        {"name": "drifted", "changed": True},
        {"name": "new", "changed": True},
    ]
    assert [d["before_header"] for d in result["diff"]] == [
        "policy drifted (current)",
        "policy new (current)",
    ]
    assert [w[1]["name"] for w in vault.writes] == ["drifted", "new"]


def test_many_unchanged_policies_have_no_diff(vault, run):
    vault.policies["same"] = RULES
    result = run(MAIN, diff=True, policies=[{"name": "same", "policy": RULES}])
    assert result["changed"] is False
    assert "diff" not in result


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"name": "root", "state": "absent"}, "The built-in policy 'root' cannot be deleted"),
        ({"name": "default", "state": "absent"}, "The built-in policy 'default' cannot be deleted"),
        ({"name": "p", "policy": "  \n "}, "The rules of policy p are empty"),
        (
            {"policies": [{"name": "a", "policy": RULES}, {"name": "b"}]},
            "policy b: the rules (policy) are required with state=present",
        ),
        (
            {"policies": [{"name": "a", "policy": RULES}, {"name": "a", "policy": OTHER}]},
            "policies: each name once; repeated: a",
        ),
    ],
)
def test_bad_input_fails_before_any_vault_call(vault, run, params, message):
    result = run(MAIN, **params)
    assert result["failed"] is True
    assert result["msg"] == message
    assert vault.calls == []


def test_one_bad_item_stops_the_whole_batch_before_the_first_write(vault, run):
    result = run(MAIN, policies=[{"name": "good", "policy": RULES}, {"name": "bad", "policy": ""}])
    assert result["failed"] is True
    assert vault.writes == []


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"name": "p"}, "state is present but any of the following are missing: policy, policies"),
        ({"name": "p", "policies": [{"name": "q", "policy": RULES}]}, "mutually exclusive"),
        ({"policy": RULES}, "one of the following is required: name, policies"),
    ],
)
def test_option_combinations_are_checked_by_the_argument_spec(vault, run, params, words):
    result = run(MAIN, **params)
    assert result["failed"] is True
    assert words in result["msg"]
    assert vault.calls == []
