#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: make sure an audit device is enabled on Vault/OpenBao."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_audit_device
short_description: Make sure an audit device is on (enable it through the API where allowed)
version_added: 0.1.0
description:
  - With O(managed_externally=false) (the default) makes sure an audit device of O(type) is
    enabled at O(path). If none is there it is enabled through the API, which HashiCorp Vault
    allows. OpenBao refuses API-created audit devices by default
    (C(use declarative, config-based audit device management)); then the module fails with the
    C(audit) stanza to add to the server configuration.
  - A device at O(path) with other options is left as it is with a warning, because audit
    devices cannot be changed in place (disable and enable would leave a gap in the audit trail).
  - With O(managed_externally=true) only checks that at least one audit device is enabled and
    fails otherwise; never changes anything.
  - Fails first, before any change, when an enabled audit device (the one at O(path) or any
    other, since every device receives every request) has C(log_raw) on, which writes secrets
    such as the kit's API key in clear text to its log, or C(hmac_accessor) off, which writes
    token accessors in clear text. The server answers options as strings; they are read as the
    server reads them (C(1), C(t), C(true) are true, C(0), C(f), C(false) are false).
  - O(options) with C(log_raw) on or C(hmac_accessor) off are refused before any Vault call.
options:
  path:
    description: Audit device path, without slashes.
    type: str
    default: file
  type:
    description: Audit device type.
    type: str
    default: file
  description:
    description: Description used when the device is enabled.
    type: str
    default: ""
  options:
    description:
      - Device options, for a C(file) device at least C(file_path).
      - C(log_raw) on or C(hmac_accessor) off are refused.
    type: dict
    default: {}
  managed_externally:
    description: Audit devices are managed outside the kit (server config); only check.
    type: bool
    default: false
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
"""

EXAMPLES = r"""
- name: Make sure the file audit device is on
  captcha_kit.vault.vault_audit_device:
    path: file
    type: file
    options:
      file_path: /var/log/vault/audit.log

- name: Only check that some audit device is on
  captcha_kit.vault.vault_audit_device:
    managed_externally: true
"""

RETURN = r"""
devices:
  description: Paths and types of the enabled audit devices (after the run).
  returned: always
  type: dict
  sample: {"file/": "file"}
unsafe_devices:
  description: Paths of the devices with C(log_raw) on or C(hmac_accessor) off.
  returned: when such a device fails the run
  type: list
  elements: str
  sample: ["file/"]
"""

import posixpath

from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    get_client,
    run_module,
    vault_call,
    with_diff,
)

OPTIONS = {
    "path": {"type": "str", "default": "file"},
    "type": {"type": "str", "default": "file"},
    "description": {"type": "str", "default": ""},
    "options": {"type": "dict", "default": {}},
    "managed_externally": {"type": "bool", "default": False},
}

METADATA_KEYS = ("request_id", "lease_id", "renewable", "lease_duration", "wrap_info", "warnings")


def list_devices(module, client):
    """The enabled audit devices by path (``file/``), without the response's metadata."""
    listing = vault_call(module, "list audit devices", client.sys.list_enabled_audit_devices)
    devices = listing.get("data", listing) or {}
    return {k: v for k, v in devices.items() if k not in METADATA_KEYS and isinstance(v, dict)}


def _comparable(key, value):
    """Option value as compared: file paths normalised (``a/../b`` == ``b``)."""
    if key == "file_path" and value and value.startswith("/"):
        return posixpath.normpath(value)
    return value


# Audit options that put secrets or token accessors in clear text into the log, with the value
# that does (the server's defaults, log_raw false and hmac_accessor true, are safe).
UNSAFE_OPTIONS = (("log_raw", True), ("hmac_accessor", False))
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_bool(value):
    """An option value as the server reads it (Go's ``strconv.ParseBool``); None if it is none
    of those spellings."""
    text = str(value).lower() if isinstance(value, bool) else str(value).strip()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def unsafe_options(options):
    """``["log_raw=1", ...]``: the options of one device that log secrets or accessors in clear
    text (a value the server could not have read counts as unsafe)."""
    found = []
    for key, unsafe in UNSAFE_OPTIONS:
        if key not in (options or {}):
            continue
        value = parse_bool(options[key])
        if value is None or value == unsafe:
            found.append(f"{key}={options[key]}")
    return found


def check_safe_devices(module, devices, summary, kit_path=None):
    """Fail when any enabled device logs secrets (``log_raw``) or accessors in clear text."""
    unsafe = {}
    for path, device in sorted(devices.items()):
        found = unsafe_options(device.get("options"))
        if found:
            mark = ", the kit's device" if kit_path and path == kit_path + "/" else ""
            unsafe[path] = f"{path} ({', '.join(found)}{mark})"
    if unsafe:
        module.fail_json(
            msg=f"Audit devices that write secrets or token accessors in clear text: "
            f"{'; '.join(unsafe.values())}. Every audit device receives every request, so "
            "log_raw=true puts the kit's API key in clear text into that log, and "
            "hmac_accessor=false the accessors of its tokens. Audit devices cannot be changed "
            "in place: enable a replacement without these options (log_raw false, "
            "hmac_accessor true: the defaults), then disable this one (OpenBao: fix its audit "
            "stanza in the server configuration, then SIGHUP). Nothing was changed.",
            devices=summary,
            unsafe_devices=sorted(unsafe),
        )


def declarative_hint(p):
    """The ``audit`` stanza of the server configuration that declares the wanted device."""
    options = "".join(f'    {k} = "{v}"\n' for k, v in sorted(p["options"].items()))
    return (
        f'audit "{p["type"]}" "{p["path"]}" {{\n'
        f'  description = "{p["description"]}"\n'
        f"  options {{\n{options}  }}\n}}"
    )


def ensure_audit_device(module):
    """Check (managed externally) or enable the device if none is at its path; the result."""
    p = module.params
    p["options"] = {k: str(v) for k, v in (p["options"] or {}).items()}
    path = p["path"].strip("/")
    if not p["managed_externally"] and p["type"] == "file" and not p["options"].get("file_path"):
        module.fail_json(msg="options.file_path is required for a file audit device")
    wanted_unsafe = unsafe_options(p["options"])
    if wanted_unsafe:
        module.fail_json(
            msg=f"options {', '.join(wanted_unsafe)} would write secrets or token accessors in "
            "clear text to the audit log; the kit does not enable such a device."
        )
    client = get_client(module)
    devices = list_devices(module, client)
    summary = {k: v.get("type") for k, v in devices.items()}
    result = {"changed": False, "devices": summary}
    check_safe_devices(module, devices, summary, None if p["managed_externally"] else path)

    if p["managed_externally"]:
        if not devices:
            module.fail_json(
                msg="No audit device is enabled, and audit is marked as managed outside the kit: "
                "enable one in the server configuration (OpenBao: an audit stanza, then SIGHUP) "
                "or through the API (HashiCorp Vault) before provisioning.",
                devices=summary,
            )
        return result

    current = devices.get(path + "/")
    if current is not None:
        check_existing(module, path, current, summary)
        return result

    before = {"devices": summary}
    after = {"devices": dict(summary, **{path + "/": p["type"]})}
    with_diff(module, result, before, after)
    result["changed"] = True
    if module.check_mode:
        result["devices"] = after["devices"]
        return result
    enable_device(module, client, path, summary)
    result["devices"] = {k: v.get("type") for k, v in list_devices(module, client).items()}
    return result


def check_existing(module, path, current, summary):
    """Fail on a device of another type at ``path``; warn when its options differ."""
    p = module.params
    if current.get("type") != p["type"]:
        module.fail_json(
            msg=f"An audit device of type '{current.get('type')}' is enabled at {path}/, "
            f"not '{p['type']}'. Nothing was changed.",
            devices=summary,
        )
    current_options = {k: str(v) for k, v in (current.get("options") or {}).items()}
    differing = sorted(
        k
        for k, v in p["options"].items()
        if _comparable(k, current_options.get(k)) != _comparable(k, v)
    )
    if differing:
        module.warn(
            f"Audit device {path}/ is enabled with other values of {', '.join(differing)}; "
            "left as it is (audit devices cannot be changed in place)."
        )


def enable_device(module, client, path, summary):
    """Enable the device through the API; a server that refuses that (OpenBao's default)
    fails with the ``audit`` stanza to declare instead."""
    p = module.params
    try:
        client.sys.enable_audit_device(
            p["type"], description=p["description"], options=p["options"], path=path
        )
    except Exception as exc:
        if "declarative" in str(exc) or "config-based" in str(exc):
            module.fail_json(
                msg=f"The server refuses to enable audit devices through the API (OpenBao "
                f"default). Declare the device in the server configuration instead and send the "
                f"server a SIGHUP (or restart it):\n{declarative_hint(p)}\nIf audit is managed "
                "outside the kit, set vault_provision_audit_managed_externally: true "
                "(module option managed_externally) so the kit only checks that one is on.",
                devices=summary,
            )
        vault_call(
            module,
            f"enable the {p['type']} audit device at {path}/",
            client.sys.enable_audit_device,
            p["type"],
            description=p["description"],
            options=p["options"],
            path=path,
        )


def main():
    run_module(OPTIONS, ensure_audit_device)


if __name__ == "__main__":
    main()
