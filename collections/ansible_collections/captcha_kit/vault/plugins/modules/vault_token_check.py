#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: check the Vault token and its capabilities before any change."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_token_check
short_description: Check that the Vault token is valid and holds the capabilities a play needs
version_added: 0.1.0
description:
  - Connects to Vault, looks the token up (C(auth/token/lookup-self)) and asks
    C(sys/capabilities-self) for O(capabilities). Fails with the list of missing rights, so a
    play can stop before its first change. Never changes anything; never returns the token.
  - Connection problems (server unreachable, wrong CA, missing or invalid token, sealed server)
    fail with a message that says what to fix.
options:
  capabilities:
    description:
      - Map of API path (without C(/v1/)) to the list of capabilities needed on it, see the
        examples. C(root) satisfies everything; C(deny) satisfies nothing.
    type: dict
    default: {}
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.no_diff
"""

EXAMPLES = r"""
- name: Check the admin token before provisioning
  captcha_kit.vault.vault_token_check:
    capabilities:
      sys/mounts/secret: [create, read, update, sudo]
      sys/policy/captcha-worker-dev: [create, read, update]
"""

RETURN = r"""
display_name:
  description: Display name of the token (not a secret).
  returned: always
  type: str
policies:
  description: Policies of the token.
  returned: always
  type: list
  elements: str
missing:
  description: Map of path to the capabilities the token lacks there (empty on success).
  returned: always
  type: dict
"""

from ansible_collections.captcha_kit.vault.plugins.module_utils.normalize import normalize_str_list
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    ADMIN_POLICY_HINT,
    get_client,
    run_module,
    vault_call,
)

OPTIONS = {"capabilities": {"type": "dict", "default": {}}}


def check_token(module):
    """Look the token up and compare its capabilities; fails listing what is missing."""
    wanted = {
        str(path).strip("/"): normalize_str_list(caps)
        for path, caps in (module.params["capabilities"] or {}).items()
    }
    client = get_client(module)
    info = vault_call(module, "look up the token", client.auth.token.lookup_self)["data"]
    missing = {}
    if wanted:
        answer = vault_call(
            module,
            "read the token's capabilities",
            client.sys.get_capabilities,
            paths=sorted(wanted),
        )
        granted = answer.get("data", answer)
        for path, caps in wanted.items():
            have = set(granted.get(path) or [])
            if "root" in have:
                continue
            if "deny" in have:
                have = set()
            lacking = [c for c in caps if c not in have]
            if lacking:
                missing[path] = lacking
    result = {
        "changed": False,
        "display_name": info.get("display_name", ""),
        "policies": sorted(info.get("policies") or []),
        "missing": missing,
    }
    if missing:
        lines = "; ".join(f"{path}: {', '.join(caps)}" for path, caps in sorted(missing.items()))
        module.fail_json(
            msg=f"The Vault token lacks rights this play needs ({ADMIN_POLICY_HINT}). "
            f"Missing: {lines}. Nothing was changed.",
            **result,
        )
    return result


def main():
    run_module(OPTIONS, check_token)


if __name__ == "__main__":
    main()
