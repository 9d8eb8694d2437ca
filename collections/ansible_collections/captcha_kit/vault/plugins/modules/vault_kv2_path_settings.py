#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: check-and-set and the version limit of KV v2 secrets, path by path."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_kv2_path_settings
short_description: Keep check-and-set and the version limit of KV v2 secrets, path by path
version_added: 0.2.0
description:
  - Sets C(cas_required) and C(max_versions) in the KV v2 metadata of each path in O(paths),
    leaving the mount's own configuration and every other path alone. A mount such as
    C(secret/) is usually shared with other teams; their writes and their history stay as they
    were.
  - A path with no secret yet gets its metadata now, so the first write to it already needs
    check-and-set.
  - Reads, compares and writes only the paths that differ; the rest of the metadata (the
    rotation record in C(custom_metadata) included) is kept. Never reads or returns a secret.
options:
  mount_point:
    description: KV v2 mount path.
    type: str
    default: secret
  paths:
    description: Secret paths inside the mount.
    type: list
    elements: str
    required: true
  cas_required:
    description: Whether every write to these paths needs check-and-set.
    type: bool
    default: true
  max_versions:
    description: Versions kept per path (C(0) = the mount's setting).
    type: int
    default: 10
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
"""

EXAMPLES = r"""
- name: Check-and-set and ten versions on the key paths of dev and prod
  captcha_kit.vault.vault_kv2_path_settings:
    mount_point: secret
    paths: [captchaai/dev, captchaai/prod, captchaai-staged/dev, captchaai-staged/prod]
"""

RETURN = r"""
changed_paths:
  description: The paths whose settings were (or, in check mode, would be) changed.
  returned: always
  type: list
  elements: str
"""

from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    get_client,
    read_kv2_metadata,
    run_module,
    vault_call_when_ready,
    with_diff,
)

OPTIONS = {
    "mount_point": {"type": "str", "default": "secret"},
    "paths": {"type": "list", "elements": "str", "required": True},
    "cas_required": {"type": "bool", "default": True},
    "max_versions": {"type": "int", "default": 10},
}


def _settings(module, client, mount, path):
    """The path's (cas_required, max_versions) as KV v2 keeps them; None without metadata."""
    meta = read_kv2_metadata(module, client, mount, path)
    if meta is None:
        return None
    return {
        "cas_required": bool(meta.get("cas_required")),
        "max_versions": int(meta.get("max_versions") or 0),
    }


def keep_settings(module):
    p = module.params
    mount = p["mount_point"].strip("/")
    paths = [path.strip("/") for path in p["paths"]]
    if p["max_versions"] < 0:
        module.fail_json(msg="max_versions must not be negative")
    if any(not path for path in paths):
        module.fail_json(msg="paths must not contain an empty path")
    wanted = {"cas_required": p["cas_required"], "max_versions": p["max_versions"]}
    client = get_client(module)
    before, after, changed_paths = {}, {}, []
    for path in paths:
        current = _settings(module, client, mount, path)
        if current == wanted:
            continue
        changed_paths.append(path)
        before[path], after[path] = current, wanted
        if not module.check_mode:
            # Only these two fields: hvac's update_metadata also sends delete_version_after
            # (resetting it, and needing a right the kit does not ask for).
            vault_call_when_ready(
                module,
                f"set check-and-set and the version limit of {mount}/{path}",
                client.adapter.post,
                f"/v1/{mount}/metadata/{path}",
                json=wanted,
            )
    result = {"changed": bool(changed_paths), "changed_paths": changed_paths}
    return with_diff(module, result, before, after)


def main():
    run_module(OPTIONS, keep_settings)


if __name__ == "__main__":
    main()
