"""Root-client chores on a ``LocalVault``: a client, a key put, AppRole credentials, a snapshot.

Secrets stay in memory or in 0600 files; nothing here prints one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hvac

from testkit.creds import write_private
from testkit.vault import LocalVault


def admin_client(vault: LocalVault) -> hvac.Client:
    """Root-token client of a ``LocalVault`` (its first node)."""
    return hvac.Client(url=vault.addr, token=vault.root_token(), verify=str(vault.ca_file))


def put_key(admin: hvac.Client, env: str, key: str, *, mount: str = "secret") -> int:
    """Write ``key`` as the next version of ``captchaai/<env>`` (check-and-set); its version."""
    path = f"captchaai/{env}"
    try:
        meta = admin.secrets.kv.v2.read_secret_metadata(path, mount_point=mount)
        current = int(meta["data"]["current_version"])
    except hvac.exceptions.InvalidPath:
        current = 0
    result = admin.secrets.kv.v2.create_or_update_secret(
        path, {"api_key": key}, cas=current, mount_point=mount
    )
    return int(result["data"]["version"])


def approle_credentials(
    admin: hvac.Client, role: str, *, mount: str = "approle"
) -> tuple[str, str]:
    """The role-id and a fresh secret-id of an AppRole role."""
    role_id = admin.auth.approle.read_role_id(role, mount_point=mount)["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id(role, mount_point=mount)["data"]["secret_id"]
    return role_id, secret_id


def approle_files(
    admin: hvac.Client, role: str, directory: Path, *, mount: str = "approle"
) -> tuple[Path, Path]:
    """The role-id and a fresh secret-id of ``role`` in 0600 files under ``directory``."""
    role_id, secret_id = approle_credentials(admin, role, mount=mount)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return (
        write_private(directory / "role-id", role_id + "\n"),
        write_private(directory / "secret-id", secret_id + "\n"),
    )


def rotator_credentials(
    directory: Path, admin: hvac.Client, env: str, mount: str = "approle"
) -> list[str]:
    """The rotator AppRole's role-id and a fresh secret-id of ``env`` in 0600 files
    ``directory/rotator-role-id`` and ``rotator-secret-id``, as a scheduler has them; returns
    the rotate-unattended arguments naming them."""
    role_id, secret_id = approle_credentials(admin, f"captcha-rotator-{env}", mount=mount)
    role_id_file = write_private(directory / "rotator-role-id", role_id + "\n")
    secret_id_file = write_private(directory / "rotator-secret-id", secret_id + "\n")
    return ["--role-id-file", str(role_id_file), "--secret-id-file", str(secret_id_file)]


def approle_login(vault: LocalVault, admin: hvac.Client, mount: str, role: str) -> hvac.Client:
    """Log in with a role's real role-id and a fresh secret-id; a client with that token."""
    role_id, secret_id = approle_credentials(admin, role, mount=mount)
    login = hvac.Client(url=vault.addr, verify=str(vault.ca_file))
    login.auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=mount)
    return login


def vault_snapshot(client: hvac.Client, only: str = "") -> dict[str, Any]:
    """Everything provisioning could change: mounts, auth methods, audit devices, policies,
    and every AppRole role's settings. With ``only``, just the mounts, auth methods and policies
    whose name contains it (other sessions may change other names on the shared server)."""
    mounts = {
        k: v for k, v in client.sys.list_mounted_secrets_engines()["data"].items() if only in k
    }
    auths = {k: v for k, v in client.sys.list_auth_methods()["data"].items() if only in k}
    audits = client.sys.list_enabled_audit_devices()["data"]
    policies = [p for p in client.sys.list_acl_policies()["data"]["keys"] if only in p]
    snap: dict[str, Any] = {
        "mounts": {
            k: (v["type"], v.get("options"), v.get("description")) for k, v in mounts.items()
        },
        "auth": {k: (v["type"], v.get("description")) for k, v in auths.items()},
        "audit": sorted(audits),
        "policies": {p: client.sys.read_acl_policy(p)["data"]["policy"] for p in policies},
        "roles": {},
    }
    for path, method in auths.items():
        if method["type"] != "approle":
            continue
        mount = path.rstrip("/")
        try:
            roles = client.auth.approle.list_roles(mount_point=mount)["data"]["keys"]
        except hvac.exceptions.InvalidPath:
            roles = []
        for role in roles:
            snap["roles"][f"{mount}/{role}"] = client.auth.approle.read_role(
                role, mount_point=mount
            )["data"]
    for path, mount in mounts.items():
        if mount["type"] == "kv" and (mount.get("options") or {}).get("version") == "2":
            snap["mounts"][path] += (
                client.secrets.kv.v2.read_configuration(mount_point=path.rstrip("/"))["data"],
            )
    return snap
