# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""captcha_worker_probe through its real main(), on this machine's files, sockets and tools.
Its answers on a systemd host (unit state, service user, port owner) are proved by the
worker-host suites (tests/test_worker_*.py), which deploy through it."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
import yaml
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

LIBRARY = Path(__file__).resolve().parents[2] / "library" / "captcha_worker_probe.py"
_spec = importlib.util.spec_from_file_location("captcha_worker_probe", LIBRARY)
assert _spec is not None
assert _spec.loader is not None
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


@pytest.fixture
def files(tmp_path):
    names = ("secret_id", "accessor", "wrapped", "refused", "refused_accessor")
    return {name: tmp_path / name for name in names}


@pytest.fixture
def run(monkeypatch, capsys, files):
    """``run(**params) -> result`` of main(), with the paths of ``files`` and a free port."""
    monkeypatch.setattr(basic.AnsibleModule, "_log_invocation", lambda module: None)

    def _run(check_mode=False, **params):
        args = {
            "secret_id_file": str(files["secret_id"]),
            "accessor_file": str(files["accessor"]),
            "wrapped_file": str(files["wrapped"]),
            "refused_file": str(files["refused"]),
            "refused_accessor_file": str(files["refused_accessor"]),
            "port": 9,
            "service": "captcha-solver-unit-test",
            "user": "no-such-user-here",
            "_ansible_check_mode": check_mode,
            **params,
        }
        with patch_module_args(args), pytest.raises(SystemExit):
            probe.main()
        return json.loads(capsys.readouterr().out)

    return _run


def listening_socket():
    server = socket.create_server(("127.0.0.1", 0))
    return server, server.getsockname()[1]


def test_the_argument_spec_matches_the_documentation():
    documented = yaml.safe_load(probe.DOCUMENTATION)["options"]
    assert set(documented) == set(probe.OPTIONS)
    for name, spec in probe.OPTIONS.items():
        for field, default in (("type", "str"), ("required", False), ("default", None)):
            assert documented[name].get(field, default) == spec.get(field, default), name


def test_a_fresh_host_has_nothing(run):
    result = run()
    assert result["changed"] is False
    assert result["secret_id_present"] is False
    assert result["accessor"] == ""
    assert result["wrapped_pending"] is False
    assert result["wrapped_refused"] is False
    assert result["refused_accessor"] == ""
    assert result["service_uid"] is None
    assert result["vault_reachable"] == []


def test_files_and_accessors(run, files):
    files["secret_id"].write_text("never read\n")
    files["accessor"].write_text("  acc-current\n")
    files["wrapped"].write_text("never read either")
    files["refused"].write_text("spent")
    files["refused_accessor"].write_text("acc-refused\n")
    result = run()
    assert result["secret_id_present"] is True
    assert result["accessor"] == "acc-current"
    assert result["wrapped_pending"] is True
    assert result["wrapped_refused"] is True
    assert result["refused_accessor"] == "acc-refused"
    assert "never read" not in json.dumps(result)


def test_only_the_paths_that_exist_are_reported(run, tmp_path):
    """The socket's leftovers the role removes: a file, a directory, a dangling link, none."""
    (tmp_path / "entry.conf").write_text("d /run/x 0750\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    asked = [str(tmp_path / name) for name in ("entry.conf", "dir", "dangling", "absent")]
    assert run(paths=asked)["paths_present"] == asked[:3]
    assert run()["paths_present"] == []


def test_accessor_files_count_only_beside_their_token(run, files):
    """An accessor file without the secret-id (or refused token) it names is not reported."""
    files["accessor"].write_text("acc-orphan")
    files["refused_accessor"].write_text("acc-old")
    result = run()
    assert result["accessor"] == ""
    assert result["refused_accessor"] == ""


def test_the_listeners_on_the_port_and_the_service_user(run):
    server, port = listening_socket()
    with server:
        result = run(port=port, user="root")
    assert len(result["port_listeners"]) == 1
    assert f"127.0.0.1:{port}" in result["port_listeners"][0]
    assert "uid:" in result["port_listeners"][0] or "ino:" in result["port_listeners"][0]
    assert result["service_uid"] == "0"
    closed_server, closed = listening_socket()
    closed_server.close()
    assert run(port=closed)["port_listeners"] == []


def test_vault_addresses_that_accept_a_connection(run):
    server, port = listening_socket()
    closed_server, closed = listening_socket()
    closed_server.close()
    with server:
        result = run(
            vault_addrs=[f"https://127.0.0.1:{closed}", f"https://127.0.0.1:{port}"],
            connect_timeout=1,
        )
    assert result["vault_reachable"] == [f"https://127.0.0.1:{port}"]


def test_check_mode_answers_the_same(run, files):
    files["secret_id"].write_text("x")
    files["accessor"].write_text("acc")
    assert run(check_mode=True)["accessor"] == "acc"


def test_without_systemd_the_unit_is_not_asked(run, monkeypatch):
    monkeypatch.setattr(probe.os.path, "isdir", lambda path: False)
    result = run()
    assert result["service_mgr"] == "other"
    assert (result["main_pid"], result["control_group"], result["systemd_version"]) == ("0", "", 0)


def test_a_host_without_ss_fails_with_what_to_install(run, monkeypatch):
    real = basic.AnsibleModule.get_bin_path
    monkeypatch.setattr(
        basic.AnsibleModule,
        "get_bin_path",
        lambda self, name, *a, **kw: None if name == "ss" else real(self, name, *a, **kw),
    )
    result = run()
    assert result["failed"] is True
    assert result["msg"].startswith("ss (Debian: iproute2) is missing on the host")


def test_the_packages_dpkg_does_not_list_as_installed(run, monkeypatch):
    """dpkg is installed wherever dpkg-query runs; an unknown name and a pinned entry (left to
    apt) are missing; without dpkg-query every package is."""
    asked = ["no-such-package-here", "dpkg", "python3=3.11*"]
    assert run(packages=asked)["packages_missing"] == ["no-such-package-here", "python3=3.11*"]
    assert run()["packages_missing"] == []
    found = basic.AnsibleModule.get_bin_path

    def no_dpkg_query(self, name, *args, **kwargs):
        return None if name == "dpkg-query" else found(self, name, *args, **kwargs)

    monkeypatch.setattr(basic.AnsibleModule, "get_bin_path", no_dpkg_query)
    assert run(packages=["dpkg"])["packages_missing"] == ["dpkg"]
