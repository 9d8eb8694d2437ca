# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The seven actions of ``captcha_kit.vault.key_rotation_state``, one step of the rotation each.

``ACTIONS[action](rot, check_mode) -> result``: ``rot`` is a loaded
``module_utils.rotation.Rotation``; the result is the module's result dict (with ``diff`` where
the action has one). A refused step raises ``RotationRefused``. In check mode nothing is
written and the result says what would be (``plan``, ``diff``).

``plan``      read-only: ``next`` from ``decide()``, the candidate's checks when it is ``put``
``put``       write the key with check-and-set on the current version (the version's data
              names the rotation), then record the rotation (propagating), delete the staged
              key once promoted; idempotent per rotation id. The check-and-set comes first: it
              is the one atomic step, so of two runs started at once the one that loses it has
              written nothing, neither a version nor a record.
              A staged key is put only when it is the staged write plan validated
              (``staged_ref``); a write whose answer was lost is recognised by reading back.
              With ``defer_record`` it returns as soon as the check-and-set is answered,
              asking Vault nothing more: the rotation's nudge is not held up behind the
              bookkeeping (a raft election right after the put answers it only seconds later)
``record``    the bookkeeping a ``put`` with ``defer_record`` left: record the rotation
              (propagating, with this run's actor), delete the staged key once promoted
``mark``      propagating -> awaiting_revocation (every worker converged)
``rollback``  write the previous version's data back as a new version; rolled_back
``finalize``  destroy every held version older than the new one; complete
``census``    read-only: the live secret-ids of the env's worker role and the hosts their
              metadata names (the rotation's check that no worker is left out of the inventory)

With the parameter ``return_keys``, ``plan`` returns the staged candidate as ``staged_key`` and
``finalize`` the old key as ``previous_key``, for the provider check of the next task; nothing
else here ever returns a key.
"""

from __future__ import annotations

import datetime
import re
import time

from ansible_collections.captcha_kit.vault.plugins.module_utils.contract import (
    ROTATION_IN_PROGRESS,
    VERSION_ROTATION_FIELD,
    mask_key,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils.rotation import (
    RotationRefused,
    confirmation,
    decide,
    diff_of,
    new_rotation_id,
    now_utc,
    version_keys,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import VaultNotFound

try:
    from hvac.exceptions import InvalidRequest as CasRefused
except ImportError:  # pragma: no cover - get_client reports the missing library

    class CasRefused(Exception):  # type: ignore[no-redef]
        """Placeholder so ``isinstance`` works without hvac."""


def plan(rot, check_mode):
    """Decide the next step; check the candidate when it is ``put``. Never writes."""
    nxt, reason, rid = decide(rot)
    candidate = {"present": False}
    key, source = rot.candidate()
    target = rot.record_int("new_version") or 0
    extra = {}
    if nxt == "put":
        candidate = rot.check_candidate(key, source)
        rid = rid or new_rotation_id(rot.env)
        target = rot.current_version + 1
        if source == "staged":
            candidate["staged_ref"] = rot.staged_ref
        if rot.params["return_keys"] and source == "staged":
            extra["staged_key"] = key
        if source == "staged":
            extra["staged_help"] = rot.staged_help()
    elif key is not None:
        candidate = {"present": True, "source": source, "fingerprint": mask_key(key)}
    steps = {
        "put": [
            f"write the {source} key {candidate.get('fingerprint', '')} as version {target} "
            f"(check-and-set on version {rot.current_version})",
            f"record rotation {rid} as propagating in the custom_metadata of "
            f"{rot.mount}/{rot.key_path}",
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
    return rot.result(
        False,
        steps,
        reason,
        next=nxt,
        rotation_id=rid,
        candidate=candidate,
        target_version=target,
        confirmed=confirmation(rot)[0] and nxt in ("put", "wait", "confirm"),
        **extra,
    )


def check_staged_ref(rot, key, source):
    """Refuse a staged key that is not the staged write plan validated (``staged_ref``)."""
    if source != "staged":
        return
    expected = rot.params.get("staged_ref") or ""
    if not expected:
        raise RotationRefused(
            "put of a staged key needs staged_ref (candidate.staged_ref from action=plan: the "
            "staged write that was validated); nothing put; nothing changed"
        )
    if expected != rot.staged_ref:
        raise RotationRefused(
            f"The staged key changed after it was validated: plan checked the staged write "
            f"{expected}, {rot.mount}/{rot.staged_path} now holds {rot.staged_ref} "
            f"({mask_key(key)}). Nothing put; nothing changed. Run again to validate the key "
            "staged now"
        )


def put(rot, check_mode):
    """Write the new key with check-and-set on the current version, then record the rotation."""
    rid = rot.params["rotation_id"]
    if not rid:
        raise RotationRefused("put needs rotation_id (from action=plan)")
    # Already done for this rotation: the put is idempotent.
    if (
        rot.record.get("rotation_id") == rid
        and rot.state in ROTATION_IN_PROGRESS
        and rot.current_version == rot.record_int("new_version")
    ):
        steps = ["the new key is already written (resume)"]
        rebuilt = rot.record_rebuilt
        if rebuilt:
            steps.append(f"record rotation {rid} as propagating (its record was never written)")
            if not check_mode:
                rot.write_record(rot.record)
                rot.refresh()
        staged_deleted = delete_staged_if_promoted(rot, check_mode)
        return rot.result(
            staged_deleted or rebuilt,
            steps,
            f"rotation {rid} already put version {rot.current_version}",
            target_version=rot.current_version,
            staged_deleted=staged_deleted,
        )
    nxt, reason, existing = decide(rot)
    if nxt != "put":
        raise RotationRefused(
            f"Cannot put for rotation {rid}: the recorded state says {nxt!r} ({reason})"
        )
    if existing and existing != rid:
        raise RotationRefused(
            f"Another rotation is in progress: rotation {existing} of {rot.env} is recorded "
            f"({rot.state}); rotation {rid} wrote no version and nothing changed. Follow "
            f"{existing}, or roll it back before starting a new one"
        )
    key, source = rot.candidate()
    check_staged_ref(rot, key, source)
    candidate = rot.check_candidate(key, source)
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
    before = {"version": base, "key": mask_key(rot.current_key()), **rot.record}
    after = {"version": target, "key": mask_key(key), **record}
    steps = [
        f"write {mask_key(key)} as version {target} with check-and-set on version {base}",
        f"record rotation {rid} as propagating",
    ]
    if check_mode:
        return rot.result(
            True,
            steps,
            reason,
            rotation_id=rid,
            candidate=candidate,
            target_version=target,
            diff=diff_of(before, after),
        )
    old_record = dict(rot.record)
    data = dict(rot.version_data(base) or {})
    data["api_key"] = key
    data[VERSION_ROTATION_FIELD] = rid
    try:
        resp = rot.kv.create_or_update_secret(
            path=rot.key_path, secret=data, cas=base, mount_point=rot.mount
        )
        written = int(resp["data"]["version"])
    except Exception as exc:
        # The answer is lost or negative: what does Vault hold now? A request retried after a
        # dropped connection can find its own first attempt applied (the retry then loses the
        # check-and-set to it): the version after ``base`` naming this rotation is that write.
        rot.refresh()
        mine = rot.version_data(target) or {}
        if rot.current_version == target and mine.get(VERSION_ROTATION_FIELD) == rid:
            written = target
            steps.insert(
                1,
                f"the write landed although its answer was lost ({type(exc).__name__}): "
                f"read back version {target}, which holds this run's key {mask_key(key)}",
            )
        else:
            put_failed(rot, exc, rid, base)
    written_at = time.time()
    if written != target:  # pragma: no cover - cas guarantees this
        raise RotationRefused(f"Vault wrote version {written}, expected {target}")
    deferred = rot.params["defer_record"]
    staged_deleted = False
    if deferred:
        # Return now: the workers can be nudged while Vault is, perhaps, electing a leader.
        # Until the record action writes it, the version's rotation_id stands for the record
        # (Rotation._rebuild_record), so another run still sees this rotation in progress.
        rot.assume_written(target, data, record)
        steps[-1] += ": deferred to the record action"
    else:
        # The check-and-set made this run the rotation of version ``target``: only now is the
        # record written, so a run that lost it never touches the record.
        rot.write_record(record)
        rot.refresh()
        staged_deleted = delete_staged_if_promoted(rot, check_mode)
        if staged_deleted:
            steps.append("deleted the promoted staged key")
    return rot.result(
        True,
        steps,
        reason,
        rotation_id=rid,
        candidate=candidate,
        target_version=target,
        staged_deleted=staged_deleted,
        record_deferred=deferred,
        written_at=written_at,
        replaced_record=old_record.get("rotation_id", ""),
        diff=diff_of(before, after),
    )


def record(rot, check_mode):
    """Write the record a ``put`` with ``defer_record`` left to this action: the rotation,
    propagating, with this run's actor; then delete the staged key once promoted. Nothing to
    do when the record is written already."""
    rid = rot.params["rotation_id"]
    require_rotation(rot, ROTATION_IN_PROGRESS, rid)
    if rot.current_version != rot.record_int("new_version"):
        raise RotationRefused(f"Rotation {rid}: the new version was never written; nothing changed")
    steps, diff = [], None
    if rot.record_rebuilt:
        written = dict(rot.record, actor=rot.actor())
        steps.append(f"record rotation {rid} as propagating")
        diff = diff_of({}, written)
        if not check_mode:
            rot.write_record(written)
            rot.refresh()
    staged_deleted = delete_staged_if_promoted(rot, check_mode)
    if staged_deleted:
        steps.append("delete the promoted staged key")
    result = rot.result(
        bool(steps),
        steps,
        f"rotation {rid} recorded" if steps else f"rotation {rid} is recorded already",
        staged_deleted=staged_deleted,
    )
    if diff is not None:
        result["diff"] = diff
    return result


def put_failed(rot, exc, rid, base):
    """This run's write did not land (and its record was not written): say what Vault holds,
    read back, not guessed from the error."""
    holds = (
        f"Vault holds version {rot.current_version} ({mask_key(rot.current_key())}) of "
        f"{rot.mount}/{rot.key_path}, recorded rotation "
        f"{rot.record.get('rotation_id') or 'none'} ({rot.state or 'none'})"
    )
    if isinstance(exc, CasRefused) and rot.current_version != base:
        raise RotationRefused(
            f"Concurrent rotation refused: {rot.mount}/{rot.key_path} moved from version "
            f"{base} to {rot.current_version} while this run prepared rotation {rid} "
            f"(check-and-set failed; the new version is another run's); {holds}; "
            "this run wrote no version and no record"
        ) from None
    raise RotationRefused(
        f"Cannot write the new key to {rot.mount}/{rot.key_path}: {str(exc)[:300]}; {holds}; "
        "this run wrote no version and no record"
    ) from None


# What a KV v2 path has when nothing was set on it (its metadata is created by a first write).
_NEW_PATH_SETTINGS = {"cas_required": False, "max_versions": 0, "delete_version_after": "0s"}


def delete_staged_if_promoted(rot, check_mode):
    """Delete the staged key once the current version holds it; whether it is (would be) gone.

    The metadata goes with every version (no key material stays behind, and the stager's next
    ``-cas=0`` write finds an empty path), so the path's own settings that provisioning keeps
    (check-and-set required, the version limit) are written back right after the delete."""
    if rot.params["key_source"] not in ("auto", "staged"):
        return False
    staged = rot.staged_key()
    if not staged or staged.strip() not in version_keys(rot.version_data(rot.current_version)):
        return False
    if check_mode:
        return True
    where = f"{rot.mount}/{rot.staged_path}"
    meta = rot.call(
        f"read the settings of the staged key path {where}",
        rot.kv.read_secret_metadata,
        path=rot.staged_path,
        mount_point=rot.mount,
    )["data"]
    settings = {name: meta.get(name, new) for name, new in _NEW_PATH_SETTINGS.items()}
    rot.call(
        f"delete the promoted staged key {where}",
        rot.kv.delete_metadata_and_all_versions,
        path=rot.staged_path,
        mount_point=rot.mount,
    )
    if settings != _NEW_PATH_SETTINGS:
        rot.call(
            f"keep check-and-set and the version limit on the staged key path {where}",
            rot.kv.update_metadata,
            path=rot.staged_path,
            mount_point=rot.mount,
            **settings,
        )
    return True


def require_rotation(rot, allowed, rid):
    """Refuse unless ``rid`` is the recorded rotation and its state is one of ``allowed``."""
    if not rid:
        raise RotationRefused(f"{rot.params['action']} needs rotation_id")
    if rot.record.get("rotation_id") != rid:
        raise RotationRefused(
            f"Rotation {rid} is not the recorded rotation of {rot.env} "
            f"(recorded: {rot.record.get('rotation_id') or 'none'}); nothing changed"
        )
    if rot.state not in allowed:
        raise RotationRefused(
            f"Rotation {rid} of {rot.env} is {rot.state or 'none'}, not "
            f"{' or '.join(allowed)}; nothing changed"
        )


def mark(rot, check_mode):
    """propagating -> awaiting_revocation, with converged_at; a no-op when already there."""
    rid = rot.params["rotation_id"]
    require_rotation(rot, ROTATION_IN_PROGRESS, rid)
    if rot.state == "awaiting_revocation":
        return rot.result(False, [], f"rotation {rid} already awaiting revocation")
    if rot.current_version != rot.record_int("new_version"):
        raise RotationRefused(f"Rotation {rid}: the new version was never written; nothing changed")
    record = dict(rot.record, rotation_state="awaiting_revocation", converged_at=now_utc())
    steps = [f"mark rotation {rid} awaiting_revocation (every worker converged)"]
    diff = diff_of(rot.record, record)
    if not check_mode:
        rot.write_record(record)
        rot.refresh()
    return rot.result(True, steps, "workers converged", diff=diff)


def rollback(rot, check_mode):
    """Write the previous version's data back as a new version; state rolled_back."""
    rid = rot.params["rotation_id"] or rot.record.get("rotation_id", "")
    if rot.state == "complete":
        raise RotationRefused(
            f"Rollback refused: rotation {rid} was finalized at "
            f"{rot.record.get('confirmed_at', '?')}; the previous version is destroyed; "
            "nothing changed"
        )
    if rot.state == "rolled_back" and rot.record.get("rotation_id") == rid:
        return rot.result(
            False, [], f"rotation {rid} is already rolled back", target_version=rot.current_version
        )
    require_rotation(rot, ROTATION_IN_PROGRESS, rid)
    prev = rot.record_int("previous_version")
    new = rot.record_int("new_version")
    prev_data = rot.version_data(prev)
    if prev_data is None:
        raise RotationRefused(
            f"Rollback impossible: version {prev} is no longer held; nothing changed"
        )
    steps = []
    target = rot.current_version
    already = rot.current_version > (new or 0) and rot.current_key() == prev_data.get("api_key")
    if rot.current_version == prev or already:
        steps.append(f"version {rot.current_version} already holds the previous key")
    elif rot.current_version == new:
        target = new + 1
        steps.append(
            f"write version {prev}'s data back as version {target} (check-and-set on version {new})"
        )
    else:
        raise RotationRefused(
            f"Rollback refused: {rot.mount}/{rot.key_path} is at version {rot.current_version}, "
            f"not the rotation's new version {new}; nothing changed"
        )
    record = dict(rot.record, rotation_state="rolled_back")
    steps.append(f"mark rotation {rid} rolled_back")
    before = {"version": rot.current_version, "key": mask_key(rot.current_key()), **rot.record}
    after = {"version": target, "key": mask_key(prev_data.get("api_key")), **record}
    if not check_mode:
        if target != rot.current_version:
            rot.write_version(
                {**prev_data, VERSION_ROTATION_FIELD: rid},
                new,
                f"write the previous key back to {rot.mount}/{rot.key_path}",
            )
        rot.write_record(record)
        rot.refresh()
    return rot.result(
        True, steps, "rollback", rotation_id=rid, target_version=target, diff=diff_of(before, after)
    )


def finalize(rot, check_mode):
    """Destroy every held version older than the new one; state complete, confirmed_at."""
    rid = rot.params["rotation_id"]
    if rot.state == "complete" and rot.record.get("rotation_id") == rid:
        return rot.result(False, [], f"rotation {rid} is already complete", destroyed_versions=[])
    require_rotation(rot, ("awaiting_revocation",), rid)
    new = rot.record_int("new_version")
    if rot.current_version != new:
        raise RotationRefused(f"Rotation {rid}: version {new} is not current; nothing changed")
    extra = {}
    if rot.params["return_keys"]:
        # Read before the destroy below: afterwards the old key cannot be read again.
        prev = rot.record_int("previous_version")
        old_key = (rot.version_data(prev) or {}).get("api_key") if prev else None
        extra["previous_key"] = old_key or ""
    old_versions = [v for v in rot.held if v < new]
    record = dict(rot.record, rotation_state="complete", confirmed_at=now_utc())
    steps = [
        f"destroy versions {old_versions} of {rot.mount}/{rot.key_path}",
        f"mark rotation {rid} complete",
    ]
    if not check_mode:
        if old_versions:
            rot.call(
                f"destroy the old versions of {rot.mount}/{rot.key_path}",
                rot.kv.destroy_secret_versions,
                path=rot.key_path,
                versions=old_versions,
                mount_point=rot.mount,
            )
        rot.write_record(record)
        rot.refresh()
    return rot.result(
        True,
        steps,
        "revocation confirmed",
        destroyed_versions=old_versions,
        diff=diff_of({"held": sorted([*old_versions, new])}, {"held": [new]}),
        **extra,
    )


def _expired(expiration_time, now):
    """Whether a secret-id's ``expiration_time`` (RFC 3339, Vault's nanoseconds) is past; the
    zero time means it never expires."""
    text = str(expiration_time or "")
    if not text or text.startswith("0001-01-01"):
        return False
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        return False  # unknown form: count it as live (the census errs on the side of a holder)
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    when = datetime.datetime.fromisoformat(match.group(1) + zone)
    return when <= now


def census(rot, check_mode):
    """The live secret-ids of the env's worker role, by the host their metadata names.

    Read-only. The kit's deploy (captcha_worker) issues every secret-id with the metadata
    ``host`` (its inventory name) and ``env``; the rotation compares the hosts found here with
    the inventory's workers of the env, so a host that can still log in but is not in the
    inventory is not left behind on the old key. ``holders`` lists one entry per live secret-id
    with a host; ``unnamed`` the accessors of live secret-ids without one (not issued by the
    kit's deploy). Accessors are not secret: they cannot log in.
    """
    mount = rot.params.get("approle_mount") or "approle"
    role = rot.params.get("worker_role") or f"captcha-worker-{rot.env}"
    base = f"auth/{mount}/role/{role}"
    wanted = {f"{base}/secret-id": "list", f"{base}/secret-id-accessor/lookup": "update"}
    resp = rot.call(
        "check the token's capabilities (sys/capabilities-self)",
        rot.client.sys.get_capabilities,
        paths=list(wanted),
    )
    data = resp.get("data", resp) if isinstance(resp, dict) else {}
    missing = [
        f"{cap} on {path}"
        for path, cap in wanted.items()
        if "root" not in (data.get(path) or []) and cap not in (data.get(path) or [])
    ]
    if missing:
        raise RotationRefused(
            f"The token cannot take the census of the worker secret-ids of {rot.env}: missing "
            + ", ".join(missing)
            + f". The token in use is {rot.identity()[0]}. policies/captcha-rotator.hcl.j2 grants "
            "both: rerun playbooks/provision-vault.yml to update the rotator policy; nothing "
            "changed",
            missing_rights=missing,
        )
    try:
        listed = rot.call(
            f"list the secret-id accessors of AppRole role {role}",
            rot.client.auth.approle.list_secret_id_accessors,
            role,
            mount_point=mount,
        )
    except VaultNotFound:  # no secret-id at all
        listed = None
    accessors = sorted(((listed or {}).get("data") or {}).get("keys") or [])
    now = datetime.datetime.now(datetime.UTC)
    holders, unnamed = [], []
    for accessor in accessors:
        try:
            info = rot.call(
                f"look up a secret-id accessor of AppRole role {role}",
                rot.client.auth.approle.read_secret_id_accessor,
                role,
                accessor,
                mount_point=mount,
            )
        except VaultNotFound:  # expired or destroyed since the list
            continue
        info = (info or {}).get("data") if isinstance(info, dict) else None
        if not info or _expired(info.get("expiration_time"), now):
            continue
        meta = info.get("metadata") or {}
        host = str(meta.get("host") or "")
        if host:
            holders.append(
                {
                    "host": host,
                    "env": str(meta.get("env") or ""),
                    "accessor": accessor,
                    "expiration_time": str(info.get("expiration_time") or ""),
                }
            )
        else:
            unnamed.append(accessor)
    holders.sort(key=lambda h: (h["host"], h["accessor"]))
    hosts = sorted({h["host"] for h in holders})
    return rot.result(
        False,
        [f"list the live secret-ids of {base} and the hosts their metadata names"],
        f"{len(holders) + len(unnamed)} live secret-id(s) of {role}: {len(hosts)} host(s) named, "
        f"{len(unnamed)} without a host",
        role=role,
        holders=holders,
        hosts=hosts,
        unnamed=unnamed,
    )


ACTIONS = {
    "census": census,
    "plan": plan,
    "put": put,
    "record": record,
    "mark": mark,
    "rollback": rollback,
    "finalize": finalize,
}
