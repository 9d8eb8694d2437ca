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
  - With O(user_lockout), keeps the mount's user lockout settings (how many refused logins
    lock a role-id or user, for how long, and when the count starts again) at the given values,
    reading, comparing and tuning only what differs. A mount that was never tuned reports no
    user lockout settings (the server's defaults apply); the diff shows them as unset, and they
    are written. A server that does not take them is an error that names it.
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
  user_lockout:
    description: User lockout of the mount. Omitted means not managed.
    type: dict
    suboptions:
      threshold:
        description: Refused logins that lock a role-id (AppRole) or user.
        type: int
        required: true
      duration:
        description: How long the lock lasts (Vault duration such as C(15m)).
        type: str
        required: true
      counter_reset:
        description: Time after which the count of refused logins starts again.
        type: str
        required: true
      disable:
        description: Turn user lockout off for the mount.
        type: bool
        default: false
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
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

from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    duration_or_fail,
    get_client,
    run_module,
    vault_call,
    with_diff,
)

LOCKOUT_SPEC = {
    "threshold": {"type": "int", "required": True},
    "duration": {"type": "str", "required": True},
    "counter_reset": {"type": "str", "required": True},
    "disable": {"type": "bool", "default": False},
}


def wanted_lockout(module, lockout):
    """The lockout settings as the tune endpoint reports them (seconds)."""
    duration = duration_or_fail(module, "user_lockout", lockout["duration"])
    counter_reset = duration_or_fail(module, "user_lockout", lockout["counter_reset"])
    if lockout["threshold"] < 1 or duration <= 0 or counter_reset <= 0:
        module.fail_json(
            msg="user_lockout: threshold must be at least 1, duration and counter_reset positive"
        )
    return {
        "threshold": lockout["threshold"],
        "duration": duration,
        "counter_reset": counter_reset,
        "disable": lockout["disable"],
    }


def read_lockout(module, client, path):
    """The mount's user lockout settings as compared; None when the mount was never tuned for
    them (Vault and OpenBao report them only once set: the server's defaults apply)."""
    tune = vault_call(
        module, f"read the settings of auth/{path}/", client.sys.read_auth_method_tuning, path
    )
    tune = tune.get("data", tune)
    if "user_lockout_threshold" not in tune:
        return None
    return {
        "threshold": int(tune.get("user_lockout_threshold") or 0),
        "duration": int(tune.get("user_lockout_duration") or 0),
        "counter_reset": int(tune.get("user_lockout_counter_reset_duration") or 0),
        "disable": bool(tune.get("user_lockout_disable")),
    }


def write_lockout(module, client, path, lockout):
    """Tune the mount's user lockout to ``lockout`` (as ``wanted_lockout`` returns it)."""
    config = {
        "lockout_threshold": str(lockout["threshold"]),
        "lockout_duration": f"{lockout['duration']}s",
        # Vault documents lockout_counter_reset; OpenBao reads lockout_counter_reset_duration.
        "lockout_counter_reset": f"{lockout['counter_reset']}s",
        "lockout_counter_reset_duration": f"{lockout['counter_reset']}s",
        "lockout_disable": lockout["disable"],
    }
    vault_call(
        module,
        f"tune the user lockout of auth/{path}/",
        client.adapter.post,
        f"/v1/sys/auth/{path}/tune",
        json={"user_lockout_config": config},
    )


def read_method(module, client, path):
    """The auth method enabled at ``auth/<path>/`` as listed by Vault, or None."""
    methods = vault_call(module, "list auth methods", client.sys.list_auth_methods)
    methods = methods.get("data", methods)
    return methods.get(path + "/")


OPTIONS = {
    "path": {"type": "str"},
    "type": {"type": "str", "required": True},
    "description": {"type": "str"},
    "user_lockout": {"type": "dict", "options": LOCKOUT_SPEC},
}


def ensure_auth_method(module):
    """Read, compare, enable or tune only what differs; the module result."""
    p = module.params
    path = (p["path"] or p["type"]).strip("/")
    lockout = None if p["user_lockout"] is None else wanted_lockout(module, p["user_lockout"])
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
    if lockout is not None:
        after["user_lockout"] = lockout
        if current is not None:
            before["user_lockout"] = read_lockout(module, client, path)
    changed = after != before
    lockout_changed = lockout is not None and before.get("user_lockout") != lockout
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
        elif before.get("description") != after.get("description"):
            vault_call(
                module,
                f"update the description of auth/{path}/",
                client.sys.tune_auth_method,
                path,
                description=p["description"],
            )
        if lockout_changed:
            write_lockout(module, client, path, lockout)
            if read_lockout(module, client, path) != lockout:
                module.fail_json(
                    msg=f"auth/{path}/ did not take the user lockout settings {lockout}: "
                    "this server does not support them all",
                    path=path,
                )
        current = read_method(module, client, path)
    result = {
        "changed": changed,
        "path": path,
        "accessor": (current or {}).get("accessor", ""),
    }
    return with_diff(module, result, before, after)


def main():
    run_module(OPTIONS, ensure_auth_method)


if __name__ == "__main__":
    main()
