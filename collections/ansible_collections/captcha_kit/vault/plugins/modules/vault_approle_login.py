#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: log in with an AppRole (role-id and secret-id files) on any node that serves."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vault_approle_login
short_description: Log in with an AppRole from its role-id and secret-id files
version_added: 0.2.0
description:
  - Reads the role-id and the secret-id from their files and logs in at
    C(auth/<mount>/login). Returns the client token for the play's later Vault calls.
  - The login goes through the collection's retrying client, like every other module of it. It
    tries each address of O(url) and O(urls) in turn, moves on from a node that is down, sealed
    or a standby without an active node (a raft election), and retries for at most
    O(retry_timeout) seconds. A login at a single address that a restarted node answers with
    "active cluster node not found" therefore waits for the election instead of failing.
  - A refused login (HTTP 400 or 403) is not retried. It fails with Vault's reason and what to
    do; on a 403 it also names AppRole user lockout as a possible cause. Neither the role-id,
    the secret-id nor the token ever appears in a message.
  - Changes nothing in Vault beyond the login itself (a secret-id with a use limit spends a use),
    so it reports C(changed=false) and runs in check mode too.
  - Register its result with C(no_log) and keep the token out of output.
  - With O(state=absent) it revokes the token in O(token) instead (C(auth/token/revoke-self)),
    through the same retrying client (the logout at the end of a run). A token Vault no longer
    knows counts as revoked.
options:
  state:
    description:
      - V(present) logs in and returns the token; V(absent) revokes O(token).
    type: str
    choices: [present, absent]
    default: present
  role_id_file:
    description:
      - File that holds the role-id. Required with O(state=present).
    type: path
  secret_id_file:
    description:
      - File that holds the secret-id (mode 0600). Required with O(state=present).
    type: path
  mount:
    description:
      - Path of the AppRole auth method.
    type: str
    default: approle
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.no_diff
"""

EXAMPLES = r"""
- name: Log in with the rotator AppRole
  captcha_kit.vault.vault_approle_login:
    url: https://vault-1.example:8200
    urls: [https://vault-2.example:8200, https://vault-3.example:8200]
    role_id_file: /etc/captcha-rotator/role-id
    secret_id_file: /etc/captcha-rotator/secret-id
  register: login
  no_log: true
"""

RETURN = r"""
revoked:
  description: Whether O(state=absent) revoked a token Vault still knew.
  returned: state is absent
  type: bool
token:
  description: The client token of the login (a secret; register with no_log).
  returned: state is present
  type: str
ttl:
  description: The token's lease in seconds.
  returned: state is present
  type: int
addr:
  description: The address that answered the login.
  returned: state is present
  type: str
"""

from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    _short,
    fail_unreachable,
    get_client,
    hvac,
    run_module,
)

OPTIONS = {
    "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
    "role_id_file": {"type": "path"},
    "secret_id_file": {"type": "path"},
    "mount": {"type": "str", "default": "approle"},
}
REQUIRED_IF = [("state", "present", ["role_id_file", "secret_id_file"])]

REFUSED_HINT = (
    'An expired or used-up secret-id needs a new one (docs/runbooks.md, "Secret-id rotation")'
)
LOCKOUT_HINT = (
    "The role-id may be locked after repeated refused logins (AppRole user lockout: "
    "sys/locked-users lists it; it lifts by itself, or an admin unlocks it with "
    "sys/locked-users/<mount accessor>/unlock/<alias>)"
)


def _read(module, path, what):
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as exc:
        module.fail_json(
            msg=f"Cannot read the {what} file {path} ({exc.strerror}); nothing changed"
        )
    if not value:
        module.fail_json(msg=f"The {what} file {path} is empty; nothing changed")
    return value


def logout(module):
    """Revoke the token of the module's ``token`` option (a login token at the end of a run)."""
    client = get_client(module, check_token=False)
    try:
        client.auth.token.revoke_self()
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
        return {"changed": False, "revoked": False}  # expired or revoked already
    except hvac.exceptions.VaultError as exc:
        module.fail_json(msg=f"Revoking the login token failed ({_short(exc)})")
    except Exception as exc:  # requests errors: connection, TLS, timeout
        fail_unreachable(module, exc, "Revoking the login token failed: ")
    return {"changed": True, "revoked": True}


def login(module):
    """Read the two files, log in on whichever node serves, return the token."""
    params = module.params
    if params["state"] == "absent":
        return logout(module)
    role_id = _read(module, params["role_id_file"], "role-id")
    secret_id = _read(module, params["secret_id_file"], "secret-id")
    client = get_client(module, token_required=False)
    where = f"{params['url']}/v1/auth/{params['mount']}/login"
    try:
        answer = client.auth.approle.login(
            role_id=role_id,
            secret_id=secret_id,
            mount_point=params["mount"],
            use_token=False,
        )
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
        hint = REFUSED_HINT
        if isinstance(exc, hvac.exceptions.Forbidden):
            hint = f"{REFUSED_HINT}. {LOCKOUT_HINT}"
        module.fail_json(
            msg=f"AppRole login at {where} refused ({_short(exc)}). {hint}; nothing changed"
        )
    except hvac.exceptions.VaultError as exc:
        module.fail_json(
            msg=f"AppRole login at {where} failed ({_short(exc)}), also after retrying every"
            f" address for {client.adapter.retry_timeout:g} s; nothing changed"
        )
    except Exception as exc:  # requests errors: connection, TLS, timeout
        fail_unreachable(module, exc, "AppRole login failed: ", "; nothing changed")
    auth = answer.get("auth") or {}
    token = auth.get("client_token")
    if not token:
        module.fail_json(msg=f"AppRole login at {where} returned no token; nothing changed")
    return {
        "changed": False,
        "token": token,
        "ttl": int(auth.get("lease_duration") or 0),
        "addr": client.adapter.base_uri,
    }


def main():
    run_module(OPTIONS, login, required_if=REQUIRED_IF)


if __name__ == "__main__":
    main()
