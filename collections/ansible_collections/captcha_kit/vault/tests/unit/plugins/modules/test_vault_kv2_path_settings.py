# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_kv2_path_settings: check-and-set and the version limit per path, the mount untouched."""

from __future__ import annotations

from ansible_collections.captcha_kit.vault.plugins.modules import vault_kv2_path_settings

MAIN = vault_kv2_path_settings.main
PATHS = ["captchaai/dev", "captchaai-staged/dev"]
KIT = {"cas_required": True, "max_versions": 10}


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_kv2_path_settings) == []


def test_paths_without_a_secret_get_the_settings_and_the_mount_stays(vault, run):
    vault.add_mount("secret")
    mount_before = dict(vault.kv2_config["secret"])
    result = run(MAIN, paths=PATHS, diff=True)
    assert result["changed"] is True
    assert result["changed_paths"] == PATHS
    assert result["diff"] == {"before": dict.fromkeys(PATHS), "after": dict.fromkeys(PATHS, KIT)}
    assert [name for name, _ in vault.writes] == ["adapter.post"] * 2
    assert vault.kv2_config["secret"] == mount_before
    again = run(MAIN, paths=PATHS)
    assert again["changed"] is False
    assert again["changed_paths"] == []


def test_only_the_path_that_differs_is_written(vault, run):
    vault.add_mount("secret")
    run(MAIN, paths=PATHS)
    vault.kv2_path_settings[("secret", "captchaai/dev")]["cas_required"] = False
    vault.writes.clear()
    result = run(MAIN, paths=PATHS, diff=True)
    assert result["changed_paths"] == ["captchaai/dev"]
    assert result["diff"]["before"] == {
        "captchaai/dev": {"cas_required": False, "max_versions": 10}
    }
    assert len(vault.writes) == 1


def test_check_mode_writes_nothing(vault, run):
    vault.add_mount("secret")
    result = run(MAIN, paths=PATHS, check_mode=True)
    assert result["changed"] is True
    assert vault.writes == []


def test_bad_input_fails_before_any_call(vault, run):
    vault.add_mount("secret")
    assert run(MAIN, paths=PATHS, max_versions=-1)["msg"] == "max_versions must not be negative"
    assert run(MAIN, paths=["/"])["msg"] == "paths must not contain an empty path"
    assert vault.writes == []
