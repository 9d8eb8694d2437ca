"""Each role's meta/argument_specs.yml mirrors its defaults/main.yml exactly (the documented
interface): the same variables, the same default values, and nothing both required and defaulted
(a defaulted variable is always "given", so `required` would never fire)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "roles").iterdir())


def _load(role: str) -> tuple[dict, dict]:
    root = Path(__file__).resolve().parents[1] / "roles" / role
    defaults = yaml.safe_load((root / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((root / "meta" / "argument_specs.yml").read_text())
    return defaults, specs["argument_specs"]["main"]["options"]


def test_every_role_is_checked():
    assert ROLES == ["captcha_worker", "key_rotation", "vault_provision"]


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_name_exactly_the_defaults(role):
    defaults, options = _load(role)
    assert sorted(set(defaults) - set(options)) == [], "in defaults only"
    assert sorted(set(options) - set(defaults)) == [], "in argument_specs only"


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_defaults_equal_the_defaults(role):
    defaults, options = _load(role)
    differ = {
        name: (options[name].get("default", "<no default>"), value)
        for name, value in defaults.items()
        if options[name].get("default", "<no default>") != value
    }
    assert differ == {}
    assert [n for n in defaults if options[n].get("required")] == []


@pytest.mark.parametrize("role", ROLES)
def test_every_variable_carries_the_role_prefix_and_a_description(role):
    _, options = _load(role)
    assert [n for n in options if not n.startswith(f"{role}_")] == []
    assert [n for n, o in options.items() if not o.get("description")] == []
