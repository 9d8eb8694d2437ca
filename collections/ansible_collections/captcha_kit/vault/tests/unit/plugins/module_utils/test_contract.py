# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The kit's contract (module_utils/contract.py), and every place that must agree with it: the
roles' defaults, argument specs, vars and validate tasks, the rotation module, and the solver."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible_collections.captcha_kit.vault.plugins.module_utils import contract
from ansible_collections.captcha_kit.vault.plugins.module_utils.contract import (
    DEFAULT_KV_MOUNT,
    ENV_NAME_PATTERN,
    KEY_PATH_TEMPLATE,
    KEY_PATTERN,
    ROTATION_RECORD_FIELDS,
    STAGED_PATH_TEMPLATE,
    key_path,
    mask_key,
    staged_path,
    valid_env_name,
    valid_key,
)

CONTRACT_FILE = Path(contract.__file__).resolve()
# The kit's repository: collections/ansible_collections/captcha_kit/vault/plugins/module_utils/
REPO = next(p for p in CONTRACT_FILE.parents if (p / "ansible.cfg").is_file())
ROLES = REPO / "roles"
SOLVER = REPO / "solver" / "src" / "captcha_solver"


def filter_expression(name):
    """How a role asks the contract for ``name`` (the captcha_kit.vault.contract filter)."""
    return "{{ '" + name + "' | captcha_kit.vault.contract }}"


# ---- the values and helpers ------------------------------------------------------------------
def test_repo_root_is_found():
    assert (REPO / "ansible.cfg").is_file()
    assert ROLES.is_dir()


@pytest.mark.parametrize("name", ["dev", "staging", "prod", "eu-west-2", "a", "a" * 24, "x1-"])
def test_valid_env_names(name):
    assert valid_env_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "Dev", "dev_1", "1dev", "-dev", "a" * 25, "dev\n", "dev/x", "../prod", " dev", None, 7],
)
def test_invalid_env_names(name):
    assert not valid_env_name(name)


def test_keys():
    key = "0123456789abcdef" * 2
    assert valid_key(key)
    for bad in (key.upper(), key[:-1], key + "0", key + "\n", " " + key, "g" * 32, None, 32):
        assert not valid_key(bad), repr(bad)


def test_patterns_are_anchored_so_match_and_fullmatch_agree():
    for pattern in (ENV_NAME_PATTERN, KEY_PATTERN):
        assert pattern.startswith("^")
        assert pattern.endswith("$")
    # The Jinja `match` test is re.match: anchored, it refuses what fullmatch refuses
    # (except a trailing newline, which valid_env_name / valid_key refuse as well).
    assert re.match(ENV_NAME_PATTERN, "dev-x_1") is None
    assert re.match(KEY_PATTERN, "0" * 33) is None


def test_key_paths():
    assert key_path("prod") == "captchaai/prod" == KEY_PATH_TEMPLATE.format(env="prod")
    assert staged_path("prod") == "captchaai-staged/prod" == STAGED_PATH_TEMPLATE.format(env="prod")
    for bad in ("../prod", "Prod", ""):
        with pytest.raises(ValueError, match="not a valid environment name"):
            key_path(bad)
        with pytest.raises(ValueError, match="not a valid environment name"):
            staged_path(bad)


def test_mask_shows_only_the_last_four_characters():
    key = "0123456789abcdef" * 2
    assert mask_key(key) == "***cdef"
    assert mask_key("") == mask_key(None) == ""


def test_rotation_record_fields_and_states_are_the_documented_ones():
    """docs/interfaces.md documents the record: the same fields in the same order, the same
    states."""
    text = " ".join((REPO / "docs" / "interfaces.md").read_text().split())
    line = text[text.index("(all values strings):") :].split(" - ", 1)[0]
    assert tuple(re.findall(r"`([a-z_]+)`", line)) == ROTATION_RECORD_FIELDS
    states = re.search(r"\(`([a-z_|]+)`\)", line).group(1).split("|")
    assert tuple(states) == contract.ROTATION_STATES
    assert set(contract.ROTATION_IN_PROGRESS) < set(contract.ROTATION_STATES)


def test_every_contract_name_is_served_by_the_filter():
    assert set(contract.CONTRACT) >= {
        "env_name_pattern",
        "key_pattern",
        "key_path_template",
        "rotation_record_fields",
    }
    assert contract.CONTRACT["env_name_pattern"] == ENV_NAME_PATTERN
    assert contract.CONTRACT["key_pattern"] == KEY_PATTERN
    assert contract.CONTRACT["key_path_template"] == KEY_PATH_TEMPLATE
    assert contract.CONTRACT["rotation_record_fields"] == ROTATION_RECORD_FIELDS


def test_the_file_is_stdlib_only_and_imports_as_a_plain_file():
    """The solver reads it through a symlink, outside Ansible: no ansible import, no package."""
    tree = ast.parse(CONTRACT_FILE.read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "re"}
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('contract', {str(CONTRACT_FILE)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print(m.key_path('dev'))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "captchaai/dev"


# ---- the roles ------------------------------------------------------------------------------
def _role_values():
    """``(where, name, value)`` of every role variable in defaults, vars and argument specs."""
    found = []
    for role in sorted(p for p in ROLES.iterdir() if p.is_dir()):
        for part in ("defaults", "vars"):
            path = role / part / "main.yml"
            if path.is_file():
                for name, value in (yaml.safe_load(path.read_text()) or {}).items():
                    found.append((f"{role.name}/{part}", name, value))
        specs = role / "meta" / "argument_specs.yml"
        if specs.is_file():
            options = yaml.safe_load(specs.read_text())["argument_specs"]["main"]["options"]
            for name, option in options.items():
                if "default" in option:
                    found.append((f"{role.name}/argument_specs", name, option["default"]))
    return found


ROLE_VALUES = _role_values()


def _values(suffixes):
    return [
        pytest.param(value, id=f"{where}:{name}")
        for where, name, value in ROLE_VALUES
        if name.endswith(suffixes)
    ]


def test_the_roles_are_found():
    assert {where.split("/")[0] for where, _, _ in ROLE_VALUES} >= {
        "captcha_worker",
        "key_rotation",
        "vault_provision",
    }


ENV_PATTERN_NAMES = ("_env_name_pattern", "_env_pattern")


@pytest.mark.parametrize("value", _values(ENV_PATTERN_NAMES))
def test_role_env_name_patterns_are_the_contract(value):
    assert value in (ENV_NAME_PATTERN, filter_expression("env_name_pattern"))


@pytest.mark.parametrize("value", _values(("_key_pattern",)))
def test_role_key_patterns_are_the_contract(value):
    assert value in (KEY_PATTERN, filter_expression("key_pattern"))


_FROM_CONTRACT = re.compile(r"'(\w+)'\s*\|\s*captcha_kit\.vault\.contract(\s*\|\s*dirname)?")


def _default_value(value):
    """The default a role variable falls back to: ``captchaai`` from
    ``{{ captcha_kit_key_path_prefix | default('captchaai') }}`` or from
    ``{{ ... | default('key_path_template' | captcha_kit.vault.contract | dirname) }}``."""
    text = str(value)
    asked = _FROM_CONTRACT.search(text)
    if asked:
        found = contract.CONTRACT[asked.group(1)]
        return found.rsplit("/", 1)[0] if asked.group(2) else found
    literal = re.search(r"default\('([^']*)'\)", text)
    return literal.group(1) if literal else value


@pytest.mark.parametrize("value", _values(("_key_path_prefix",)))
def test_role_key_path_prefixes_default_to_the_contract(value):
    assert _default_value(value) + "/{env}" == KEY_PATH_TEMPLATE


@pytest.mark.parametrize("value", _values(("_staged_path_prefix",)))
def test_role_staged_path_prefixes_default_to_the_contract(value):
    assert _default_value(value) + "/{env}" == STAGED_PATH_TEMPLATE


@pytest.mark.parametrize("value", _values(("_kv_mount",)))
def test_role_kv_mounts_default_to_the_contract(value):
    assert _default_value(value) == DEFAULT_KV_MOUNT


# A regular expression for env names or keys written out anywhere in a role.
_ENV_REGEX = re.compile(r"\^?\[a-z[a-z0-9]*\]\[[^\]]*\](?:\{\d*,?\d*\}|[*+])\$?")
_KEY_REGEX = re.compile(r"\^?\[0-9a-f\]\{32\}\$?")
ROLE_FILES = sorted(ROLES.glob("*/**/*.yml"))


@pytest.mark.parametrize("path", ROLE_FILES, ids=lambda p: str(p.relative_to(ROLES)))
def test_no_role_spells_the_patterns_another_way(path):
    text = path.read_text()
    assert [m for m in _ENV_REGEX.findall(text) if m != ENV_NAME_PATTERN] == []
    assert [m for m in _KEY_REGEX.findall(text) if m != KEY_PATTERN] == []


_ENV_CHECK = re.compile(
    r"(\w*env\w*)\s+is\s+(?:not\s+)?(\w+)\(([^()]*)\)|reject\('(\w+)',\s*([^()]*)\)"
)
_WHOLE = ", match_type='fullmatch'"
VALIDATE_FILES = sorted(ROLES.glob("*/tasks/validate*.yml")) + sorted(
    ROLES.glob("key_rotation/tasks/preflight.yml")
)


def _env_checks():
    checks = []
    for path in VALIDATE_FILES:
        for found in _ENV_CHECK.finditer(path.read_text()):
            subject, is_test, matched, reject_test, rejected = found.groups()
            test = is_test or reject_test
            if test not in ("match", "regex") or (rejected is not None and "env" not in rejected):
                continue
            checks.append(
                pytest.param(
                    test,
                    (matched or rejected).strip(),
                    id=f"{path.relative_to(ROLES)}:{subject or ''}",
                )
            )
    return checks


@pytest.mark.parametrize(("test", "argument"), _env_checks())
def test_validate_tasks_check_env_names_with_the_contract(test, argument):
    """Every env-name check of a validate task matches the whole name (``regex`` with
    ``match_type='fullmatch'``: ``match`` and a pattern's ``$`` let a trailing newline through)
    against the filter, or a role variable held to the contract by
    ``test_role_env_name_patterns_are_the_contract``."""
    held = {name for _, name, _ in ROLE_VALUES if name.endswith(ENV_PATTERN_NAMES)}
    assert test == "regex", argument
    assert argument.endswith(_WHOLE), argument
    pattern = argument.removesuffix(_WHOLE).strip()
    assert pattern == "'env_name_pattern' | captcha_kit.vault.contract" or pattern in held


def test_the_validate_tasks_are_found():
    assert len(_env_checks()) >= 3  # captcha_worker, vault_provision, key_rotation


# ---- the solver -------------------------------------------------------------------------------
def test_the_solver_contract_is_this_very_file():
    """``solver/src/captcha_solver/contract.py`` is a symlink to this module, not a copy."""
    link = SOLVER / "contract.py"
    if not link.exists() and not link.is_symlink():
        pytest.skip("solver/src/captcha_solver/contract.py does not exist (yet)")
    assert link.is_symlink(), "a copy would drift: make it a symlink"
    assert link.resolve() == CONTRACT_FILE


def _literal_assignments(path, name):
    tree = ast.parse(path.read_text())
    return [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        and isinstance(node.value, ast.Tuple | ast.List)
    ]


def test_the_solver_keeps_no_other_record_field_list():
    """The worker reports the same rotation record fields (or imports them from the contract)."""
    keycache = SOLVER / "keycache.py"
    if not keycache.is_file():
        pytest.skip("no solver keycache.py")
    for fields in _literal_assignments(keycache, "ROTATION_FIELDS"):
        assert tuple(fields) == ROTATION_RECORD_FIELDS
