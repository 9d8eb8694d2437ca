#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: create-only KV v2 secret (check-and-set 0) on Vault/OpenBao."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_kv2_secret_create
short_description: Write a KV v2 secret only if the path holds none yet (check-and-set 0)
version_added: 0.1.0
description:
  - Writes O(data) to O(path) with check-and-set C(0), so the write succeeds only when the path
    has no version yet. An existing secret is never read, compared or overwritten; the module
    reports C(ok) and its current version.
  - The data is never logged and never returned. Diff mode shows only the field names.
options:
  mount_point:
    description: KV v2 mount path.
    type: str
    default: secret
  path:
    description: Secret path inside the mount.
    type: str
    required: true
  data:
    description: Fields of the secret. Never logged or returned.
    type: dict
    required: true
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
"""

EXAMPLES = r"""
- name: Store the first API key of dev unless one exists
  captcha_kit.vault.vault_kv2_secret_create:
    mount_point: secret
    path: captchaai/dev
    data:
      api_key: "{{ first_key }}"
  no_log: true
"""

RETURN = r"""
created:
  description: Whether the secret was (or, in check mode, would be) created.
  returned: always
  type: bool
version:
  description: The secret's current version (C(0) in check mode before creation).
  returned: always
  type: int
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
    "path": {"type": "str", "required": True},
    "data": {"type": "dict", "required": True, "no_log": True},
}


def _create_only(client, path, data, mount):
    """Write with check-and-set 0; None when the path got a version in the meantime."""
    try:
        return client.secrets.kv.v2.create_or_update_secret(
            path, secret=data, cas=0, mount_point=mount
        )
    except Exception as exc:
        if "check-and-set" in str(exc):
            return None
        raise


def create_secret(module):
    """Create the secret unless the path has a version; the result (never the data)."""
    p = module.params
    mount = p["mount_point"].strip("/")
    path = p["path"].strip("/")
    if not p["data"]:
        module.fail_json(msg=f"data for {mount}/{path} is empty")
    client = get_client(module)
    metadata = read_kv2_metadata(module, client, mount, path) or {}
    version = int(metadata.get("current_version") or 0)
    fields = sorted(p["data"])
    result = {"changed": False, "created": False, "version": version}
    if version == 0:
        result.update(changed=True, created=True)
        with_diff(module, result, {"exists": False}, {"exists": True, "fields": fields})
        if not module.check_mode:
            written = vault_call_when_ready(
                module,
                f"create {mount}/{path}",
                _create_only,
                client,
                path,
                p["data"],
                mount,
            )
            if written is None:
                module.fail_json(
                    msg=f"{mount}/{path} was created by someone else during this run; "
                    "nothing was overwritten"
                )
            result["version"] = int(written["data"]["version"])
    return result


def main():
    run_module(OPTIONS, create_secret)


if __name__ == "__main__":
    main()
