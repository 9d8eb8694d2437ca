# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One environment's key path in Vault, its rotation record, and the state machine on it.

The Vault side of ``captcha_kit.vault.key_rotation_state``, free of ``AnsibleModule`` so it can
be unit-tested against an in-memory client:

``Rotation(client, params, call=None)``
    ``client`` is an ``hvac.Client`` (or a fake with the methods used here); ``params`` are the
    module's parameters (``env``, ``mount``, ``key_path``, ``staged_path``, ``new_key``,
    ``key_source``, ``key_pattern``, ``actor``, ``rollback``, ``confirm``); every Vault request
    goes through ``call(what, func, **kwargs)``: the module passes ``vault_call`` bound to
    itself, which turns Vault errors into failures that name ``what``. ``load()`` checks the
    token's rights (optional) and reads the metadata; nothing is read before.

``decide(rot) -> (next, reason, rotation_id)``
    The state machine: the next step from the recorded state and the inputs.

``RotationRefused``
    Raised when a step must not happen; ``msg`` says why (and that nothing changed, where that
    is so), ``extra`` holds result fields such as ``candidate``.

Keys never leave this file except as masked fingerprints (``***ab12``), and through
``Rotation.candidate()`` / ``Rotation.version_data()`` to the actions that write them.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets

from ansible_collections.captcha_kit.vault.plugins.module_utils.contract import (
    ROTATION_IN_PROGRESS,
    ROTATION_RECORD_FIELDS,
    VERSION_ROTATION_FIELD,
    key_path,
    mask_key,
    staged_path,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import VaultNotFound


class RotationRefused(Exception):
    """A step that must not happen: ``msg`` for the operator, ``extra`` result fields."""

    def __init__(self, msg, **extra):
        super().__init__(msg)
        self.msg = msg
        self.extra = extra


def now_utc():
    """The current UTC time as Vault-style text (``2026-01-31T12:00:00Z``)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_rotation_id(env):
    """A fresh rotation id: ``<env>-<UTC stamp>-<6 hex>``."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{env}-{stamp}-{secrets.token_hex(3)}"


def version_keys(data):
    """Every key a version holds: the main key and the backup keys."""
    keys = []
    if isinstance(data, dict):
        if data.get("api_key"):
            keys.append(str(data["api_key"]))
        backups = data.get("backup_keys") or []
        if isinstance(backups, list):
            keys.extend(str(k) for k in backups if k)
    return keys


def diff_of(before, after):
    """An Ansible diff of two masked views (dicts) of the key path."""
    return {
        "before_header": "rotation record (masked)",
        "after_header": "rotation record (masked)",
        "before": json.dumps(before, indent=2, sort_keys=True) + "\n",
        "after": json.dumps(after, indent=2, sort_keys=True) + "\n",
    }


def _call_directly(what, func, *args, **kwargs):
    return func(*args, **kwargs)


class Rotation:
    """One environment's key path, its versions and its rotation record."""

    def __init__(self, client, params, call=None):
        self.client = client
        self.kv = client.secrets.kv.v2
        self.params = params
        self.call = call or _call_directly
        self.env = params["env"]
        self.mount = params["mount"]
        self.key_path = params["key_path"] or key_path(self.env)
        self.staged_path = params["staged_path"] or staged_path(self.env)
        self.current_version = 0
        self.custom = {}
        self.versions = {}
        self.held = []
        self.record = {}
        self.record_rebuilt = False  # the record was rebuilt from the current version's data
        self.state = ""
        self.staged_ref = ""  # the ref of the staged write candidate() took, if any
        self._data_cache = {}

    def load(self, check_rights=False):
        """Check the token's rotator rights (first, so a token without them gets that answer
        rather than a bare 403 on a read), then read the key path's metadata."""
        if check_rights:
            missing = self.missing_rights()
            if missing:
                identity, policies = self.identity()
                rotator = f"captcha-rotator-{self.env}"
                if rotator in policies:
                    # The rotator's own policy without these rights: it was written by an
                    # older kit (a new version may need more) or changed by hand.
                    advice = (
                        f"The {rotator} policy in Vault lacks them: it is older than this kit "
                        "or was changed by hand. Run playbooks/provision-vault.yml (with the "
                        "provisioner token), which writes the policies again, then rotate"
                    )
                else:
                    advice = f"Use the {rotator} AppRole or an admin token"
                raise RotationRefused(
                    f"The token lacks rotator rights for {self.env}: missing "
                    + ", ".join(missing)
                    + f". The token in use is {identity}. {advice}; nothing changed",
                    missing_rights=missing,
                )
        self.refresh()

    def identity(self):
        """Who the token is, for a refusal, and its policies: its name, the AppRole role it
        logged in with (``role_name``) and its policies; ``unknown`` when the lookup fails."""
        try:
            info = self.client.auth.token.lookup_self()["data"]
        except Exception:
            return "unknown (token lookup failed)", []
        name = info.get("display_name") or "token"
        role = (info.get("meta") or {}).get("role_name")
        policies = sorted(p for p in (info.get("policies") or []) if p != "default")
        parts = [f"logged in with AppRole role {role}"] if role else []
        if policies:
            parts.append("policies " + ", ".join(policies))
        return (f"{name} ({'; '.join(parts)})" if parts else name), policies

    # ---- reading -------------------------------------------------------------------------
    def refresh(self):
        """Read the metadata again: versions, the ones still held, and the rotation record."""
        self._data_cache = {}
        try:
            meta = self.call(
                f"read the metadata of {self.mount}/{self.key_path}",
                self.kv.read_secret_metadata,
                path=self.key_path,
                mount_point=self.mount,
            )
        except VaultNotFound:
            raise RotationRefused(
                f"Unknown environment {self.env!r}: there is no key at "
                f"{self.mount}/{self.key_path} (provision the environment first, or check the env "
                "name); nothing changed"
            ) from None
        data = meta["data"]
        self.current_version = int(data.get("current_version") or 0)
        self.custom = dict(data.get("custom_metadata") or {})
        self.versions = {int(v): info for v, info in (data.get("versions") or {}).items()}
        self.held = sorted(
            v
            for v, info in self.versions.items()
            if not info.get("destroyed") and not info.get("deletion_time")
        )
        self.record = {k: str(self.custom[k]) for k in ROTATION_RECORD_FIELDS if self.custom.get(k)}
        self.record_rebuilt = False
        self._rebuild_record()
        self.state = self.record.get("rotation_state", "")

    def _rebuild_record(self):
        """A run cut off between its check-and-set write and its record leaves a current version
        that names its rotation (``VERSION_ROTATION_FIELD``) and a record that does not reach
        that version: take that rotation as recorded, ``propagating`` (in memory; the next write
        of that rotation writes it), so it is resumed, not mistaken for a change by hand."""
        recorded_up_to = self.record_int("new_version") or 0
        if recorded_up_to >= self.current_version:
            return
        data = self.version_data(self.current_version) or {}
        rid = str(data.get(VERSION_ROTATION_FIELD) or "")
        if not rid or rid == self.record.get("rotation_id"):
            return
        created = str(self.versions[self.current_version].get("created_time") or "")
        self.record = {
            "rotation_id": rid,
            "rotation_state": "propagating",
            "previous_version": str(self.current_version - 1),
            "new_version": str(self.current_version),
            "started_at": created[:19] + "Z" if created else now_utc(),
            "actor": f"unrecorded (record rebuilt from version {self.current_version})",
        }
        self.record_rebuilt = True

    def version_data(self, version):
        """The data of a held version (cached until the next refresh); None when not held."""
        if version not in self._data_cache:
            if version not in self.held:
                self._data_cache[version] = None
            else:
                resp = self.call(
                    f"read version {version} of {self.mount}/{self.key_path}",
                    self.kv.read_secret_version,
                    path=self.key_path,
                    version=version,
                    mount_point=self.mount,
                    raise_on_deleted_version=True,
                )
                self._data_cache[version] = dict(resp["data"]["data"] or {})
        return self._data_cache[version]

    def current_key(self):
        data = self.version_data(self.current_version) or {}
        return data.get("api_key")

    def staged_key(self):
        """The staged next key, or None when nothing is staged."""
        return self.staged()[0]

    def staged(self):
        """``(key, ref)`` of the staged next key, ``(None, "")`` when nothing is staged. ``ref``
        (``v<version>@<created_time>``) names that exact write: a key staged again, even after
        the path was deleted and written from version 1 again, has another ref."""
        try:
            resp = self.call(
                f"read the staged key {self.mount}/{self.staged_path}",
                self.kv.read_secret_version,
                path=self.staged_path,
                mount_point=self.mount,
                raise_on_deleted_version=True,
            )
        except VaultNotFound:
            return None, ""
        meta = resp["data"].get("metadata") or {}
        ref = f"v{meta.get('version', '?')}@{meta.get('created_time', '?')}"
        return (resp["data"]["data"] or {}).get("api_key") or None, ref

    def record_int(self, field):
        """A record field as int; None when absent or not a number."""
        try:
            return int(self.record.get(field, ""))
        except ValueError:
            return None

    # ---- the candidate -------------------------------------------------------------------
    def candidate(self):
        """``(key, source)``: the new key and where it came from, or ``(None, key_source)``."""
        p = self.params
        source = p["key_source"]
        if source in ("auto", "variable") and p["new_key"]:
            return p["new_key"].strip(), "variable"
        if source in ("auto", "staged"):
            staged, self.staged_ref = self.staged()
            if staged:
                return staged.strip(), "staged"
        return None, source

    def match_held(self, key):
        """'current', 'version N' or None: where the key is still held in Vault."""
        if key in version_keys(self.version_data(self.current_version)):
            return "current"
        for version in reversed(self.held):
            if key in version_keys(self.version_data(version)):
                return f"version {version}"
        return None

    def check_candidate(self, key, source):
        """Masked facts about an acceptable candidate; raises ``RotationRefused`` when the key
        is malformed or still held in Vault (the current one, or any version still held)."""
        pattern = self.params["key_pattern"]
        info = {"source": source, "present": True, "fingerprint": mask_key(key)}
        where = f" (from the {source} key)" if source == "staged" else ""
        help_ = (" " + self.staged_help()) if source == "staged" else ""
        if not re.fullmatch(pattern, key):
            raise RotationRefused(
                f"The new key{where} is malformed: it does not match the key pattern {pattern!r} "
                f"(CaptchaAI keys are 32 lowercase hex characters); nothing changed.{help_}",
                candidate=dict(info, format_ok=False),
            )
        info["format_ok"] = True
        same = self.match_held(key)
        if same == "current":
            raise RotationRefused(
                f"The new key{where} ({mask_key(key)}) is the current key of {self.env}: "
                f"nothing to rotate; nothing changed.{help_}",
                candidate=dict(info, same_as=same),
            )
        if same:
            raise RotationRefused(
                f"The new key{where} ({mask_key(key)}) is still held in Vault as {same} of "
                f"{self.mount}/{self.key_path}: a rotation needs a key never used before; "
                f"nothing changed.{help_}",
                candidate=dict(info, same_as=same),
            )
        info["same_as"] = None
        return info

    def staged_commands(self):
        """The stager's exact commands (a ``captcha-stager-<env>`` token in VAULT_TOKEN) that
        withdraw the staged key and that replace it by a new staged version (check-and-set on
        the current version, read from the metadata); neither puts a key on a command line."""
        m, path = self.mount, self.staged_path
        withdraw = f"bao kv delete -mount={m} {path}"
        replace = (
            'read -rs KEY && printf \'{"api_key":"%s"}\' "$KEY" | bao kv put '
            f'-mount={m} -cas="$(bao read -field=current_version {m}/metadata/{path})" '
            f"{path} - ; unset KEY"
        )
        return {"withdraw": withdraw, "replace": replace}

    def staged_help(self):
        """What a stager does about a staged key the rotation refuses (never: turn a check off)."""
        cmds = self.staged_commands()
        return (
            f"The staged key stays at {self.mount}/{self.staged_path} and every run refuses it "
            "until the stager (a captcha-stager-" + self.env + " token in VAULT_TOKEN) withdraws "
            f"it: {cmds['withdraw']} (the next runs then find nothing staged), or replaces it by "
            f"the right key: {cmds['replace']}"
        )

    # ---- rights --------------------------------------------------------------------------
    def missing_rights(self):
        """The rotator capabilities the token lacks on the key (and staged) paths."""
        m = self.mount
        wanted = {
            f"{m}/data/{self.key_path}": ["read", "update"],
            f"{m}/metadata/{self.key_path}": ["read", "update"],
            f"{m}/destroy/{self.key_path}": ["update"],
        }
        if self.params["key_source"] in ("auto", "staged"):
            wanted[f"{m}/data/{self.staged_path}"] = ["read"]
            wanted[f"{m}/metadata/{self.staged_path}"] = ["create", "read", "delete"]
        resp = self.call(
            "check the token's capabilities (sys/capabilities-self)",
            self.client.sys.get_capabilities,
            paths=list(wanted),
        )
        data = resp.get("data", resp) if isinstance(resp, dict) else {}
        missing = []
        for path, caps in wanted.items():
            have = set(data.get(path) or [])
            if "root" in have:
                continue
            missing.extend(f"{cap} on {path}" for cap in caps if cap not in have)
        return missing

    def actor(self):
        """Who runs the rotation: the ``actor`` parameter, else the token's name (and role)."""
        if self.params["actor"]:
            return self.params["actor"]
        try:
            info = self.client.auth.token.lookup_self()["data"]
        except Exception:
            return "unknown"
        name = info.get("display_name") or "token"
        role = (info.get("meta") or {}).get("role_name")
        return f"{name} ({role})" if role else name

    def assume_written(self, version, data, record):
        """Take ``version`` (holding ``data``) and ``record`` as what Vault holds, without
        reading it back (``put`` with ``defer_record``: the result costs no request)."""
        self.current_version = version
        self.held = sorted({*self.held, version})
        self._data_cache[version] = dict(data)
        self.record = dict(record)
        self.record_rebuilt = False
        self.state = self.record.get("rotation_state", "")

    # ---- writing -------------------------------------------------------------------------
    def write_record(self, record):
        """Replace the rotation fields of custom_metadata, keeping any other entries."""
        custom = {k: v for k, v in self.custom.items() if k not in ROTATION_RECORD_FIELDS}
        custom.update({k: str(v) for k, v in record.items() if v not in (None, "")})
        self.call(
            f"write the rotation record (custom_metadata) of {self.mount}/{self.key_path}",
            self.client.adapter.post,
            url=f"/v1/{self.mount}/metadata/{self.key_path}",
            json={"custom_metadata": custom},
        )

    def write_version(self, data, cas, what):
        """Write ``data`` as a new version with check-and-set on ``cas``; the new version."""
        try:
            resp = self.call(
                what,
                self.kv.create_or_update_secret,
                path=self.key_path,
                secret=data,
                cas=cas,
                mount_point=self.mount,
            )
        except VaultNotFound:
            raise RotationRefused(f"Cannot {what}: the key path disappeared") from None
        return int(resp["data"]["version"])

    # ---- results -------------------------------------------------------------------------
    def summary(self):
        """The masked state every result carries (success or failure)."""
        prev = self.record_int("previous_version")
        prev_data = self.version_data(prev) if prev else None
        return {
            "env": self.env,
            "key_path": f"{self.mount}/{self.key_path}",
            "current_version": self.current_version,
            "versions_held": self.held,
            "current_fingerprint": mask_key(self.current_key()),
            "previous_fingerprint": mask_key((prev_data or {}).get("api_key")),
            "rotation": dict(self.record),
            "rotation_state": self.state or "none",
            "in_progress": self.state in ROTATION_IN_PROGRESS,
        }

    def result(self, changed, plan, reason, **extra):
        """A module result: the summary, ``changed``, ``plan``, ``reason``, ``rotation_id``
        (the recorded one unless given) and ``extra``."""
        result = self.summary()
        result.update(
            changed=changed,
            plan=plan,
            reason=reason,
            rotation_id=extra.pop("rotation_id", self.record.get("rotation_id", "")),
        )
        result.update(extra)
        return result


def confirmation(rot):
    """``(given, named)``: whether a confirmation was given, and the rotation id it names
    ("" for the form given up front: ``confirm`` alone, or the env name with a new key)."""
    named = (rot.params.get("confirm_rotation") or "").strip()
    given = bool(rot.params["confirm"]) or bool(named)
    return given, ("" if named == rot.env else named)


def check_confirmation(rot, key):
    """Refuse a confirmation that does not name the rotation it would confirm.

    A confirmation names the rotation by its id (printed when the rotation stopped awaiting
    revocation). The env name (or ``confirm`` alone) is the confirmation given up front, with a
    new key, for the rotation this run starts (an emergency rotation whose old key is already
    revoked); it does not confirm a rotation that is already recorded without that key."""
    given, named = confirmation(rot)
    if not given:
        return
    rid = rot.record.get("rotation_id", "")
    state = rot.state
    if state in ROTATION_IN_PROGRESS:
        if named and named != rid:
            raise RotationRefused(
                f"Confirmation refused: it names rotation {named}, but the rotation of {rot.env} "
                f"in progress is {rid} ({state}); check which rotation you mean and pass "
                f"key_rotation_confirm_revoked={rid}; nothing changed",
                confirm_rotation=named,
            )
        if not named and key is None:
            raise RotationRefused(
                f"Confirmation refused: a confirmation names the rotation it confirms; rotation "
                f"{rid} of {rot.env} is {state}: pass key_rotation_confirm_revoked={rid}; "
                "nothing changed"
            )
        return
    if not named and key is None and rot.params["key_source"] != "staged":
        # The env name given up front before the key is known: the run asks for the key (the
        # prompt, or need_key), and the confirmation applies to the rotation that key starts.
        return
    if named or key is None:
        # (With a new key and no name, the confirmation is given up front: emergency rotation.)
        last = f"; the confirmation names rotation {named}" if named else ""
        raise RotationRefused(
            f"Confirmation refused: no rotation of {rot.env} is awaiting revocation "
            f"(recorded state: {state or 'none'}{last}); nothing changed",
            confirm_rotation=named,
        )


def decide(rot):
    """The state machine: ``(next, reason, rotation_id)`` from the recorded state and the inputs.

    ``next`` is ``put``, ``wait``, ``confirm``, ``rollback``, ``need_key`` or ``noop``;
    ``rotation_id`` is the recorded rotation's id ("" when a new rotation would start). Raises
    ``RotationRefused`` when the inputs are not acceptable in this state: a rollback without a
    rotation in progress or after finalize, a confirmation with nothing pending, a second
    rotation while one is in progress, or a key path changed outside the rotation.
    """
    p = rot.params
    rid = rot.record.get("rotation_id", "")
    state = rot.state
    prev = rot.record_int("previous_version")
    new = rot.record_int("new_version")
    key, source = rot.candidate()

    if p["rollback"]:
        if state in ROTATION_IN_PROGRESS:
            return (
                "rollback",
                f"rotation {rid} ({state}) will be rolled back to version {prev}",
                rid,
            )
        if state == "complete":
            raise RotationRefused(
                f"Rollback refused: rotation {rid} of {rot.env} was finalized at "
                f"{rot.record.get('confirmed_at', '?')} and the previous version is destroyed; "
                "rotate to a new key instead; nothing changed"
            )
        if state == "rolled_back":
            return "noop", f"rotation {rid} is already rolled back; nothing to do", rid
        raise RotationRefused(
            f"Rollback refused: no rotation of {rot.env} is in progress; nothing changed"
        )

    check_confirmation(rot, key)

    if state in ROTATION_IN_PROGRESS:
        if rot.current_version == new:
            if key is not None and key not in version_keys(rot.version_data(new)):
                raise RotationRefused(
                    f"Another rotation is in progress: rotation {rid} of {rot.env} is {state} "
                    f"(version {prev} -> {new}, started {rot.record.get('started_at', '?')} by "
                    f"{rot.record.get('actor', '?')}); finish it (confirm the revocation) or roll "
                    f"it back before starting a new one; the {source} key {mask_key(key)} was not "
                    "written; nothing changed"
                )
            nxt = "wait" if state == "propagating" else "confirm"
            return nxt, f"resuming rotation {rid} ({state}, version {prev} -> {new})", rid
        if rot.current_version == prev:
            if key is None:
                return (
                    "need_key",
                    f"rotation {rid} was recorded but its key was never written; give the new "
                    "key again (or stage it) to resume",
                    rid,
                )
            return "put", f"resuming rotation {rid}: the new key was not written yet", rid
        raise RotationRefused(
            f"The key path {rot.mount}/{rot.key_path} changed outside rotation {rid}: current "
            f"version {rot.current_version}, the rotation expected {prev} -> {new}. Inspect the "
            "versions, then roll back or finish by hand; nothing changed"
        )

    if key is None:
        if p["key_source"] == "staged":
            return "noop", f"no staged key at {rot.mount}/{rot.staged_path}: nothing to do", ""
        return "need_key", "no new key given and none staged", ""
    return "put", f"start a new rotation of {rot.env} from version {rot.current_version}", ""
