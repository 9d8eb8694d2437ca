#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: idempotent secrets engine (mount) on Vault/OpenBao."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_mount
short_description: Enable a secrets engine and keep its settings (incl. KV v2 options)
version_added: 0.1.0
description:
  - Enables a secrets engine at O(path) if nothing is mounted there, and keeps its description
    and, for KV version 2, the C(max_versions), C(cas_required) and C(delete_version_after)
    settings of the C(<path>/config) endpoint.
  - Reads the current state, compares normalised values and writes only the difference.
  - A mount of another type, or a KV version 1 mount where version 2 is wanted, is an error and
    nothing is changed; converting a mount would lose or expose data.
  - Never disables a mount.
options:
  path:
    description: Mount path, without slashes around it.
    type: str
    required: true
  type:
    description: Secrets engine type, for example C(kv), C(transit), C(pki).
    type: str
    default: kv
  kv_version:
    description: KV version wanted when O(type=kv).
    type: int
    choices: [1, 2]
    default: 2
  description:
    description: Mount description. Omitted means not managed.
    type: str
  max_versions:
    description: KV v2 versions kept per key (C(0) = server default of 10). Omitted = not managed.
    type: int
  cas_required:
    description: KV v2 - require check-and-set on every write. Omitted means not managed.
    type: bool
  delete_version_after:
    description: KV v2 - delete versions after this duration (C(0) = never). Omitted = not managed.
    type: str
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
"""

EXAMPLES = r"""
- name: Enable KV v2 at secret/ with check-and-set required
  captcha_kit.vault.vault_mount:
    path: secret
    type: kv
    kv_version: 2
    max_versions: 10
    cas_required: true
"""

RETURN = r"""
path:
  description: The mount path.
  returned: always
  type: str
  sample: secret
mount:
  description: The normalised state after the run (or the state it would have in check mode).
  returned: always
  type: dict
  sample: {"type": "kv", "kv_version": 2, "max_versions": 10, "cas_required": true}
changed_keys:
  description: Settings that differed and were (or would be) written.
  returned: always
  type: list
  elements: str
"""

from ansible_collections.captcha_kit.vault.plugins.module_utils.normalize import (
    dict_difference,
    ttl_to_seconds,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    duration_or_fail,
    get_client,
    run_module,
    vault_call,
    vault_call_when_ready,
    with_diff,
)

OPTIONS = {
    "path": {"type": "str", "required": True},
    "type": {"type": "str", "default": "kv"},
    "kv_version": {"type": "int", "default": 2, "choices": [1, 2]},
    "description": {"type": "str"},
    "max_versions": {"type": "int"},
    "cas_required": {"type": "bool"},
    "delete_version_after": {"type": "str"},
}


def read_mount(module, client, path):
    """The engine mounted at ``path`` as listed by Vault, or None."""
    mounts = vault_call(module, "list secrets engines", client.sys.list_mounted_secrets_engines)
    mounts = mounts.get("data", mounts)
    return mounts.get(path + "/")


def read_kv2_config(module, client, path):
    """The KV v2 settings of the mount ``path`` as compared (durations in seconds)."""
    config = vault_call_when_ready(
        module,
        f"read the KV v2 configuration of {path}/",
        client.secrets.kv.v2.read_configuration,
        mount_point=path,
    )["data"]
    return {
        "max_versions": int(config.get("max_versions") or 0),
        "cas_required": bool(config.get("cas_required")),
        "delete_version_after": ttl_to_seconds(config.get("delete_version_after") or 0),
    }


def wanted_kv_settings(module):
    """The KV v2 settings given (durations in seconds); they need a KV v2 mount."""
    p = module.params
    kv_settings = {key: p[key] for key in ("max_versions", "cas_required") if p[key] is not None}
    if p["delete_version_after"] is not None:
        kv_settings["delete_version_after"] = duration_or_fail(
            module, "delete_version_after", p["delete_version_after"]
        )
    if kv_settings and not (p["type"] == "kv" and p["kv_version"] == 2):
        module.fail_json(msg="max_versions, cas_required and delete_version_after need type=kv v2")
    return kv_settings


def current_settings(module, client, path, current):
    """The settings of the engine mounted at ``path`` as compared; fails on another kind."""
    p = module.params
    current_version = int((current.get("options") or {}).get("version") or 1)
    if current["type"] != p["type"]:
        module.fail_json(
            msg=f"A secrets engine of type '{current['type']}' is mounted at {path}/, "
            f"not '{p['type']}'. Nothing was changed: choose another mount path or move "
            "that engine by hand.",
            path=path,
        )
    if p["type"] == "kv" and current_version != p["kv_version"]:
        module.fail_json(
            msg=f"{path}/ is a KV version {current_version} mount, not version "
            f"{p['kv_version']}. Nothing was changed: upgrading a KV mount in place rewrites "
            "its data; do it deliberately (bao/vault kv enable-versioning) or choose another "
            "mount path.",
            path=path,
        )
    before = {"type": current["type"], "description": current.get("description", "")}
    if p["type"] == "kv":
        before["kv_version"] = current_version
        if p["kv_version"] == 2:
            before.update(read_kv2_config(module, client, path))
    return before


def ensure_mount(module):
    """Read, compare, enable or tune only what differs; the module result."""
    p = module.params
    path = p["path"].strip("/")
    if not path:
        module.fail_json(msg="path must not be empty")
    kv_settings = wanted_kv_settings(module)

    client = get_client(module)
    current = read_mount(module, client, path)
    before = None if current is None else current_settings(module, client, path, current)
    desired = {"type": p["type"]}
    if p["type"] == "kv":
        desired["kv_version"] = p["kv_version"]
    if p["description"] is not None:
        desired["description"] = p["description"]
    desired.update(kv_settings)

    diff_keys = dict_difference(before, desired)
    after = dict(before or {})
    after.update(desired)
    changed_keys = sorted(desired) if current is None else sorted(diff_keys)

    if changed_keys and not module.check_mode:
        if current is None:
            options = {"version": str(p["kv_version"])} if p["type"] == "kv" else None
            vault_call(
                module,
                f"enable the {p['type']} secrets engine at {path}/",
                client.sys.enable_secrets_engine,
                p["type"],
                path=path,
                description=p["description"],
                options=options,
            )
        elif "description" in diff_keys:
            vault_call(
                module,
                f"update the description of {path}/",
                client.sys.tune_mount_configuration,
                path,
                description=p["description"],
            )
        kv_diff = {k: v for k, v in kv_settings.items() if current is None or k in diff_keys}
        if kv_diff:
            vault_call_when_ready(
                module,
                f"write the KV v2 configuration of {path}/",
                client.adapter.post,
                f"/v1/{path}/config",
                json=kv_diff,
            )

    result = {
        "changed": bool(changed_keys),
        "path": path,
        "mount": after,
        "changed_keys": changed_keys,
    }
    return with_diff(module, result, before or {}, after)


def main():
    run_module(OPTIONS, ensure_mount)


if __name__ == "__main__":
    main()
