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

from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    VaultNotFound,
    batch_items,
    batch_result,
    get_client,
    run_module,
    vault_call,
)

OPTIONS = {
    "name": {"type": "str"},
    "policy": {"type": "str"},
    "policies": {
        "type": "list",
        "elements": "dict",
        "options": {
            "name": {"type": "str", "required": True},
            "policy": {"type": "str"},
        },
    },
    "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
}


def normalize_rules(text):
    """Rules as compared and written: the text stripped at both ends, trailing whitespace
    stripped per line, one final newline."""
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
    """Read, compare, write if it differs: the per-policy result (with its diff)."""
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
    return {"name": name, "changed": changed, "diff": diff}


def ensure_policies(module):
    """Check every item, then reconcile each; the module result."""
    state = module.params["state"]
    batch, items = batch_items(module, "policies", ("policy",))
    for item in items:
        check_item(module, item["name"], item["policy"], state)

    client = get_client(module)
    results = [reconcile(module, client, item["name"], item["policy"], state) for item in items]
    return batch_result(module, "policies", batch, results)


def main():
    run_module(
        OPTIONS,
        ensure_policies,
        mutually_exclusive=[("name", "policies"), ("policy", "policies")],
        required_one_of=[("name", "policies")],
        required_if=[("state", "present", ["policy", "policies"], True)],
    )


if __name__ == "__main__":
    main()
