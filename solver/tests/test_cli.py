import json
import subprocess
import sys

from captcha_solver.cli import EX_CONFIG, main

from .helpers import free_port


def _config(tmp_path, **extra):
    role = tmp_path / "role-id"
    role.write_text("role\n")
    (tmp_path / "state").mkdir()
    text = f"""
env = "dev"
[vault]
addrs = ["https://127.0.0.1:1"]
role_id_file = "{role}"
secret_id_file = "{tmp_path / "state" / "secret-id"}"
wrapped_secret_id_file = "{tmp_path / "state" / "secret-id.wrapped"}"
[provider]
url = "http://127.0.0.1:1"
[server]
port = {extra.get("port", 18401)}
"""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_check_config_reports_missing_secret_id(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["check-config", "--config", str(path)]) == EX_CONFIG
    out = json.loads(capsys.readouterr().out)
    assert out["env"] == "dev"
    assert any("secret_id_file" in p for p in out["problems"])
    (tmp_path / "state" / "secret-id.wrapped").write_text("s.x\n")
    assert main(["check-config", "--config", str(path)]) == 0


def test_invalid_config_exits_78_naming_the_field(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text('env = "dev"\n[vault]\naddrs = ["http://x"]\n')
    assert main(["check-config", "--config", str(path)]) == EX_CONFIG
    assert "vault.addrs[0]" in capsys.readouterr().err


def test_status_when_not_running(tmp_path, capsys):
    path = _config(tmp_path, port=free_port())
    assert main(["status", "--config", str(path)]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_console_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "captcha_solver", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("serve", "status", "solve", "check-config"):
        assert command in out
