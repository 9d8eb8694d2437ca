"""Each role's meta/argument_specs.yml mirrors its defaults/main.yml exactly (the documented
interface): the same variables, the same default values, and nothing both required and defaulted
(a defaulted variable is always "given", so `required` would never fire)."""

from __future__ import annotations

import tomllib

import pytest
import yaml
from captcha_solver.config import parse_config, render_config

from testkit.paths import REPO
from testkit.playbook import run_playbook, write_inventory

ROLES = sorted(p.name for p in (REPO / "roles").iterdir())


def _load(role: str) -> tuple[dict, dict]:
    root = REPO / "roles" / role
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


def test_the_worker_template_writes_what_render_config_writes(tmp_path):
    """The role's config.toml.j2 and the solver's ``render_config`` (which the test kit's
    workers use) write the same configuration: rendered by a real ``ansible-playbook`` with the
    role's own defaults and vars, loaded by the solver, written again and loaded again."""
    role = REPO / "roles" / "captcha_worker"
    out = tmp_path / "config.toml"
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars_files": [str(role / "defaults" / "main.yml"), str(role / "vars" / "main.yml")],
            "tasks": [
                {
                    "name": "Render the worker's config the way the role does",
                    "ansible.builtin.template": {
                        "src": str(role / "templates" / "config.toml.j2"),
                        "dest": str(out),
                        "mode": "0600",
                    },
                }
            ],
        }
    ]
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump(play))
    settings = {  # extra vars: above the role files' own precedence
        "captcha_worker_env": "staging",
        "captcha_kit_vault_addr": "https://127.0.0.1:18250",
        "captcha_kit_vault_addrs": ["https://127.0.0.1:18250", "https://127.0.0.1:18260"],
        "captcha_kit_vault_cacert": "/nowhere/ca.pem",
        "captcha_worker_provider_settings": {
            "poll_interval": 2.5,
            "first_poll_delay": {"default": 3.0, "userrecaptcha": 12.0},
            "max_in_flight": 50,
        },
    }
    inventory = write_inventory(tmp_path, {}, {})
    run = run_playbook(playbook, inventory=inventory, extra_vars=settings)
    assert run.rc == 0, run.output[-3000:]
    data = tomllib.loads(out.read_text())
    again = tomllib.loads(render_config(data))
    assert again == data
    assert parse_config(again, environ={}) == parse_config(data, environ={})
    assert data["vault"]["key_path"] == "captchaai/staging"


def test_the_worker_venv_pins_what_the_solver_package_pins():
    """solver/pyproject.toml is the one place a runtime dependency of the worker is chosen; the
    role's constraints (the whole locked venv of a worker host) must pin the same versions."""
    project = tomllib.loads((REPO / "solver" / "pyproject.toml").read_text())["project"]
    defaults, _ = _load("captcha_worker")
    constraints = dict(line.split("==", 1) for line in defaults["captcha_worker_pip_constraints"])
    for requirement in project["dependencies"]:
        name, version = requirement.split("==", 1)
        assert constraints.get(name) == version, (
            f"{name}: role {constraints.get(name)}, solver {version}"
        )
