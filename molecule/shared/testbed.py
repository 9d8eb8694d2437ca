"""Local parts the molecule scenarios share: the test Vault, the CaptchaAI emulator, test keys.

Used by the scenarios' prepare/cleanup playbooks (``python molecule/shared/testbed.py ...``) and
by their testinfra tests (``import testbed``; the base config puts this directory on
``PYTHONPATH``). Ports and paths follow docs/interfaces.md (test column): Vault 18250 with state
in ``.state/test/vault``, emulator 18350/18351 with state in ``.state/test/emulator``.

Keys are made here at run time and go straight to the emulator and to Vault: never to argv, a
file or the output (only masked fingerprints are printed).

CLI::

    python molecule/shared/testbed.py vault-start
    python molecule/shared/testbed.py emulator-start | emulator-stop
    python molecule/shared/testbed.py new-keys ENV [ENV ...] [--kv-mount M] [--prefix P]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[2]))
import hvac  # noqa: E402

from testkit.emulator import EmulatorAdmin, EmulatorAdminError, start_detached, stop_detached  # noqa: E402
from testkit.vault import LocalVault  # noqa: E402

VAULT_DIR = REPO / ".state" / "test" / "vault"
VAULT_PORT = 18250
EMULATOR_DIR = REPO / ".state" / "test" / "emulator"
EMULATOR_PORT = 18350
EMULATOR_ADMIN_PORT = 18351


def vault() -> LocalVault:
    return LocalVault(VAULT_DIR, VAULT_PORT)


def vault_client() -> hvac.Client:
    """hvac client of the test Vault with its root token."""
    server = vault()
    return hvac.Client(url=server.addr, token=server.root_token(), verify=str(server.ca_file))


def emulator_admin() -> EmulatorAdmin:
    return EmulatorAdmin(f"http://127.0.0.1:{EMULATOR_ADMIN_PORT}")


def _lease() -> Path:
    """This scenario's claim on the shared emulator (scenarios may run at the same time)."""
    name = os.environ.get("MOLECULE_SCENARIO_NAME") or "default"
    return EMULATOR_DIR / "leases" / name


def emulator_start(timeout: float = 15.0) -> str:
    """Start the emulator detached (it outlives the caller) unless one already answers."""
    _lease().parent.mkdir(parents=True, exist_ok=True)
    _lease().touch()
    return start_detached(
        EMULATOR_PORT,
        EMULATOR_ADMIN_PORT,
        EMULATOR_DIR,
        ["--solve-delay", "fixed:1", "--time-scale", "0.05"],
        timeout,
    )


def emulator_stop() -> str:
    """Drop this scenario's lease; stop the emulator this module started (by its pid file)
    once no scenario holds a lease on it. An emulator started elsewhere is left alone."""
    _lease().unlink(missing_ok=True)
    leases = EMULATOR_DIR / "leases"
    if leases.is_dir() and any(leases.iterdir()):
        return "still in use"
    return stop_detached(EMULATOR_DIR)


def ensure_emulator(
    envs: list[str], *, kv_mount: str = "secret", prefix: str = "captchaai"
) -> None:
    """The emulator answers and knows the current key of every env (re-registered when the
    emulator was restarted meanwhile, e.g. by another test session on the shared ports)."""
    emulator_start()
    admin = emulator_admin()
    for env in envs:
        _, key = current_key(env, kv_mount=kv_mount, prefix=prefix)
        try:
            admin.counters(key)
        except EmulatorAdminError:
            admin.add_key(key, balance=100.0)


@dataclass(frozen=True)
class KeyVersion:
    env: str
    version: int
    fingerprint: str  # ***ab12, safe to print


def new_key_version(
    env: str,
    *,
    kv_mount: str = "secret",
    prefix: str = "captchaai",
    client: hvac.Client | None = None,
) -> KeyVersion:
    """Make a fresh key, register it with the emulator, then store it as the next version of
    ``<prefix>/<env>`` (check-and-set on the current version)."""
    client = client or vault_client()
    key = secrets.token_hex(16)
    emulator_admin().add_key(key, balance=100.0)
    path = f"{prefix}/{env}"
    try:
        meta = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=kv_mount)
        current = int(meta["data"]["current_version"])
    except hvac.exceptions.InvalidPath:
        current = 0
    written = client.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"api_key": key}, cas=current, mount_point=kv_mount
    )
    return KeyVersion(env, int(written["data"]["version"]), "***" + key[-4:])


def current_key(
    env: str, *, kv_mount: str = "secret", prefix: str = "captchaai"
) -> tuple[int, str]:
    """(version, key) of the current key of ``env``. Callers must not print the key."""
    data = vault_client().secrets.kv.v2.read_secret_version(
        path=f"{prefix}/{env}", mount_point=kv_mount, raise_on_deleted_version=True
    )["data"]
    return int(data["metadata"]["version"]), str(data["data"]["api_key"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testbed.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("vault-start", help="start (or find) the test Vault, initialised and unsealed")
    sub.add_parser("emulator-start", help="start the emulator detached unless one answers")
    sub.add_parser("emulator-stop", help="stop the emulator started by emulator-start")
    p_keys = sub.add_parser("new-keys", help="a fresh key version per env (Vault + emulator)")
    p_keys.add_argument("envs", nargs="+")
    p_keys.add_argument("--kv-mount", default="secret")
    p_keys.add_argument("--prefix", default="captchaai")
    args = parser.parse_args(argv)
    if args.command == "vault-start":
        print(json.dumps({"vault": vault().start()}))
    elif args.command == "emulator-start":
        print(json.dumps({"emulator": emulator_start()}))
    elif args.command == "emulator-stop":
        print(json.dumps({"emulator": emulator_stop()}))
    elif args.command == "new-keys":
        out = [
            new_key_version(env, kv_mount=args.kv_mount, prefix=args.prefix).__dict__
            for env in args.envs
        ]
        print(json.dumps({"keys": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
