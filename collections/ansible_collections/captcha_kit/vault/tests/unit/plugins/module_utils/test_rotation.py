# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""module_utils/rotation.py: the record, the candidate checks and decide() in every state,
against the in-memory FakeVault (no AnsibleModule, no server)."""

from __future__ import annotations

import json
import re

import pytest
from ansible_collections.captcha_kit.vault.plugins.module_utils.rotation import (
    Rotation,
    RotationRefused,
    decide,
    diff_of,
    new_rotation_id,
    now_utc,
    version_keys,
)
from ansible_collections.captcha_kit.vault.tests.unit.plugins.modules.rotation_fakes import (
    KEY_PATH,
    STAGED_PATH,
    FakeVault,
    env_with_key,
    mid_rotation,
    new_key,
    params,
    rotation,
)


# ---- helpers -------------------------------------------------------------------------------
def test_version_keys_lists_the_main_key_then_the_backups():
    a, b, c = new_key(), new_key(), new_key()
    assert version_keys({"api_key": a, "backup_keys": [b, "", c]}) == [a, b, c]
    assert version_keys({"api_key": a, "backup_keys": "not a list"}) == [a]
    assert version_keys(None) == []
    assert version_keys({}) == []


def test_rotation_ids_and_times_have_their_shape():
    rid = new_rotation_id("dev")
    assert re.fullmatch(r"dev-\d{8}T\d{6}Z-[0-9a-f]{6}", rid)
    assert new_rotation_id("dev") != rid
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now_utc())


def test_diff_of_is_sorted_json_with_masked_headers():
    diff = diff_of({"b": 1, "a": "***abcd"}, {"a": "***ef01"})
    assert diff["before_header"] == diff["after_header"] == "rotation record (masked)"
    assert json.loads(diff["before"]) == {"a": "***abcd", "b": 1}
    assert diff["before"].index('"a"') < diff["before"].index('"b"')
    assert diff["after"].endswith("\n")


# ---- loading ---------------------------------------------------------------------------------
def test_nothing_is_read_before_load():
    vault = env_with_key()
    rot = Rotation(vault, params())
    assert rot.current_version == 0
    assert rot.key_path == KEY_PATH
    assert rot.staged_path == STAGED_PATH


def test_load_reads_versions_held_and_the_record():
    vault, _, _ = mid_rotation("propagating")
    vault.store[("secret", KEY_PATH)].versions[1]["deletion_time"] = "2026-01-01T00:00:00Z"
    vault.set_record({**vault.record(), "owner": "ops", "converged_at": ""})
    rot = rotation(vault)
    assert rot.current_version == 2
    assert rot.held == [2]
    assert rot.state == "propagating"
    assert rot.record["rotation_id"] == "dev-r1"
    assert "owner" not in rot.record, "only the rotation fields are the record"
    assert "converged_at" not in rot.record, "empty fields are absent"
    assert rot.custom["owner"] == "ops"


def test_an_env_without_a_key_is_unknown():
    with pytest.raises(RotationRefused, match=r"Unknown environment 'dev': there is no key at "):
        rotation(FakeVault())


def test_missing_rights_are_named_before_anything_is_read():
    vault = env_with_key()
    vault.capabilities = {
        "secret/data/captchaai/dev": ["read"],
        "secret/metadata/captchaai/dev": ["read", "update"],
    }
    rot = Rotation(vault, params())
    with pytest.raises(RotationRefused) as refused:
        rot.load(check_rights=True)
    assert refused.value.msg.startswith("The token lacks rotator rights for dev: missing ")
    assert refused.value.extra["missing_rights"] == [
        "update on secret/data/captchaai/dev",
        "update on secret/destroy/captchaai/dev",
        "read on secret/data/captchaai-staged/dev",
        "create on secret/metadata/captchaai-staged/dev",
        "read on secret/metadata/captchaai-staged/dev",
        "delete on secret/metadata/captchaai-staged/dev",
    ]
    assert "captcha-rotator-dev AppRole" in refused.value.msg


def test_the_staged_path_rights_are_asked_only_when_a_staged_key_may_be_used():
    vault = env_with_key()
    vault.capabilities = {
        "secret/data/captchaai/dev": ["read", "update"],
        "secret/metadata/captchaai/dev": ["read", "update"],
        "secret/destroy/captchaai/dev": ["update"],
    }
    Rotation(vault, params(key_source="variable")).load(check_rights=True)
    vault.capabilities = {"secret/data/captchaai/dev": ["root"]}
    with pytest.raises(RotationRefused):
        Rotation(vault, params(key_source="variable")).load(check_rights=True)


# ---- the candidate ---------------------------------------------------------------------------
def test_the_candidate_comes_from_the_variable_first_then_the_staged_path():
    vault = env_with_key()
    given, staged = new_key(), new_key()
    vault.put(STAGED_PATH, {"api_key": staged})
    assert rotation(vault, new_key=f" {given}\n").candidate() == (given, "variable")
    assert rotation(vault).candidate() == (staged, "staged")
    assert rotation(vault, new_key=given, key_source="staged").candidate() == (staged, "staged")
    assert rotation(vault, key_source="variable").candidate() == (None, "variable")
    assert rotation(env_with_key()).candidate() == (None, "auto")


def test_a_good_candidate_is_described_masked():
    key = new_key()
    info = rotation(env_with_key()).check_candidate(key, "variable")
    assert info == {
        "source": "variable",
        "present": True,
        "fingerprint": "***" + key[-4:],
        "format_ok": True,
        "same_as": None,
    }


@pytest.mark.parametrize(
    "bad", [lambda k: k.upper(), lambda k: k[:31], lambda k: k + "0", lambda k: k + "\n"]
)
def test_a_malformed_candidate_is_refused(bad):
    key = bad(new_key())
    with pytest.raises(RotationRefused, match="is malformed") as refused:
        rotation(env_with_key()).check_candidate(key, "staged")
    assert "(from the staged key)" in refused.value.msg
    assert "nothing changed" in refused.value.msg
    assert refused.value.extra["candidate"]["format_ok"] is False
    assert key not in json.dumps([refused.value.msg, refused.value.extra])


def test_the_key_pattern_can_be_set():
    rot = rotation(env_with_key(), key_pattern="^[A-Z]{4}$")
    assert rot.check_candidate("ABCD", "variable")["format_ok"]


def test_the_current_key_and_keys_still_held_are_refused():
    old, backup = new_key(), new_key()
    vault = FakeVault()
    vault.put(KEY_PATH, {"api_key": old})
    current = new_key()
    vault.put(KEY_PATH, {"api_key": current, "backup_keys": [backup]})
    rot = rotation(vault)
    with pytest.raises(RotationRefused, match="is the current key of dev"):
        rot.check_candidate(current, "variable")
    with pytest.raises(RotationRefused, match="is the current key of dev"):
        rot.check_candidate(backup, "variable")
    with pytest.raises(RotationRefused, match="still held in Vault as version 1 of secret/captcha"):
        rot.check_candidate(old, "variable")


def test_a_destroyed_version_does_not_count_as_held():
    old = new_key()
    vault = FakeVault()
    vault.put(KEY_PATH, {"api_key": old})
    vault.put(KEY_PATH, {"api_key": new_key()})
    vault.store[("secret", KEY_PATH)].versions[1]["destroyed"] = True
    assert rotation(vault).check_candidate(old, "variable")["same_as"] is None


# ---- the actor -------------------------------------------------------------------------------
def test_the_actor_is_the_parameter_or_the_token():
    assert rotation(env_with_key(), actor="alice").actor() == "alice"
    vault = env_with_key()
    vault.auth.token.lookup_self = lambda: {
        "data": {"display_name": "approle", "meta": {"role_name": "captcha-rotator-dev"}}
    }
    assert rotation(vault).actor() == "approle (captcha-rotator-dev)"

    def broken():
        raise RuntimeError("no lookup")

    vault.auth.token.lookup_self = broken
    assert rotation(vault).actor() == "unknown"


# ---- the record ------------------------------------------------------------------------------
def test_write_record_replaces_the_rotation_fields_and_keeps_the_others():
    vault = env_with_key(owner="ops", rotation_id="old", converged_at="x")
    rot = rotation(vault)
    rot.write_record({"rotation_id": "new", "rotation_state": "propagating", "actor": ""})
    assert vault.record() == {
        "owner": "ops",
        "rotation_id": "new",
        "rotation_state": "propagating",
    }


def test_the_summary_is_masked():
    vault, old, new = mid_rotation("awaiting_revocation")
    summary = rotation(vault).summary()
    assert summary == {
        "env": "dev",
        "key_path": "secret/captchaai/dev",
        "current_version": 2,
        "versions_held": [1, 2],
        "current_fingerprint": "***" + new[-4:],
        "previous_fingerprint": "***" + old[-4:],
        "rotation": vault.record(),
        "rotation_state": "awaiting_revocation",
        "in_progress": True,
    }
    assert rotation(env_with_key()).summary()["rotation_state"] == "none"


# ---- decide() in every state ---------------------------------------------------------------
def decided(vault, **p):
    return decide(rotation(vault, **p))


def refusal(vault, **p):
    with pytest.raises(RotationRefused) as refused:
        decide(rotation(vault, **p))
    return refused.value.msg


def staged(vault):
    key = new_key()
    vault.put(STAGED_PATH, {"api_key": key})
    return key


class TestNoRotationRecorded:
    def test_a_new_key_starts_a_rotation(self):
        assert decided(env_with_key(), new_key=new_key()) == (
            "put",
            "start a new rotation of dev from version 1",
            "",
        )

    def test_a_staged_key_starts_a_rotation(self):
        vault = env_with_key()
        staged(vault)
        assert decided(vault)[0] == "put"
        assert decided(vault, key_source="staged")[0] == "put"

    def test_no_key_needs_one(self):
        assert decided(env_with_key()) == ("need_key", "no new key given and none staged", "")

    def test_no_staged_key_in_staged_mode_is_a_noop_that_says_so(self):
        assert decided(env_with_key(), key_source="staged") == (
            "noop",
            "no staged key at secret/captchaai-staged/dev: nothing to do",
            "",
        )

    def test_a_rollback_is_refused(self):
        msg = refusal(env_with_key(), rollback=True)
        assert msg == "Rollback refused: no rotation of dev is in progress; nothing changed"

    def test_a_confirmation_alone_from_the_staged_source_is_refused(self):
        """Nothing staged and nothing to prompt for: the confirmation has nothing to apply to."""
        msg = refusal(env_with_key(), confirm=True, key_source="staged")
        assert msg == (
            "Confirmation refused: no rotation of dev is awaiting revocation "
            "(recorded state: none); nothing changed"
        )
        msg = refusal(env_with_key(), confirm_rotation="dev", key_source="staged")
        assert "no rotation of dev is awaiting revocation" in msg

    def test_the_env_name_given_up_front_asks_for_the_key(self):
        """The emergency runbook: the env name before the key is known; the run then asks for
        the key (the prompt), and the plan with it is a put confirmed up front."""
        assert decided(env_with_key(), confirm_rotation="dev")[0] == "need_key"
        assert decided(env_with_key(), confirm=True)[0] == "need_key"

    def test_a_confirmation_with_a_new_key_is_an_emergency_rotation(self):
        assert decided(env_with_key(), confirm=True, new_key=new_key())[0] == "put"
        assert decided(env_with_key(), confirm_rotation="dev", new_key=new_key())[0] == "put"

    def test_a_confirmation_naming_a_rotation_with_none_recorded_is_refused(self):
        msg = refusal(env_with_key(), confirm_rotation="dev-r1", new_key=new_key())
        assert msg == (
            "Confirmation refused: no rotation of dev is awaiting revocation (recorded state: "
            "none; the confirmation names rotation dev-r1); nothing changed"
        )


class TestPropagating:
    def test_without_a_key_it_waits(self):
        vault, _, _ = mid_rotation("propagating")
        assert decided(vault) == (
            "wait",
            "resuming rotation dev-r1 (propagating, version 1 -> 2)",
            "dev-r1",
        )

    def test_the_same_new_key_again_resumes(self):
        vault, _, new = mid_rotation("propagating")
        assert decided(vault, new_key=new)[0] == "wait"

    def test_another_key_is_a_second_rotation_and_refused(self):
        vault, _, _ = mid_rotation("propagating")
        other = new_key()
        msg = refusal(vault, new_key=other)
        assert msg.startswith("Another rotation is in progress: rotation dev-r1 of dev is ")
        assert "started 2026-01-01T00:00:00Z by token" in msg
        assert f"the variable key ***{other[-4:]} was not written; nothing changed" in msg
        assert other not in msg

    def test_a_rollback_is_planned(self):
        vault, _, _ = mid_rotation("propagating")
        assert decided(vault, rollback=True) == (
            "rollback",
            "rotation dev-r1 (propagating) will be rolled back to version 1",
            "dev-r1",
        )

    def test_a_confirmation_naming_it_while_propagating_still_waits(self):
        vault, _, _ = mid_rotation("propagating")
        assert decided(vault, confirm_rotation="dev-r1")[0] == "wait"

    def test_a_record_without_its_key_needs_the_key_again(self):
        vault, _, _ = mid_rotation("propagating", written=False)
        assert decided(vault) == (
            "need_key",
            "rotation dev-r1 was recorded but its key was never written; give the new key "
            "again (or stage it) to resume",
            "dev-r1",
        )

    def test_a_record_without_its_key_resumes_with_a_key(self):
        vault, _, _ = mid_rotation("propagating", written=False)
        assert decided(vault, new_key=new_key()) == (
            "put",
            "resuming rotation dev-r1: the new key was not written yet",
            "dev-r1",
        )

    def test_a_key_path_changed_outside_the_rotation_is_refused(self):
        vault, _, _ = mid_rotation("propagating")
        vault.put(KEY_PATH, {"api_key": new_key()})
        msg = refusal(vault)
        assert msg.startswith(
            "The key path secret/captchaai/dev changed outside rotation dev-r1: current version 3"
        )


class TestAwaitingRevocation:
    def test_without_a_key_it_asks_for_the_confirmation(self):
        vault, _, _ = mid_rotation("awaiting_revocation")
        assert decided(vault) == (
            "confirm",
            "resuming rotation dev-r1 (awaiting_revocation, version 1 -> 2)",
            "dev-r1",
        )

    def test_a_confirmation_naming_it_is_accepted(self):
        vault, _, _ = mid_rotation("awaiting_revocation")
        assert decided(vault, confirm_rotation="dev-r1")[0] == "confirm"

    @pytest.mark.parametrize("form", [{"confirm": True}, {"confirm_rotation": "dev"}])
    def test_a_confirmation_that_names_no_rotation_is_refused(self, form):
        vault, _, _ = mid_rotation("awaiting_revocation")
        assert refusal(vault, **form) == (
            "Confirmation refused: a confirmation names the rotation it confirms; rotation "
            "dev-r1 of dev is awaiting_revocation: pass key_rotation_confirm_revoked=dev-r1; "
            "nothing changed"
        )

    def test_a_confirmation_naming_another_rotation_is_refused(self):
        vault, _, _ = mid_rotation("awaiting_revocation")
        assert refusal(vault, confirm_rotation="dev-r0") == (
            "Confirmation refused: it names rotation dev-r0, but the rotation of dev in "
            "progress is dev-r1 (awaiting_revocation); check which rotation you mean and pass "
            "key_rotation_confirm_revoked=dev-r1; nothing changed"
        )

    def test_the_up_front_form_with_the_same_key_resumes_an_emergency_rotation(self):
        vault, _, new = mid_rotation("propagating")
        assert decided(vault, confirm_rotation="dev", new_key=new)[0] == "wait"

    def test_a_rollback_is_planned(self):
        vault, _, _ = mid_rotation("awaiting_revocation")
        assert decided(vault, rollback=True)[0] == "rollback"

    def test_a_staged_key_for_the_next_rotation_is_refused(self):
        vault, _, _ = mid_rotation("awaiting_revocation")
        staged(vault)
        assert "(confirm the revocation) or roll it back" in refusal(vault)


class TestComplete:
    def test_a_rollback_is_refused(self):
        vault, _, _ = mid_rotation("complete")
        vault.set_record({**vault.record(), "confirmed_at": "2026-01-02T00:00:00Z"})
        assert refusal(vault, rollback=True) == (
            "Rollback refused: rotation dev-r1 of dev was finalized at 2026-01-02T00:00:00Z and "
            "the previous version is destroyed; rotate to a new key instead; nothing changed"
        )

    def test_a_confirmation_is_refused(self):
        vault, _, _ = mid_rotation("complete")
        assert "(recorded state: complete)" in refusal(vault, confirm=True, key_source="staged")
        assert decided(vault, confirm=True)[0] == "need_key"  # up front: the key is asked for
        assert refusal(vault, confirm_rotation="dev-r1") == (
            "Confirmation refused: no rotation of dev is awaiting revocation (recorded state: "
            "complete; the confirmation names rotation dev-r1); nothing changed"
        )

    def test_a_new_key_starts_the_next_rotation(self):
        vault, _, _ = mid_rotation("complete")
        assert decided(vault, new_key=new_key()) == (
            "put",
            "start a new rotation of dev from version 2",
            "",
        )

    def test_without_a_key_a_key_is_needed(self):
        vault, _, _ = mid_rotation("complete")
        assert decided(vault)[0] == "need_key"


class TestRolledBack:
    def test_a_second_rollback_is_a_noop(self):
        vault, _, _ = mid_rotation("rolled_back")
        assert decided(vault, rollback=True) == (
            "noop",
            "rotation dev-r1 is already rolled back; nothing to do",
            "dev-r1",
        )

    def test_a_new_key_starts_the_next_rotation(self):
        vault, _, _ = mid_rotation("rolled_back")
        assert decided(vault, new_key=new_key())[0] == "put"
