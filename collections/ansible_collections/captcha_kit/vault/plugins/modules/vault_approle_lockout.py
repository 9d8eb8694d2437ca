#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: is an AppRole role's role-id locked out by Vault's user lockout?"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_approle_lockout
short_description: Tell whether an AppRole role's role-id is locked out by the user lockout
version_added: 0.2.0
description:
  - Vault and OpenBao lock a role-id after a few refused logins (user lockout) and then refuse
    every login with it, also one with a valid secret-id, with the same "permission denied" a
    bad secret-id gets. Every worker of an env shares the env's role-id, so a locked role-id
    takes the whole env down; this module lets a play name that cause instead of guessing.
  - Reads the role's role-id and C(sys/locked-users) and compares them inside the module. Never
    returns or logs the role-id. Never changes anything.
options:
  mount:
    description: AppRole mount path.
    type: str
    default: approle
  role_name:
    description: The AppRole role, for example C(captcha-worker-prod).
    type: str
    required: true
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.no_diff
"""

EXAMPLES = r"""
- name: Tell whether the env's role-id is locked out
  captcha_kit.vault.vault_approle_lockout:
    role_name: captcha-worker-prod
  register: lockout
"""

RETURN = r"""
locked:
  description: Whether the role's role-id is locked out now.
  returned: always
  type: bool
mount_accessor:
  description: Accessor of the AppRole mount (not a secret; the unlock command needs it).
  returned: always
  type: str
locked_aliases:
  description: How many role-ids of this mount are locked out (any role).
  returned: always
  type: int
"""

from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    get_client,
    run_module,
    vault_call,
)

OPTIONS = {
    "mount": {"type": "str", "default": "approle"},
    "role_name": {"type": "str", "required": True},
}


def locked_aliases(locked_users, mount_accessor):
    """The alias identifiers (role-ids) locked on ``mount_accessor`` in a sys/locked-users
    answer."""
    data = locked_users.get("data", locked_users) or {}
    found = []
    for namespace in data.get("by_namespace") or []:
        for mount in namespace.get("mount_accessors") or []:
            if mount.get("mount_accessor") != mount_accessor:
                continue
            found += list(mount.get("alias_identifiers") or [])
    return found


def check_lockout(module):
    p = module.params
    mount = p["mount"].strip("/")
    client = get_client(module)
    methods = vault_call(module, "list auth methods", client.sys.list_auth_methods)
    method = methods.get("data", methods).get(mount + "/")
    if method is None:
        module.fail_json(msg=f"No auth method is enabled at auth/{mount}/")
    accessor = method["accessor"]
    role_id = vault_call(
        module,
        f"read the role-id of {p['role_name']}",
        client.auth.approle.read_role_id,
        p["role_name"],
        mount_point=mount,
    )["data"]["role_id"]
    answer = vault_call(module, "read sys/locked-users", client.adapter.get, "/v1/sys/locked-users")
    aliases = locked_aliases(answer or {}, accessor)
    return {
        "changed": False,
        "locked": role_id in aliases,
        "mount_accessor": accessor,
        "locked_aliases": len(aliases),
    }


def main():
    run_module(OPTIONS, check_lockout)


if __name__ == "__main__":
    main()
