#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: idempotent AppRole role on Vault/OpenBao."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_approle_role
short_description: Create, update or delete an AppRole role, writing only what differs
version_added: 0.1.0
description:
  - Reads the role, normalises the server's answer and the wanted settings (durations to seconds,
    single addresses to C(/32), sorted lists), and writes only the settings that differ.
  - Every setting is optional; an omitted setting is not managed (the server keeps its value).
  - Returns the role-id (an identifier, not a credential); never creates or returns secret-ids.
  - With O(roles), does the same for many roles of one mount in one call (one connection and one
    module run, much faster than a loop). Every item is checked before the first write.
options:
  name:
    description: Role name. Mutually exclusive with O(roles).
    type: str
  roles:
    description:
      - Many roles at once. Each item takes O(name) and any of the role settings below
        (O(bind_secret_id) to O(token_type)); top-level settings are not merged into items.
      - O(mount_point) and O(state) apply to every item.
    type: list
    elements: dict
  mount_point:
    description: AppRole mount path.
    type: str
    default: approle
  state:
    description: Whether the role should exist.
    type: str
    choices: [present, absent]
    default: present
  bind_secret_id:
    description: Require a secret-id at login.
    type: bool
  secret_id_bound_cidrs:
    description: CIDRs (or single addresses) allowed to log in with a secret-id.
    type: list
    elements: str
  secret_id_num_uses:
    description: Logins per secret-id (C(0) = unlimited).
    type: int
  secret_id_ttl:
    description: Lifetime of a secret-id (C(0) = no expiry); seconds or a duration such as C(24h).
    type: str
  local_secret_ids:
    description: Secret-ids local to this cluster (can only be set at creation).
    type: bool
  token_ttl:
    description: TTL of issued tokens; seconds or a duration.
    type: str
  token_max_ttl:
    description: Maximum TTL of issued tokens; seconds or a duration.
    type: str
  token_explicit_max_ttl:
    description: Hard maximum TTL of issued tokens; seconds or a duration.
    type: str
  token_period:
    description: Period of periodic tokens; seconds or a duration.
    type: str
  token_policies:
    description: Policies attached to issued tokens.
    type: list
    elements: str
  token_bound_cidrs:
    description: CIDRs (or single addresses) that may use issued tokens.
    type: list
    elements: str
  token_no_default_policy:
    description: Do not attach the C(default) policy.
    type: bool
  token_num_uses:
    description: Uses per token (C(0) = unlimited).
    type: int
  token_type:
    description: Token type.
    type: str
    choices: [default, service, batch, default-service, default-batch]
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
"""

EXAMPLES = r"""
- name: Create the worker roles of dev and prod in one call
  captcha_kit.vault.vault_approle_role:
    roles:
      - name: captcha-worker-dev
        token_policies: [captcha-worker-dev]
      - name: captcha-worker-prod
        token_policies: [captcha-worker-prod]
        token_bound_cidrs: [10.0.0.0/8]

- name: Create the dev worker role
  captcha_kit.vault.vault_approle_role:
    name: captcha-worker-dev
    token_policies: [captcha-worker-dev]
    token_ttl: 1h
    token_max_ttl: 4h
    secret_id_ttl: 24h
    secret_id_num_uses: 0
    secret_id_bound_cidrs: [127.0.0.1]
    token_bound_cidrs: [127.0.0.1]
"""

RETURN = r"""
name:
  description: The role name.
  returned: with O(name)
  type: str
role_id:
  description: The role-id (an identifier, not a secret); empty in check mode for a new role.
  returned: with O(name) when state is present
  type: str
role:
  description: The normalised settings after the run.
  returned: with O(name) when state is present
  type: dict
changed_keys:
  description: Settings that differed and were (or would be) written.
  returned: with O(name)
  type: list
  elements: str
roles:
  description: >-
    With O(roles): one entry per role with RV(name), RV(changed), RV(changed_keys) and, when
    state is present, RV(role) and RV(role_id).
  returned: with O(roles)
  type: list
  elements: dict
"""

from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    VaultNotFound,
    batch_items,
    batch_result,
    get_client,
    normalize_cidr_list,
    normalize_str_list,
    run_module,
    ttl_to_seconds,
    vault_call,
)

TTL_FIELDS = (
    "secret_id_ttl",
    "token_ttl",
    "token_max_ttl",
    "token_explicit_max_ttl",
    "token_period",
)
CIDR_FIELDS = ("secret_id_bound_cidrs", "token_bound_cidrs")
LIST_FIELDS = ("token_policies",)
INT_FIELDS = ("secret_id_num_uses", "token_num_uses")
BOOL_FIELDS = ("bind_secret_id", "token_no_default_policy", "local_secret_ids")
STR_FIELDS = ("token_type",)
ALL_FIELDS = TTL_FIELDS + CIDR_FIELDS + LIST_FIELDS + INT_FIELDS + BOOL_FIELDS + STR_FIELDS


def normalize(field, value):
    """One setting as compared (and as sent to the server)."""
    if field in TTL_FIELDS:
        return ttl_to_seconds(value)
    if field in CIDR_FIELDS:
        return normalize_cidr_list(value)
    if field in LIST_FIELDS:
        return normalize_str_list(value)
    if field in INT_FIELDS:
        return int(value or 0)
    if field in BOOL_FIELDS:
        return bool(value)
    return value if value is not None else ""


FIELD_SPEC = {
    "bind_secret_id": {"type": "bool"},
    "secret_id_bound_cidrs": {"type": "list", "elements": "str"},
    "secret_id_num_uses": {"type": "int"},
    "secret_id_ttl": {"type": "str"},
    "local_secret_ids": {"type": "bool"},
    "token_ttl": {"type": "str"},
    "token_max_ttl": {"type": "str"},
    "token_explicit_max_ttl": {"type": "str"},
    "token_period": {"type": "str"},
    "token_policies": {"type": "list", "elements": "str"},
    "token_bound_cidrs": {"type": "list", "elements": "str"},
    "token_no_default_policy": {"type": "bool"},
    "token_num_uses": {"type": "int"},
    "token_type": {
        "type": "str",
        "choices": ["default", "service", "batch", "default-service", "default-batch"],
    },
}


OPTIONS = {
    "name": {"type": "str"},
    "roles": {
        "type": "list",
        "elements": "dict",
        "options": {"name": {"type": "str", "required": True}, **FIELD_SPEC},
    },
    "mount_point": {"type": "str", "default": "approle"},
    "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
    **FIELD_SPEC,
}


def desired_settings(module, item):
    """The settings given for one role, normalised; bad values fail before any Vault call."""
    desired = {}
    for field in ALL_FIELDS:
        if item.get(field) is None:
            continue
        try:
            desired[field] = normalize(field, item[field])
        except ValueError as exc:
            module.fail_json(msg=f"AppRole role {item['name']}: {field}: {exc}")
    return desired


def reconcile(module, client, mount, name, state, desired):
    """Read, compare, write only what differs: the per-role result (with its diff)."""
    try:
        current = vault_call(
            module,
            f"read AppRole role {name} at auth/{mount}",
            client.auth.approle.read_role,
            name,
            mount_point=mount,
        )["data"]
    except VaultNotFound:
        current = None
    before = None
    if current is not None:
        before = {f: normalize(f, current.get(f)) for f in ALL_FIELDS if f in current}

    result = {"name": name, "changed": False, "changed_keys": []}
    if state == "absent":
        if current is not None:
            result.update(changed=True, changed_keys=sorted(before))
            if not module.check_mode:
                vault_call(
                    module,
                    f"delete AppRole role {name}",
                    client.auth.approle.delete_role,
                    name,
                    mount_point=mount,
                )
        result["diff"] = {"before": before or {}, "after": {}}
        return result

    if current is None:
        changes = dict(desired)
    else:
        changes = {k: v for k, v in desired.items() if before.get(k) != v}
        if "local_secret_ids" in changes:
            module.fail_json(
                msg=f"AppRole role {name}: local_secret_ids can only be set when the role is "
                "created; delete and recreate the role to change it. Nothing was changed."
            )
    after = dict(before or {})
    after.update(desired)
    changed = current is None or bool(changes)
    if changed and not module.check_mode:
        vault_call(
            module,
            f"write AppRole role {name} at auth/{mount}",
            client.adapter.post,
            f"/v1/auth/{mount}/role/{name}",
            json=dict(changes),
        )
    role_id = ""
    if not (module.check_mode and current is None):
        role_id = vault_call(
            module,
            f"read the role-id of {name}",
            client.auth.approle.read_role_id,
            name,
            mount_point=mount,
        )["data"]["role_id"]
    result.update(changed=changed, changed_keys=sorted(changes), role=after, role_id=role_id)
    result["diff"] = {
        "before": before or {},
        "after": after,
        "before_header": f"auth/{mount}/role/{name} (current)",
        "after_header": f"auth/{mount}/role/{name} (desired)",
    }
    return result


def ensure_roles(module):
    """Check every item, then reconcile each role; the module result."""
    mount = module.params["mount_point"].strip("/")
    batch, items = batch_items(module, "roles", FIELD_SPEC)
    wanted = [(item["name"], desired_settings(module, item)) for item in items]

    client = get_client(module)
    state = module.params["state"]
    results = [reconcile(module, client, mount, name, state, d) for name, d in wanted]
    return batch_result(module, "roles", batch, results)


def main():
    run_module(
        OPTIONS,
        ensure_roles,
        mutually_exclusive=[("name", "roles"), *(("roles", field) for field in FIELD_SPEC)],
        required_one_of=[("name", "roles")],
    )


if __name__ == "__main__":
    main()
