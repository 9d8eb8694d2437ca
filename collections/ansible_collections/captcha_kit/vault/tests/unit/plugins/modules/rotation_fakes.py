# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An in-memory stand-in for the few hvac client methods the rotation uses, and helpers.

``FakeVault`` keeps KV v2 secrets (versions, destroyed/deleted flags, custom_metadata) and answers
like hvac does: ``InvalidPath`` for a path or version that cannot be read, ``InvalidRequest`` for a
lost check-and-set. ``writes`` lists every change (so a test can say "nothing was written"),
``before_write`` lets a test slip a concurrent writer in, and ``after_write`` lose the answer of
a write that landed. Unit tests only: this is not Vault.

Import it by its full name,
``ansible_collections.captcha_kit.vault.tests.unit.plugins.modules.rotation_fakes``.
"""

from __future__ import annotations

import itertools
import secrets
from types import SimpleNamespace

from ansible_collections.captcha_kit.vault.plugins.module_utils.rotation import Rotation
from ansible_collections.captcha_kit.vault.plugins.modules.key_rotation_state import OPTIONS
from hvac.exceptions import InvalidPath, InvalidRequest

ENV = "dev"
KEY_PATH = "captchaai/dev"
STAGED_PATH = "captchaai-staged/dev"


_WRITES = itertools.count(1)


def _created_time():
    """A distinct Vault-style creation time per write (as Vault's, never equal for two)."""
    n = next(_WRITES)
    return f"2026-01-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}.{n:09d}Z"


def new_key():
    """A CaptchaAI-shaped key made at run time (32 lowercase hex characters)."""
    return secrets.token_hex(16)


class _Secret:
    def __init__(self):
        self.versions = {}  # number -> {"data": dict, "destroyed": bool, "deletion_time": str}
        self.custom = {}
        # The path's own settings, as Vault has them on a path nothing was set on.
        self.settings = {"cas_required": False, "max_versions": 0, "delete_version_after": "0s"}

    @property
    def current(self):
        return max(self.versions, default=0)


def _version(data):
    return {
        "data": dict(data),
        "destroyed": False,
        "deletion_time": "",
        "created_time": _created_time(),
    }


class FakeKv2:
    """``client.secrets.kv.v2``: the methods the rotation calls, with hvac's arguments."""

    def __init__(self, vault):
        self._vault = vault

    def _secret(self, mount_point, path):
        secret = self._vault.store.get((mount_point, path))
        if secret is None:
            raise InvalidPath(f"no secret at {mount_point}/{path}")
        return secret

    def read_secret_metadata(self, path, mount_point="secret"):
        secret = self._secret(mount_point, path)
        return {
            "data": {
                **secret.settings,
                "current_version": secret.current,
                "custom_metadata": dict(secret.custom) or None,
                "versions": {
                    str(n): {"destroyed": v["destroyed"], "deletion_time": v["deletion_time"]}
                    for n, v in secret.versions.items()
                },
            }
        }

    def read_secret_version(
        self, path, version=None, mount_point="secret", raise_on_deleted_version=True
    ):
        secret = self._secret(mount_point, path)
        number = version or secret.current
        found = secret.versions.get(number)
        if found is None or found["destroyed"] or found["deletion_time"]:
            raise InvalidPath(f"version {number} of {mount_point}/{path} cannot be read")
        meta = {"version": number, "created_time": found["created_time"]}
        return {"data": {"data": dict(found["data"]), "metadata": meta}}

    def create_or_update_secret(self, path, secret, cas=None, mount_point="secret"):
        self._vault.before_write(mount_point, path)
        stored = self._vault.store.setdefault((mount_point, path), _Secret())
        if cas is None and stored.settings["cas_required"]:
            raise InvalidRequest("check-and-set parameter required for this call")
        if cas is not None and cas != stored.current:
            raise InvalidRequest("check-and-set parameter did not match the current version")
        number = stored.current + 1
        stored.versions[number] = _version(secret)
        self._vault.writes.append(("write", f"{mount_point}/{path}", number))
        self._vault.after_write(mount_point, path)
        return {"data": {"version": number}}

    def delete_metadata_and_all_versions(self, path, mount_point="secret"):
        self._secret(mount_point, path)
        del self._vault.store[(mount_point, path)]
        self._vault.writes.append(("delete", f"{mount_point}/{path}", None))

    def update_metadata(
        self,
        path,
        max_versions=None,
        cas_required=None,
        delete_version_after="0s",
        mount_point="secret",
        custom_metadata=None,
    ):
        secret = self._vault.store.setdefault((mount_point, path), _Secret())
        changes = {"max_versions": max_versions, "cas_required": cas_required}
        secret.settings.update({k: v for k, v in changes.items() if v is not None})
        secret.settings["delete_version_after"] = delete_version_after
        if custom_metadata is not None:
            secret.custom = dict(custom_metadata)
        self._vault.writes.append(("settings", f"{mount_point}/{path}", dict(secret.settings)))

    def destroy_secret_versions(self, path, versions, mount_point="secret"):
        secret = self._secret(mount_point, path)
        for number in versions:
            secret.versions[int(number)]["destroyed"] = True
        self._vault.writes.append(("destroy", f"{mount_point}/{path}", sorted(versions)))


class FakeVault:
    """The hvac client surface the rotation uses (``secrets.kv.v2``, ``sys.get_capabilities``,
    ``auth.token.lookup_self``, ``adapter.post`` of custom_metadata) over an in-memory KV v2."""

    def __init__(self, capabilities=None, display_name="token", role_name=None, policies=None):
        self.store = {}  # (mount, path) -> _Secret
        self.writes = []
        # None: every path is "root"; else path -> capabilities, unlisted paths "deny"
        self.capabilities = capabilities
        self.before_write = lambda mount_point, path: None
        # after_write: runs once the version is stored; raising there is an answer lost on the
        # way back (the write landed, the caller sees an error).
        self.after_write = lambda mount_point, path: None
        self.secrets = SimpleNamespace(kv=SimpleNamespace(v2=FakeKv2(self)))
        self.sys = SimpleNamespace(get_capabilities=self._get_capabilities)
        meta = {"role_name": role_name} if role_name else None
        token = {"data": {"display_name": display_name, "meta": meta, "policies": policies or []}}
        # AppRole secret-ids: (mount, role) -> {accessor: lookup data}
        self.secret_ids = {}
        self.auth = SimpleNamespace(
            token=SimpleNamespace(lookup_self=lambda: token),
            approle=SimpleNamespace(
                list_secret_id_accessors=self._list_accessors,
                read_secret_id_accessor=self._read_accessor,
            ),
        )
        self.adapter = SimpleNamespace(post=self._post)

    def _get_capabilities(self, paths):
        if self.capabilities is None:
            return {"data": {p: ["root"] for p in paths}}
        return {"data": {p: list(self.capabilities.get(p, ["deny"])) for p in paths}}

    def _post(self, url, json):
        mount, _, path = url.removeprefix("/v1/").partition("/metadata/")
        secret = self.store[(mount, path)]
        secret.custom = dict(json["custom_metadata"])
        self.writes.append(("metadata", f"{mount}/{path}", dict(secret.custom)))

    def _list_accessors(self, role_name, mount_point="approle"):
        known = self.secret_ids.get((mount_point, role_name))
        if not known:
            raise InvalidPath(f"no secret-ids of {role_name}")
        return {"data": {"keys": list(known)}}

    def _read_accessor(self, role_name, secret_id_accessor, mount_point="approle"):
        info = self.secret_ids.get((mount_point, role_name), {}).get(secret_id_accessor)
        if info is None:
            raise InvalidPath(f"no accessor {secret_id_accessor}")
        return {"data": dict(info)}

    # ---- set-up and inspection, for tests ----------------------------------------------------
    def add_secret_id(self, role, metadata=None, expiration_time="2999-01-01T00:00:00Z"):
        """A secret-id of AppRole ``role`` with ``metadata``; its (made-up) accessor."""
        accessor = secrets.token_hex(8)
        self.secret_ids.setdefault(("approle", role), {})[accessor] = {
            "metadata": dict(metadata or {}),
            "expiration_time": expiration_time,
        }
        return accessor

    def put(self, path, data, custom=None, mount="secret"):
        """Write a version directly (set-up: not recorded in ``writes``); its number."""
        secret = self.store.setdefault((mount, path), _Secret())
        number = secret.current + 1
        secret.versions[number] = _version(data)
        if custom is not None:
            secret.custom = dict(custom)
        return number

    def key(self, version=None, path=KEY_PATH, mount="secret"):
        secret = self.store[(mount, path)]
        return secret.versions[version or secret.current]["data"].get("api_key")

    def record(self, path=KEY_PATH, mount="secret"):
        return dict(self.store[(mount, path)].custom)

    def set_record(self, record, path=KEY_PATH, mount="secret"):
        self.store[(mount, path)].custom = dict(record)

    def current_version(self, path=KEY_PATH, mount="secret"):
        return self.store[(mount, path)].current

    def exists(self, path, mount="secret"):
        return (mount, path) in self.store

    def destroyed(self, version, path=KEY_PATH, mount="secret"):
        return self.store[(mount, path)].versions[version]["destroyed"]


def params(**overrides):
    """The module's parameters with their defaults (from OPTIONS), for env ``dev``."""
    values = {name: spec.get("default") for name, spec in OPTIONS.items()}
    values.update(env=ENV, action="plan")
    values.update(overrides)
    return values


def rotation(vault, **overrides):
    """A loaded ``Rotation`` of ``dev`` over ``vault``."""
    rot = Rotation(vault, params(**overrides))
    rot.load()
    return rot


def env_with_key(key=None, **custom):
    """A FakeVault holding version 1 of captchaai/dev, with ``custom`` as its custom_metadata."""
    vault = FakeVault()
    vault.put(KEY_PATH, {"api_key": key or new_key()}, custom=custom or None)
    return vault


def mid_rotation(state, *, written=True, old=None, new=None, rotation_id="dev-r1"):
    """A FakeVault in the middle of rotation ``rotation_id``: version 1 the old key and, when
    ``written``, version 2 the new one; the record says ``state``."""
    old, new = old or new_key(), new or new_key()
    vault = FakeVault()
    vault.put(KEY_PATH, {"api_key": old})
    if written:
        vault.put(KEY_PATH, {"api_key": new})
    vault.set_record(
        {
            "rotation_id": rotation_id,
            "rotation_state": state,
            "previous_version": "1",
            "new_version": "2",
            "started_at": "2026-01-01T00:00:00Z",
            "actor": "token",
        }
    )
    return vault, old, new
