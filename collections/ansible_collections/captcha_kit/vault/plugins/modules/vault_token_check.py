#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: check the Vault token and its capabilities before any change."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_token_check
short_description: Check that the Vault token is valid and holds the capabilities a play needs
version_added: 0.1.0
description:
  - Connects to Vault, looks the token up (C(auth/token/lookup-self)) and asks
    C(sys/capabilities-self) for O(capabilities). Fails with the list of missing rights, so a
    play can stop before its first change. Never changes anything; never returns the token.
  - Connection problems (server unreachable, wrong CA, missing or invalid token, sealed server)
    fail with a message that says what to fix.
  - "With several node addresses (O(url), O(urls), C($CAPTCHA_KIT_VAULT_ADDRS)), asks each node
    whether it is a standby (C(sys/leader)) and whether a standby answers a read itself
    (C(auth/token/lookup-self) with the header C(X-Vault-No-Request-Forwarding)). A standby that
    answers reads from its own copy (OpenBao's standby reads, on unless C(disable_standby_reads =
    true)) can answer an old key version right after a put and across a leader election, so it
    fails the check unless O(allow_standby_reads). A node that does not answer is left to the
    other checks."
options:
  capabilities:
    description:
      - Map of API path (without C(/v1/)) to the list of capabilities needed on it, see the
        examples. C(root) satisfies everything; C(deny) satisfies nothing.
    type: dict
    default: {}
  allow_standby_reads:
    description:
      - Accept standbys that answer reads from their own copy (eventual consistency).
    type: bool
    default: false
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.no_diff
"""

EXAMPLES = r"""
- name: Check the admin token before provisioning
  captcha_kit.vault.vault_token_check:
    capabilities:
      sys/mounts/secret: [create, read, update, sudo]
      sys/policy/captcha-worker-dev: [create, read, update]
"""

RETURN = r"""
display_name:
  description: Display name of the token (not a secret).
  returned: always
  type: str
policies:
  description: Policies of the token.
  returned: always
  type: list
  elements: str
missing:
  description: Map of path to the capabilities the token lacks there (empty on success).
  returned: always
  type: dict
standby_reads:
  description: Addresses of the standbys that answer reads from their own copy.
  returned: always
  type: list
  elements: str
"""

from ansible_collections.captcha_kit.vault.plugins.module_utils.normalize import normalize_str_list
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    ADMIN_POLICY_HINT,
    get_client,
    node_addresses,
    run_module,
    vault_call,
)

OPTIONS = {
    "capabilities": {"type": "dict", "default": {}},
    "allow_standby_reads": {"type": "bool", "default": False},
}

STANDBY_READS_HINT = (
    "right after a put, and for a whole leader election, such a node answers the old key"
    " version, and a worker nudged by a rotation keeps that version until its next refresh."
    " Set disable_standby_reads = true in the server configuration of every node and restart"
    " them one at a time (docs/provisioning.md), or accept it with"
    " vault_provision_allow_standby_reads=true"
)


def standby_readers(module, client):
    """The node addresses that are standbys answering reads themselves (several nodes only)."""
    addrs = node_addresses(module.params)
    if len(addrs) < 2:
        return []
    session, timeout = client.adapter.session, min(float(module.params["timeout"]), 5.0)
    verify = module.params.get("ca_cert") or True
    found = []
    for addr in addrs:
        try:
            leader = session.get(f"{addr}/v1/sys/leader", verify=verify, timeout=timeout)
            status = leader.json() if leader.status_code == 200 else {}
            if not status.get("ha_enabled") or status.get("is_self", True):
                continue  # the active node, a node without HA, or one that cannot say
            answer = session.get(
                f"{addr}/v1/auth/token/lookup-self",
                headers={
                    "X-Vault-Token": module.params["token"],
                    "X-Vault-No-Request-Forwarding": "true",
                },
                verify=verify,
                timeout=timeout,
                allow_redirects=False,
            )
        except (OSError, ValueError):  # a node away: the connection checks report those
            continue
        if answer.status_code == 200:  # a forwarding standby answers 307 (to the active node)
            found.append(addr)
    return found


def check_token(module):
    """Look the token up and compare its capabilities; fails listing what is missing."""
    wanted = {
        str(path).strip("/"): normalize_str_list(caps)
        for path, caps in (module.params["capabilities"] or {}).items()
    }
    client = get_client(module)
    info = vault_call(module, "look up the token", client.auth.token.lookup_self)["data"]
    missing = {}
    if wanted:
        answer = vault_call(
            module,
            "read the token's capabilities",
            client.sys.get_capabilities,
            paths=sorted(wanted),
        )
        granted = answer.get("data", answer)
        for path, caps in wanted.items():
            have = set(granted.get(path) or [])
            if "root" in have:
                continue
            if "deny" in have:
                have = set()
            lacking = [c for c in caps if c not in have]
            if lacking:
                missing[path] = lacking
    readers = [] if module.params["allow_standby_reads"] else standby_readers(module, client)
    result = {
        "changed": False,
        "display_name": info.get("display_name", ""),
        "policies": sorted(info.get("policies") or []),
        "missing": missing,
        "standby_reads": readers,
    }
    if readers:
        who = (
            f"standby {readers[0]} answers reads from its own copy"
            if len(readers) == 1
            else f"standbys {', '.join(readers)} answer reads from their own copies"
        )
        module.fail_json(
            msg=f"Vault {who} (OpenBao's standby reads, on unless disable_standby_reads = true): "
            f"{STANDBY_READS_HINT}. Nothing was changed.",
            **result,
        )
    if missing:
        lines = "; ".join(f"{path}: {', '.join(caps)}" for path, caps in sorted(missing.items()))
        module.fail_json(
            msg=f"The Vault token lacks rights this play needs ({ADMIN_POLICY_HINT}). "
            f"Missing: {lines}. Nothing was changed.",
            **result,
        )
    return result


def main():
    run_module(OPTIONS, check_token)


if __name__ == "__main__":
    main()
