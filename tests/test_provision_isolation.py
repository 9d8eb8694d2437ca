"""What the provisioned policies and AppRoles allow, proved with real logins on the test server."""

from __future__ import annotations

import json

import hvac
import hvac.exceptions
import pytest

from testkit.creds import new_key, new_tag
from testkit.playbook import provision_vars, run_playbook
from testkit.vault_ops import approle_login

PLAYBOOK = "playbooks/provision-vault.yml"
ENVS = ("dev", "staging", "prod")


@pytest.fixture(scope="module")
def provisioned(vault):
    """Three envs with a first key each, provisioned once for this module."""
    tag = new_tag("m")
    keys = {f"{tag}-{env}": new_key() for env in ENVS}
    extra = provision_vars(vault, tag, vault_provision_first_keys=keys)
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert result.rc == 0, result.failure_messages()
    for key in keys.values():
        assert key not in result.output
    return {
        "tag": tag,
        "envs": [f"{tag}-{env}" for env in ENVS],
        "keys": keys,
        "kv": f"kv-{tag}",
        "approle": f"approle-{tag}",
    }


def _read_key(client: hvac.Client, kv: str, env: str) -> str:
    secret = client.secrets.kv.v2.read_secret_version(
        f"captchaai/{env}", mount_point=kv, raise_on_deleted_version=True
    )
    return secret["data"]["data"]["api_key"]


def _current_version(root: hvac.Client, kv: str, path: str) -> int:
    return root.secrets.kv.v2.read_secret_metadata(path, mount_point=kv)["data"]["current_version"]


@pytest.mark.parametrize("index", range(len(ENVS)), ids=ENVS)
def test_worker_reads_its_own_key_and_nothing_else(vault, vault_client, provisioned, index):
    """The worker AppRole of an env reads that env's key; 403 on other envs, write, delete, list."""
    kv, envs = provisioned["kv"], provisioned["envs"]
    env = envs[index]
    worker = approle_login(vault, vault_client, provisioned["approle"], f"captcha-worker-{env}")
    assert set(worker.lookup_token()["data"]["policies"]) == {f"captcha-worker-{env}", "default"}
    assert _read_key(worker, kv, env) == _read_key(vault_client, kv, env)
    for other in envs:
        if other == env:
            continue
        with pytest.raises(hvac.exceptions.Forbidden):
            _read_key(worker, kv, other)
    version = _current_version(vault_client, kv, f"captchaai/{env}")
    with pytest.raises(hvac.exceptions.Forbidden):
        worker.secrets.kv.v2.create_or_update_secret(
            f"captchaai/{env}", secret={"api_key": new_key()}, cas=version, mount_point=kv
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        worker.secrets.kv.v2.delete_latest_version_of_secret(f"captchaai/{env}", mount_point=kv)
    with pytest.raises(hvac.exceptions.Forbidden):
        worker.secrets.kv.v2.list_secrets("captchaai", mount_point=kv)
    with pytest.raises(hvac.exceptions.Forbidden):
        worker.secrets.kv.v2.read_secret_metadata(f"captchaai/{env}", mount_point=kv)
    with pytest.raises(hvac.exceptions.Forbidden):
        worker.secrets.kv.v2.read_secret_version(
            f"captchaai-staged/{env}", mount_point=kv, raise_on_deleted_version=True
        )
    assert _current_version(vault_client, kv, f"captchaai/{env}") == version


@pytest.mark.parametrize("index", range(len(ENVS)), ids=ENVS)
def test_rotator_writes_its_own_env_only(vault, vault_client, provisioned, index):
    """The rotator AppRole writes (check-and-set) and annotates its env's key, takes its staged key,
    and gets 403 on every other env."""
    kv, envs = provisioned["kv"], provisioned["envs"]
    env = envs[index]
    rotator = approle_login(vault, vault_client, provisioned["approle"], f"captcha-rotator-{env}")
    version = _current_version(rotator, kv, f"captchaai/{env}")
    fresh = new_key()
    written = rotator.secrets.kv.v2.create_or_update_secret(
        f"captchaai/{env}", secret={"api_key": fresh}, cas=version, mount_point=kv
    )
    assert written["data"]["version"] == version + 1
    assert _read_key(vault_client, kv, env) == fresh
    rotator.secrets.kv.v2.update_metadata(
        f"captchaai/{env}", custom_metadata={"rotation_state": "propagating"}, mount_point=kv
    )
    rotator.secrets.kv.v2.destroy_secret_versions(f"captchaai/{env}", [version], mount_point=kv)

    vault_client.secrets.kv.v2.create_or_update_secret(
        f"captchaai-staged/{env}", secret={"api_key": new_key()}, cas=0, mount_point=kv
    )
    assert rotator.secrets.kv.v2.read_secret_version(
        f"captchaai-staged/{env}", mount_point=kv, raise_on_deleted_version=True
    )["data"]["data"]["api_key"]
    rotator.secrets.kv.v2.delete_metadata_and_all_versions(
        f"captchaai-staged/{env}", mount_point=kv
    )

    for other in envs:
        if other == env:
            continue
        other_version = _current_version(vault_client, kv, f"captchaai/{other}")
        with pytest.raises(hvac.exceptions.Forbidden):
            rotator.secrets.kv.v2.create_or_update_secret(
                f"captchaai/{other}",
                secret={"api_key": new_key()},
                cas=other_version,
                mount_point=kv,
            )
        with pytest.raises(hvac.exceptions.Forbidden):
            _read_key(rotator, kv, other)
        with pytest.raises(hvac.exceptions.Forbidden):
            rotator.secrets.kv.v2.update_metadata(
                f"captchaai/{other}", custom_metadata={"x": "y"}, mount_point=kv
            )
    with pytest.raises(hvac.exceptions.Forbidden):
        rotator.secrets.kv.v2.list_secrets("captchaai", mount_point=kv)


@pytest.mark.parametrize("index", range(len(ENVS)), ids=ENVS)
def test_stager_writes_the_staged_key_but_cannot_read_it(vault, vault_client, provisioned, index):
    """A token with the stager policy creates the staged key and gets 403 reading it back,
    on the live key, and on other envs' staged keys."""
    kv, envs = provisioned["kv"], provisioned["envs"]
    env = envs[index]
    token = vault_client.auth.token.create(
        policies=[f"captcha-stager-{env}"], ttl="10m", no_default_policy=True
    )["auth"]["client_token"]
    stager = hvac.Client(url=vault.addr, token=token, verify=str(vault.ca_file))
    path = f"captchaai-staged/{env}"
    vault_client.secrets.kv.v2.delete_metadata_and_all_versions(path, mount_point=kv)
    staged = new_key()
    stager.secrets.kv.v2.create_or_update_secret(
        path, secret={"api_key": staged}, cas=0, mount_point=kv
    )
    stored = vault_client.secrets.kv.v2.read_secret_version(
        path, mount_point=kv, raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["api_key"] == staged
    with pytest.raises(hvac.exceptions.Forbidden):
        stager.secrets.kv.v2.read_secret_version(
            path, mount_point=kv, raise_on_deleted_version=True
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        _read_key(stager, kv, env)
    with pytest.raises(hvac.exceptions.Forbidden):
        stager.secrets.kv.v2.create_or_update_secret(
            f"captchaai/{env}", secret={"api_key": new_key()}, cas=1, mount_point=kv
        )
    for other in envs:
        if other != env:
            with pytest.raises(hvac.exceptions.Forbidden):
                stager.secrets.kv.v2.create_or_update_secret(
                    f"captchaai-staged/{other}",
                    secret={"api_key": new_key()},
                    cas=0,
                    mount_point=kv,
                )
    vault_client.auth.token.revoke(token)


def test_role_bound_to_other_cidr_cannot_log_in(vault, vault_client):
    """secret_id_bound_cidrs without 127.0.0.1 -> login refused; the same role bound to
    127.0.0.1 in the same run logs in."""
    tag = new_tag("b")
    extra = provision_vars(
        vault,
        tag,
        vault_provision_worker_role_overrides={
            f"{tag}-prod": {"secret_id_bound_cidrs": ["10.66.0.0/16"]}
        },
    )
    result = run_playbook(PLAYBOOK, vault=vault, extra_vars=extra)
    assert result.rc == 0, result.failure_messages()
    mount = f"approle-{tag}"
    role = vault_client.auth.approle.read_role(f"captcha-worker-{tag}-prod", mount_point=mount)
    assert role["data"]["secret_id_bound_cidrs"] == ["10.66.0.0/16"]
    with pytest.raises(hvac.exceptions.VaultError) as refused:
        approle_login(vault, vault_client, mount, f"captcha-worker-{tag}-prod")
    assert "unauthorized" in str(refused.value).lower() or "cidr" in str(refused.value).lower()
    allowed = approle_login(vault, vault_client, mount, f"captcha-worker-{tag}-dev")
    assert allowed.is_authenticated()


def test_worker_read_is_in_the_audit_log_with_the_role_name(vault, vault_client, provisioned):
    """After a worker read, the audit log holds that read with the role's name; the key is found
    through sys/audit-hash, and never appears in clear."""
    kv, env = provisioned["kv"], provisioned["envs"][0]
    worker = approle_login(vault, vault_client, provisioned["approle"], f"captcha-worker-{env}")
    key = _read_key(worker, kv, env)
    hashed = vault_client.sys.calculate_hash("file", key)["data"]["hash"]
    assert hashed.startswith("hmac-sha256:")
    path = f"{kv}/data/captchaai/{env}"
    found = []
    text = vault.audit_log.read_text()
    for line in text.splitlines():
        if path not in line:
            continue
        entry = json.loads(line)
        if entry.get("type") != "response" or entry["request"]["path"] != path:
            continue
        data = (entry.get("response") or {}).get("data") or {}
        if (data.get("data") or {}).get("api_key") == hashed:
            found.append(entry)
    assert found, f"no audit entry for the worker read of {path}"
    meta = found[-1]["auth"]["metadata"]
    assert meta["role_name"] == f"captcha-worker-{env}"
    assert set(found[-1]["auth"]["policies"]) == {f"captcha-worker-{env}", "default"}
    assert key not in text
