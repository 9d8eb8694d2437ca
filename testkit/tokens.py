"""The operators' tokens the tests run playbooks with: never the root token.

Each playbook runs with the smallest token its docs name (docs/design.md, "Who holds what"):

* ``provision-vault.yml``: a token of ``captcha-provisioner``, the policy
  ``playbooks/operator-policies.yml`` makes for the run's layout (envs, mounts, key paths).
  ``policies/captcha-provisioner.hcl`` is that policy for the default layout; a test layout
  (``kv-<tag>``, ``approle-<tag>``, envs ``<tag>-dev`` ...) gets its own, made by the same filter.
* ``deploy-workers.yml``: a token of ``captcha-deployer-<env>`` for each env of the inventory's
  worker hosts (policies written by provisioning).
* ``rotate-key.yml``: the rotator's own AppRole login or a ``captcha-rotator-<env>`` token
  (``testkit.rotation``).

``playbook_token`` picks the token from the playbook's name and its variables (the inventory's
and the extra vars). Tokens are made with the test server's root token, which stays in testkit.

    python -m testkit.tokens provisioner OUT [--vars-json JSON]   # 0600 file, for molecule
    python -m testkit.tokens deployer OUT ENV [ENV ...]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import hvac
import yaml
from captcha_solver import contract

from testkit.creds import write_private
from testkit.paths import BIN, COLLECTION, REPO, TEST_VAULT_DIR, TEST_VAULT_PORT
from testkit.vault import LocalVault

FILTERS = COLLECTION / "plugins" / "filter"
ROLE_VARS = REPO / "roles" / "vault_provision" / "vars" / "main.yml"
TOKEN_TTL = "2h"  # noqa: S105 (a duration)

# The role defaults a layout falls back to (roles/vault_provision/defaults/main.yml, which takes
# the mount and key paths from the kit's contract as well).
DEFAULT_LAYOUT = {
    "envs": ["dev", "staging", "prod"],
    "kv_mount": contract.DEFAULT_KV_MOUNT,
    "approle_mount": "approle",
    "key_path_prefix": contract.KEY_PATH_TEMPLATE.rsplit("/", 1)[0],
    "staged_path_prefix": contract.STAGED_PATH_TEMPLATE.rsplit("/", 1)[0],
    "audit_path": "file",
}


def _filter_module(name: str) -> ModuleType:
    """A filter plugin of the collection, loaded from its file (plain Python, no Ansible)."""
    spec = importlib.util.spec_from_file_location(f"captcha_kit_filter_{name}", FILTERS / name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def provision_layout(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The layout a provisioning run with ``variables`` works on, as vault_provision reads it."""

    def pick(name: str) -> Any:
        default = DEFAULT_LAYOUT[name]
        return variables.get(
            f"vault_provision_{name}", variables.get(f"captcha_kit_{name}", default)
        )

    layout = {name: pick(name) for name in DEFAULT_LAYOUT}
    layout["envs"] = list(layout["envs"])
    return layout


def provisioner_policy(layout: Mapping[str, Any]) -> str:
    """The HCL of captcha-provisioner for ``layout``, made by the collection's own filters (the
    ones playbooks/operator-policies.yml uses) with the policy and role kinds of the role."""
    kinds = yaml.safe_load(ROLE_VARS.read_text())
    provision = _filter_module("provision.py")
    operator = _filter_module("operator_policy.py")
    caps = provision.provision_capabilities(
        layout["envs"],
        kv_mount=layout["kv_mount"],
        approle_mount=layout["approle_mount"],
        policy_kinds=kinds["__vault_provision_policy_kinds"],
        role_kinds=kinds["__vault_provision_role_kinds"],
        key_path_prefix=layout["key_path_prefix"],
        staged_path_prefix=layout["staged_path_prefix"],
        first_key_envs=layout["envs"],
    )
    return str(
        operator.provisioner_policy(
            caps,
            layout["kv_mount"],
            layout["approle_mount"],
            layout["audit_path"],
            envs=layout["envs"],
            key_path_prefixes=[layout["key_path_prefix"], layout["staged_path_prefix"]],
        )
    )


def _root(vault: LocalVault) -> hvac.Client:
    """The root client of the test server (its active node for a cluster)."""
    addr = vault.wait_active_node().addr if len(vault.nodes) > 1 else vault.addr
    return hvac.Client(url=addr, token=vault.root_token(), verify=str(vault.ca_file))


_TOKENS: dict[tuple[str, str, tuple[str, ...]], str] = {}


def token_with(vault: LocalVault, policies: Iterable[str]) -> str:
    """A token with exactly ``policies`` (and ``default``), cached for the session."""
    policies = list(policies)
    if not policies:  # a child token without policies would inherit the root token's
        raise ValueError("a token needs at least one policy")
    key = (str(vault.state_dir), vault.root_token(), tuple(sorted(policies)))
    if key not in _TOKENS:
        answer = _root(vault).auth.token.create(
            policies=list(key[2]), ttl=TOKEN_TTL, no_parent=True
        )
        _TOKENS[key] = str(answer["auth"]["client_token"])
    return _TOKENS[key]


def provisioner_token(vault: LocalVault, layout: Mapping[str, Any]) -> str:
    """A token of the provisioner's policy for ``layout`` (written under a name of its own)."""
    text = provisioner_policy(layout)
    name = "captcha-provisioner-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    if (str(vault.state_dir), vault.root_token(), (name,)) not in _TOKENS:  # named by its text
        _root(vault).sys.create_or_update_policy(name, text)
    return token_with(vault, [name])


def deployer_token(vault: LocalVault, envs: Iterable[str]) -> str:
    """A token of ``captcha-deployer-<env>`` for each of ``envs``."""
    return token_with(vault, sorted({f"captcha-deployer-{env}" for env in envs}))


def deployer_policy(env: str, approle_mount: str, max_wrapping_ttl: str = "10m") -> str:
    """policies/captcha-deployer.hcl.j2 rendered for ``env`` (as provisioning renders it), for
    a test that makes a worker role of its own without provisioning."""
    import jinja2

    jinja = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True, autoescape=False)  # noqa: S701 (HCL, not HTML)
    jinja.filters["comment"] = lambda text: f"# {text}"
    template = jinja.from_string((REPO / "policies" / "captcha-deployer.hcl.j2").read_text())
    return template.render(
        ansible_managed="made by testkit.tokens",
        captcha_env=env,
        approle_mount=approle_mount,
        max_wrapping_ttl=max_wrapping_ttl,
    )


def own_deployer_token(vault: LocalVault, env: str, approle_mount: str) -> str:
    """A deployer's token for a worker role ``captcha-worker-<env>`` a test made by hand."""
    name = f"captcha-deployer-{env}"
    _root(vault).sys.create_or_update_policy(name, deployer_policy(env, approle_mount))
    return token_with(vault, [name])


# --------------------------------------------------------------------------- inventories


def _walk(group: Mapping[str, Any], inherited: dict[str, Any], out: list[dict[str, Any]]) -> None:
    here = {**inherited, **(group.get("vars") or {})}
    for host_vars in (group.get("hosts") or {}).values():
        out.append({**here, **(host_vars or {})})
    for child in (group.get("children") or {}).values():
        _walk(child or {}, here, out)
    if not group.get("hosts") and not group.get("children"):
        out.append(here)


def inventory_hosts(inventory: str | Path | None) -> list[dict[str, Any]]:
    """The variables of every host of ``inventory`` (a YAML file, or a directory read with
    ``ansible-inventory``)."""
    if inventory is None:
        return [{}]
    path = Path(inventory)
    if not path.is_absolute():
        path = REPO / path
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        out: list[dict[str, Any]] = []
        _walk(data.get("all") or {}, {}, out)
        return out
    listed = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(path), "--list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    hostvars = json.loads(listed.stdout).get("_meta", {}).get("hostvars", {})
    return list(hostvars.values()) or [{}]


def playbook_token(
    vault: LocalVault,
    playbook: str | Path,
    inventory: str | Path | None,
    extra_vars: Mapping[str, Any] | None,
) -> str | None:
    """The least-privilege token for ``playbook`` with this inventory and these extra vars;
    None for a playbook that needs no Vault token of an operator."""
    name = Path(playbook).name
    hosts = [{**h, **(extra_vars or {})} for h in inventory_hosts(inventory)]
    if name == "provision-vault.yml":
        controller = next((h for h in hosts if "vault_provision_envs" in h), None)
        controller = controller or next((h for h in hosts if "captcha_kit_envs" in h), hosts[0])
        return provisioner_token(vault, provision_layout(controller))
    if name == "deploy-workers.yml":
        envs = {str(h["captcha_worker_env"]) for h in hosts if h.get("captcha_worker_env")}
        return deployer_token(vault, envs)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.tokens", description=__doc__)
    parser.add_argument("kind", choices=["provisioner", "deployer"])
    parser.add_argument("out", type=Path, help="write the token here (0600)")
    parser.add_argument("envs", nargs="*", help="deployer: the envs")
    parser.add_argument(
        "--vars-json", default="{}", help="provisioner: the inventory's variables (a JSON object)"
    )
    parser.add_argument("--state-dir", default=str(TEST_VAULT_DIR))
    parser.add_argument("--port", type=int, default=TEST_VAULT_PORT)
    args = parser.parse_args(argv)
    vault = LocalVault(args.state_dir, args.port)
    if args.kind == "provisioner":
        token = provisioner_token(vault, provision_layout(json.loads(args.vars_json)))
    else:
        token = deployer_token(vault, args.envs)
    write_private(args.out, token + "\n")
    print(f"wrote a {args.kind} token to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
