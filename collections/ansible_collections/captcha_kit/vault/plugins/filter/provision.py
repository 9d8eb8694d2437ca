# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The data vault_provision hands to its modules, built in Python rather than in Jinja loops.

``envs | per_env(kinds)``                      ``[{name: '<kind>-<env>', kind, env}]``, env by env
``envs | approle_roles(kind, settings, overrides)``  one AppRole role item per env
``policies | policy_items(texts)``             ``[{name, policy}]`` for ``vault_policy``
``envs | provision_capabilities(...)``         ``{path: [capabilities]}`` the admin token needs
``roles | approle_summary(mount)``             one line per AppRole role (no secrets)
``roles | unbound_production_roles(envs, kinds, waivers)``  production roles without CIDRs

Each filter only arranges data the role has already validated; none talks to Vault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

_WRITE = ["create", "read", "update"]


def _name(kind: object, env: object) -> str:
    return f"{kind}-{env}"


def per_env(envs: Iterable[Any], kinds: Iterable[Any]) -> list[dict[str, Any]]:
    """One item per env and kind, env by env in the order given, then kind by kind.

    ``['dev', 'prod'] | per_env(['captcha-worker', 'captcha-stager'])`` is
    ``[{name: captcha-worker-dev, kind: captcha-worker, env: dev}, {name: captcha-stager-dev, ...},
    {name: captcha-worker-prod, ...}, {name: captcha-stager-prod, ...}]``: the policies (or roles)
    of every env, each named ``<kind>-<env>``.
    """
    kinds = list(kinds)
    return [{"name": _name(kind, env), "kind": kind, "env": env} for env in envs for kind in kinds]


def approle_roles(
    envs: Iterable[Any],
    kind: str,
    settings: Mapping[str, Any],
    overrides: Mapping[Any, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The AppRole role items of ``kind`` for every env, for ``vault_approle_role``'s ``roles``.

    Each item is ``settings``, then that env's entry of ``overrides`` on top (a shallow merge,
    like ``combine``), then ``name`` and ``token_policies`` set to ``<kind>-<env>``: the role of an
    env gets exactly the policy of the same name, whatever the settings say.
    """
    overrides = overrides or {}
    roles = []
    for env in envs:
        role = dict(settings.items())
        role.update((overrides.get(env) or {}).items())
        role["name"] = _name(kind, env)
        role["token_policies"] = [_name(kind, env)]
        roles.append(role)
    return roles


def policy_items(policies: Iterable[Mapping[str, Any]], texts: Mapping[str, str]) -> list[dict]:
    """``[{name, policy}]`` for ``vault_policy``'s ``policies``: each policy of ``policies``
    (items with a ``name``, as ``per_env`` makes them) with its rendered text from ``texts``
    (policy name -> HCL). A policy without a text is an error, never an empty policy."""
    return [{"name": item["name"], "policy": texts[item["name"]]} for item in policies]


def env_paths(envs: Iterable[Any], prefixes: Iterable[Any]) -> list[str]:
    """``<prefix>/<env>`` for every environment, prefix by prefix within each environment: the
    KV paths an environment's key (and staged key) live at."""
    prefixes = [str(prefix).strip("/") for prefix in prefixes]
    return [f"{prefix}/{env}" for env in envs for prefix in prefixes]


def provision_capabilities(
    envs: Iterable[Any],
    kv_mount: str,
    approle_mount: str,
    policy_kinds: Iterable[Any],
    role_kinds: Iterable[Any],
    key_path_prefix: str,
    first_key_envs: Iterable[Any] = (),
    staged_path_prefix: str | None = None,
) -> dict[str, list[str]]:
    """Every right the admin token needs for one provisioning run, as ``{path: [capabilities]}``
    for ``vault_token_check``.

    The KV mount (read the mount table, create the mount, read its ``config``: a mount that is
    there already is never changed), the AppRole auth mount (with ``sudo``: tuning user lockout
    is root-protected), the audit devices, each policy ``<policy kind>-<env>``, each AppRole role
    ``<role kind>-<env>`` (not its role-id: provisioning never reads one), the metadata of each
    env's key path (and, with ``staged_path_prefix``, its staged key path) where check-and-set
    and the version limit are kept, and for each env of ``first_key_envs`` the data (create)
    of ``<key_path_prefix>/<env>``.
    """
    envs = list(envs)
    caps: dict[str, list[str]] = {
        "sys/mounts": ["read"],
        f"sys/mounts/{kv_mount}": list(_WRITE),
        f"{kv_mount}/config": ["read"],
        "sys/auth": ["read"],
        f"sys/auth/{approle_mount}": [*_WRITE, "sudo"],
        "sys/audit": ["read", "sudo"],
    }
    for policy in per_env(envs, policy_kinds):
        caps[f"sys/policy/{policy['name']}"] = list(_WRITE)
    for role in per_env(envs, role_kinds):
        base = f"auth/{approle_mount}/role/{role['name']}"
        caps[base] = list(_WRITE)
    prefixes = [key_path_prefix] + ([staged_path_prefix] if staged_path_prefix else [])
    for path in env_paths(envs, prefixes):
        caps[f"{kv_mount}/metadata/{path}"] = list(_WRITE)
    for env in first_key_envs:
        caps[f"{kv_mount}/data/{key_path_prefix}/{env}"] = ["create"]
    return caps


def unbound_production_roles(
    roles: Iterable[Mapping[str, Any]],
    production_envs: Iterable[Any],
    kinds: Iterable[Any],
    waivers: Mapping[Any, Any] | None = None,
) -> list[str]:
    """``<role>: <field>`` for every CIDR binding left empty on a role of a production env.

    ``roles`` are the AppRole role items the role writes (``approle_roles`` output, overrides
    applied). Each role ``<kind>-<env>`` of a production env needs both ``secret_id_bound_cidrs``
    and ``token_bound_cidrs``, unless ``waivers`` maps the env to a (non-empty) reason.
    """
    waivers = waivers or {}
    waived = {str(env) for env, why in waivers.items() if str(why or "").strip()}
    names = {
        _name(kind, env) for env in production_envs if str(env) not in waived for kind in kinds
    }
    return [
        f"{role['name']}: {field}"
        for role in roles
        if role.get("name") in names
        for field in ("secret_id_bound_cidrs", "token_bound_cidrs")
        if not role.get(field)
    ]


def _joined(values: Iterable[Any]) -> str:
    return ",".join(str(v) for v in values)


def approle_summary(roles: Iterable[Mapping[str, Any]] | None, approle_mount: str) -> list[str]:
    """One line per role of ``vault_approle_role``'s ``roles`` result, without secrets:

    ``auth/<mount>/role/<name>: policies=a,b token_ttl=3600s token_max_ttl=14400s
    secret_id_ttl=2592000s secret_id_num_uses=0 secret_id_bound_cidrs=- token_bound_cidrs=-``

    A setting the result does not carry shows as ``?``, an empty CIDR list as ``-``.
    """
    lines = []
    for result in roles or []:
        role = result.get("role") or {}
        lines.append(
            f"auth/{approle_mount}/role/{result['name']}"
            f": policies={_joined(role.get('token_policies', []))}"
            f" token_ttl={role.get('token_ttl', '?')}s"
            f" token_max_ttl={role.get('token_max_ttl', '?')}s"
            f" secret_id_ttl={role.get('secret_id_ttl', '?')}s"
            f" secret_id_num_uses={role.get('secret_id_num_uses', '?')}"
            f" secret_id_bound_cidrs={_joined(role.get('secret_id_bound_cidrs', [])) or '-'}"
            f" token_bound_cidrs={_joined(role.get('token_bound_cidrs', [])) or '-'}"
        )
    return lines


class FilterModule:
    """captcha_kit.vault filters that build vault_provision's data."""

    def filters(self):
        return {
            "per_env": per_env,
            "env_paths": env_paths,
            "approle_roles": approle_roles,
            "policy_items": policy_items,
            "provision_capabilities": provision_capabilities,
            "approle_summary": approle_summary,
            "unbound_production_roles": unbound_production_roles,
        }
