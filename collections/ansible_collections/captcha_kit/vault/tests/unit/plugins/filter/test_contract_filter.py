# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The captcha_kit.vault.contract and captcha_kit.vault.key_path filters."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError
from ansible_collections.captcha_kit.vault.plugins.filter.contract import (
    FilterModule,
    contract,
    key_path,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils import contract as source


def test_the_filters_are_registered():
    assert FilterModule().filters() == {"contract": contract, "key_path": key_path}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("env_name_pattern", source.ENV_NAME_PATTERN),
        ("key_pattern", source.KEY_PATTERN),
        ("key_path_template", "captchaai/{env}"),
        ("staged_path_template", "captchaai-staged/{env}"),
        ("default_kv_mount", "secret"),
        ("rotation_record_fields", list(source.ROTATION_RECORD_FIELDS)),
        ("rotation_states", list(source.ROTATION_STATES)),
    ],
)
def test_contract_returns_the_value(name, value):
    assert contract(name) == value


def test_lists_come_back_as_lists_for_templates():
    assert isinstance(contract("rotation_record_fields"), list)


def test_an_unknown_name_is_an_error_that_lists_the_known_ones():
    with pytest.raises(AnsibleFilterError, match="unknown name 'key_regex'; known: env_name_"):
        contract("key_regex")


def test_key_path():
    assert key_path("prod") == "captchaai/prod"


@pytest.mark.parametrize("env", ["Prod", "../prod", "", "a" * 25])
def test_key_path_of_a_bad_name_is_an_error(env):
    with pytest.raises(AnsibleFilterError, match="not a valid environment name"):
        key_path(env)
