# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The kit's contract (module_utils/contract.py) for templates and role validation.

``'env_name_pattern' | captcha_kit.vault.contract``  the value of a contract name
``'prod' | captcha_kit.vault.key_path``              ``captchaai/prod``
"""

from __future__ import annotations

from ansible.errors import AnsibleFilterError
from ansible_collections.captcha_kit.vault.plugins.module_utils.contract import CONTRACT
from ansible_collections.captcha_kit.vault.plugins.module_utils.contract import (
    key_path as _key_path,
)


def contract(name):
    """The value of the contract name ``name`` (tuples come back as lists)."""
    if name not in CONTRACT:
        raise AnsibleFilterError(
            f"captcha_kit.vault.contract: unknown name {name!r}; known: {', '.join(CONTRACT)}"
        )
    value = CONTRACT[name]
    return list(value) if isinstance(value, tuple) else value


def key_path(env):
    """The default key path of the environment ``env`` (``captchaai/<env>``)."""
    try:
        return _key_path(env)
    except ValueError as exc:
        raise AnsibleFilterError(f"captcha_kit.vault.key_path: {exc}") from exc


class FilterModule:
    """captcha_kit.vault contract filters."""

    def filters(self):
        return {"contract": contract, "key_path": key_path}
