# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""key_rotation_state: each action's plan, writes, check mode and diff against the in-memory
FakeVault, run through the module's real main() (argument spec, no_log, exit_json)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import requests
import yaml
from ansible.module_utils import _internal as ansible_internal
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.captcha_kit.vault.plugins.module_utils.contract import (
    DEFAULT_KV_MOUNT,
    KEY_PATTERN,
)
from ansible_collections.captcha_kit.vault.plugins.modules import key_rotation_state
from ansible_collections.captcha_kit.vault.tests.unit.plugins.modules.rotation_fakes import (
    KEY_PATH,
    STAGED_PATH,
    FakeVault,
    env_with_key,
    mid_rotation,
    new_key,
)
from hvac.exceptions import InvalidRequest

COLLECTION = Path(key_rotation_state.__file__).resolve().parents[2]


def _all_keys(vault):
    keys = set()
    for secret in vault.store.values():
        for version in secret.versions.values():
            data = version["data"]
            keys.update(k for k in [data.get("api_key"), *(data.get("backup_keys") or [])] if k)
    return keys


@pytest.fixture
def rotate(monkeypatch, capsys):
    """``rotate(vault, check_mode=False, diff=False, **params) -> result`` runs the module's
    main() on ``vault`` and returns what exit_json / fail_json printed. It fails the test when
    any key the vault holds (or held) or ``new_key`` appears in the result outside the fields
    ``return_keys`` asks for."""
    monkeypatch.setattr(basic.AnsibleModule, "_log_invocation", lambda module: None)
    # A module runs apart from the controller: once any test imported controller code (a filter
    # plugin imports ansible.errors), module warnings would go to the display, not the result.
    monkeypatch.setattr(ansible_internal, "is_controller", False)

    def run(vault, check_mode=False, diff=False, **params):
        monkeypatch.setattr(key_rotation_state, "get_client", lambda module: vault)
        keys = _all_keys(vault) | ({params["new_key"]} if params.get("new_key") else set())
        args = {"env": "dev", "url": "https://vault.test:8200", "token": "hvs.unit-test"}
        args.update(params, _ansible_check_mode=check_mode, _ansible_diff=diff)
        with patch_module_args(args), pytest.raises(SystemExit):
            key_rotation_state.main()
        result = json.loads(capsys.readouterr().out)
        shown = {k: v for k, v in result.items() if k not in ("staged_key", "previous_key")}
        text = json.dumps(shown)
        for key in keys | _all_keys(vault):
            assert key not in text, f"key …{key[-4:]} in the result"
        assert "hvs.unit-test" not in json.dumps(result)
        return result

    return run


# ---- the interface ------------------------------------------------------------------------
def test_the_argument_spec_matches_the_documentation():
    documented = yaml.safe_load(key_rotation_state.DOCUMENTATION)["options"]
    assert set(documented) == set(key_rotation_state.OPTIONS)
    for name, spec in key_rotation_state.OPTIONS.items():
        doc = documented[name]
        for field, default in (("type", "str"), ("required", False), ("default", None)):
            assert doc.get(field, default) == spec.get(field, default), f"{name}.{field}"
        assert doc.get("choices") == spec.get("choices"), f"{name}.choices"


def test_the_defaults_are_the_contract():
    assert key_rotation_state.OPTIONS["key_pattern"]["default"] == KEY_PATTERN
    assert key_rotation_state.OPTIONS["mount"]["default"] == DEFAULT_KV_MOUNT


def test_the_documentation_promises_diff_mode():
    doc = yaml.safe_load(key_rotation_state.DOCUMENTATION)
    assert "captcha_kit.vault.connection.changes" in doc["extends_documentation_fragment"]


def test_every_vault_module_of_the_collection_is_in_the_action_group():
    """The group is for module_defaults of the connection options: every module that takes them
    (the connection doc fragment) is in it, and only those (worker_healthz talks to a worker)."""
    runtime = yaml.safe_load((COLLECTION / "meta" / "runtime.yml").read_text())
    vault_modules = set()
    for path in (COLLECTION / "plugins" / "modules").glob("*.py"):
        module = importlib.import_module(
            f"ansible_collections.captcha_kit.vault.plugins.modules.{path.stem}"
        )
        fragments = yaml.safe_load(module.DOCUMENTATION).get("extends_documentation_fragment", [])
        if "captcha_kit.vault.connection" in fragments:
            vault_modules.add(path.stem)
    assert "worker_healthz" not in vault_modules
    assert set(runtime["action_groups"]["vault"]) == vault_modules


def test_an_env_name_outside_the_contract_fails_before_vault_is_asked(rotate):
    vault = env_with_key()
    result = rotate(vault, action="plan", env="Dev_1")
    assert result["failed"]
    assert result["msg"] == "Unknown environment 'Dev_1': not a valid name"


def test_an_env_without_a_key_is_unknown(rotate):
    result = rotate(FakeVault(), action="plan", env="ghost")
    assert result["msg"].startswith(
        "Unknown environment 'ghost': there is no key at secret/captchaai/ghost"
    )


def test_missing_rights_fail_the_plan_with_the_list(rotate):
    vault = env_with_key()
    vault.capabilities = {}
    result = rotate(vault, action="plan", new_key=new_key())
    assert result["failed"]
    assert len(result["missing_rights"]) == 9
    assert "current_version" not in result, "nothing was read"
    assert rotate(vault, action="plan", check_rights=False)["next"] == "need_key"


def test_a_refused_step_reports_the_state(rotate):
    result = rotate(env_with_key(), action="plan", new_key="NOT-A-KEY")
    assert result["failed"]
    assert "is malformed: it does not match the key pattern '^[0-9a-f]{32}$'" in result["msg"]
    assert result["current_version"] == 1
    assert result["candidate"]["format_ok"] is False


# ---- plan ------------------------------------------------------------------------------------
def test_plan_of_a_new_rotation(rotate):
    vault = env_with_key()
    key = new_key()
    result = rotate(vault, action="plan", new_key=key)
    assert result["changed"] is False
    assert result["next"] == "put"
    assert result["rotation_id"].startswith("dev-")
    assert result["target_version"] == 2
    assert result["candidate"]["fingerprint"] == "***" + key[-4:]
    assert result["plan"] == [
        f"write the variable key ***{key[-4:]} as version 2 (check-and-set on version 1)",
        f"record rotation {result['rotation_id']} as propagating in the custom_metadata of "
        "secret/captchaai/dev",
    ]
    assert "staged_key" not in result
    assert vault.writes == []


def test_plan_of_a_staged_key_mentions_its_deletion(rotate):
    vault = env_with_key()
    vault.put(STAGED_PATH, {"api_key": new_key()})
    result = rotate(vault, action="plan", key_source="staged")
    assert result["plan"][-1] == "delete the staged key at secret/captchaai-staged/dev"
    assert result["candidate"]["source"] == "staged"


def test_plan_hands_the_staged_key_over_only_when_asked(rotate):
    vault = env_with_key()
    staged = new_key()
    vault.put(STAGED_PATH, {"api_key": staged})
    assert "staged_key" not in rotate(vault, action="plan")
    assert rotate(vault, action="plan", return_keys=True)["staged_key"] == staged
    given = rotate(vault, action="plan", return_keys=True, new_key=new_key())
    assert "staged_key" not in given, "a key from new_key is the caller's own"


def test_plan_hands_nothing_over_when_there_is_nothing_to_put(rotate):
    vault, _, _ = mid_rotation("propagating")
    vault.put(STAGED_PATH, {"api_key": vault.key(2)})
    result = rotate(vault, action="plan", return_keys=True)
    assert result["next"] == "wait"
    assert "staged_key" not in result


@pytest.mark.parametrize(
    ("state", "params", "nxt", "steps"),
    [
        ("propagating", {}, "wait", ["nudge and wait until every worker reports version 2"]),
        (
            "awaiting_revocation",
            {},
            "confirm",
            ["ask for the confirmation that the old key was revoked at the provider"],
        ),
        (
            "awaiting_revocation",
            {"rollback": True},
            "rollback",
            ["write version 1 back as a new version; state rolled_back"],
        ),
        ("rolled_back", {"rollback": True}, "noop", ["nothing to do"]),
        ("complete", {}, "need_key", ["a new key is needed (variable, prompt or staged key)"]),
    ],
)
def test_plan_steps(rotate, state, params, nxt, steps):
    vault, _, _ = mid_rotation(state)
    result = rotate(vault, action="plan", **params)
    assert (result["next"], result["plan"]) == (nxt, steps)
    # The recorded rotation's id while it is the business at hand; none for a new rotation.
    assert result["rotation_id"] == ("" if state == "complete" else "dev-r1")
    assert vault.writes == []


def test_plan_in_check_mode_is_the_same_plan(rotate):
    vault = env_with_key()
    key = new_key()
    result = rotate(vault, check_mode=True, action="plan", new_key=key)
    assert result["next"] == "put"
    assert vault.writes == []


# ---- put ---------------------------------------------------------------------------------------
def test_put_writes_with_check_and_set_then_records_the_rotation(rotate):
    vault = env_with_key()
    old, key = vault.key(), new_key()
    result = rotate(
        vault, diff=True, action="put", new_key=key, rotation_id="dev-r9", actor="alice"
    )
    assert result["changed"] is True
    assert result["target_version"] == 2
    assert [w[0] for w in vault.writes] == ["write", "metadata"]
    assert vault.key() == key
    assert vault.store[("secret", KEY_PATH)].versions[2]["data"]["rotation_id"] == "dev-r9"
    record = vault.record()
    assert record["rotation_id"] == "dev-r9"
    assert record["rotation_state"] == "propagating"
    assert (record["previous_version"], record["new_version"]) == ("1", "2")
    assert record["actor"] == "alice"
    assert result["rotation_state"] == "propagating"
    before, after = json.loads(result["diff"]["before"]), json.loads(result["diff"]["after"])
    assert before == {"version": 1, "key": "***" + old[-4:]}
    assert after["key"] == "***" + key[-4:]
    assert after["rotation_state"] == "propagating"


def test_put_keeps_the_other_fields_of_the_version(rotate):
    backup = new_key()
    vault = FakeVault()
    vault.put(KEY_PATH, {"api_key": new_key(), "backup_keys": [backup]})
    rotate(vault, action="put", new_key=new_key(), rotation_id="dev-r9")
    assert vault.store[("secret", KEY_PATH)].versions[2]["data"]["backup_keys"] == [backup]


def test_put_in_check_mode_writes_nothing_and_shows_the_diff(rotate):
    vault = env_with_key()
    vault.put(STAGED_PATH, {"api_key": new_key()})
    ref = rotate(vault, action="plan")["candidate"]["staged_ref"]
    result = rotate(
        vault, check_mode=True, diff=True, action="put", rotation_id="dev-r9", staged_ref=ref
    )
    assert result["changed"] is True
    assert result["plan"] == [
        f"write {result['candidate']['fingerprint']} as version 2 with check-and-set on version 1",
        "record rotation dev-r9 as propagating",
    ]
    assert json.loads(result["diff"]["after"])["version"] == 2
    assert vault.writes == []
    assert vault.exists(STAGED_PATH)


def test_put_promotes_the_staged_key_and_deletes_it(rotate):
    vault = env_with_key()
    staged = new_key()
    vault.put(STAGED_PATH, {"api_key": staged})
    ref = rotate(vault, action="plan")["candidate"]["staged_ref"]
    result = rotate(vault, action="put", rotation_id="dev-r9", staged_ref=ref)
    assert vault.key() == staged
    assert not vault.exists(STAGED_PATH)
    assert result["staged_deleted"] is True
    assert result["plan"][-1] == "deleted the promoted staged key"


def test_the_staged_path_keeps_its_settings_after_the_promoted_key_is_deleted(rotate):
    """The delete takes the path's metadata with the key; what provisioning set on the path
    (check-and-set required, the version limit) is written back, so the stager's next write
    still needs check-and-set. A path with Vault's defaults gets no extra write."""
    provisioned = {"cas_required": True, "max_versions": 10, "delete_version_after": "0s"}
    vault = env_with_key()
    vault.secrets.kv.v2.update_metadata(STAGED_PATH, cas_required=True, max_versions=10)
    vault.put(STAGED_PATH, {"api_key": new_key()})
    ref = rotate(vault, action="plan")["candidate"]["staged_ref"]
    vault.writes.clear()
    rotate(vault, action="put", rotation_id="dev-r9", staged_ref=ref)
    assert [w[0] for w in vault.writes] == ["write", "metadata", "delete", "settings"]
    meta = vault.secrets.kv.v2.read_secret_metadata(STAGED_PATH)["data"]
    assert {name: meta[name] for name in provisioned} == provisioned
    assert meta["current_version"] == 0, "no staged key is left"
    with pytest.raises(InvalidRequest, match="check-and-set parameter required"):
        vault.secrets.kv.v2.create_or_update_secret(STAGED_PATH, {"api_key": new_key()})
    vault.secrets.kv.v2.create_or_update_secret(STAGED_PATH, {"api_key": new_key()}, cas=0)

    bare = env_with_key()
    bare.put(STAGED_PATH, {"api_key": new_key()})
    ref = rotate(bare, action="plan")["candidate"]["staged_ref"]
    rotate(bare, action="put", rotation_id="dev-r9", staged_ref=ref)
    assert [w[0] for w in bare.writes][-1] == "delete"
    assert not bare.exists(STAGED_PATH)


def test_put_again_for_the_same_rotation_writes_nothing_new(rotate):
    vault = env_with_key()
    key = new_key()
    rotate(vault, action="put", new_key=key, rotation_id="dev-r9")
    writes = list(vault.writes)
    again = rotate(vault, action="put", new_key=key, rotation_id="dev-r9")
    assert again["changed"] is False
    assert again["reason"] == "rotation dev-r9 already put version 2"
    assert vault.writes == writes
    assert vault.current_version() == 2


def test_a_rerun_finishes_the_deletion_of_the_promoted_staged_key(rotate):
    vault = env_with_key()
    staged = new_key()
    vault.put(STAGED_PATH, {"api_key": staged})
    ref = rotate(vault, action="plan")["candidate"]["staged_ref"]
    rotate(vault, action="put", rotation_id="dev-r9", staged_ref=ref)
    vault.put(STAGED_PATH, {"api_key": staged})  # as if the run died before the deletion
    again = rotate(vault, action="put", rotation_id="dev-r9")
    assert again["changed"] is True
    assert again["staged_deleted"] is True
    assert not vault.exists(STAGED_PATH)


def test_put_needs_a_rotation_id(rotate):
    result = rotate(env_with_key(), action="put", new_key=new_key())
    assert result["msg"] == "put needs rotation_id (from action=plan)"


def test_put_refuses_when_the_record_says_something_else(rotate):
    vault, _, _ = mid_rotation("propagating")
    result = rotate(vault, action="put", rotation_id="dev-other")
    assert result["msg"] == (
        "Cannot put for rotation dev-other: the recorded state says 'wait' "
        "(resuming rotation dev-r1 (propagating, version 1 -> 2))"
    )


def test_put_refuses_a_second_rotation_while_one_is_recorded(rotate):
    vault, _, _ = mid_rotation("propagating", written=False)
    result = rotate(vault, action="put", new_key=new_key(), rotation_id="dev-other")
    assert result["msg"] == (
        "Another rotation is in progress: rotation dev-r1 of dev is recorded (propagating); "
        "rotation dev-other wrote no version and nothing changed. Follow dev-r1, or roll it "
        "back before starting a new one"
    )


def test_put_resumes_a_rotation_whose_key_was_never_written(rotate):
    vault, _, _ = mid_rotation("propagating", written=False)
    key = new_key()
    result = rotate(vault, action="put", new_key=key, rotation_id="dev-r1")
    assert result["changed"] is True
    assert vault.key() == key
    assert vault.record()["started_at"] == "2026-01-01T00:00:00Z", "the first start is kept"


def test_a_lost_check_and_set_is_a_concurrent_rotation(rotate):
    """Another run writes its key (and records its rotation) between this run's read and its
    check-and-set write: this run writes no version and no record."""
    vault = env_with_key(owner="ops")
    other = new_key()
    theirs = {"owner": "ops", "rotation_id": "dev-other", "rotation_state": "propagating"}

    def concurrent_rotation(mount_point, path):
        vault.before_write = lambda *_: None
        vault.set_record(theirs)
        vault.put(KEY_PATH, {"api_key": other})

    vault.before_write = concurrent_rotation
    result = rotate(vault, action="put", new_key=new_key(), rotation_id="dev-r9")
    assert result["failed"]
    assert result["msg"] == (
        "Concurrent rotation refused: secret/captchaai/dev moved from version 1 to 2 while "
        "this run prepared rotation dev-r9 (check-and-set failed; the new version is another "
        f"run's); Vault holds version 2 (***{other[-4:]}) of secret/captchaai/dev, "
        "recorded rotation dev-other (propagating); this run wrote no version and no record"
    )
    assert vault.key() == other
    assert vault.record() == theirs


@pytest.mark.parametrize(
    "error",
    [RuntimeError("disk full"), requests.exceptions.ConnectionError("Connection aborted")],
    ids=["disk_full", "connection_dropped"],
)
def test_a_failed_write_writes_no_record_and_says_what_vault_holds(rotate, error):
    vault = env_with_key(owner="ops")
    old = vault.key()

    def broken(mount_point, path):
        raise error

    vault.before_write = broken
    result = rotate(vault, action="put", new_key=new_key(), rotation_id="dev-r9")
    assert result["msg"] == (
        f"Cannot write the new key to secret/captchaai/dev: {error}; Vault holds version 1 "
        f"(***{old[-4:]}) of secret/captchaai/dev, recorded rotation none (none); this "
        "run wrote no version and no record"
    )
    assert vault.record() == {"owner": "ops"}
    assert vault.writes == [], "the record is written only after the key"
    assert vault.current_version() == 1


# ---- put: only the validated staged key; the truth after a lost answer ----------------------
def _restage(vault, key, *, recreate):
    """Stage ``key`` again: over the old one, or (``recreate``) after deleting the path, so the
    staged secret is at version 1 again, like a stager who followed the docs."""
    if recreate:
        del vault.store[("secret", STAGED_PATH)]
    vault.put(STAGED_PATH, {"api_key": key})


@pytest.mark.parametrize("recreate", [False, True], ids=["overwritten", "deleted_and_staged"])
def test_a_staged_key_changed_after_the_plan_is_not_put(rotate, recreate):
    vault = env_with_key()
    vault.put(STAGED_PATH, {"api_key": new_key()})
    plan = rotate(vault, action="plan", key_source="staged", return_keys=True)
    ref = plan["candidate"]["staged_ref"]
    swapped = new_key()  # never validated
    _restage(vault, swapped, recreate=recreate)
    writes = list(vault.writes)
    result = rotate(
        vault, action="put", key_source="staged", rotation_id=plan["rotation_id"], staged_ref=ref
    )
    assert result["failed"]
    assert result["msg"].startswith(
        f"The staged key changed after it was validated: plan checked the staged write {ref}, "
        "secret/captchaai-staged/dev now holds v"
    )
    assert f"(***{swapped[-4:]}). Nothing put; nothing changed." in result["msg"]
    assert vault.writes == writes
    assert vault.current_version() == 1
    assert vault.record() == {}
    assert vault.key(path=STAGED_PATH) == swapped, "the staged key is left for the next run"


def test_a_staged_put_without_the_plans_ref_is_refused(rotate):
    vault = env_with_key()
    vault.put(STAGED_PATH, {"api_key": new_key()})
    result = rotate(vault, action="put", key_source="staged", rotation_id="dev-r9")
    assert result["msg"].startswith("put of a staged key needs staged_ref")
    assert vault.current_version() == 1


def test_a_write_that_landed_but_lost_its_answer_is_recognised(rotate):
    """The connection drops after Vault applied the write; the client's retry then loses the
    check-and-set to that first attempt. The put reads back, finds its own key in the version
    it meant to write and carries on: not a concurrent rotation, no second version."""
    vault = env_with_key()
    key = new_key()

    def retried_after_a_drop(mount_point, path):
        vault.after_write = lambda *_: None
        raise InvalidRequest("check-and-set parameter did not match the current version")

    vault.after_write = retried_after_a_drop
    result = rotate(vault, action="put", new_key=key, rotation_id="dev-r9")
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    assert result["target_version"] == 2
    assert vault.current_version() == 2
    assert vault.key() == key
    assert vault.record()["rotation_id"] == "dev-r9"
    assert vault.record()["rotation_state"] == "propagating"
    assert (
        "the write landed although its answer was lost (InvalidRequest): read back version 2, "
        f"which holds this run's key ***{key[-4:]}"
    ) in result["plan"]


def test_the_run_that_read_first_but_put_second_writes_nothing(rotate):
    """Two runs read version 1; one puts version 2; the other, with what it read, then puts: it
    loses the check-and-set having written nothing, and the winner's record stays (the loser
    used to record its rotation first and so replaced the winner's record)."""
    vault = env_with_key()
    winner = new_key()

    def the_other_run_puts_first(mount_point, path):
        vault.before_write = lambda *_: None
        assert rotate(vault, action="put", new_key=winner, rotation_id="dev-first")["changed"]

    vault.before_write = the_other_run_puts_first
    result = rotate(vault, action="put", new_key=new_key(), rotation_id="dev-second")
    assert result["msg"].startswith("Concurrent rotation refused")
    assert vault.key() == winner
    assert vault.record()["rotation_id"] == "dev-first"
    assert [w[0] for w in vault.writes] == ["write", "metadata"], "the winner's writes only"


def _cut_off_after_the_write(rotation_id="dev-r7"):
    """A run that wrote version 2 (its data naming ``rotation_id``) and was cut off before its
    record: the record still says the previous rotation, complete at version 1."""
    old, new = new_key(), new_key()
    vault = FakeVault()
    vault.put(KEY_PATH, {"api_key": old})
    vault.set_record({"rotation_id": "dev-r0", "rotation_state": "complete", "new_version": "1"})
    vault.put(KEY_PATH, {"api_key": new, "rotation_id": rotation_id})
    return vault, old, new


def test_a_run_cut_off_before_its_record_is_resumed_from_the_version(rotate):
    vault, old, new = _cut_off_after_the_write()
    plan = rotate(vault, action="plan")
    assert (plan["next"], plan["rotation_id"]) == ("wait", "dev-r7")
    assert plan["rotation"]["previous_version"] == "1"
    assert plan["rotation"]["actor"] == "unrecorded (record rebuilt from version 2)"
    assert vault.writes == [], "plan reads only"
    # Another key is a second rotation while this one is in progress.
    other = rotate(vault, action="plan", new_key=new_key())
    assert other["msg"].startswith("Another rotation is in progress: rotation dev-r7")
    # The put of that rotation again writes its record, not a second version.
    put = rotate(vault, action="put", new_key=new, rotation_id="dev-r7")
    assert put["changed"] is True
    assert "record rotation dev-r7 as propagating (its record was never written)" in put["plan"]
    assert vault.current_version() == 2
    assert [w[0] for w in vault.writes] == ["metadata"]
    assert vault.record()["rotation_state"] == "propagating"
    assert rotate(vault, action="mark", rotation_id="dev-r7")["changed"] is True
    assert vault.record()["rotation_state"] == "awaiting_revocation"
    rolled = rotate(vault, action="rollback", rotation_id="dev-r7")
    assert rolled["target_version"] == 3
    assert vault.key() == old


# ---- put with defer_record, then record ------------------------------------------------------
def _unreachable_after_the_write(vault):
    """Once the check-and-set is answered, every further request fails (a raft election)."""

    def down(*args, **kwargs):
        raise requests.exceptions.ConnectionError("no active node")

    def go_down(mount_point, path):
        kv = vault.secrets.kv.v2
        for name in (
            "read_secret_metadata",
            "read_secret_version",
            "delete_metadata_and_all_versions",
        ):
            setattr(kv, name, down)
        vault.adapter.post = down
        vault.auth.token.lookup_self = down

    vault.after_write = go_down


def test_a_deferred_put_asks_vault_nothing_once_the_write_is_answered(rotate):
    vault = env_with_key()
    old, key = vault.key(), new_key()
    vault.put(STAGED_PATH, {"api_key": key})
    ref = rotate(vault, action="plan")["candidate"]["staged_ref"]
    _unreachable_after_the_write(vault)
    result = rotate(vault, action="put", rotation_id="dev-r9", staged_ref=ref, defer_record=True)
    assert result["changed"] is True
    assert (result["record_deferred"], result["staged_deleted"]) == (True, False)
    assert isinstance(result["written_at"], float)
    assert result["target_version"] == result["current_version"] == 2
    assert result["current_fingerprint"] == "***" + key[-4:]
    assert result["previous_fingerprint"] == "***" + old[-4:]
    assert result["rotation"]["previous_version"] == "1"
    assert (
        result["plan"][-1] == "record rotation dev-r9 as propagating: deferred to the record action"
    )
    assert [w[0] for w in vault.writes] == ["write"]
    assert vault.record() == {}
    assert vault.exists(STAGED_PATH)


def test_record_writes_what_the_deferred_put_left(rotate):
    vault = env_with_key()
    key = new_key()
    vault.put(STAGED_PATH, {"api_key": key})
    ref = rotate(vault, action="plan")["candidate"]["staged_ref"]
    rotate(vault, action="put", rotation_id="dev-r9", staged_ref=ref, defer_record=True)
    # Until it is recorded, the version stands for the record: another run waits its turn.
    other = rotate(vault, action="plan", new_key=new_key())
    assert other["msg"].startswith("Another rotation is in progress: rotation dev-r9")
    assert rotate(vault, action="record", rotation_id="dev-r8")["msg"] == (
        "Rotation dev-r8 is not the recorded rotation of dev (recorded: dev-r9); nothing changed"
    )
    assert rotate(vault, check_mode=True, action="record", rotation_id="dev-r9")["changed"]
    assert [w[0] for w in vault.writes] == ["write"]
    result = rotate(vault, diff=True, action="record", rotation_id="dev-r9", actor="alice")
    assert result["changed"] is True
    assert result["plan"] == [
        "record rotation dev-r9 as propagating",
        "delete the promoted staged key",
    ]
    assert json.loads(result["diff"]["after"])["actor"] == "alice"
    record = vault.record()
    assert (record["rotation_id"], record["rotation_state"], record["actor"]) == (
        "dev-r9",
        "propagating",
        "alice",
    )
    assert (record["previous_version"], record["new_version"]) == ("1", "2")
    assert not vault.exists(STAGED_PATH)
    writes = list(vault.writes)
    again = rotate(vault, action="record", rotation_id="dev-r9", actor="alice")
    assert (again["changed"], again["reason"]) == (False, "rotation dev-r9 is recorded already")
    assert vault.writes == writes
    assert rotate(vault, action="mark", rotation_id="dev-r9")["changed"] is True


def test_record_without_the_new_version_is_refused(rotate):
    vault, _, _ = mid_rotation("propagating", written=False)
    assert rotate(vault, action="record", rotation_id="dev-r1")["msg"] == (
        "Rotation dev-r1: the new version was never written; nothing changed"
    )
    assert vault.writes == []


def test_a_record_is_rebuilt_only_for_a_version_it_does_not_reach(rotate):
    # Rolled back: the data written back names the rollback's rotation, so the record stays.
    vault, _, _ = mid_rotation("awaiting_revocation")
    vault.store[("secret", KEY_PATH)].versions[1]["data"]["rotation_id"] = "dev-r0"
    rotate(vault, action="rollback", rotation_id="dev-r1")
    assert vault.store[("secret", KEY_PATH)].versions[3]["data"]["rotation_id"] == "dev-r1"
    plan = rotate(vault, action="plan")
    assert (plan["rotation_state"], plan["rotation"]["rotation_id"]) == ("rolled_back", "dev-r1")
    # A record written before its key (by a kit of before this order) is resumed as recorded.
    vault, _, _ = mid_rotation("propagating", written=False)
    vault.store[("secret", KEY_PATH)].versions[1]["data"]["rotation_id"] = "dev-r0"
    plan = rotate(vault, action="plan", new_key=new_key())
    assert (plan["next"], plan["rotation_id"]) == ("put", "dev-r1")
    # A version written by hand names no rotation: nothing is rebuilt, a new rotation starts.
    vault = env_with_key()
    vault.set_record({"rotation_id": "dev-r0", "rotation_state": "complete", "new_version": "1"})
    vault.put(KEY_PATH, {"api_key": new_key()})
    plan = rotate(vault, action="plan", new_key=new_key())
    assert (plan["next"], plan["rotation_state"]) == ("put", "complete")


# ---- mark ----------------------------------------------------------------------------------
def test_mark_moves_to_awaiting_revocation_with_a_true_diff(rotate):
    vault, _, _ = mid_rotation("propagating")
    result = rotate(vault, diff=True, action="mark", rotation_id="dev-r1")
    assert result["changed"] is True
    assert result["rotation_state"] == "awaiting_revocation"
    assert vault.record()["converged_at"]
    before, after = json.loads(result["diff"]["before"]), json.loads(result["diff"]["after"])
    assert before["rotation_state"] == "propagating"
    assert after["rotation_state"] == "awaiting_revocation"
    assert "converged_at" in after


def test_mark_in_check_mode_writes_nothing(rotate):
    vault, _, _ = mid_rotation("propagating")
    result = rotate(vault, check_mode=True, action="mark", rotation_id="dev-r1")
    assert result["changed"] is True
    assert vault.writes == []
    assert vault.record()["rotation_state"] == "propagating"


def test_mark_again_is_a_noop(rotate):
    vault, _, _ = mid_rotation("awaiting_revocation")
    result = rotate(vault, action="mark", rotation_id="dev-r1")
    assert result["changed"] is False
    assert vault.writes == []


@pytest.mark.parametrize(
    ("state", "written", "rid", "msg"),
    [
        (
            "propagating",
            False,
            "dev-r1",
            "Rotation dev-r1: the new version was never written; nothing changed",
        ),
        (
            "propagating",
            True,
            "dev-r2",
            "Rotation dev-r2 is not the recorded rotation of dev (recorded: dev-r1); "
            "nothing changed",
        ),
        (
            "complete",
            True,
            "dev-r1",
            "Rotation dev-r1 of dev is complete, not propagating or awaiting_revocation; "
            "nothing changed",
        ),
        ("propagating", True, None, "mark needs rotation_id"),
    ],
)
def test_mark_refusals(rotate, state, written, rid, msg):
    vault, _, _ = mid_rotation(state, written=written)
    assert rotate(vault, action="mark", rotation_id=rid)["msg"] == msg
    assert vault.writes == []


# ---- rollback ----------------------------------------------------------------------------------
def test_rollback_writes_the_previous_key_back_as_a_new_version(rotate):
    vault, old, _ = mid_rotation("awaiting_revocation")
    result = rotate(vault, diff=True, action="rollback", rotation_id="dev-r1")
    assert result["changed"] is True
    assert result["target_version"] == 3
    assert vault.key() == old
    assert vault.record()["rotation_state"] == "rolled_back"
    assert result["plan"] == [
        "write version 1's data back as version 3 (check-and-set on version 2)",
        "mark rotation dev-r1 rolled_back",
    ]
    assert json.loads(result["diff"]["after"])["key"] == "***" + old[-4:]


def test_rollback_takes_the_recorded_rotation_when_none_is_given(rotate):
    vault, old, _ = mid_rotation("propagating")
    result = rotate(vault, action="rollback")
    assert result["rotation_id"] == "dev-r1"
    assert vault.key() == old


def test_rollback_in_check_mode_writes_nothing(rotate):
    vault, _, new = mid_rotation("propagating")
    result = rotate(vault, check_mode=True, action="rollback", rotation_id="dev-r1")
    assert result["target_version"] == 3
    assert vault.writes == []
    assert vault.key() == new


def test_rollback_of_an_unwritten_key_only_marks_it(rotate):
    vault, _, _ = mid_rotation("propagating", written=False)
    result = rotate(vault, action="rollback", rotation_id="dev-r1")
    assert result["plan"][0] == "version 1 already holds the previous key"
    assert [w[0] for w in vault.writes] == ["metadata"]


def test_rollback_again_is_a_noop(rotate):
    vault, _, _ = mid_rotation("rolled_back")
    result = rotate(vault, action="rollback", rotation_id="dev-r1")
    assert result["changed"] is False
    assert result["reason"] == "rotation dev-r1 is already rolled back"


def test_rollback_after_finalize_is_refused(rotate):
    vault, _, _ = mid_rotation("complete")
    result = rotate(vault, action="rollback", rotation_id="dev-r1")
    assert result["msg"].startswith("Rollback refused: rotation dev-r1 was finalized at ")


def test_rollback_without_the_previous_version_is_impossible(rotate):
    vault, _, _ = mid_rotation("propagating")
    vault.store[("secret", KEY_PATH)].versions[1]["destroyed"] = True
    result = rotate(vault, action="rollback", rotation_id="dev-r1")
    assert result["msg"] == "Rollback impossible: version 1 is no longer held; nothing changed"


def test_rollback_refuses_a_key_path_moved_elsewhere(rotate):
    vault, _, _ = mid_rotation("propagating")
    vault.put(KEY_PATH, {"api_key": new_key()})
    result = rotate(vault, action="rollback", rotation_id="dev-r1")
    assert result["msg"] == (
        "Rollback refused: secret/captchaai/dev is at version 3, not the rotation's new "
        "version 2; nothing changed"
    )


# ---- finalize ------------------------------------------------------------------------------
def test_finalize_destroys_the_old_versions_and_completes(rotate):
    vault, _, _ = mid_rotation("awaiting_revocation")
    result = rotate(vault, diff=True, action="finalize", rotation_id="dev-r1")
    assert result["changed"] is True
    assert result["destroyed_versions"] == [1]
    assert vault.destroyed(1)
    assert not vault.destroyed(2)
    assert vault.record()["rotation_state"] == "complete"
    assert vault.record()["confirmed_at"]
    assert result["versions_held"] == [2]
    assert json.loads(result["diff"]["before"]) == {"held": [1, 2]}
    assert "previous_key" not in result


def test_finalize_hands_the_old_key_over_when_asked(rotate):
    vault, old, _ = mid_rotation("awaiting_revocation")
    result = rotate(vault, action="finalize", rotation_id="dev-r1", return_keys=True)
    assert result["previous_key"] == old
    assert vault.destroyed(1), "handed over, then destroyed"


def test_finalize_in_check_mode_writes_nothing(rotate):
    vault, _, _ = mid_rotation("awaiting_revocation")
    result = rotate(vault, check_mode=True, action="finalize", rotation_id="dev-r1")
    assert result["plan"] == [
        "destroy versions [1] of secret/captchaai/dev",
        "mark rotation dev-r1 complete",
    ]
    assert vault.writes == []


def test_finalize_again_is_a_noop(rotate):
    vault, _, _ = mid_rotation("complete")
    result = rotate(vault, action="finalize", rotation_id="dev-r1", return_keys=True)
    assert result["changed"] is False
    assert result["destroyed_versions"] == []
    assert "previous_key" not in result


def test_finalize_before_the_workers_converged_is_refused(rotate):
    vault, _, _ = mid_rotation("propagating")
    result = rotate(vault, action="finalize", rotation_id="dev-r1")
    assert result["msg"] == (
        "Rotation dev-r1 of dev is propagating, not awaiting_revocation; nothing changed"
    )
    assert vault.writes == []


def test_finalize_refuses_a_key_path_moved_elsewhere(rotate):
    vault, _, _ = mid_rotation("awaiting_revocation")
    vault.put(KEY_PATH, {"api_key": new_key()})
    result = rotate(vault, action="finalize", rotation_id="dev-r1")
    assert result["msg"] == "Rotation dev-r1: version 2 is not current; nothing changed"


# ---- a whole rotation ------------------------------------------------------------------------
def test_a_whole_rotation_plan_put_mark_finalize(rotate):
    vault = env_with_key()
    old = vault.key()
    staged = new_key()
    vault.put(STAGED_PATH, {"api_key": staged})
    plan = rotate(vault, action="plan", key_source="staged", return_keys=True)
    assert plan["staged_key"] == staged
    rid = plan["rotation_id"]
    ref = plan["candidate"]["staged_ref"]
    assert rotate(vault, action="put", key_source="staged", rotation_id=rid, staged_ref=ref)[
        "changed"
    ]
    assert rotate(vault, action="plan", key_source="staged")["next"] == "wait"
    assert rotate(vault, action="mark", rotation_id=rid)["changed"]
    assert rotate(vault, action="plan", confirm=True)["msg"] == (
        f"Confirmation refused: a confirmation names the rotation it confirms; rotation {rid} "
        f"of dev is awaiting_revocation: pass key_rotation_confirm_revoked={rid}; nothing changed"
    )
    confirmed = rotate(vault, action="plan", confirm_rotation=rid)
    assert (confirmed["next"], confirmed["confirmed"]) == ("confirm", True)
    done = rotate(vault, action="finalize", rotation_id=rid, return_keys=True)
    assert done["previous_key"] == old
    assert done["rotation"]["rotation_state"] == "complete"
    assert done["versions_held"] == [2]
    assert vault.key() == staged
    assert rotate(vault, action="plan", key_source="staged")["next"] == "noop"


# ---- census, who logged in, a refused staged key (issue 15) ---------------------------------
def test_census_names_the_live_holders_and_the_unnamed(rotate):
    vault = env_with_key()
    a = vault.add_secret_id("captcha-worker-dev", {"host": "w1", "env": "dev"})
    b = vault.add_secret_id("captcha-worker-dev", {"host": "gone", "env": "dev"})
    vault.add_secret_id("captcha-worker-dev", {"host": "old"}, "2001-01-01T00:00:00.123456789Z")
    c = vault.add_secret_id("captcha-worker-dev", {}, "0001-01-01T00:00:00Z")  # never expires
    vault.add_secret_id("captcha-worker-prod", {"host": "p1", "env": "prod"})
    result = rotate(vault, action="census")
    assert not result.get("failed"), result
    assert result["hosts"] == ["gone", "w1"]
    assert {h["accessor"] for h in result["holders"]} == {a, b}
    assert result["unnamed"] == [c]
    assert result["changed"] is False
    assert vault.writes == []


def test_census_of_a_role_without_secret_ids_is_empty(rotate):
    result = rotate(env_with_key(), action="census")
    assert (result["hosts"], result["holders"], result["unnamed"]) == ([], [], [])


def test_census_without_the_rights_names_them_and_the_token(rotate):
    vault = env_with_key()
    vault.capabilities = {}
    vault.auth.token.lookup_self = lambda: {
        "data": {"display_name": "approle", "meta": {"role_name": "captcha-rotator-dev"}}
    }
    result = rotate(vault, action="census")
    assert result["failed"]
    assert result["missing_rights"] == [
        "list on auth/approle/role/captcha-worker-dev/secret-id",
        "update on auth/approle/role/captcha-worker-dev/secret-id-accessor/lookup",
    ]
    assert "logged in with AppRole role captcha-rotator-dev" in result["msg"]


def _plan_as_rotator(rotate, role, capabilities):
    """The plan of a new rotation of dev with the token of AppRole ``role`` (its policy of the
    same name) holding ``capabilities``."""
    vault = FakeVault(
        capabilities=capabilities,
        display_name="approle",
        role_name=role,
        policies=["default", role],
    )
    vault.put(KEY_PATH, {"api_key": new_key()})
    return vault, rotate(vault, action="plan", new_key=new_key())


def test_a_token_of_another_env_is_refused_naming_its_role(rotate):
    _, result = _plan_as_rotator(rotate, "captcha-rotator-prod", {})
    assert result["failed"]
    assert result["msg"].startswith("The token lacks rotator rights for dev: missing ")
    assert (
        "The token in use is approle (logged in with AppRole role captcha-rotator-prod; "
        "policies captcha-rotator-prod)" in result["msg"]
    )
    assert "Use the captcha-rotator-dev AppRole or an admin token; nothing changed" in result["msg"]


def test_the_rotators_own_policy_without_a_right_is_named_as_out_of_date(rotate):
    """The env's rotator logs in but its policy in Vault lacks a right this kit needs (written
    by an older kit): the refusal says to provision again, not to use the rotator AppRole."""
    caps = {
        "secret/data/captchaai/dev": ["read", "update"],
        "secret/metadata/captchaai/dev": ["read", "update"],
        "secret/destroy/captchaai/dev": ["update"],
        "secret/data/captchaai-staged/dev": ["read", "delete"],
        "secret/metadata/captchaai-staged/dev": ["read", "delete"],
    }
    vault, result = _plan_as_rotator(rotate, "captcha-rotator-dev", caps)
    assert result["failed"]
    assert result["missing_rights"] == ["create on secret/metadata/captchaai-staged/dev"]
    assert result["msg"].endswith(
        "The captcha-rotator-dev policy in Vault lacks them: it is older than this kit or was "
        "changed by hand. Run playbooks/provision-vault.yml (with the provisioner token), which "
        "writes the policies again, then rotate; nothing changed"
    )
    assert vault.writes == []


def test_a_refused_staged_key_says_how_to_withdraw_or_replace_it(rotate):
    vault = env_with_key()
    vault.put(STAGED_PATH, {"api_key": "not-a-key"})  # pragma: allowlist secret
    result = rotate(vault, action="plan", key_source="staged")
    assert result["failed"]
    assert "is malformed" in result["msg"]
    assert "bao kv delete -mount=secret captchaai-staged/dev" in result["msg"]
    assert (
        '-cas="$(bao read -field=current_version secret/metadata/captchaai-staged/dev)" '
        "captchaai-staged/dev -" in result["msg"]
    )
    assert "validate_provider" not in result["msg"]
    good = new_key()
    vault.put(STAGED_PATH, {"api_key": good})  # replaced: the latest staged version counts
    plan = rotate(vault, action="plan", key_source="staged")
    assert plan["next"] == "put"
    assert "bao kv delete -mount=secret captchaai-staged/dev" in plan["staged_help"]


def test_a_withdrawn_staged_key_is_nothing_staged(rotate):
    vault = env_with_key()
    vault.put(STAGED_PATH, {"api_key": new_key()})
    secret = vault.store[("secret", STAGED_PATH)]
    secret.versions[secret.current]["deletion_time"] = "2026-01-01T00:00:00Z"  # bao kv delete
    plan = rotate(vault, action="plan", key_source="staged")
    assert plan["next"] == "noop"
    assert rotate(vault, action="plan")["next"] == "need_key"
