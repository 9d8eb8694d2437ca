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
  - A setting changed by hand on the server is set back to the given value, reported as a change
    with the before and after values of the differing settings (in diff mode); check mode reports
    the same change and writes nothing.
  - Every setting is optional; an omitted setting is not managed (the server keeps its value).
    To leave no security-relevant setting to drift, give all of them (the tokens' period,
    explicit maximum TTL, number of uses, type and default policy, the secret-id binding and
    uses, local secret-ids and the CIDR bindings), as the vault_provision role does.
  - The server also answers legacy aliases (C(policies), C(period), C(bound_cidr_list)), which
    it keeps in step with the canonical settings; only the canonical settings are compared.
  - O(local_secret_ids) can only be set when a role is created; a role whose value differs
    fails with what to do, and nothing is written.
  - Never reads or returns the role-id, and never creates or returns secret-ids.
  - With O(roles), does the same for many roles of one mount in one call (one connection and one
    module run, much faster than a loop). Every item is read and checked before the first write.
options:
  name:
    description: Role name. Mutually exclusive with O(roles).
    type: str
  roles:
    description:
      - Many roles at once. Each item takes a name and any of the role settings, which mean
        the same as the top-level ones (O(bind_secret_id) to O(token_type)); top-level settings
        are not merged into items.
      - O(mount_point) and O(state) apply to every item.
    type: list
    elements: dict
    suboptions:
      name:
        description: Role name.
        type: str
        required: true
      # The role settings, written once: the top-level options merge them in below.
      <<: &role_settings
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
          description:
            - Lifetime of a secret-id (C(0) = no expiry); seconds or a duration such as C(24h).
          type: str
        local_secret_ids:
          description:
            - Secret-ids local to this cluster (not replicated).
            - Can only be set when the role is created; a differing value on an existing role fails.
          type: bool
        token_ttl:
          description: TTL of issued tokens; seconds or a duration.
          type: str
        token_max_ttl:
          description: Maximum TTL of issued tokens; seconds or a duration.
          type: str
        token_explicit_max_ttl:
          description: Hard maximum TTL of issued tokens (C(0) = none); seconds or a duration.
          type: str
        token_period:
          description:
            - Period of periodic tokens (C(0) = tokens are not periodic); seconds or a duration.
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
  mount_point:
    description: AppRole mount path.
    type: str
    default: approle
  state:
    description: Whether the role should exist.
    type: str
    choices: [present, absent]
    default: present
  <<: *role_settings
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

- name: Create the dev worker role, every security-relevant setting given
  captcha_kit.vault.vault_approle_role:
    name: captcha-worker-dev
    token_policies: [captcha-worker-dev]
    token_ttl: 1h
    token_max_ttl: 4h
    token_explicit_max_ttl: 0
    token_period: 0
    token_num_uses: 0
    token_no_default_policy: false
    token_type: service
    bind_secret_id: true
    secret_id_ttl: 24h
    secret_id_num_uses: 0
    local_secret_ids: false
    secret_id_bound_cidrs: [127.0.0.1]
    token_bound_cidrs: [127.0.0.1]
"""

RETURN = r"""
name:
  description: The role name.
  returned: with O(name)
  type: str
role:
  description: The normalised settings after the run.
  returned: with O(name) when state is present
  type: dict
changed_keys:
  description:
    Settings that differed and were (or would be) written (every given one for a new role).
  returned: with O(name)
  type: list
  elements: str
roles:
  description: With O(roles), one entry per role, in the order of O(roles).
  returned: with O(roles)
  type: list
  elements: dict
  contains:
    name:
      description: The role name.
      returned: always
      type: str
    changed:
      description: Whether the role was (or would be) created, changed or deleted.
      returned: always
      type: bool
    changed_keys:
      description: Settings that differed and were (or would be) written, as RV(changed_keys).
      returned: always
      type: list
      elements: str
    role:
      description: The normalised settings after the run, as RV(role).
      returned: when state is present
      type: dict
"""

from ansible_collections.captcha_kit.vault.plugins.module_utils.normalize import (
    normalize_cidr_list,
    normalize_str_list,
    ttl_to_seconds,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    VaultNotFound,
    batch_items,
    batch_result,
    get_client,
    run_module,
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


# The role settings, top level and in each item of ``roles``. None is a secret: ``no_log=False``
# on the ones whose names validate-modules takes for secrets (``secret``, ``token``).
FIELD_SPEC = {
    "bind_secret_id": {"type": "bool"},
    "secret_id_bound_cidrs": {"type": "list", "elements": "str", "no_log": False},
    "secret_id_num_uses": {"type": "int", "no_log": False},
    "secret_id_ttl": {"type": "str", "no_log": False},
    "local_secret_ids": {"type": "bool"},
    "token_ttl": {"type": "str", "no_log": False},
    "token_max_ttl": {"type": "str", "no_log": False},
    "token_explicit_max_ttl": {"type": "str", "no_log": False},
    "token_period": {"type": "str"},
    "token_policies": {"type": "list", "elements": "str", "no_log": False},
    "token_bound_cidrs": {"type": "list", "elements": "str", "no_log": False},
    "token_no_default_policy": {"type": "bool"},
    "token_num_uses": {"type": "int", "no_log": False},
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


def read_role(module, client, mount, name):
    """The role's settings as the server answers them, or None when there is no such role."""
    try:
        return vault_call(
            module,
            f"read AppRole role {name} at auth/{mount}",
            client.auth.approle.read_role,
            name,
            mount_point=mount,
        )["data"]
    except VaultNotFound:
        return None


def current_settings(current):
    """The canonical settings of a server answer, normalised; the legacy aliases the server
    also answers (``policies``, ``period``, ``bound_cidr_list``) are left out."""
    if current is None:
        return None
    return {f: normalize(f, current.get(f)) for f in ALL_FIELDS if f in current}


def local_secret_ids_message(mount, name, current, wanted):
    """Why a role cannot get another ``local_secret_ids``, and what the operator can do."""
    return (
        f"AppRole role {name} at auth/{mount}: local_secret_ids is {str(current).lower()} on the "
        f"server, {str(wanted).lower()} is wanted, and Vault/OpenBao set it only when a role is "
        "created (a create-time setting). Either set the wanted value to the server's, or "
        f"delete the role (auth/{mount}/role/{name}) and provision again to recreate it: it "
        "gets a new role-id and every secret-id of the role is gone, so redeploy its workers "
        "(or rotator credentials) afterwards. No AppRole role was changed."
    )


def plan(module, mount, name, state, desired, current):
    """Compare one role: ``(result with its diff, settings to write or None, delete?)``."""
    before = current_settings(current)
    result = {"name": name, "changed": False, "changed_keys": []}
    if state == "absent":
        if current is not None:
            result.update(changed=True, changed_keys=sorted(before))
        result["diff"] = {"before": before or {}, "after": {}}
        return result, None, current is not None

    if current is None:
        changes = dict(desired)
    else:
        changes = {k: v for k, v in desired.items() if before.get(k) != v}
        if "local_secret_ids" in changes:
            module.fail_json(
                msg=local_secret_ids_message(
                    mount, name, before.get("local_secret_ids"), changes["local_secret_ids"]
                ),
                changed=False,
            )
    after = dict(before or {})
    after.update(desired)
    changed = current is None or bool(changes)
    result.update(changed=changed, changed_keys=sorted(changes), role=after)
    result["diff"] = {
        "before": {k: before[k] for k in sorted(changes) if k in before} if before else {},
        "after": {k: changes[k] for k in sorted(changes)},
        "before_header": f"auth/{mount}/role/{name} (current)",
        "after_header": f"auth/{mount}/role/{name} (desired)",
    }
    return result, (dict(changes) if changed else None), False


def apply(module, client, mount, name, write, delete):
    """Write (or delete) one role as planned."""
    if delete:
        vault_call(
            module,
            f"delete AppRole role {name}",
            client.auth.approle.delete_role,
            name,
            mount_point=mount,
        )
    elif write is not None:
        vault_call(
            module,
            f"write AppRole role {name} at auth/{mount}",
            client.adapter.post,
            f"/v1/auth/{mount}/role/{name}",
            json=write,
        )


def ensure_roles(module):
    """Check every item, read and compare every role, then write what differs; the result."""
    mount = module.params["mount_point"].strip("/")
    batch, items = batch_items(module, "roles", FIELD_SPEC)
    wanted = [(item["name"], desired_settings(module, item)) for item in items]

    client = get_client(module)
    state = module.params["state"]
    plans = [
        (name, *plan(module, mount, name, state, d, read_role(module, client, mount, name)))
        for name, d in wanted
    ]
    if not module.check_mode:
        for name, _result, write, delete in plans:
            apply(module, client, mount, name, write, delete)
    return batch_result(module, "roles", batch, [planned[1] for planned in plans])


def main():
    run_module(
        OPTIONS,
        ensure_roles,
        mutually_exclusive=[("name", "roles"), *(("roles", field) for field in FIELD_SPEC)],
        required_one_of=[("name", "roles")],
    )


if __name__ == "__main__":
    main()
