#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Vault side of the CaptchaAI key rotation state machine (see DOCUMENTATION)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: key_rotation_state
short_description: Vault side of the CaptchaAI key rotation state machine (KV v2 + custom_metadata)
description:
  - Reads and advances the rotation record kept in the KV v2 C(custom_metadata) of an environment's
    key path (C(rotation_id), C(rotation_state), C(previous_version), C(new_version),
    C(started_at), C(converged_at), C(confirmed_at), C(actor); all values strings).
  - C(plan) is read-only and decides the next step from the recorded state and the inputs;
    the other actions perform one step each and are idempotent, so a rerun after an interruption
    continues where the first run stopped and never writes a second new version for one rotation.
  - Never returns or logs a key; keys are only shown as masked fingerprints such as C(***ab12).
  - Check mode returns the plan and writes nothing; diff mode shows masked before/after.
options:
  action:
    description:
      - C(plan) reads the state and returns C(next) (C(put), C(wait), C(confirm), C(rollback),
        C(need_key), C(noop)) or fails with a clear message when the inputs are not acceptable.
      - C(put) records the rotation (state C(propagating)) and writes the new key with
        check-and-set on the current version, then deletes the staged key if it was promoted.
      - C(mark) moves C(propagating) to C(awaiting_revocation) and sets C(converged_at).
      - C(rollback) writes the previous version's data back as a new version (check-and-set) and
        sets the state C(rolled_back). Refused after finalize.
      - C(finalize) destroys every held version older than the new one, optionally checks that the
        provider rejects the old key, and sets the state C(complete) with C(confirmed_at).
    type: str
    required: true
    choices: [plan, put, mark, rollback, finalize]
  env:
    description: Environment name (used in messages and in the default paths).
    type: str
    required: true
  mount:
    description: KV v2 mount.
    type: str
    default: secret
  key_path:
    description: Key path inside the mount; default C(captchaai/<env>).
    type: str
  staged_path:
    description: Staged next key path inside the mount; default C(captchaai-staged/<env>).
    type: str
  new_key:
    description: The candidate key. Never returned or logged.
    type: str
  key_source:
    description:
      - Where the candidate comes from. C(auto) takes I(new_key) when given, else the staged key
        when one exists. C(variable) uses only I(new_key); C(staged) uses only the staged key.
    type: str
    choices: [auto, variable, staged]
    default: auto
  key_pattern:
    description: Regular expression a key must match completely.
    type: str
    default: "[0-9a-f]{32}"
  rollback:
    description: With C(plan), ask for a rollback of the rotation in progress.
    type: bool
    default: false
  confirm:
    description:
      - With C(plan), the operator confirms that the old key was revoked at the provider.
      - Refused when no rotation is pending and no new key is given; with a new key it is the
        confirmation given up front (emergency rotation, finalized as soon as workers converged).
    type: bool
    default: false
  check_rights:
    description: With C(plan), check that the token has the rotator capabilities on the paths.
    type: bool
    default: true
  rotation_id:
    description: Rotation id the step belongs to (from C(plan)); required by every write action.
    type: str
  actor:
    description: Who runs the rotation; default derived from the token (display name, role).
    type: str
  provider_url:
    description: CaptchaAI-compatible base URL (C(res.php?action=getbalance) is called with POST).
    type: str
  validate_provider:
    description: With C(plan), check the candidate with the provider's getbalance call.
    type: bool
    default: false
  check_old_key_rejected:
    description: With C(finalize), check that the provider now rejects the old key (warns if not).
    type: bool
    default: false
  provider_timeout:
    description: Timeout in seconds of provider calls.
    type: int
    default: 10
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.no_diff
author:
  - captcha key vault kit contributors
"""

EXAMPLES = r"""
- name: Plan the rotation of the dev key from the staged key
  captcha_kit.vault.key_rotation_state:
    action: plan
    env: dev
    key_source: staged
  register: plan

- name: Put the new key with check-and-set
  captcha_kit.vault.key_rotation_state:
    action: put
    env: dev
    key_source: staged
    rotation_id: "{{ plan.rotation_id }}"
  no_log: true
"""

RETURN = r"""
next:
  description: Next step (plan); C(put), C(wait), C(confirm), C(rollback), C(need_key) or C(noop).
  returned: action=plan
  type: str
reason:
  description: Why C(next) was chosen, in words.
  returned: always
  type: str
rotation_id:
  description: Rotation id (existing one when resuming, a new one when starting).
  returned: always
  type: str
rotation:
  description: The rotation record after the action (custom_metadata rotation fields).
  returned: always
  type: dict
current_version:
  description: Current version of the key path after the action.
  returned: always
  type: int
versions_held:
  description: Versions whose data can still be read (not deleted, not destroyed).
  returned: always
  type: list
  elements: int
current_fingerprint:
  description: Masked fingerprint of the current key.
  returned: always
  type: str
previous_fingerprint:
  description: Masked fingerprint of the rotation's previous (old) key while it is held.
  returned: always
  type: str
candidate:
  description: Masked facts about the candidate (source, fingerprint, checks); never the key.
  returned: always
  type: dict
target_version:
  description: The version every worker must report after this step (put, rollback).
  returned: always
  type: int
destroyed_versions:
  description: Versions destroyed by finalize.
  returned: action=finalize
  type: list
  elements: int
old_key_rejected:
  description: Whether the provider rejects the old key (finalize with check_old_key_rejected).
  returned: action=finalize
  type: bool
plan:
  description: Human-readable steps this action performs (or would perform in check mode).
  returned: always
  type: list
  elements: str
"""

import datetime
import json
import re
import secrets
from urllib.parse import urlencode

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    VaultNotFound,
    get_client,
    vault_argument_spec,
    vault_call,
)

try:
    from ansible.module_utils.urls import open_url
except ImportError:  # pragma: no cover
    open_url = None

try:
    import hvac.exceptions as hvac_exceptions
except ImportError:  # pragma: no cover - get_client reports the missing library
    hvac_exceptions = None

ROTATION_FIELDS = (
    "rotation_id",
    "rotation_state",
    "previous_version",
    "new_version",
    "started_at",
    "converged_at",
    "confirmed_at",
    "actor",
)
IN_PROGRESS = ("propagating", "awaiting_revocation")


def mask(key):
    """Masked fingerprint of a key: the last four characters only (``***ab12``)."""
    if not key:
        return ""
    return "***" + str(key)[-4:]


def now_utc():
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_rotation_id(env):
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


class Rotation:
    """One environment's key path, its versions and its rotation record."""

    def __init__(self, module):
        self.module = module
        p = module.params
        self.env = p["env"]
        self.mount = p["mount"]
        self.key_path = p["key_path"] or f"captchaai/{self.env}"
        self.staged_path = p["staged_path"] or f"captchaai-staged/{self.env}"
        self.client = get_client(module)
        self.kv = self.client.secrets.kv.v2
        self._data_cache = {}
        if module.params["action"] == "plan" and module.params["check_rights"]:
            # Rights first: a token without them gets that answer, not a bare 403 on a read.
            missing = self.missing_rights()
            if missing:
                module.fail_json(
                    msg=f"The token lacks rotator rights for {self.env}: missing "
                    + ", ".join(missing)
                    + f". Use the captcha-rotator-{self.env} AppRole or an admin token; "
                    "nothing changed",
                    missing_rights=missing,
                )
        self.refresh()

    # ---- reading -------------------------------------------------------------------------
    def refresh(self):
        self._data_cache = {}
        try:
            meta = vault_call(
                self.module,
                f"read the metadata of {self.mount}/{self.key_path}",
                self.kv.read_secret_metadata,
                path=self.key_path,
                mount_point=self.mount,
            )
        except VaultNotFound:
            self.module.fail_json(
                msg=f"Unknown environment {self.env!r}: there is no key at "
                f"{self.mount}/{self.key_path} (provision the environment first, or check the env "
                "name); nothing changed"
            )
        data = meta["data"]
        self.current_version = int(data.get("current_version") or 0)
        self.custom = dict(data.get("custom_metadata") or {})
        self.versions = {int(v): info for v, info in (data.get("versions") or {}).items()}
        self.held = sorted(
            v
            for v, info in self.versions.items()
            if not info.get("destroyed") and not info.get("deletion_time")
        )
        self.record = {k: str(self.custom[k]) for k in ROTATION_FIELDS if self.custom.get(k)}
        self.state = self.record.get("rotation_state", "")

    def version_data(self, version):
        if version not in self._data_cache:
            if version not in self.held:
                self._data_cache[version] = None
            else:
                resp = vault_call(
                    self.module,
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
        try:
            resp = vault_call(
                self.module,
                f"read the staged key {self.mount}/{self.staged_path}",
                self.kv.read_secret_version,
                path=self.staged_path,
                mount_point=self.mount,
                raise_on_deleted_version=True,
            )
        except VaultNotFound:
            return None
        return (resp["data"]["data"] or {}).get("api_key") or None

    def record_int(self, field):
        try:
            return int(self.record.get(field, ""))
        except ValueError:
            return None

    # ---- the candidate -------------------------------------------------------------------
    def candidate(self):
        p = self.module.params
        source = p["key_source"]
        if source in ("auto", "variable") and p["new_key"]:
            return p["new_key"].strip(), "variable"
        if source in ("auto", "staged"):
            staged = self.staged_key()
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

    def check_candidate(self, key, source, validate_provider):
        """Fail with a clear message when the candidate is not acceptable."""
        pattern = self.module.params["key_pattern"]
        info = {"source": source, "present": True, "fingerprint": mask(key)}
        where = f" (from the {source} key)" if source == "staged" else ""
        if not re.fullmatch(pattern, key):
            self.fail(
                f"The new key{where} is malformed: it does not match the key pattern {pattern!r} "
                f"(CaptchaAI keys are 32 lowercase hex characters); nothing changed",
                candidate=dict(info, format_ok=False),
            )
        info["format_ok"] = True
        same = self.match_held(key)
        if same == "current":
            self.fail(
                f"The new key{where} ({mask(key)}) is the current key of {self.env}: "
                "nothing to rotate; nothing changed",
                candidate=dict(info, same_as=same),
            )
        if same:
            self.fail(
                f"The new key{where} ({mask(key)}) is still held in Vault as {same} of "
                f"{self.mount}/{self.key_path}: a rotation needs a key never used before; "
                "nothing changed",
                candidate=dict(info, same_as=same),
            )
        info["same_as"] = None
        if validate_provider:
            status, detail = self.provider_balance(key)
            info["provider"] = {"checked": True, "accepted": status, "detail": detail}
            if status is not True:
                self.fail(
                    f"The provider did not accept the new key ({mask(key)}): {detail}; "
                    "nothing changed (set key_rotation_validate_provider=false to skip this check)",
                    candidate=info,
                )
        else:
            info["provider"] = {"checked": False}
        return info

    def provider_balance(self, key):
        """(True, balance) when the provider accepts the key, (False, error) or (None, problem)."""
        p = self.module.params
        url = (p["provider_url"] or "").rstrip("/")
        if not url:
            return None, "no provider_url set"
        body = urlencode({"key": key, "action": "getbalance", "json": "1"})
        try:
            resp = open_url(
                f"{url}/res.php",
                data=body,
                method="POST",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                timeout=p["provider_timeout"],
            )
            text = resp.read().decode("utf-8", "replace").strip()
        except Exception as exc:
            code = getattr(exc, "code", None)
            if code is not None:
                try:
                    text = exc.read().decode("utf-8", "replace").strip()
                except Exception:
                    return None, f"provider answered HTTP {code}"
            else:
                return None, f"provider at {url} not reachable ({type(exc).__name__})"
        try:
            doc = json.loads(text)
        except ValueError:
            doc = {"status": 0 if text.startswith("ERROR") else 1, "request": text}
        answer = str(doc.get("request", ""))[:100]
        if str(doc.get("status")) == "1":
            return True, f"balance {answer}"
        return False, answer or "empty answer"

    # ---- rights --------------------------------------------------------------------------
    def missing_rights(self):
        m = self.mount
        wanted = {
            f"{m}/data/{self.key_path}": ["read", "update"],
            f"{m}/metadata/{self.key_path}": ["read", "update"],
            f"{m}/destroy/{self.key_path}": ["update"],
        }
        if self.module.params["key_source"] in ("auto", "staged"):
            wanted[f"{m}/data/{self.staged_path}"] = ["read"]
            wanted[f"{m}/metadata/{self.staged_path}"] = ["delete"]
        resp = vault_call(
            self.module,
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
        if self.module.params["actor"]:
            return self.module.params["actor"]
        try:
            info = self.client.auth.token.lookup_self()["data"]
        except Exception:
            return "unknown"
        name = info.get("display_name") or "token"
        role = (info.get("meta") or {}).get("role_name")
        return f"{name} ({role})" if role else name

    # ---- writing -------------------------------------------------------------------------
    def write_record(self, record):
        """Replace the rotation fields of custom_metadata, keeping any other entries."""
        custom = {k: v for k, v in self.custom.items() if k not in ROTATION_FIELDS}
        custom.update({k: str(v) for k, v in record.items() if v not in (None, "")})
        vault_call(
            self.module,
            f"write the rotation record (custom_metadata) of {self.mount}/{self.key_path}",
            self.client.adapter.post,
            url=f"/v1/{self.mount}/metadata/{self.key_path}",
            json={"custom_metadata": custom},
        )

    def write_version(self, data, cas, what):
        try:
            resp = vault_call(
                self.module,
                what,
                self.kv.create_or_update_secret,
                path=self.key_path,
                secret=data,
                cas=cas,
                mount_point=self.mount,
            )
        except VaultNotFound:
            self.fail(f"Cannot {what}: the key path disappeared")
        return int(resp["data"]["version"])

    # ---- results -------------------------------------------------------------------------
    def summary(self):
        prev = self.record_int("previous_version")
        prev_data = self.version_data(prev) if prev else None
        return {
            "env": self.env,
            "key_path": f"{self.mount}/{self.key_path}",
            "current_version": self.current_version,
            "versions_held": self.held,
            "current_fingerprint": mask(self.current_key()),
            "previous_fingerprint": mask((prev_data or {}).get("api_key")),
            "rotation": dict(self.record),
            "rotation_state": self.state or "none",
            "in_progress": self.state in IN_PROGRESS,
        }

    def fail(self, msg, **extra):
        result = self.summary()
        result.update(extra)
        self.module.fail_json(msg=msg, **result)

    def exit(self, changed, plan, reason, **extra):
        result = self.summary()
        result.update(
            changed=changed,
            plan=plan,
            reason=reason,
            rotation_id=extra.pop("rotation_id", self.record.get("rotation_id", "")),
        )
        result.update(extra)
        self.module.exit_json(**result)


def diff_of(before, after):
    return {
        "before_header": "rotation record (masked)",
        "after_header": "rotation record (masked)",
        "before": json.dumps(before, indent=2, sort_keys=True) + "\n",
        "after": json.dumps(after, indent=2, sort_keys=True) + "\n",
    }


# ---- actions -------------------------------------------------------------------------------
def decide(rot):
    """The state machine: returns (next, reason, rotation_id, candidate_info, target_version)."""
    p = rot.module.params
    rid = rot.record.get("rotation_id", "")
    state = rot.state
    prev = rot.record_int("previous_version")
    new = rot.record_int("new_version")
    key, source = rot.candidate()

    if p["rollback"]:
        if state in IN_PROGRESS:
            return (
                "rollback",
                f"rotation {rid} ({state}) will be rolled back to version {prev}",
                rid,
            )
        if state == "complete":
            rot.fail(
                f"Rollback refused: rotation {rid} of {rot.env} was finalized at "
                f"{rot.record.get('confirmed_at', '?')} and the previous version is destroyed; "
                "rotate to a new key instead; nothing changed"
            )
        if state == "rolled_back":
            return "noop", f"rotation {rid} is already rolled back; nothing to do", rid
        rot.fail(f"Rollback refused: no rotation of {rot.env} is in progress; nothing changed")

    if p["confirm"] and state not in IN_PROGRESS and key is None:
        # (With a new key, the confirmation is given up front: emergency one-shot rotation.)
        rot.fail(
            f"Confirmation refused: no rotation of {rot.env} is awaiting revocation "
            f"(recorded state: {state or 'none'}); nothing changed"
        )

    if state in IN_PROGRESS:
        if rot.current_version == new:
            if key is not None and key not in version_keys(rot.version_data(new)):
                rot.fail(
                    f"Another rotation is in progress: rotation {rid} of {rot.env} is {state} "
                    f"(version {prev} -> {new}, started {rot.record.get('started_at', '?')} by "
                    f"{rot.record.get('actor', '?')}); finish it (confirm the revocation) or roll "
                    f"it back before starting a new one; the {source} key {mask(key)} was not "
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
        rot.fail(
            f"The key path {rot.mount}/{rot.key_path} changed outside rotation {rid}: current "
            f"version {rot.current_version}, the rotation expected {prev} -> {new}. Inspect the "
            "versions, then roll back or finish by hand; nothing changed"
        )

    if key is None:
        if p["key_source"] == "staged":
            return "noop", f"no staged key at {rot.mount}/{rot.staged_path}: nothing to do", ""
        return "need_key", "no new key given and none staged", ""
    return "put", f"start a new rotation of {rot.env} from version {rot.current_version}", ""


def action_plan(module, rot):
    p = module.params
    nxt, reason, rid = decide(rot)
    candidate = {"present": False}
    key, source = rot.candidate()
    target = rot.record_int("new_version") or 0
    if nxt == "put":
        candidate = rot.check_candidate(key, source, p["validate_provider"])
        rid = rid or new_rotation_id(rot.env)
        target = rot.current_version + 1
    elif key is not None:
        candidate = {"present": True, "source": source, "fingerprint": mask(key)}
    steps = {
        "put": [
            f"record rotation {rid} as propagating in the custom_metadata of "
            f"{rot.mount}/{rot.key_path}",
            f"write the {source} key {candidate.get('fingerprint', '')} as version {target} "
            f"(check-and-set on version {rot.current_version})",
        ]
        + (
            [f"delete the staged key at {rot.mount}/{rot.staged_path}"]
            if source == "staged"
            else []
        ),
        "wait": [f"nudge and wait until every worker reports version {target}"],
        "confirm": ["ask for the confirmation that the old key was revoked at the provider"],
        "rollback": [
            f"write version {rot.record.get('previous_version')} back as a new version; "
            "state rolled_back"
        ],
        "need_key": ["a new key is needed (variable, prompt or staged key)"],
        "noop": ["nothing to do"],
    }[nxt]
    rot.exit(
        False,
        steps,
        reason,
        next=nxt,
        rotation_id=rid,
        candidate=candidate,
        target_version=target,
    )


def action_put(module, rot):
    p = module.params
    rid = p["rotation_id"]
    if not rid:
        module.fail_json(msg="put needs rotation_id (from action=plan)")
    state = rot.state
    # Already done for this rotation: the put is idempotent.
    if (
        rot.record.get("rotation_id") == rid
        and state in IN_PROGRESS
        and rot.current_version == rot.record_int("new_version")
    ):
        staged_deleted = delete_staged_if_promoted(module, rot)
        rot.exit(
            staged_deleted,
            ["the new key is already written (resume)"],
            f"rotation {rid} already put version {rot.current_version}",
            target_version=rot.current_version,
            staged_deleted=staged_deleted,
        )
    nxt, reason, existing = decide(rot)
    if nxt != "put":
        rot.fail(f"Cannot put for rotation {rid}: the recorded state says {nxt!r} ({reason})")
    if existing and existing != rid:
        rot.fail(f"Cannot put for rotation {rid}: rotation {existing} is recorded; resume that")
    key, source = rot.candidate()
    candidate = rot.check_candidate(key, source, False)
    base = rot.current_version
    target = base + 1
    record = {
        "rotation_id": rid,
        "rotation_state": "propagating",
        "previous_version": str(base),
        "new_version": str(target),
        "started_at": rot.record.get("started_at") if existing == rid else now_utc(),
        "actor": rot.actor(),
    }
    before = {"version": base, "key": mask(rot.current_key()), **rot.record}
    after = {"version": target, "key": mask(key), **record}
    plan = [
        f"record rotation {rid} as propagating",
        f"write {mask(key)} as version {target} with check-and-set on version {base}",
    ]
    if module.check_mode:
        rot.exit(
            True,
            plan,
            reason,
            rotation_id=rid,
            candidate=candidate,
            target_version=target,
            diff=diff_of(before, after),
        )
    old_record = dict(rot.record)
    data = dict(rot.version_data(base) or {})
    data["api_key"] = key
    rot.write_record(record)
    try:
        resp = rot.kv.create_or_update_secret(
            path=rot.key_path, secret=data, cas=base, mount_point=rot.mount
        )
        written = int(resp["data"]["version"])
    except Exception as exc:
        cas_lost = hvac_exceptions is not None and isinstance(exc, hvac_exceptions.InvalidRequest)
        # Give the record back when it is still ours: this run wrote no version.
        rot.refresh()
        if rot.record.get("rotation_id") == rid and rot.current_version == base:
            rot.custom = {k: v for k, v in rot.custom.items() if k not in ROTATION_FIELDS}
            rot.write_record(old_record)
            rot.refresh()
        if cas_lost:
            rot.fail(
                f"Concurrent rotation refused: {rot.mount}/{rot.key_path} moved from version "
                f"{base} to {rot.current_version} while this run prepared rotation {rid} "
                "(check-and-set failed); this run wrote no version"
            )
        rot.fail(f"Cannot write the new key to {rot.mount}/{rot.key_path}: {str(exc)[:300]}")
    rot.refresh()
    if written != target:  # pragma: no cover - cas guarantees this
        rot.fail(f"Vault wrote version {written}, expected {target}")
    if rot.record.get("rotation_id") != rid:
        # A concurrent run overwrote the record before losing the check-and-set: ours won.
        rot.write_record(record)
        rot.refresh()
    staged_deleted = delete_staged_if_promoted(module, rot)
    rot.exit(
        True,
        plan + (["deleted the promoted staged key"] if staged_deleted else []),
        reason,
        rotation_id=rid,
        candidate=candidate,
        target_version=target,
        staged_deleted=staged_deleted,
        replaced_record=old_record.get("rotation_id", ""),
        diff=diff_of(before, after),
    )


def delete_staged_if_promoted(module, rot):
    if module.params["key_source"] not in ("auto", "staged"):
        return False
    staged = rot.staged_key()
    if not staged or staged.strip() not in version_keys(rot.version_data(rot.current_version)):
        return False
    if module.check_mode:
        return True
    vault_call(
        module,
        f"delete the promoted staged key {rot.mount}/{rot.staged_path}",
        rot.kv.delete_metadata_and_all_versions,
        path=rot.staged_path,
        mount_point=rot.mount,
    )
    return True


def require_rotation(module, rot, allowed):
    rid = module.params["rotation_id"]
    if not rid:
        module.fail_json(msg=f"{module.params['action']} needs rotation_id")
    if rot.record.get("rotation_id") != rid:
        rot.fail(
            f"Rotation {rid} is not the recorded rotation of {rot.env} "
            f"(recorded: {rot.record.get('rotation_id') or 'none'}); nothing changed"
        )
    if rot.state not in allowed:
        rot.fail(
            f"Rotation {rid} of {rot.env} is {rot.state or 'none'}, not "
            f"{' or '.join(allowed)}; nothing changed"
        )
    return rid


def action_mark(module, rot):
    rid = require_rotation(module, rot, ("propagating", "awaiting_revocation"))
    if rot.state == "awaiting_revocation":
        rot.exit(False, [], f"rotation {rid} already awaiting revocation")
    if rot.current_version != rot.record_int("new_version"):
        rot.fail(f"Rotation {rid}: the new version was never written; nothing changed")
    record = dict(rot.record, rotation_state="awaiting_revocation", converged_at=now_utc())
    plan = [f"mark rotation {rid} awaiting_revocation (every worker converged)"]
    if not module.check_mode:
        rot.write_record(record)
        rot.refresh()
    rot.exit(True, plan, "workers converged", diff=diff_of(rot.record, record))


def action_rollback(module, rot):
    rid = module.params["rotation_id"] or rot.record.get("rotation_id", "")
    if rot.state == "complete":
        rot.fail(
            f"Rollback refused: rotation {rid} was finalized at "
            f"{rot.record.get('confirmed_at', '?')}; the previous version is destroyed; "
            "nothing changed"
        )
    if rot.state == "rolled_back" and rot.record.get("rotation_id") == rid:
        rot.exit(
            False, [], f"rotation {rid} is already rolled back", target_version=rot.current_version
        )
    module.params["rotation_id"] = rid
    require_rotation(module, rot, IN_PROGRESS)
    prev = rot.record_int("previous_version")
    new = rot.record_int("new_version")
    prev_data = rot.version_data(prev)
    if prev_data is None:
        rot.fail(f"Rollback impossible: version {prev} is no longer held; nothing changed")
    plan = []
    target = rot.current_version
    already = rot.current_version > (new or 0) and rot.current_key() == prev_data.get("api_key")
    if rot.current_version == prev or already:
        plan.append(f"version {rot.current_version} already holds the previous key")
    elif rot.current_version == new:
        target = new + 1
        plan.append(
            f"write version {prev}'s data back as version {target} (check-and-set on version {new})"
        )
    else:
        rot.fail(
            f"Rollback refused: {rot.mount}/{rot.key_path} is at version {rot.current_version}, "
            f"not the rotation's new version {new}; nothing changed"
        )
    record = dict(rot.record, rotation_state="rolled_back")
    plan.append(f"mark rotation {rid} rolled_back")
    before = {"version": rot.current_version, "key": mask(rot.current_key()), **rot.record}
    after = {"version": target, "key": mask(prev_data.get("api_key")), **record}
    if not module.check_mode:
        if target != rot.current_version:
            rot.write_version(
                prev_data, new, f"write the previous key back to {rot.mount}/{rot.key_path}"
            )
        rot.write_record(record)
        rot.refresh()
    rot.exit(True, plan, "rollback", target_version=target, diff=diff_of(before, after))


def action_finalize(module, rot):
    p = module.params
    rid = p["rotation_id"]
    if rot.state == "complete" and rot.record.get("rotation_id") == rid:
        rot.exit(False, [], f"rotation {rid} is already complete", destroyed_versions=[])
    require_rotation(module, rot, ("awaiting_revocation",))
    new = rot.record_int("new_version")
    if rot.current_version != new:
        rot.fail(f"Rotation {rid}: version {new} is not current; nothing changed")
    prev = rot.record_int("previous_version")
    old_key = (rot.version_data(prev) or {}).get("api_key") if prev else None
    rejected = None
    if p["check_old_key_rejected"] and old_key:
        status, detail = rot.provider_balance(old_key)
        rejected = None if status is None else status is False
        if status is True:
            module.warn(
                f"The provider still accepts the old key {mask(old_key)} ({detail}): revoke it "
                "at the provider now"
            )
        elif status is None:
            module.warn(f"Could not check the old key at the provider: {detail}")
    old_versions = [v for v in rot.held if v < new]
    record = dict(rot.record, rotation_state="complete", confirmed_at=now_utc())
    plan = [
        f"destroy versions {old_versions} of {rot.mount}/{rot.key_path}",
        f"mark rotation {rid} complete",
    ]
    if not module.check_mode:
        if old_versions:
            vault_call(
                module,
                f"destroy the old versions of {rot.mount}/{rot.key_path}",
                rot.kv.destroy_secret_versions,
                path=rot.key_path,
                versions=old_versions,
                mount_point=rot.mount,
            )
        rot.write_record(record)
        rot.refresh()
    rot.exit(
        True,
        plan,
        "revocation confirmed",
        destroyed_versions=old_versions,
        old_key_rejected=rejected,
        diff=diff_of({"held": sorted([*old_versions, new])}, {"held": [new]}),
    )


def main():
    module = AnsibleModule(
        argument_spec=vault_argument_spec(
            action={
                "type": "str",
                "required": True,
                "choices": ["plan", "put", "mark", "rollback", "finalize"],
            },
            env={"type": "str", "required": True},
            mount={"type": "str", "default": "secret"},
            key_path={"type": "str"},
            staged_path={"type": "str"},
            new_key={"type": "str", "no_log": True},
            key_source={
                "type": "str",
                "default": "auto",
                "choices": ["auto", "variable", "staged"],
            },
            key_pattern={"type": "str", "default": "[0-9a-f]{32}"},
            rollback={"type": "bool", "default": False},
            confirm={"type": "bool", "default": False},
            check_rights={"type": "bool", "default": True},
            rotation_id={"type": "str"},
            actor={"type": "str"},
            provider_url={"type": "str"},
            validate_provider={"type": "bool", "default": False},
            check_old_key_rejected={"type": "bool", "default": False},
            provider_timeout={"type": "int", "default": 10},
        ),
        supports_check_mode=True,
    )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", module.params["env"]):
        module.fail_json(msg=f"Unknown environment {module.params['env']!r}: not a valid name")
    rot = Rotation(module)
    {
        "plan": action_plan,
        "put": action_put,
        "mark": action_mark,
        "rollback": action_rollback,
        "finalize": action_finalize,
    }[module.params["action"]](module, rot)


if __name__ == "__main__":
    main()
