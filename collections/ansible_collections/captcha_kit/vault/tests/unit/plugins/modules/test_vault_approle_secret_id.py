# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_approle_secret_id: when a host needs a new secret-id, issuing it wrapped, destroying."""

from __future__ import annotations

import datetime as dt

import pytest
from ansible_collections.captcha_kit.vault.plugins.modules import vault_approle_secret_id

MAIN = vault_approle_secret_id.main
ROLE = "captcha-worker-dev"
DAY = 86400
NOW = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def role(vault):
    vault.add_role(ROLE, secret_id_ttl=30 * DAY)
    return vault


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_approle_secret_id) == []


@pytest.mark.parametrize(
    ("expiration", "seconds"),
    [
        ("", None),
        (None, None),
        ("0001-01-01T00:00:00Z", None),
        ("2025-01-01T01:00:00Z", 3600),
        ("2025-01-01T01:00:00.123456789+00:00", 3600),
        ("2025-01-01T03:00:00.5+02:00", 3600),
        ("2025-01-01T00:59:59", 3599),
        ("2024-12-31T23:00:00Z", -3600),
    ],
)
def test_expiry_times_as_vault_prints_them_are_read(expiration, seconds):
    assert vault_approle_secret_id._expires_in(expiration, now=NOW) == seconds


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ({"secret_id_present": False}, "the host has no secret-id yet"),
        ({"secret_id_present": True, "accessor": " "}, "the host's secret-id accessor is unknown"),
        ({"force": True}, "a new secret-id was requested (force)"),
        (
            {"wrapped_pending": True},
            "a wrapped secret-id is waiting on the host, not taken by the worker",
        ),
        ({"wrapped_refused": True}, "the worker refused a wrapped secret-id"),
    ],
)
def test_a_host_needs_a_new_secret_id_when(role, run, host, reason):
    result = run(MAIN, role_name=ROLE, issue=False, **host)
    assert result["needs_issue"] is True
    assert result["reason"].startswith(reason)
    assert result["changed"] is False
    assert result["role_id"] == role.role_ids[("approle", ROLE)]


def test_a_valid_secret_id_needs_nothing(role, run):
    accessor = role.add_secret_id(ROLE, ttl=30 * DAY)
    result = run(MAIN, role_name=ROLE, secret_id_present=True, accessor=accessor)
    assert result["needs_issue"] is False
    assert result["changed"] is False
    assert result["issued"] is False
    assert 30 * DAY - 60 < result["expires_in"] <= 30 * DAY
    assert result["reason"] == f"the host's secret-id is valid for {result['expires_in']} s"
    assert role.writes == []


def test_a_secret_id_without_expiry_needs_nothing(role, run):
    accessor = role.add_secret_id(ROLE, ttl=None)
    result = run(MAIN, role_name=ROLE, secret_id_present=True, accessor=accessor)
    assert (result["needs_issue"], result["expires_in"]) == (False, None)
    assert result["reason"] == "the host's secret-id is valid (no expiry)"


def test_a_secret_id_expiring_within_min_ttl_is_replaced(role, run):
    accessor = role.add_secret_id(ROLE, ttl=3600)
    result = run(MAIN, role_name=ROLE, secret_id_present=True, accessor=accessor, min_ttl=DAY)
    assert result["needs_issue"] is True
    assert result["reason"].startswith("the host's secret-id expires in ")
    assert 0 < result["expires_in"] <= 3600


def test_a_secret_id_without_uses_left_is_replaced(role, run):
    accessor = role.add_secret_id(ROLE, ttl=None, num_uses=-1)
    result = run(MAIN, role_name=ROLE, secret_id_present=True, accessor=accessor, issue=False)
    assert result["reason"] == "the host's secret-id has no uses left"


@pytest.mark.parametrize("status", [404, 204])
def test_an_accessor_vault_does_not_know_is_replaced(role, run, status):
    role.unknown_accessor_status = status
    result = run(MAIN, role_name=ROLE, secret_id_present=True, accessor="sid_gone", issue=False)
    assert result["needs_issue"] is True
    assert result["reason"] == "Vault does not know the host's secret-id (revoked or expired)"


def test_a_needed_secret_id_is_issued_wrapped(role, run):
    result = run(
        MAIN,
        role_name=ROLE,
        wrap_ttl="2m",
        metadata={"host": "worker-1"},
        cidr_list=["127.0.0.1/32"],
    )
    assert result["changed"] is True
    assert result["issued"] is True
    assert result["wrap_token"].startswith("hvs.")
    assert result["wrap_ttl"] == 120
    assert result["wrapped_accessor"] in role.secret_ids[("approle", ROLE)]
    assert result["wrap_accessor"]
    assert role.writes == [
        (
            "approle.generate_secret_id",
            {
                "role_name": ROLE,
                "metadata": {"host": "worker-1"},
                "cidr_list": ["127.0.0.1/32"],
                "mount_point": "approle",
                "wrap_ttl": "120s",
            },
        )
    ]


def test_empty_metadata_and_cidrs_are_not_sent(role, run):
    run(MAIN, role_name=ROLE)
    [(_, sent)] = role.writes
    assert (sent["metadata"], sent["cidr_list"]) == (None, None)


def test_check_mode_says_it_would_issue_and_issues_nothing(role, run):
    result = run(MAIN, check_mode=True, role_name=ROLE)
    assert result["changed"] is True
    assert result["issued"] is False
    assert "wrap_token" not in result
    assert role.writes == []


def test_issue_false_only_reports(role, run):
    result = run(MAIN, role_name=ROLE, issue=False)
    assert (result["changed"], result["needs_issue"], result["issued"]) == (False, True, False)
    assert role.writes == []


def test_an_unwrapped_answer_fails(role, run):
    role.wrap_secret_ids = False
    result = run(MAIN, role_name=ROLE)
    assert result["failed"] is True
    assert result["msg"] == f"Vault did not wrap the secret-id of AppRole role {ROLE}"
    assert "secret_id" not in result


def test_state_absent_destroys_a_known_secret_id(role, run):
    accessor = role.add_secret_id(ROLE)
    result = run(MAIN, role_name=ROLE, state="absent", accessor=accessor)
    assert result["changed"] is True
    assert result["reason"] == "destroyed the secret-id"
    assert role.writes == [
        (
            "approle.destroy_secret_id_accessor",
            {"role_name": ROLE, "secret_id_accessor": accessor, "mount_point": "approle"},
        )
    ]
    assert role.secret_ids[("approle", ROLE)] == {}


def test_state_absent_in_check_mode_destroys_nothing(role, run):
    accessor = role.add_secret_id(ROLE)
    result = run(MAIN, check_mode=True, role_name=ROLE, state="absent", accessor=accessor)
    assert result["changed"] is True
    assert role.writes == []
    assert accessor in role.secret_ids[("approle", ROLE)]


def test_state_absent_on_an_unknown_secret_id_is_no_change(role, run):
    result = run(MAIN, role_name=ROLE, state="absent", accessor="sid_gone")
    assert result["changed"] is False
    assert result["reason"] == "Vault does not know that secret-id"
    assert role.writes == []


def test_a_missing_role_means_the_environment_is_not_provisioned(vault, run):
    result = run(MAIN, role_name=ROLE, mount="/approle-x/")
    assert result["failed"] is True
    assert result["msg"] == (
        f"AppRole role {ROLE} does not exist at auth/approle-x: this environment is not "
        "provisioned in Vault (run playbooks/provision-vault.yml for it first)"
    )
    assert vault.writes == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"wrap_ttl": "two minutes"}, "wrap_ttl: not a duration: 'two minutes'"),
        ({"wrap_ttl": "0s"}, "wrap_ttl must be a positive duration, e.g. 120s"),
        ({"min_ttl": -1}, "min_ttl must not be negative"),
        (
            {"state": "absent", "accessor": "  "},
            "state=absent needs the accessor of the secret-id to destroy",
        ),
    ],
)
def test_bad_input_fails_before_any_vault_call(vault, run, params, message):
    result = run(MAIN, role_name=ROLE, **params)
    assert result["failed"] is True
    assert result["msg"].startswith(message)
    assert vault.calls == []
