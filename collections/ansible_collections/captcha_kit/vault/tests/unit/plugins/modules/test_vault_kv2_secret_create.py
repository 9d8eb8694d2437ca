# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_kv2_secret_create: write once with check-and-set 0; never read, compare or show data."""

from __future__ import annotations

import json
import secrets

import pytest
from ansible_collections.captcha_kit.vault.plugins.modules import vault_kv2_secret_create

MAIN = vault_kv2_secret_create.main
PATH = "captchaai/dev"


@pytest.fixture
def key():
    return secrets.token_hex(16)


@pytest.fixture
def kv(vault):
    vault.add_mount("secret")
    return vault


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_kv2_secret_create) == []


def test_an_absent_secret_is_created_with_check_and_set_0(kv, run, key):
    result = run(MAIN, path=f"/{PATH}/", data={"api_key": key}, diff=True)
    assert result["changed"] is True
    assert result["created"] is True
    assert result["version"] == 1
    assert result["diff"] == {
        "before": {"exists": False},
        "after": {"exists": True, "fields": ["api_key"]},
    }
    assert key not in json.dumps(result)
    [(name, sent)] = kv.writes
    assert name == "kv2.create_or_update_secret"
    assert (sent["path"], sent["cas"], sent["mount_point"]) == (PATH, 0, "secret")


def test_an_existing_secret_is_neither_read_nor_overwritten(kv, run, key):
    kv.kv2_versions[("secret", PATH)] = 3
    result = run(MAIN, path=PATH, data={"api_key": key}, diff=True)
    assert result["changed"] is False
    assert result["created"] is False
    assert result["version"] == 3
    assert "diff" not in result
    assert kv.writes == []
    assert "kv2.read_secret_version" not in kv.calls


def test_check_mode_reports_the_creation_with_field_names_only(kv, run, key):
    result = run(MAIN, check_mode=True, diff=True, path=PATH, data={"api_key": key, "note": key})
    assert result["changed"] is True
    assert result["created"] is True
    assert result["version"] == 0
    assert result["diff"]["after"] == {"exists": True, "fields": ["api_key", "note"]}
    assert key not in json.dumps(result)
    assert kv.writes == []


def test_another_mount_point_is_used_as_given(vault, run, key):
    vault.add_mount("kv-dev")
    result = run(MAIN, mount_point="/kv-dev/", path=PATH, data={"api_key": key})
    assert result["version"] == 1
    assert vault.kv2_versions == {("kv-dev", PATH): 1}


def test_a_secret_created_by_someone_else_meanwhile_is_not_overwritten(kv, run, key):
    kv.before(
        "kv2.create_or_update_secret",
        lambda: kv.kv2_versions.setdefault(("secret", PATH), 1),
    )
    result = run(MAIN, path=PATH, data={"api_key": key})
    assert result["failed"] is True
    assert result["msg"] == (
        f"secret/{PATH} was created by someone else during this run; nothing was overwritten"
    )
    assert kv.kv2_versions[("secret", PATH)] == 1


def test_a_fresh_mount_still_upgrading_is_waited_for(kv, run, key):
    kv.upgrading_answers = 1
    result = run(MAIN, path=PATH, data={"api_key": key})
    assert result["created"] is True
    assert kv.calls.count("kv2.read_secret_metadata") == 2


def test_empty_data_fails_before_any_vault_call(kv, run):
    result = run(MAIN, path=PATH, data={})
    assert result["failed"] is True
    assert result["msg"] == f"data for secret/{PATH} is empty"
    assert kv.calls == []
