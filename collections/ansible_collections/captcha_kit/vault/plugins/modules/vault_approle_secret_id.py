#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: response-wrapped AppRole secret-id, issued only when the host needs one."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_approle_secret_id
short_description: Issue a response-wrapped AppRole secret-id only when a host needs one
version_added: 0.1.0
description:
  - Reads the role-id of the AppRole role O(role_name) (a missing role fails with a message
    saying the environment is not provisioned).
  - Decides whether the host needs a new secret-id. It does when it has none
    (O(secret_id_present=false)), when the accessor of its secret-id (O(accessor)) is unknown
    to Vault (destroyed, expired and tidied, or from another server), when that secret-id expires
    within O(min_ttl) seconds or has no uses left, when a wrapped secret-id is still waiting on
    the host (O(wrapped_pending)) or the worker refused one (O(wrapped_refused), a used or
    expired token, possibly intercepted; O(state=absent) with the refused token's
    RV(wrapped_accessor) then destroys the secret-id it held), or when O(force=true).
  - When one is needed and O(issue=true), asks Vault for a secret-id with response wrapping
    (O(wrap_ttl)) and returns only the single-use wrapping token. The secret-id itself never
    reaches the controller; the worker unwraps it on the host.
  - In check mode nothing is issued; the result says whether a secret-id would be.
  - With O(state=absent), destroys the secret-id of O(accessor) instead (used after a rotation,
    once the worker runs on the new one); an accessor Vault does not know is not a change.
notes:
  - The wrapping token is returned in RV(wrap_token); the task must use C(no_log).
options:
  role_name:
    description: AppRole role name, e.g. C(captcha-worker-dev).
    type: str
    required: true
  mount:
    description: AppRole auth mount path.
    type: str
    default: approle
  secret_id_present:
    description: Whether the host already holds a secret-id (its secret-id file exists).
    type: bool
    default: false
  accessor:
    description: Accessor of the host's current secret-id (not secret); empty when unknown.
    type: str
    default: ""
  min_ttl:
    description: Re-issue when the current secret-id expires within this many seconds.
    type: int
    default: 86400
  force:
    description: Issue a new secret-id even when the current one is valid (rotation).
    type: bool
    default: false
  wrapped_pending:
    description: A wrapped secret-id is waiting on the host that the worker has not taken.
    type: bool
    default: false
  wrapped_refused:
    description: The worker refused a wrapped secret-id (already used or expired).
    type: bool
    default: false

  issue:
    description: Issue when needed. With C(false) the module only reports (never changes).
    type: bool
    default: true
  wrap_ttl:
    description: Lifetime of the wrapping token (Vault duration such as C(120s)).
    type: str
    default: 120s
  metadata:
    description: Metadata stored with the new secret-id (visible in Vault and its audit log).
    type: dict
    default: {}
  cidr_list:
    description: CIDRs the new secret-id may be used from (on top of the role's own binding).
    type: list
    elements: str
    default: []
  state:
    description:
      - C(present) issues a secret-id when needed; C(absent) destroys the one of O(accessor).
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.no_diff
"""

EXAMPLES = r"""
- name: Issue a wrapped secret-id for the dev worker when it needs one
  captcha_kit.vault.vault_approle_secret_id:
    role_name: captcha-worker-dev
    secret_id_present: "{{ __secret_id_stat.stat.exists }}"
    accessor: "{{ __accessor }}"
    wrap_ttl: 120s
  delegate_to: localhost
  register: __issue
  no_log: true
"""

RETURN = r"""
role_id:
  description: The role-id of O(role_name) (an identifier, not a secret on its own).
  returned: always
  type: str
needs_issue:
  description: Whether the host needs a new secret-id.
  returned: always
  type: bool
reason:
  description: Why a new secret-id is (or is not) needed.
  returned: always
  type: str
  sample: the host has no secret-id yet
expires_in:
  description: Seconds until the current secret-id expires; null if it never expires or is unknown.
  returned: always
  type: int
issued:
  description: Whether a wrapped secret-id was issued by this run.
  returned: always
  type: bool
wrap_token:
  description: The single-use wrapping token (only when RV(issued)). Keep the task C(no_log).
  returned: when issued
  type: str
wrap_accessor:
  description: Accessor of the wrapping token.
  returned: when issued
  type: str
wrap_ttl:
  description: Lifetime of the wrapping token in seconds.
  returned: when issued
  type: int
wrapped_accessor:
  description:
    - Accessor of the secret-id inside the wrapping token (not secret). Kept on the host, it
      lets a later run destroy that secret-id if the worker refused the token (used by someone
      else, possibly an interception).
  returned: when issued
  type: str
"""

import datetime as dt
import itertools

from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    VaultForbidden,
    VaultNotFound,
    duration_or_fail,
    get_client,
    run_module,
    vault_call,
)

OPTIONS = {
    "role_name": {"type": "str", "required": True},
    "mount": {"type": "str", "default": "approle"},
    "secret_id_present": {"type": "bool", "default": False},
    "accessor": {"type": "str", "default": ""},
    "min_ttl": {"type": "int", "default": 86400},
    "force": {"type": "bool", "default": False},
    "wrapped_pending": {"type": "bool", "default": False},
    "wrapped_refused": {"type": "bool", "default": False},
    "issue": {"type": "bool", "default": True},
    "wrap_ttl": {"type": "str", "default": "120s"},
    "metadata": {"type": "dict", "default": {}},
    "cidr_list": {"type": "list", "elements": "str", "default": []},
    "state": {"type": "str", "default": "present", "choices": ["present", "absent"]},
}


def _expires_in(expiration_time, now=None):
    """Seconds until ``expiration_time`` (RFC 3339); None when it never expires."""
    if not expiration_time or str(expiration_time).startswith("0001-01-01"):
        return None
    text = str(expiration_time).replace("Z", "+00:00")
    # Vault prints nanoseconds; datetime takes at most microseconds.
    if "." in text:
        head, _dot, rest = text.partition(".")
        digits = "".join(itertools.takewhile(str.isdigit, rest))
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return int((when - now).total_seconds())


def _lookup_accessor(module, client, role, mount, accessor):
    """Lookup data of the accessor, or None when Vault does not know it."""
    what = f"look up the secret-id accessor of AppRole role {role}"
    try:
        response = vault_call(
            module,
            what,
            client.auth.approle.read_secret_id_accessor,
            role,
            accessor,
            mount_point=mount,
        )
    except VaultNotFound:
        return None
    if response is None:  # some servers answer 204 for unknown accessors
        return None
    if isinstance(response, dict):
        return response.get("data") or None
    return None


class _RoleIdForbidden(Exception):
    """Vault answered 403 to the role-id read."""


def read_role_id(module, client, role, mount):
    """The role-id of ``role``; a missing role fails (the environment is not provisioned)."""

    def read(*args, **kwargs):
        try:
            return client.auth.approle.read_role_id(*args, **kwargs)
        except VaultForbidden as exc:
            raise _RoleIdForbidden() from exc

    try:
        response = vault_call(
            module, f"read the role-id of AppRole role {role}", read, role, mount_point=mount
        )
    except _RoleIdForbidden:
        # A deployer's token may read only the role-ids of its envs, and Vault answers 403 for
        # a role that does not exist as for one the token may not read.
        module.fail_json(
            msg=f"AppRole role {role} does not exist at auth/{mount}, or this token may not read "
            "it (Vault answers both with 403 to a token without the env's deployer policy): if "
            "this environment is not provisioned in Vault, run playbooks/provision-vault.yml "
            "for it first; otherwise deploy with a token of captcha-deployer-<env> "
            "(docs/tokens.md)"
        )
    except VaultNotFound:
        module.fail_json(
            msg=f"AppRole role {role} does not exist at auth/{mount}: this environment is not "
            "provisioned in Vault (run playbooks/provision-vault.yml for it first)"
        )
    role_id = ((response or {}).get("data") or {}).get("role_id")
    if not role_id:
        module.fail_json(msg=f"Vault returned no role-id for AppRole role {role}")
    return role_id


def destroy(module, client, role, mount, role_id, accessor):
    """state=absent: destroy the secret-id of ``accessor`` if Vault knows it; the result."""
    known = _lookup_accessor(module, client, role, mount, accessor) is not None
    if known and not module.check_mode:
        vault_call(
            module,
            f"destroy a secret-id of AppRole role {role}",
            client.auth.approle.destroy_secret_id_accessor,
            role,
            accessor,
            mount_point=mount,
        )
    return {
        "changed": known,
        "role_id": role_id,
        "needs_issue": False,
        "reason": "destroyed the secret-id" if known else "Vault does not know that secret-id",
        "expires_in": None,
        "issued": False,
    }


def needs_new_secret_id(module, client, role, mount, accessor):
    """``(needs, reason, expires_in)``: whether the host needs a new secret-id, and why."""
    p = module.params
    if p["force"]:
        return True, "a new secret-id was requested (force)", None
    if p["wrapped_refused"]:
        return (
            True,
            "the worker refused a wrapped secret-id (already used or expired: possibly"
            " intercepted); a new one is delivered and the host's other secret-ids destroyed",
            None,
        )
    if p["wrapped_pending"]:
        return True, "a wrapped secret-id is waiting on the host, not taken by the worker", None
    if not p["secret_id_present"]:
        return True, "the host has no secret-id yet", None
    if not accessor:
        return True, "the host's secret-id accessor is unknown", None
    info = _lookup_accessor(module, client, role, mount, accessor)
    if info is None:
        return True, "Vault does not know the host's secret-id (revoked or expired)", None
    expires_in = _expires_in(info.get("expiration_time"))
    uses = info.get("secret_id_num_uses")
    if expires_in is not None and expires_in <= p["min_ttl"]:
        return True, f"the host's secret-id expires in {max(expires_in, 0)} s", expires_in
    if uses is not None and int(uses) < 0:
        return True, "the host's secret-id has no uses left", expires_in
    reason = "the host's secret-id is valid" + (
        f" for {expires_in} s" if expires_in is not None else " (no expiry)"
    )
    return False, reason, expires_in


def issue_wrapped(module, client, role, mount, wrap_ttl):
    """Issue a response-wrapped secret-id: the result keys of the wrapping token."""
    p = module.params
    response = vault_call(
        module,
        f"issue a wrapped secret-id for AppRole role {role}",
        client.auth.approle.generate_secret_id,
        role,
        metadata=p["metadata"] or None,
        cidr_list=p["cidr_list"] or None,
        mount_point=mount,
        wrap_ttl=f"{wrap_ttl}s",
    )
    wrap = (response or {}).get("wrap_info") or {}
    if not wrap.get("token"):
        module.fail_json(msg=f"Vault did not wrap the secret-id of AppRole role {role}")
    return {
        "issued": True,
        "wrap_token": wrap["token"],
        "wrap_accessor": wrap.get("accessor", ""),
        "wrapped_accessor": wrap.get("wrapped_accessor", ""),
        "wrap_ttl": int(wrap.get("ttl") or wrap_ttl),
    }


def ensure_secret_id(module):
    """Check the input, read the role-id, then destroy, or issue when needed; the result."""
    p = module.params
    role = p["role_name"]
    mount = p["mount"].strip("/")
    wrap_ttl = duration_or_fail(module, "wrap_ttl", p["wrap_ttl"])
    if wrap_ttl <= 0:
        module.fail_json(msg="wrap_ttl must be a positive duration, e.g. 120s")
    if p["min_ttl"] < 0:
        module.fail_json(msg="min_ttl must not be negative")
    accessor = (p["accessor"] or "").strip()
    if p["state"] == "absent" and not accessor:
        module.fail_json(msg="state=absent needs the accessor of the secret-id to destroy")

    client = get_client(module)
    role_id = read_role_id(module, client, role, mount)
    if p["state"] == "absent":
        return destroy(module, client, role, mount, role_id, accessor)

    needs, reason, expires_in = needs_new_secret_id(module, client, role, mount, accessor)
    result = {
        "changed": False,
        "role_id": role_id,
        "needs_issue": needs,
        "reason": reason,
        "expires_in": expires_in,
        "issued": False,
    }
    if needs and p["issue"]:
        result["changed"] = True
        if not module.check_mode:
            result.update(issue_wrapped(module, client, role, mount, wrap_ttl))
    return result


def main():
    # No required_if for state=absent: accessor defaults to '', which required_if accepts;
    # ensure_secret_id refuses a blank accessor itself, before any Vault call.
    run_module(OPTIONS, ensure_secret_id)


if __name__ == "__main__":
    main()
