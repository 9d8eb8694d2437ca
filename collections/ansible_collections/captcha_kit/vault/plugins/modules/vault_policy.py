#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: idempotent ACL policy on Vault/OpenBao."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_policy
short_description: Write or delete an ACL policy, only when it differs
version_added: 0.1.0
description:
  - Reads the policy O(name), compares its rules with O(policy) (ignoring trailing whitespace
    on lines and at the end) and writes it only when it differs.
  - Diff mode shows the policy text before and after (policies hold no secrets).
options:
  name:
    description: Policy name.
    type: str
    required: true
  policy:
    description: Policy rules (HCL or JSON). Required when O(state=present).
    type: str
  state:
    description: Whether the policy should exist.
    type: str
    choices: [present, absent]
    default: present
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
extends_documentation_fragment:
  - captcha_kit.vault.connection
author:
  - captcha key vault kit contributors
"""

EXAMPLES = r"""
- name: Write the worker policy of dev
  captcha_kit.vault.vault_policy:
    name: captcha-worker-dev
    policy: "{{ lookup('ansible.builtin.template', 'captcha-worker.hcl.j2') }}"
"""

RETURN = r"""
name:
  description: The policy name.
  returned: always
  type: str
  sample: captcha-worker-dev
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    VaultNotFound,
    get_client,
    vault_argument_spec,
    vault_call,
)


def normalize_rules(text):
    """Rules as compared: trailing whitespace stripped per line and at the end."""
    if text is None:
        return None
    return "\n".join(line.rstrip() for line in text.strip().splitlines()) + "\n"


def main():
    module = AnsibleModule(
        argument_spec=vault_argument_spec(
            name={"type": "str", "required": True},
            policy={"type": "str"},
            state={"type": "str", "default": "present", "choices": ["present", "absent"]},
        ),
        required_if=[("state", "present", ["policy"])],
        supports_check_mode=True,
    )
    p = module.params
    name = p["name"]
    if name in ("root", "default") and p["state"] == "absent":
        module.fail_json(msg=f"The built-in policy '{name}' cannot be deleted")
    if p["state"] == "present" and not p["policy"].strip():
        module.fail_json(msg=f"The rules of policy {name} are empty")
    client = get_client(module)
    try:
        current = vault_call(module, f"read policy {name}", client.sys.read_policy, name)
        current_rules = current.get("data", current).get("rules")
    except VaultNotFound:
        current_rules = None
    before = normalize_rules(current_rules)
    after = normalize_rules(p["policy"]) if p["state"] == "present" else None
    changed = before != after
    if changed and not module.check_mode:
        if after is None:
            vault_call(module, f"delete policy {name}", client.sys.delete_policy, name)
        else:
            vault_call(
                module,
                f"write policy {name}",
                client.sys.create_or_update_policy,
                name,
                after,
            )
    result = {"changed": changed, "name": name}
    if module._diff:
        result["diff"] = {
            "before": before or "",
            "after": after or "",
            "before_header": f"policy {name} (current)",
            "after_header": f"policy {name} (desired)",
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
