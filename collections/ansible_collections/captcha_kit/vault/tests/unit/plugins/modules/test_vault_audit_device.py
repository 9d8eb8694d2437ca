# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""vault_audit_device: make sure a device is on; never change one in place; refuse a device that
logs secrets (log_raw) or token accessors (hmac_accessor off) in clear text."""

from __future__ import annotations

import hvac.exceptions
import pytest
from ansible_collections.captcha_kit.vault.plugins.modules import vault_audit_device

MAIN = vault_audit_device.main
LOG = "/var/log/vault/audit.log"


def test_the_argument_spec_matches_the_documentation(spec_mismatches):
    assert spec_mismatches(vault_audit_device) == []


def test_an_absent_device_is_enabled_through_the_api(vault, run):
    result = run(MAIN, options={"file_path": LOG}, diff=True)
    assert result["changed"] is True
    assert result["devices"] == {"file/": "file"}
    assert result["diff"] == {"before": {"devices": {}}, "after": {"devices": {"file/": "file"}}}
    assert vault.writes == [
        (
            "sys.enable_audit_device",
            {
                "device_type": "file",
                "description": "",
                "options": {"file_path": LOG},
                "path": "file",
            },
        )
    ]


def test_check_mode_reports_the_device_it_would_enable_and_writes_nothing(vault, run):
    vault.add_audit_device("syslog", "syslog")
    result = run(MAIN, check_mode=True, diff=True, options={"file_path": LOG})
    assert result["changed"] is True
    assert result["devices"] == {"syslog/": "syslog", "file/": "file"}
    assert result["diff"]["before"] == {"devices": {"syslog/": "syslog"}}
    assert vault.writes == []


def test_option_values_are_sent_as_strings(vault, run):
    run(MAIN, path="/sock/", type="socket", options={"address": "127.0.0.1:9090", "mode": 600})
    [(_, sent)] = vault.writes
    assert sent["options"] == {"address": "127.0.0.1:9090", "mode": "600"}
    assert sent["path"] == "sock"


def test_an_enabled_device_is_no_change(vault, run):
    vault.add_audit_device(file_path=LOG)
    result = run(MAIN, options={"file_path": "/var/log/vault/../vault/audit.log"})
    assert result["changed"] is False
    assert result["devices"] == {"file/": "file"}
    assert result["warnings"] == []
    assert vault.writes == []


def test_a_device_with_other_options_is_left_as_it_is_with_a_warning(vault, run):
    vault.add_audit_device(file_path="/tmp/audit.log")  # noqa: S108 (a value compared, no file)
    result = run(MAIN, options={"file_path": LOG})
    assert result["changed"] is False
    assert result["warnings"] == [
        "Audit device file/ is enabled with other values of file_path; left as it is "
        "(audit devices cannot be changed in place)."
    ]
    assert vault.writes == []


def test_a_device_of_another_type_at_the_path_is_refused(vault, run):
    vault.add_audit_device("file", "syslog")
    result = run(MAIN, options={"file_path": LOG})
    assert result["failed"] is True
    assert result["msg"] == (
        "An audit device of type 'syslog' is enabled at file/, not 'file'. Nothing was changed."
    )
    assert result["devices"] == {"file/": "syslog"}


def test_a_file_device_needs_a_file_path_before_any_vault_call(vault, run):
    result = run(MAIN)
    assert result["failed"] is True
    assert result["msg"] == "options.file_path is required for a file audit device"
    assert vault.calls == []


def test_a_server_refusing_api_devices_gets_the_stanza_to_declare(vault, run):
    vault.audit_api_refused = True
    result = run(MAIN, description="kit audit", options={"file_path": LOG})
    assert result["failed"] is True
    assert result["msg"].startswith("The server refuses to enable audit devices through the API")
    assert (
        'audit "file" "file" {\n'
        '  description = "kit audit"\n'
        "  options {\n"
        f'    file_path = "{LOG}"\n'
        "  }\n"
        "}"
    ) in result["msg"]
    assert "managed_externally" in result["msg"]


def test_another_refusal_is_reported_as_a_vault_error(vault, run):
    vault.fail("sys.enable_audit_device", hvac.exceptions.Forbidden("permission denied"))
    result = run(MAIN, options={"file_path": LOG})
    assert result["failed"] is True
    assert result["msg"].startswith("Permission denied to enable the file audit device at file/")


def test_managed_externally_only_checks_that_one_device_is_on(vault, run):
    vault.add_audit_device("syslog", "syslog")
    result = run(MAIN, managed_externally=True)
    assert result == {
        "failed": False,
        "changed": False,
        "devices": {"syslog/": "syslog"},
        "warnings": [],
    }
    assert vault.writes == []


def test_managed_externally_without_any_device_fails(vault, run):
    result = run(MAIN, managed_externally=True)
    assert result["failed"] is True
    assert result["msg"].startswith("No audit device is enabled, and audit is marked as managed")
    assert vault.writes == []


# --------------------------------------------------------------------------- unsafe options
# The server answers options as strings, in the spelling they were given ("1" for a JSON true).
UNSAFE = [
    ({"log_raw": "1"}, "log_raw=1"),
    ({"log_raw": "true"}, "log_raw=true"),
    ({"log_raw": "T"}, "log_raw=T"),
    ({"hmac_accessor": "false"}, "hmac_accessor=false"),
    ({"hmac_accessor": "0"}, "hmac_accessor=0"),
    ({"log_raw": "True", "hmac_accessor": "f"}, "log_raw=True, hmac_accessor=f"),
    ({"log_raw": "maybe"}, "log_raw=maybe"),
]


@pytest.mark.parametrize(("options", "shown"), UNSAFE, ids=[u[1] for u in UNSAFE])
def test_the_kits_device_logging_in_clear_text_fails_and_nothing_changes(
    vault, run, options, shown
):
    vault.add_audit_device(file_path=LOG, **options)
    result = run(MAIN, options={"file_path": LOG})
    assert result["failed"] is True
    assert result["msg"].startswith(
        f"Audit devices that write secrets or token accessors in clear text: file/ ({shown}, "
        "the kit's device)."
    )
    assert result["msg"].endswith("Nothing was changed.")
    assert result["unsafe_devices"] == ["file/"]
    assert vault.writes == []


@pytest.mark.parametrize(
    "options",
    [{"log_raw": "false"}, {"log_raw": "0"}, {"hmac_accessor": "true"}, {"hmac_accessor": "1"}],
)
def test_the_safe_values_spelled_out_are_accepted(vault, run, options):
    vault.add_audit_device(file_path=LOG, **options)
    result = run(MAIN, options={"file_path": LOG})
    assert (result["failed"], result["changed"]) == (False, False)


def test_another_device_logging_in_clear_text_fails_before_the_kits_is_enabled(vault, run):
    """Every device receives every request: a raw log elsewhere holds the key too."""
    vault.add_audit_device("raw", "file", file_path="/srv/raw.log", log_raw="1")
    result = run(MAIN, options={"file_path": LOG})
    assert result["failed"] is True
    assert "clear text: raw/ (log_raw=1)." in result["msg"]
    assert vault.writes == []


def test_managed_externally_fails_on_a_device_logging_in_clear_text(vault, run):
    vault.add_audit_device(file_path=LOG)
    vault.add_audit_device("acc", "file", file_path="/srv/acc.log", hmac_accessor="false")
    result = run(MAIN, managed_externally=True)
    assert result["failed"] is True
    assert "clear text: acc/ (hmac_accessor=false)." in result["msg"]
    assert result["unsafe_devices"] == ["acc/"]


@pytest.mark.parametrize("options", [{"log_raw": True}, {"hmac_accessor": False}])
def test_unsafe_wanted_options_are_refused_before_any_vault_call(vault, run, options):
    result = run(MAIN, options={"file_path": LOG, **options})
    assert result["failed"] is True
    assert "would write secrets or token accessors in clear text" in result["msg"]
    assert vault.calls == []
