#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: idempotent ACL policy on Vault/OpenBao."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_policy
short_description: Write or delete ACL policies, only those that differ
version_added: 0.1.0
description:
  - Reads the policy O(name), compares its rules with O(policy) (ignoring trailing whitespace
    on lines and at the end) and writes it only when it differs.
  - With O(policies), does the same for many policies in one call (one connection and one module
    run, much faster than a loop). Every item is checked before the first write.
  - Diff mode shows the policy text before and after (policies hold no secrets); with
    O(policies), one diff per policy that differs.
options:
  name:
    description: Policy name. Mutually exclusive with O(policies).
    type: str
  policy:
    description: Policy rules (HCL or JSON). Required with O(name) when O(state=present).
    type: str
  policies:
    description: Many policies at once; O(state) applies to each.
    type: list
    elements: dict
    suboptions:
      name:
        description: Policy name.
        type: str
        required: true
      policy:
        description: Policy rules. Required when O(state=present).
        type: str
  state:
    description: Whether the policies should exist.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
author:
  - captcha key vault kit contributors
"""

EXAMPLES = r"""
- name: Write the worker policy of dev
  captcha_kit.vault.vault_policy:
    name: captcha-worker-dev
    policy: "{{ lookup('ansible.builtin.template', 'captcha-worker.hcl.j2') }}"

- name: Write two policies in one call
  captcha_kit.vault.vault_policy:
    policies:
      - name: captcha-worker-dev
        policy: "{{ policy_texts['captcha-worker-dev'] }}"
      - name: captcha-worker-prod
        policy: "{{ policy_texts['captcha-worker-prod'] }}"
"""

RETURN = r"""
name:
  description: The policy name.
  returned: with O(name)
  type: str
  sample: captcha-worker-dev
policies:
  description: Each policy of O(policies) and whether it differed (was or would be written).
  returned: with O(policies)
  type: list
  elements: dict
  sample: [{"name": "captcha-worker-dev", "changed": false}]
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


def check_item(module, name, policy, state):
    """Bad input fails here, before any Vault call."""
    if name in ("root", "default") and state == "absent":
        module.fail_json(msg=f"The built-in policy '{name}' cannot be deleted")
    if state == "present" and policy is None:
        module.fail_json(msg=f"policy {name}: the rules (policy) are required with state=present")
    if state == "present" and not policy.strip():
        module.fail_json(msg=f"The rules of policy {name} are empty")


def reconcile(module, client, name, policy, state):
    """Read, compare, write if it differs: (changed, diff)."""
    try:
        current = vault_call(module, f"read policy {name}", client.sys.read_policy, name)
        current_rules = current.get("data", current).get("rules")
    except VaultNotFound:
        current_rules = None
    before = normalize_rules(current_rules)
    after = normalize_rules(policy) if state == "present" else None
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
    diff = {
        "before": before or "",
        "after": after or "",
        "before_header": f"policy {name} (current)",
        "after_header": f"policy {name} (desired)",
    }
    return changed, diff


def main():
    module = AnsibleModule(
        argument_spec=vault_argument_spec(
            name={"type": "str"},
            policy={"type": "str"},
            policies={
                "type": "list",
                "elements": "dict",
                "options": {
                    "name": {"type": "str", "required": True},
                    "policy": {"type": "str"},
                },
            },
            state={"type": "str", "default": "present", "choices": ["present", "absent"]},
        ),
        mutually_exclusive=[("name", "policies"), ("policy", "policies")],
        required_one_of=[("name", "policies")],
        required_if=[("state", "present", ["policy", "policies"], True)],
        supports_check_mode=True,
    )
    p = module.params
    state = p["state"]
    batch = p["policies"] is not None
    items = p["policies"] if batch else [{"name": p["name"], "policy": p["policy"]}]
    names = [item["name"] for item in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        module.fail_json(msg=f"policies: each name once; repeated: {', '.join(repeated)}")
    for item in items:
        check_item(module, item["name"], item["policy"], state)

    client = get_client(module)
    outcomes = [
        (item["name"], *reconcile(module, client, item["name"], item["policy"], state))
        for item in items
    ]
    changed = any(c for _, c, _ in outcomes)
    if batch:
        result = {
            "changed": changed,
            "policies": [{"name": n, "changed": c} for n, c, _ in outcomes],
        }
        diffs = [d for _, c, d in outcomes if c]
    else:
        result = {"changed": changed, "name": p["name"]}
        diffs = [outcomes[0][2]]
    if module._diff and diffs:
        result["diff"] = diffs if batch else diffs[0]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
