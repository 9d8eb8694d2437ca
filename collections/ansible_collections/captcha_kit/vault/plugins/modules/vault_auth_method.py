#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: idempotent auth method on Vault/OpenBao."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_auth_method
short_description: Enable an auth method and keep its description
version_added: 0.1.0
description:
  - Enables an auth method of O(type) at O(path) if nothing is enabled there, and keeps its
    description. An auth method of another type at the path is an error and nothing is changed.
  - Never disables an auth method (that would revoke every token it issued).
options:
  path:
    description: Mount path under C(auth/), without slashes. Defaults to O(type).
    type: str
  type:
    description: Auth method type, for example C(approle), C(userpass), C(kubernetes).
    type: str
    required: true
  description:
    description: Description of the auth method. Omitted means not managed.
    type: str
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
author:
  - captcha key vault kit contributors
"""

EXAMPLES = r"""
- name: Enable AppRole at auth/approle
  captcha_kit.vault.vault_auth_method:
    type: approle
    path: approle
    description: AppRole logins of the captcha workers
"""

RETURN = r"""
path:
  description: The auth mount path (without C(auth/)).
  returned: always
  type: str
  sample: approle
accessor:
  description: Accessor of the auth method (empty in check mode when it would be created).
  returned: always
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    get_client,
    vault_argument_spec,
    vault_call,
)


def read_method(module, client, path):
    methods = vault_call(module, "list auth methods", client.sys.list_auth_methods)
    methods = methods.get("data", methods)
    return methods.get(path + "/")


def main():
    module = AnsibleModule(
        argument_spec=vault_argument_spec(
            path={"type": "str"},
            type={"type": "str", "required": True},
            description={"type": "str"},
        ),
        supports_check_mode=True,
    )
    p = module.params
    path = (p["path"] or p["type"]).strip("/")
    client = get_client(module)
    current = read_method(module, client, path)
    before = {}
    if current is not None:
        if current["type"] != p["type"]:
            module.fail_json(
                msg=f"An auth method of type '{current['type']}' is enabled at auth/{path}/, "
                f"not '{p['type']}'. Nothing was changed: choose another path.",
                path=path,
            )
        before = {"type": current["type"], "description": current.get("description", "")}
    after = dict(before)
    after["type"] = p["type"]
    if p["description"] is not None:
        after["description"] = p["description"]
    changed = after != before
    if changed and not module.check_mode:
        if current is None:
            vault_call(
                module,
                f"enable the {p['type']} auth method at auth/{path}/",
                client.sys.enable_auth_method,
                p["type"],
                description=p["description"],
                path=path,
            )
        else:
            vault_call(
                module,
                f"update the description of auth/{path}/",
                client.sys.tune_auth_method,
                path,
                description=p["description"],
            )
        current = read_method(module, client, path)
    result = {
        "changed": changed,
        "path": path,
        "accessor": (current or {}).get("accessor", ""),
    }
    if module._diff:
        result["diff"] = {"before": before, "after": after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
