#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ansible module: the Vault side of the CaptchaAI key rotation state machine.

The logic lives in module_utils: ``rotation`` (the key path, its record, ``decide()``) and
``rotation_actions`` (one function per action). This file holds the interface and the glue.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: key_rotation_state
short_description: Vault side of the CaptchaAI key rotation state machine (KV v2 + custom_metadata)
version_added: 0.1.0
description:
  - Reads and advances the rotation record kept in the KV v2 C(custom_metadata) of an environment's
    key path (C(rotation_id), C(rotation_state), C(previous_version), C(new_version),
    C(started_at), C(converged_at), C(confirmed_at), C(actor); all values strings).
  - C(plan) is read-only and decides the next step from the recorded state and the inputs;
    the other actions perform one step each and are idempotent, so a rerun after an interruption
    continues where the first run stopped and never writes a second new version for one rotation.
  - Only Vault is contacted. Whether the provider accepts a key is the business of
    M(captcha_kit.captchaai.key_check); O(return_keys) hands it the keys only Vault holds.
  - Keys are only shown as masked fingerprints such as C(***ab12); no key is returned unless
    O(return_keys) asks for it.
  - Check mode returns the plan and writes nothing; diff mode shows masked before/after.
options:
  action:
    description:
      - C(plan) reads the state and returns C(next) (C(put), C(wait), C(confirm), C(rollback),
        C(need_key), C(noop)) or fails with a clear message when the inputs are not acceptable
        (malformed key, a key still held in Vault, a second rotation, nothing to confirm).
      - C(put) writes the new key with check-and-set on the current version (the version's
        data names the rotation in C(rotation_id)), then records the rotation (state
        C(propagating)) and deletes the staged key if it was promoted. Of two runs started at
        once, the one that loses the check-and-set writes nothing, neither a version nor a
        record; a run cut off between the write and the record is resumed from the version.
        A staged key is put only when it is the staged write C(plan) validated (O(staged_ref)).
        When Vault's answer to the write is lost (a dropped connection, a retried request),
        C(put) reads the key path back and recognises this run's own write.
        With O(defer_record), C(put) returns as soon as the write is answered and leaves the
        record and the staged key's deletion to C(record).
      - C(record) does what a C(put) with O(defer_record) left, in the same run. It records the
        rotation (state C(propagating), O(actor)) and deletes the staged key if it was promoted.
        Nothing to do when the record is written already.
      - C(mark) moves C(propagating) to C(awaiting_revocation) and sets C(converged_at).
      - C(rollback) writes the previous version's data back as a new version (check-and-set) and
        sets the state C(rolled_back). Refused after finalize.
      - C(finalize) destroys every held version older than the new one and sets the state
        C(complete) with C(confirmed_at).
      - C(census) is read-only and lists the live secret-ids of the environment's worker AppRole
        role (O(worker_role)) with the host their metadata names (RV(holders), RV(hosts)) and
        those without one (RV(unnamed)). It needs C(list) on the role's C(secret-id) path and
        C(update) on its C(secret-id-accessor/lookup) path.
    type: str
    required: true
    choices: [census, plan, put, record, mark, rollback, finalize]
  env:
    description:
      - Environment name (used in messages and in the default paths); must match the kit's
        environment name pattern C(^[a-z][a-z0-9-]{0,23}$).
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
      - Where the candidate comes from. C(auto) takes O(new_key) when given, else the staged key
        when one exists. C(variable) uses only O(new_key); C(staged) uses only the staged key.
    type: str
    choices: [auto, variable, staged]
    default: auto
  key_pattern:
    description: Regular expression a key must match completely.
    type: str
    default: "^[0-9a-f]{32}$"
  rollback:
    description: With C(plan), ask for a rollback of the rotation in progress.
    type: bool
    default: false
  confirm:
    description:
      - With C(plan), the operator confirms that the old key was revoked at the provider,
        without naming a rotation. Only valid together with a new key, as the confirmation given
        up front for the rotation this run starts (emergency rotation, finalized as soon as the
        workers converged). Use O(confirm_rotation) to confirm a recorded rotation.
    type: bool
    default: false
  confirm_rotation:
    description:
      - With C(plan), the rotation id the operator confirms (the id the awaiting-revocation
        message prints). Refused when it is not the rotation in progress, or when no rotation is
        awaiting revocation. The env name instead of an id is the confirmation given up front
        (see O(confirm)).
    type: str
  staged_ref:
    description:
      - With C(put) of a staged key, the staged write C(plan) validated (RV(candidate) key
        C(staged_ref), the version and creation time of the staged secret). A staged key written
        again since then is refused and nothing is put.
    type: str
  defer_record:
    description:
      - With C(put), return as soon as Vault answered the check-and-set write, without asking
        Vault anything more; C(record) writes the rotation record later in the same run. A
        rotation nudges its workers in between, so the bookkeeping (three more requests) does
        not hold up the workers when a raft election follows the put. Until then the version
        names the rotation, so other runs see it in progress, and a run cut off before
        C(record) is resumed as after any interruption.
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
  approle_mount:
    description: With C(census), the AppRole mount of the worker role.
    type: str
    default: approle
  worker_role:
    description: With C(census), the worker AppRole role; default C(captcha-worker-<env>).
    type: str
  return_keys:
    description:
      - Return the keys only Vault holds, for a provider check in the next task
        (M(captcha_kit.captchaai.key_check)). Set C(no_log) on the task.
      - With C(plan) and C(next=put), the staged candidate as RV(staged_key) (a candidate from
        O(new_key) is the caller's own value and is never returned).
      - With C(finalize), the old key as RV(previous_key), read before its version is destroyed.
    type: bool
    default: false
extends_documentation_fragment:
  - captcha_kit.vault.connection
  - captcha_kit.vault.connection.changes
seealso:
  - module: captcha_kit.captchaai.key_check
"""

EXAMPLES = r"""
- name: Plan the rotation of the dev key from the staged key
  captcha_kit.vault.key_rotation_state:
    action: plan
    env: dev
    key_source: staged
    return_keys: true
  register: plan
  no_log: true

- name: Check the staged key at the provider before it is written
  captcha_kit.captchaai.key_check:
    key: "{{ plan.staged_key }}"
    provider_url: https://ocr.captchaai.com
  when: plan.next == 'put'
  no_log: true

- name: Put the new key with check-and-set
  captcha_kit.vault.key_rotation_state:
    action: put
    env: dev
    key_source: staged
    rotation_id: "{{ plan.rotation_id }}"
    staged_ref: "{{ plan.candidate.staged_ref }}"
  no_log: true

- name: Confirm the revocation of the old key of the rotation awaiting it
  captcha_kit.vault.key_rotation_state:
    action: plan
    env: dev
    confirm_rotation: dev-20260131T120000Z-a1b2c3
  register: confirm_plan
"""

RETURN = r"""
next:
  description: Next step (plan); C(put), C(wait), C(confirm), C(rollback), C(need_key) or C(noop).
  returned: action=plan
  type: str
reason:
  description: Why C(next) was chosen, or what the action did, in words.
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
rotation_state:
  description: The recorded state after the action, C(none) when there is no record.
  returned: always
  type: str
in_progress:
  description: Whether a rotation is propagating or awaiting revocation.
  returned: always
  type: bool
env:
  description: The environment.
  returned: always
  type: str
key_path:
  description: The key path with its mount, for example C(secret/captchaai/dev).
  returned: always
  type: str
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
  description:
    - Masked facts about the candidate (source, fingerprint, format and reuse checks).
    - For a staged candidate C(staged_ref) names the staged write, for O(staged_ref) of C(put).
  returned: action=plan or action=put
  type: dict
confirmed:
  description: Whether the confirmation given applies to the rotation this plan continues.
  returned: action=plan
  type: bool
target_version:
  description: The version every worker must report after this step.
  returned: action=plan or action=put or action=rollback
  type: int
staged_deleted:
  description: Whether the promoted staged key was (or in check mode would be) deleted.
  returned: action=put or action=record
  type: bool
record_deferred:
  description: Whether the put left the record to C(record) (O(defer_record)).
  returned: action=put when it wrote a version
  type: bool
written_at:
  description:
    - When Vault's answer to the check-and-set write came, in seconds since the epoch on the
      host that runs the module (the controller); the rotation counts its workers' convergence
      from it.
  returned: action=put when it wrote a version
  type: float
destroyed_versions:
  description: Versions destroyed by finalize.
  returned: action=finalize
  type: list
  elements: int
staged_key:
  description: The staged candidate key. Secret.
  returned: action=plan with return_keys, next=put and a staged candidate
  type: str
previous_key:
  description: The rotation's old key (empty when no longer held). Secret.
  returned: action=finalize with return_keys
  type: str
staged_help:
  description:
    - For a staged candidate, what the stager does about a staged key the rotation refuses, with
      the exact commands that withdraw it or replace it by a new staged version.
  returned: action=plan with a staged candidate and next=put
  type: str
holders:
  description:
    - One entry per live secret-id of the worker role whose metadata names a host, with the keys
      C(host), C(env), C(accessor) and C(expiration_time). Accessors cannot log in.
  returned: action=census
  type: list
  elements: dict
hosts:
  description: The hosts named by RV(holders), sorted and unique.
  returned: action=census
  type: list
  elements: str
unnamed:
  description: Accessors of live secret-ids of the worker role whose metadata names no host.
  returned: action=census
  type: list
  elements: str
plan:
  description: Human-readable steps this action performs (or would perform in check mode).
  returned: always
  type: list
  elements: str
"""

import functools

from ansible_collections.captcha_kit.vault.plugins.module_utils.contract import (
    DEFAULT_KV_MOUNT,
    KEY_PATTERN,
    valid_env_name,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils.rotation import (
    Rotation,
    RotationRefused,
)
from ansible_collections.captcha_kit.vault.plugins.module_utils.rotation_actions import ACTIONS
from ansible_collections.captcha_kit.vault.plugins.module_utils.vault_client import (
    get_client,
    run_module,
    vault_call,
)

OPTIONS = {
    "action": {"type": "str", "required": True, "choices": list(ACTIONS)},
    "env": {"type": "str", "required": True},
    "mount": {"type": "str", "default": DEFAULT_KV_MOUNT},
    "key_path": {"type": "str", "no_log": False},
    "staged_path": {"type": "str"},
    "new_key": {"type": "str", "no_log": True},
    "key_source": {"type": "str", "default": "auto", "choices": ["auto", "variable", "staged"]},
    "key_pattern": {"type": "str", "default": KEY_PATTERN, "no_log": False},
    "rollback": {"type": "bool", "default": False},
    "confirm": {"type": "bool", "default": False},
    "confirm_rotation": {"type": "str"},
    "staged_ref": {"type": "str"},
    "defer_record": {"type": "bool", "default": False},
    "check_rights": {"type": "bool", "default": True},
    "rotation_id": {"type": "str"},
    "actor": {"type": "str"},
    "approle_mount": {"type": "str", "default": "approle"},
    "worker_role": {"type": "str"},
    "return_keys": {"type": "bool", "default": False, "no_log": False},
}


def rotate(module):
    """Load the key path's state and run one action; a refused step fails with the state."""
    params = module.params
    if not valid_env_name(params["env"]):
        module.fail_json(msg=f"Unknown environment {params['env']!r}: not a valid name")
    rot = Rotation(get_client(module), params, functools.partial(vault_call, module))
    try:
        rot.load(check_rights=params["action"] == "plan" and params["check_rights"])
    except RotationRefused as refused:  # nothing read yet: no state to report
        module.fail_json(msg=refused.msg, **refused.extra)
    try:
        return ACTIONS[params["action"]](rot, module.check_mode)
    except RotationRefused as refused:
        module.fail_json(msg=refused.msg, **{**rot.summary(), **refused.extra})
    return None  # not reached: fail_json exits


def main():
    run_module(OPTIONS, rotate)


if __name__ == "__main__":
    main()
