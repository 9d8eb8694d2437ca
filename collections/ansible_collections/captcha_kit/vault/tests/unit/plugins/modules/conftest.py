# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures to run the captcha_kit.vault modules in-process against ``FakeVault``.

``vault``     a fresh ``FakeVault``, put where ``get_client`` builds its hvac client, with the
              connection environment variables cleared.
``run``       ``run(main, check_mode=False, diff=False, **params) -> dict``: runs a module's
              ``main()`` with ``params`` (url and the fake's token added unless given) the way
              Ansible does, and returns its result. ``exit_json`` and ``fail_json`` end the run
              with the result (``failed`` tells which); module warnings are in ``warnings``.
              Every result is checked to hold no Vault token.
``spec_mismatches``
              ``spec_mismatches(module) -> list[str]``: where a module's ``OPTIONS`` (its
              argument spec without the connection options) and the options of its
              ``DOCUMENTATION`` disagree (name, type, required, default, choices, elements).
"""

from __future__ import annotations

import json

import hvac
import pytest
import yaml
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.captcha_kit.vault.tests.unit.plugins.modules.vault_fakes import (
    FakeVault,
)

VAULT_URL = "https://vault.test:8200"
CONNECTION_ENV = (
    "VAULT_ADDR",
    "VAULT_CACERT",
    "VAULT_TOKEN",
    "CAPTCHA_KIT_VAULT_ADDRS",
    "CAPTCHA_KIT_VAULT_RETRY_TIMEOUT",
)


class ModuleDone(Exception):
    """Raised in place of ``exit_json`` / ``fail_json``; ``result`` is what they were given."""

    def __init__(self, result):
        super().__init__(result.get("msg", "module exited"))
        self.result = result


def _exit_json(module, **kwargs):
    kwargs.setdefault("changed", False)
    raise ModuleDone({"failed": False, **kwargs})


def _fail_json(module, msg, **kwargs):
    kwargs.pop("exception", None)
    raise ModuleDone({"failed": True, "msg": msg, **kwargs})


@pytest.fixture
def vault(monkeypatch):
    """A fresh in-memory Vault that ``get_client`` connects to."""
    fake = FakeVault()
    monkeypatch.setattr(hvac, "Client", fake.client)
    for name in CONNECTION_ENV:
        monkeypatch.delenv(name, raising=False)
    return fake


@pytest.fixture
def run(vault, monkeypatch):
    """Run a module's ``main()`` in-process; see the module docstring."""
    monkeypatch.setattr(basic.AnsibleModule, "exit_json", _exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", _fail_json)
    monkeypatch.setattr(basic.AnsibleModule, "_log_invocation", lambda module: None)
    warnings = []
    monkeypatch.setattr(
        basic.AnsibleModule, "warn", lambda module, warning, **_: warnings.append(warning)
    )

    def run_main(main, check_mode=False, diff=False, **params):
        args = {"url": VAULT_URL, "token": vault.token, **params}
        args.update(_ansible_check_mode=check_mode, _ansible_diff=diff)
        warnings.clear()
        with patch_module_args(args), pytest.raises(ModuleDone) as done:
            main()
        result = done.value.result
        result["warnings"] = list(warnings)
        for token in vault.tokens:
            assert token not in json.dumps(result, default=str), "a Vault token in the result"
        return result

    return run_main


_SPEC_KEYS = {"type": "str", "required": False, "default": None, "choices": None, "elements": None}


def _mismatches(documented, spec, where=""):
    found = []
    for name in sorted(set(documented) | set(spec)):
        if name not in spec or name not in documented:
            side = "DOCUMENTATION" if name in documented else "the argument spec"
            found.append(f"{where}{name}: only in {side}")
            continue
        doc, arg = documented[name], spec[name]
        for key, default in _SPEC_KEYS.items():
            if doc.get(key, default) != arg.get(key, default):
                found.append(f"{where}{name}.{key}: {doc.get(key)!r} documented, {arg.get(key)!r}")
        if "suboptions" in doc:
            found += _mismatches(doc["suboptions"], arg.get("options") or {}, f"{where}{name}.")
    return found


@pytest.fixture
def spec_mismatches():
    """See the module docstring."""

    def check(module):
        return _mismatches(yaml.safe_load(module.DOCUMENTATION)["options"], module.OPTIONS)

    return check
