"""Least privilege of the operators' tokens (docs/tokens.md), against the real OpenBao.

One env set is provisioned with the provisioner's policy; then each operator token (provisioner,
deployer, rotator and stager of ``<tag>-dev``) tries every escalation a kit-admin token could do
before (issue 13) and a few more, and does what its playbook needs. The matrix below is the one
docs/tokens.md shows; a refused attempt leaves Vault as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import hvac
import pytest

from testkit.creds import new_key, new_tag
from testkit.paths import REPO
from testkit.playbook import ansible_env, provision_vars, run_argv, run_playbook
from testkit.tokens import deployer_token, provision_layout, provisioner_token, token_with
from testkit.vault import LocalVault

PLAYBOOK = "playbooks/provision-vault.yml"
TOKENS = ("provisioner", "deployer", "rotator", "stager")


class Site:
    """The provisioned layout of one tag and a client per operator token."""

    def __init__(self, vault: LocalVault, root: hvac.Client) -> None:
        self.tag = new_tag("lp")
        self.vault = vault
        self.root = root
        self.dev, self.prod = f"{self.tag}-dev", f"{self.tag}-prod"
        self.kv, self.approle = f"kv-{self.tag}", f"approle-{self.tag}"
        self.extra = provision_vars(
            vault, self.tag, vault_provision_first_keys={self.dev: new_key(), self.prod: new_key()}
        )
        self.tokens = {
            "provisioner": provisioner_token(vault, provision_layout(self.extra)),
            "deployer": deployer_token(vault, [self.dev]),
            "rotator": token_with(vault, [f"captcha-rotator-{self.dev}"]),
            "stager": token_with(vault, [f"captcha-stager-{self.dev}"]),
        }

    def client(self, who: str) -> hvac.Client:
        return hvac.Client(
            url=self.vault.addr, token=self.tokens[who], verify=str(self.vault.ca_file)
        )

    def role(self, kind: str, env: str) -> str:
        return f"auth/{self.approle}/role/captcha-{kind}-{env}"


def _fill(value: Any, site: Site) -> Any:
    """``{dev}``, ``{prod}``, ``{tag}``, ``{kv}``, ``{approle}`` in strings (also nested)."""
    if isinstance(value, str):
        for name in ("dev", "prod", "tag", "kv", "approle"):
            value = value.replace("{" + name + "}", getattr(site, name))
        return value
    if isinstance(value, list):
        return [_fill(v, site) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, site) for k, v in value.items()}
    return value


def _post(path: str, body: dict[str, Any] | None = None, wrap: str | None = None):
    def attempt(site: Site, client: hvac.Client) -> None:
        headers = {"X-Vault-Wrap-TTL": wrap} if wrap else None
        client.adapter.post(
            f"/v1/{_fill(path, site)}", json=_fill(body or {}, site), headers=headers
        )

    return attempt


def _get(path: str):
    def attempt(site: Site, client: hvac.Client) -> None:
        client.adapter.get(f"/v1/{_fill(path, site)}")

    return attempt


# Every attempt that must be refused for every operator token.
ESCALATIONS: dict[str, Callable[[Site, hvac.Client], None]] = {
    "write a policy captcha-x with path * and sudo": _post(
        "sys/policy/captcha-x-{tag}",
        {"policy": 'path "*" { capabilities = ["create", "read", "update", "sudo"] }'},
    ),
    "create an AppRole role captcha-x": _post(
        "auth/{approle}/role/captcha-x-{tag}", {"token_policies": ["default"]}
    ),
    "set token_policies=root on the dev worker role": _post(
        "auth/{approle}/role/captcha-worker-{dev}", {"token_policies": ["root"]}
    ),
    "add root next to the role's own policy": _post(
        "auth/{approle}/role/captcha-worker-{dev}",
        {"token_policies": ["captcha-worker-{dev}", "root"]},
    ),
    "set the legacy policies=root on the dev worker role": _post(
        "auth/{approle}/role/captcha-worker-{dev}", {"policies": "root"}
    ),
    "set bind_secret_id=false on the dev worker role": _post(
        "auth/{approle}/role/captcha-worker-{dev}", {"bind_secret_id": False}
    ),
    "set a custom role-id on the dev worker role": _post(
        "auth/{approle}/role/captcha-worker-{dev}/role-id", {"role_id": "chosen-role-id"}
    ),
    "issue a secret-id for the prod rotator": _post(
        "auth/{approle}/role/captcha-rotator-{prod}/secret-id", wrap="60s"
    ),
    "issue a secret-id for the dev rotator": _post(
        "auth/{approle}/role/captcha-rotator-{dev}/secret-id", wrap="60s"
    ),
    "issue a secret-id for the prod worker": _post(
        "auth/{approle}/role/captcha-worker-{prod}/secret-id", wrap="60s"
    ),
    "issue an unwrapped secret-id for the dev worker": _post(
        "auth/{approle}/role/captcha-worker-{dev}/secret-id"
    ),
    "set a custom secret-id on the dev worker role": _post(
        "auth/{approle}/role/captcha-worker-{dev}/custom-secret-id",
        {"secret_id": "a-chosen-secret-id-value"},
    ),
    "read the prod key": _get("{kv}/data/captchaai/{prod}"),
    "write the prod key": _post("{kv}/data/captchaai/{prod}", {"data": {"api_key": "x" * 32}}),
    "mint a token with the root policy": _post("auth/token/create", {"policies": ["root"]}),
    "mint a token with the dev worker policy": _post(
        "auth/token/create", {"policies": ["captcha-worker-{dev}"]}
    ),
    "enable an auth method": _post("sys/auth/userpass-{tag}", {"type": "userpass"}),
    "change the KV mount's config": _post("{kv}/config", {"cas_required": False}),
}

# What each token's playbook needs (allowed), and what only some tokens may do.
NEEDS: dict[str, dict[str, Callable[[Site, hvac.Client], None]]] = {
    "provisioner": {
        "keep the dev worker role with its own policy": _post(
            "auth/{approle}/role/captcha-worker-{dev}",
            {"token_policies": ["captcha-worker-{dev}"], "bind_secret_id": True},
        ),
        "set check-and-set on the dev key path": _post(
            "{kv}/metadata/captchaai/{dev}", {"cas_required": True}
        ),
    },
    "deployer": {
        "read the dev worker role-id": _get("auth/{approle}/role/captcha-worker-{dev}/role-id"),
        "issue a wrapped secret-id for the dev worker": _post(
            "auth/{approle}/role/captcha-worker-{dev}/secret-id", wrap="60s"
        ),
        "read which role-ids are locked": _get("sys/locked-users"),
    },
    "rotator": {
        "read the dev key": _get("{kv}/data/captchaai/{dev}"),
        "write the rotation record (custom_metadata)": _post(
            "{kv}/metadata/captchaai/{dev}", {"custom_metadata": {"probe": "least-privilege"}}
        ),
    },
    "stager": {
        "stage the next dev key": _post(
            "{kv}/data/captchaai-staged/{dev}",
            {"data": {"api_key": "y" * 32}, "options": {"cas": 0}},
        )
    },
}
# Things one token needs that every other token must be refused.
ONLY = {
    "read the dev worker role-id": {"deployer"},
    "issue a wrapped secret-id for the dev worker": {"deployer"},
    "read the dev key": {"rotator"},
    "write the rotation record (custom_metadata)": {"rotator"},
    "stage the next dev key": {"stager"},
    # The rotator keeps the rotation record in its key path's metadata (its own env only).
    "set check-and-set on the dev key path": {"provisioner", "rotator"},
}


@pytest.fixture(scope="module")
def site(vault: LocalVault, vault_client: hvac.Client) -> Site:
    site = Site(vault, vault_client)
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=site.extra)
    assert result.rc == 0, result.failure_messages()
    return site


def _outcome(site: Site, who: str, attempt: Callable[[Site, hvac.Client], None]) -> str:
    try:
        attempt(site, site.client(who))
    except hvac.exceptions.Forbidden:
        return "refused"
    return "allowed"


@pytest.mark.parametrize("who", TOKENS)
@pytest.mark.parametrize("what", list(ESCALATIONS))
def test_every_escalation_is_refused(site, snapshot, who, what):
    """Each operator token is refused each escalation, and Vault is left as it was."""
    before = snapshot(site.tag)
    assert _outcome(site, who, ESCALATIONS[what]) == "refused"
    assert snapshot(site.tag) == before


@pytest.mark.parametrize(
    ("who", "what"), [(who, what) for who, needs in NEEDS.items() for what in needs]
)
def test_what_the_playbook_needs_is_allowed(site, who, what):
    assert _outcome(site, who, NEEDS[who][what]) == "allowed"


@pytest.mark.parametrize(
    ("who", "what"),
    [(who, what) for what, owners in ONLY.items() for who in TOKENS if who not in owners],
)
def test_one_tokens_rights_are_refused_to_the_others(site, who, what):
    attempt = next(needs[what] for needs in NEEDS.values() if what in needs)
    assert _outcome(site, who, attempt) == "refused"


def test_the_committed_policy_is_the_one_the_playbook_makes(tmp_path):
    """policies/captcha-provisioner.hcl is what playbooks/operator-policies.yml writes for the
    default layout (inventories/local), and what testkit makes for it."""
    env = ansible_env()
    result = run_argv(
        [
            str(REPO / ".venv" / "bin" / "ansible-playbook"),
            "-i",
            str(REPO / "inventories" / "local"),
            str(REPO / "playbooks" / "operator-policies.yml"),
            "-e",
            f"operator_policies_dir={tmp_path}",
        ],
        env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written = (tmp_path / "captcha-provisioner.hcl").read_text()
    committed = (REPO / "policies" / "captcha-provisioner.hcl").read_text()
    assert written == committed
    from testkit.tokens import provisioner_policy

    assert provisioner_policy(provision_layout({})) == committed
    shutil.rmtree(tmp_path)
