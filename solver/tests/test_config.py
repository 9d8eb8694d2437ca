import json
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from captcha_solver.config import (
    DEFAULT_FIRST_POLL_DELAY,
    ConfigError,
    load_config,
    parse_config,
    render_config,
)

CONTRACT_TOML = """
env = "dev"
[vault]
addrs = ["https://127.0.0.1:18200"]
ca_file = "/etc/captcha-solver/vault-ca.pem"
approle_mount = "approle"
role_id_file = "/etc/captcha-solver/role-id"
secret_id_file = "/var/lib/captcha-solver/secret-id"                 # 0600, written by the worker
wrapped_secret_id_file = "/var/lib/captcha-solver/secret-id.wrapped" # single-use wrapping token
kv_mount = "secret"
key_path = "captchaai/dev"
refresh_interval = 300.0
refresh_jitter = 0.1
max_staleness = 3600.0
[provider]
url = "https://ocr.captchaai.com"
[server]
host = "127.0.0.1"
port = 18401
[logging]
format = "json"
level = "INFO"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_contract_example_parses(tmp_path):
    cfg = load_config(_write(tmp_path, CONTRACT_TOML), environ={})
    assert cfg.env == "dev"
    assert cfg.vault.addrs == ("https://127.0.0.1:18200",)
    assert cfg.vault.ca_file == Path("/etc/captcha-solver/vault-ca.pem")
    assert cfg.vault.secret_id_accessor_file == Path("/var/lib/captcha-solver/secret-id.accessor")
    assert cfg.vault.refresh_interval == 300.0
    assert cfg.server.port == 18401
    assert cfg.logging.level == "INFO"
    assert cfg.provider.first_poll_delay_for("userrecaptcha") == 15.0
    assert cfg.provider.first_poll_delay_for("base64") == 5.0
    assert cfg.provider.first_poll_delay_for("unknown") == DEFAULT_FIRST_POLL_DELAY["default"]


def test_key_path_defaults_from_env(tmp_path):
    text = CONTRACT_TOML.replace('key_path = "captchaai/dev"\n', "").replace(
        '"dev"', '"staging"', 1
    )
    cfg = load_config(_write(tmp_path, text), environ={})
    assert cfg.vault.key_path == "captchaai/staging"


def test_environment_overrides(tmp_path):
    env = {
        "CAPTCHA_SOLVER_ENV": "prod",
        "CAPTCHA_SOLVER_VAULT_ADDRS": "https://127.0.0.1:18210,https://127.0.0.1:18220",
        "CAPTCHA_SOLVER_VAULT_REFRESH_INTERVAL": "60",
        "CAPTCHA_SOLVER_SERVER_PORT": "18402",
        "CAPTCHA_SOLVER_LOGGING_LEVEL": "debug",
        "CAPTCHA_SOLVER_PROVIDER_FIRST_POLL_DELAY": '{"userrecaptcha": 18}',
        "CAPTCHA_SOLVER_CONFIG": "/ignored",
        "UNRELATED": "x",
    }
    cfg = load_config(_write(tmp_path, CONTRACT_TOML), environ=env)
    assert cfg.env == "prod"
    assert cfg.vault.addrs == ("https://127.0.0.1:18210", "https://127.0.0.1:18220")
    assert cfg.vault.refresh_interval == 60.0
    assert cfg.server.port == 18402
    assert cfg.logging.level == "DEBUG"
    assert cfg.provider.first_poll_delay_for("userrecaptcha") == 18.0
    assert cfg.provider.first_poll_delay_for("base64") == 5.0


@pytest.mark.parametrize(
    ("mutation", "field"),
    [
        (
            ('addrs = ["https://127.0.0.1:18200"]', 'addrs = ["http://127.0.0.1:18200"]'),
            "vault.addrs[0]",
        ),
        (('addrs = ["https://127.0.0.1:18200"]', "addrs = []"), "vault.addrs"),
        (("refresh_interval = 300.0", "refresh_interval = 0"), "vault.refresh_interval"),
        (("refresh_interval = 300.0", 'refresh_interval = "soon"'), "vault.refresh_interval"),
        (("refresh_jitter = 0.1", "refresh_jitter = 2"), "vault.refresh_jitter"),
        (("port = 18401", "port = 70000"), "server.port"),
        (('host = "127.0.0.1"', 'host = "0.0.0.0"'), "server.host"),
        (('format = "json"', 'format = "xml"'), "logging.format"),
        (('url = "https://ocr.captchaai.com"', 'url = "ftp://x"'), "provider.url"),
        (('kv_mount = "secret"', 'kv_mount = "secret"\nkv_mount_typo = 1'), "vault.kv_mount_typo"),
        (
            ('role_id_file = "/etc/captcha-solver/role-id"', 'role_id_file = "role-id"'),
            "vault.role_id_file",
        ),
        (('role_id_file = "/etc/captcha-solver/role-id"', ""), "vault.role_id_file"),
        (('env = "dev"', 'env = "Dev Env"'), "env"),
        (('env = "dev"', ""), "env"),
        # Plain http sends the key in clear: only to a loopback address (an emulator, a proxy).
        (('url = "https://ocr.captchaai.com"', 'url = "http://ocr.captchaai.com"'), "provider.url"),
        (('url = "https://ocr.captchaai.com"', 'url = "http://10.0.0.5:8080"'), "provider.url"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, mutation, field):
    old, new = mutation
    assert old in CONTRACT_TOML
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, CONTRACT_TOML.replace(old, new, 1)), environ={})
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_unknown_environment_override_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, CONTRACT_TOML), environ={"CAPTCHA_SOLVER_VAULT_ADDR": "x"})
    assert err.value.field == "CAPTCHA_SOLVER_VAULT_ADDR"


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "env = "), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", environ={})


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config({"env": "dev", "vaults": {}}, environ={})
    assert err.value.field == "vaults"


def test_first_poll_delay_table_with_default_replaces_builtins():
    base = {
        "env": "dev",
        "vault": {"addrs": ["https://v:8200"], "role_id_file": "/r", "secret_id_file": "/s"},
        "provider": {
            "url": "http://127.0.0.1:18300",
            "first_poll_delay": {"default": 0.2, "base64": 1},
        },
    }
    cfg = parse_config(base, environ={})
    assert cfg.provider.first_poll_delay_for("hcaptcha") == 0.2
    assert cfg.provider.first_poll_delay_for("base64") == 1.0
    base["provider"]["first_poll_delay"] = {"userrecaptcha": 20}
    cfg = parse_config(base, environ={})
    assert cfg.provider.first_poll_delay_for("userrecaptcha") == 20.0
    assert cfg.provider.first_poll_delay_for("hcaptcha") == 15.0


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:18300", "http://localhost:8080", "http://[::1]:80", "https://x.example"],
)
def test_provider_url_plain_http_only_to_loopback(url):
    base = {
        "env": "dev",
        "vault": {"addrs": ["https://v:8200"], "role_id_file": "/r", "secret_id_file": "/s"},
        "provider": {"url": url},
    }
    assert parse_config(base, environ={}).provider.url == url


def test_provider_url_plain_http_elsewhere_says_why():
    base = {
        "env": "dev",
        "vault": {"addrs": ["https://v:8200"], "role_id_file": "/r", "secret_id_file": "/s"},
        "provider": {"url": "http://ocr.captchaai.com"},
    }
    with pytest.raises(ConfigError, match="in clear") as err:
        parse_config(base, environ={})
    assert err.value.field == "provider.url"


def _document() -> dict:
    return {
        "env": "prod",
        "vault": {
            "addrs": ["https://127.0.0.1:18250"],
            "role_id_file": "/etc/captcha-solver/role-id",
            "secret_id_file": "/var/lib/captcha-solver/secret-id",
            "refresh_interval": 30.0,
        },
        "provider": {"url": "https://ocr.captchaai.com", "first_poll_delay": {"default": 4.0}},
        "server": {"port": 18401},
    }


def test_render_config_writes_what_load_config_reads(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(render_config(_document()))
    cfg = load_config(path, environ={})
    assert cfg == parse_config(_document(), environ={}, source=path)
    assert cfg.provider.first_poll_delay == {"default": 4.0}


def test_render_config_refuses_what_would_not_load():
    doc = _document()
    doc["vault"]["refresh_interval"] = -1
    with pytest.raises(ConfigError, match=r"vault\.refresh_interval"):
        render_config(doc)


# --------------------------------------------------------------------------- server.token_file


def _token_file(tmp_path: Path, text: str, mode: int = 0o640) -> Path:
    path = tmp_path / "api-token"
    path.write_text(text)
    path.chmod(mode)
    return path


class _Raised:
    def __init__(self, value: ConfigError) -> None:
        self.value = value


def _config_error_as_nobody(content: str, mode: int) -> tuple[Path, _Raised]:
    """Root reads any file, so read the token file as ``nobody``, the way the service user reads
    it: the file (``content``, ``mode``, owned by nobody) in a directory anyone may enter, read
    by a child process that has become nobody. The ConfigError it raised, from its report."""
    nobody = pwd.getpwnam("nobody")
    directory = Path(tempfile.mkdtemp(prefix="token-file-"))
    directory.chmod(0o755)  # /tmp is open to all: only the file's own mode may refuse
    path = _token_file(directory, content, mode)
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    cfg = parse_config(_server(directory, token_file=str(path)), environ={})
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, read, report the error's field and message
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                cfg.server.read_token()
                report: dict = {"raised": None}
            except ConfigError as exc:
                report = {"raised": [exc.field, str(exc).removeprefix(f"{exc.field}: ")]}
            os.write(wfd, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    os.waitpid(pid, 0)
    shutil.rmtree(directory)
    assert report.get("raised"), f"no ConfigError as nobody: {report}"
    return path, _Raised(ConfigError(*report["raised"]))


def _server(tmp_path: Path, **server: object) -> dict:
    return {
        "env": "dev",
        "vault": {"addrs": ["https://v:8200"], "role_id_file": "/r", "secret_id_file": "/s"},
        "provider": {"url": "https://ocr.captchaai.com"},
        "server": server,
    }


def test_token_file_is_optional_and_read_as_a_masked_secret(tmp_path):
    import secrets

    from testkit.creds import assert_no_secrets

    from captcha_solver.secret import Secret

    assert parse_config(_server(tmp_path), environ={}).server.read_token() is None
    token = secrets.token_urlsafe(32)
    path = _token_file(tmp_path, token + "\n")
    cfg = parse_config(_server(tmp_path, token_file=str(path)), environ={})
    assert cfg.server.token_file == path
    secret = cfg.server.read_token()
    assert secret == Secret(token)  # stripped; a failure shows only ***<last 4>
    assert_no_secrets(f"{secret!r} {secret} {cfg!r}", [token])
    # The environment can set it like any other setting.
    env = {"CAPTCHA_SOLVER_SERVER_TOKEN_FILE": str(path)}
    assert parse_config(_server(tmp_path), environ=env).server.token_file == path


def test_token_file_must_be_an_absolute_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config(_server(tmp_path, token_file="api-token"), environ={})
    assert err.value.field == "server.token_file"


@pytest.mark.parametrize(
    ("content", "mode", "reason"),
    [
        (None, 0o640, "cannot read"),
        ("<directory>", 0o750, "cannot read"),
        ("", 0o640, "is empty"),
        ("  \n", 0o640, "is empty"),
        ("x" * 40, 0o000, "cannot read"),
        ("x" * 40, 0o644, "open to other users (mode 0644)"),
        ("x" * 40, 0o642, "open to other users"),
        ("short-one", 0o600, "16 to 4096 visible ASCII characters"),
        ("two words but long enough", 0o600, "without spaces"),
        ("a" * 20 + "\n" + "b" * 20, 0o600, "without spaces"),
        ("\u00e9" * 20, 0o600, "visible ASCII"),
        ("x" * 5000, 0o600, "16 to 4096"),
    ],
)
def test_a_bad_token_file_is_a_config_error_naming_the_setting(tmp_path, content, mode, reason):
    """Missing, empty, unreadable, open to other users, or not one token: each is refused
    with an error that names server.token_file and never quotes the file's content."""
    if content is None:
        path = tmp_path / "missing"
    elif content == "<directory>":
        path = tmp_path / "a-directory"
        path.mkdir(mode)
        content = None
    else:
        path = _token_file(tmp_path, content, mode)
    if mode == 0o000 and os.geteuid() == 0:
        path, err = _config_error_as_nobody(content, mode)
    else:
        cfg = parse_config(_server(tmp_path, token_file=str(path)), environ={})
        with pytest.raises(ConfigError) as raised:
            cfg.server.read_token()
        err = raised
    assert err.value.field == "server.token_file"
    assert str(err.value).startswith("server.token_file: ")
    assert str(path) in str(err.value)
    assert reason in str(err.value)
    for part in (content or "").split():
        assert part not in str(err.value).replace(str(path), "")


def test_a_token_of_4096_characters_is_the_longest(tmp_path):
    path = _token_file(tmp_path, "x" * 4096 + "\n", 0o600)
    cfg = parse_config(_server(tmp_path, token_file=str(path)), environ={})
    assert len(cfg.server.read_token() or "") == 4096
    path.write_text("x" * 4097)
    with pytest.raises(ConfigError, match="16 to 4096"):
        cfg.server.read_token()


def test_render_config_writes_the_token_file_setting(tmp_path):
    doc = _document()
    doc["server"]["token_file"] = "/etc/captcha-solver-client/api-token"
    doc["server"]["unix_socket"] = "/run/captcha-solver/solve.sock"
    path = tmp_path / "config.toml"
    path.write_text(render_config(doc))
    cfg = load_config(path, environ={})
    assert cfg.server.token_file == Path("/etc/captcha-solver-client/api-token")
    assert cfg.server.unix_socket == Path("/run/captcha-solver/solve.sock")
