import json
import subprocess
import sys

from captcha_solver.cli import EX_CONFIG, EX_TEMPFAIL, main

from .helpers import free_port, serve_once


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
{extra.get("vault_extra", "")}
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


def test_check_config_syntax_only_judges_the_file_alone(tmp_path, capsys):
    """How the role validates a new config before it replaces the old one (the files it names
    may not exist yet on a first deploy); a bad setting still exits 78 naming it."""
    path = _config(tmp_path)
    assert main(["check-config", "--syntax-only", "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    path.write_text(path.read_text().replace("[provider]", "[provider]\nrequest_timeuot = 30", 1))
    assert main(["check-config", "--syntax-only", "--config", str(path)]) == EX_CONFIG
    assert "provider.request_timeuot" in capsys.readouterr().err


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


def test_serve_without_a_key_by_the_startup_timeout_exits_75(tmp_path):
    """No Vault answering (a closed port): ``serve`` fails closed and exits 75 (EX_TEMPFAIL)
    with the Vault error, so that systemd's Restart=on-failure starts it again."""
    path = _config(tmp_path, port=free_port(), vault_extra="startup_timeout = 1.0\nretries = 1")
    (tmp_path / "state" / "secret-id").write_text("s\n")
    proc = serve_once(path)
    assert proc.returncode == EX_TEMPFAIL, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "captcha-solver: no key from Vault within 1s of start: vault unavailable: login:"
        " no Vault address answered (last: https://127.0.0.1:1: ConnectionError)"
    )
