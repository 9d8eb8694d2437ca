# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""key_check through its real main(): expectations, failures, warnings, check mode, no_log."""

from __future__ import annotations

import json

import pytest
import yaml
from ansible.module_utils import _internal as ansible_internal
from ansible.module_utils import basic
from ansible.module_utils.common import warnings as ansible_warnings
from ansible.module_utils.testing import patch_module_args
from ansible_collections.captcha_kit.captchaai.plugins.modules import key_check


@pytest.fixture
def check(monkeypatch, capsys, provider):
    """``check(key, check_mode=False, **params) -> result`` from main()'s printed JSON; fails the
    test when the key appears in it."""
    monkeypatch.setattr(basic.AnsibleModule, "_log_invocation", lambda module: None)
    # A module runs apart from the controller: once any test imported controller code (a filter
    # plugin imports ansible.errors), module warnings would go to the display, not the result.
    monkeypatch.setattr(ansible_internal, "is_controller", False)

    def run(key, check_mode=False, **params):
        monkeypatch.setattr(ansible_warnings, "_global_warnings", {})
        args = {"key": key, "provider_url": provider.url, **params}
        args["_ansible_check_mode"] = check_mode
        with patch_module_args(args), pytest.raises(SystemExit):
            key_check.main()
        out = capsys.readouterr().out
        assert key.strip() not in out, "the key in the result"
        result = json.loads(out)
        if "warnings" in result:  # 2.19 sends WarningSummary objects to the controller
            result["warnings"] = [
                w if isinstance(w, str) else w["event"]["msg"] for w in result["warnings"]
            ]
        return result

    return run


def test_the_argument_spec_matches_the_documentation():
    documented = yaml.safe_load(key_check.DOCUMENTATION)["options"]
    assert set(documented) == set(key_check.OPTIONS)
    for name, spec in key_check.OPTIONS.items():
        doc = documented[name]
        for field, default in (("type", "str"), ("required", False), ("default", None)):
            assert doc.get(field, default) == spec.get(field, default), f"{name}.{field}"
        assert doc.get("choices") == spec.get("choices"), f"{name}.choices"
        assert doc.get("no_log", spec.get("no_log")) == spec.get("no_log")
    assert key_check.OPTIONS["key"]["no_log"] is True


def test_an_accepted_key(check, provider, key):
    provider.accepted[key] = "5.00000"
    result = check(f" {key}\n", label="new key")
    assert result["changed"] is False
    assert "failed" not in result
    assert result["accepted"] is True
    assert result["as_expected"] is True
    assert result["detail"] == "balance 5.00000"
    assert result["fingerprint"] == "***" + key[-4:]
    assert provider.requests[0][1]["key"] == key, "sent stripped"


def test_a_new_key_the_provider_does_not_accept_fails(check, key):
    result = check(key, label="new key")
    assert result["failed"] is True
    assert result["msg"] == (
        f"The provider did not accept the new key (***{key[-4:]}): ERROR_KEY_DOES_NOT_EXIST"
    )
    assert result["accepted"] is False


def test_an_unreachable_provider_fails_the_check_of_a_new_key(check, provider, key):
    provider.answer = (503, "busy")
    result = check(key)
    assert result["msg"] == (
        f"The provider did not accept the key (***{key[-4:]}): provider answered HTTP 503"
    )
    assert result["accepted"] is None


def test_a_revoked_old_key(check, key):
    result = check(key, expect="rejected", fail_on_mismatch=False, label="old key")
    assert result["as_expected"] is True
    assert result["accepted"] is False
    assert "warnings" not in result


def test_an_old_key_still_accepted_is_a_warning(check, provider, key):
    provider.accepted[key] = "1.25"
    result = check(key, expect="rejected", fail_on_mismatch=False, label="old key")
    assert "failed" not in result
    assert result["as_expected"] is False
    assert result["warnings"] == [
        f"The provider still accepts the old key ***{key[-4:]} (balance 1.25): revoke it at "
        "the provider now"
    ]


def test_an_old_key_still_accepted_fails_unless_told_to_warn(check, provider, key):
    provider.accepted[key] = "1.25"
    result = check(key, expect="rejected", label="old key")
    assert result["failed"] is True
    assert result["msg"].startswith("The provider still accepts the old key")


def test_an_old_key_that_could_not_be_checked_is_a_warning(check, provider, key):
    provider.answer = (502, "")
    result = check(key, expect="rejected", fail_on_mismatch=False, label="old key")
    assert result["accepted"] is None
    assert result["warnings"] == [
        "Could not check the old key at the provider: provider answered HTTP 502"
    ]


def test_check_mode_asks_the_provider_all_the_same(check, provider, key):
    provider.accepted[key] = "5"
    result = check(key, check_mode=True)
    assert result["accepted"] is True
    assert result["changed"] is False
    assert len(provider.requests) == 1
