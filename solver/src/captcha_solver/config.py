"""Worker configuration: a TOML file without secrets, plus ``CAPTCHA_SOLVER_*`` overrides.

The schema is the one in ``docs/interfaces.md`` ("Worker (solver) contract"); the optional
tuning fields below it have defaults and are documented in ``solver/README.md``. Every
validation error names the field, e.g. ``vault.addrs[0]: must start with https://``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

from .contract import ENV_NAME_PATTERN, KEY_PATH_TEMPLATE
from .secret import Secret

DEFAULT_CONFIG_PATH = Path("/etc/captcha-solver/config.toml")
ENV_PREFIX = "CAPTCHA_SOLVER_"
CONFIG_PATH_ENV = "CAPTCHA_SOLVER_CONFIG"

DEFAULT_FIRST_POLL_DELAY: dict[str, float] = {
    "userrecaptcha": 15.0,
    "hcaptcha": 15.0,
    "turnstile": 10.0,
    "base64": 5.0,
    "post": 5.0,
    "default": 10.0,
}

_ENV_RE = re.compile(ENV_NAME_PATTERN)  # the kit's contract (contract.py)
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# server.token_file: one token of visible ASCII without spaces (what a Bearer header carries).
_TOKEN_RE = re.compile(r"[\x21-\x7e]{16,}")
_TOKEN_MAX_BYTES = 4096


class ConfigError(ValueError):
    """A configuration problem; ``field`` names the offending setting."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


# --------------------------------------------------------------------------- field parsers

T = TypeVar("T")
Parser = Callable[[str, Any], Any]


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(name, f"must be a non-empty string, got {type(value).__name__}")
    return value.strip()


def _path(name: str, value: Any) -> Path:
    text = _str(name, value)
    path = Path(text)
    if not path.is_absolute():
        raise ConfigError(name, f"must be an absolute path, got {text!r}")
    return path


def _float_in(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Parser:
    def parse(name: str, value: Any) -> float:
        if isinstance(value, bool):
            raise ConfigError(name, "must be a number, got bool")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(name, f"must be a number, got {value!r}") from None
        if not isinstance(value, int | float):
            raise ConfigError(name, f"must be a number, got {type(value).__name__}")
        number = float(value)
        if number != number or number < lo or (lo_open and number == lo):
            bound = f"> {lo}" if lo_open else f">= {lo}"
            raise ConfigError(name, f"must be {bound}, got {number}")
        if hi is not None and number > hi:
            raise ConfigError(name, f"must be <= {hi}, got {number}")
        return number

    return parse


def _int_in(lo: int, hi: int) -> Parser:
    def parse(name: str, value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value, 10)
            except ValueError:
                raise ConfigError(name, f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ConfigError(name, f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _choice(*choices: str, upper: bool = False) -> Parser:
    def parse(name: str, value: Any) -> str:
        text = _str(name, value)
        text = text.upper() if upper else text.lower()
        if text not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _url(*schemes: str) -> Parser:
    def parse(name: str, value: Any) -> str:
        text = _str(name, value).rstrip("/")
        if not any(text.startswith(f"{s}://") for s in schemes):
            need = " or ".join(f"{s}://" for s in schemes)
            raise ConfigError(name, f"must start with {need}, got {text!r}")
        return text

    return parse


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _provider_url(name: str, value: Any) -> str:
    """https://, or plain http:// to a loopback address only: the key travels in the body."""
    text: str = _url("https", "http")(name, value)
    if text.startswith("http://"):
        host = urllib.parse.urlsplit(text).hostname or ""
        if host not in _LOOPBACK_HOSTS:
            raise ConfigError(
                name,
                f"plain http:// to {host!r} would send the API key in clear: use https:// "
                "(http is allowed only to a loopback address, e.g. a local emulator or proxy)",
            )
    return text


def _addrs(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value:
        raise ConfigError(name, "must be a non-empty list of https:// addresses")
    https = _url("https")  # TLS verification is always on: plain http is refused
    return tuple(https(f"{name}[{i}]", item) for i, item in enumerate(value))


def _delays(name: str, value: Any) -> dict[str, float]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(name, 'must be a table, e.g. {"userrecaptcha": 15}') from None
    if not isinstance(value, dict):
        raise ConfigError(name, f"must be a table of method = seconds, got {type(value).__name__}")
    # A table with its own "default" replaces the built-in per-method values; one without
    # "default" adjusts only the methods it names.
    merged = {} if "default" in value else dict(DEFAULT_FIRST_POLL_DELAY)
    check = _float_in(0.0)
    for method, seconds in value.items():
        merged[str(method)] = check(f"{name}.{method}", seconds)
    return merged


def _host(name: str, value: Any) -> str:
    text = _str(name, value)
    if text == "localhost":
        return text
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(name, f"must be a loopback IP address, got {text!r}") from None
    if not address.is_loopback:
        raise ConfigError(name, f"must be a loopback address (the API is local only), got {text}")
    return text


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class VaultConfig:
    addrs: Annotated[tuple[str, ...], _addrs]
    role_id_file: Annotated[Path, _path]
    secret_id_file: Annotated[Path, _path]
    ca_file: Annotated[Path | None, _path] = None
    wrapped_secret_id_file: Annotated[Path | None, _path] = None
    approle_mount: Annotated[str, _str] = "approle"
    kv_mount: Annotated[str, _str] = "secret"
    key_path: Annotated[str, _str] = ""
    refresh_interval: Annotated[float, _float_in(0.0, lo_open=True)] = 300.0
    refresh_jitter: Annotated[float, _float_in(0.0, 0.9)] = 0.1
    max_staleness: Annotated[float, _float_in(0.0)] = 3600.0
    # > 0: no key read within this many seconds of start -> exit 75 (EX_TEMPFAIL) so that the
    # supervisor (systemd) restarts the worker; 0: keep running keyless and keep retrying.
    startup_timeout: Annotated[float, _float_in(0.0)] = 0.0
    timeout: Annotated[float, _float_in(0.0, lo_open=True)] = 5.0
    retries: Annotated[int, _int_in(1, 100)] = 3
    retry_delay: Annotated[float, _float_in(0.0)] = 0.5
    # For this many seconds after a SIGHUP (the rotation's nudge) a failed key read is retried
    # every retry_delay (+-50 %) instead of on the growing backoff: a rotation is waiting on this
    # worker, and a raft leader election is over in seconds. 0: no difference after a nudge.
    nudge_retry_window: Annotated[float, _float_in(0.0)] = 30.0
    # At most this many refused AppRole logins within login_refusal_window seconds; after that
    # no login is sent until the oldest refusal leaves the window. Vault and OpenBao lock a
    # role-id (shared by every worker of the env) after 5 refused logins within 15 minutes by
    # default, so one host with a bad secret-id must stay well under that.
    login_refusal_limit: Annotated[int, _int_in(1, 100)] = 2
    login_refusal_window: Annotated[float, _float_in(0.0)] = 960.0
    # Warn (journal, once an hour; /healthz "warnings") when the secret-id expires within this
    # many seconds: the deploy that re-issues it is overdue. Default: 7 days.
    secret_id_warn_before: Annotated[float, _float_in(0.0)] = 604800.0

    @property
    def secret_id_accessor_file(self) -> Path:
        return self.secret_id_file.with_name(self.secret_id_file.name + ".accessor")

    @property
    def secret_id_expiry_file(self) -> Path:
        """When the secret-id expires (not secret): an ISO 8601 UTC time, ``never``, or
        ``unknown`` (Vault refused the worker a lookup of an older secret-id's expiry)."""
        return self.secret_id_file.with_name(self.secret_id_file.name + ".expires")


@dataclass(frozen=True)
class ProviderConfig:
    url: Annotated[str, _provider_url]
    request_timeout: Annotated[float, _float_in(0.0, lo_open=True)] = 30.0
    task_timeout: Annotated[float, _float_in(0.0, lo_open=True)] = 180.0
    poll_interval: Annotated[float, _float_in(0.0, lo_open=True)] = 5.0
    # default (None): poll_interval / 5
    poll_tick: Annotated[float | None, _float_in(0.0, lo_open=True)] = None
    first_poll_delay: Annotated[Mapping[str, float], _delays] = field(
        default_factory=lambda: dict(DEFAULT_FIRST_POLL_DELAY)
    )
    max_in_flight: Annotated[int, _int_in(1, 100_000)] = 1000
    # in.php requests on the wire at once. A key the provider no longer accepts (revoked) costs
    # at most this many refused submits before the circuit opens: the others wait here and
    # never leave (CaptchaAI bans an address after about 20 bad-key requests a minute).
    max_submits_in_flight: Annotated[int, _int_in(1, 1_000)] = 8
    backoff_base: Annotated[float, _float_in(0.0, lo_open=True)] = 1.0
    backoff_max: Annotated[float, _float_in(0.0, lo_open=True)] = 30.0
    circuit_cooldown: Annotated[float, _float_in(0.0)] = 300.0
    zero_balance_cooldown: Annotated[float, _float_in(0.0)] = 600.0
    max_connections: Annotated[int, _int_in(1, 10_000)] = 32

    @property
    def effective_poll_tick(self) -> float:
        return self.poll_tick if self.poll_tick is not None else self.poll_interval / 5

    def first_poll_delay_for(self, method: str) -> float:
        delays = self.first_poll_delay
        return delays.get(method, delays.get("default", DEFAULT_FIRST_POLL_DELAY["default"]))


@dataclass(frozen=True)
class ServerConfig:
    host: Annotated[str, _host] = "127.0.0.1"
    port: Annotated[int, _int_in(1, 65535)] = 18401
    unix_socket: Annotated[Path | None, _path] = None
    # When set, POST /solve requires "Authorization: Bearer <this file's content>" (TCP and
    # the unix socket alike); read at start and on SIGHUP, never logged (read_token below).
    token_file: Annotated[Path | None, _path] = None
    shutdown_grace: Annotated[float, _float_in(0.0)] = 30.0

    def read_token(self) -> Secret | None:
        """The API token of ``token_file`` (None when unset), as a :class:`Secret`.

        A file that cannot be read, is empty, is open to other users (any "other" permission
        bit) or holds something else than one line of at least 16 visible ASCII characters
        without spaces is a :class:`ConfigError` naming ``server.token_file``; no message ever
        holds the file's content."""
        if self.token_file is None:
            return None
        name, path = "server.token_file", self.token_file
        try:
            with path.open("rb") as fh:
                mode = os.fstat(fh.fileno()).st_mode
                raw = fh.read(2 * _TOKEN_MAX_BYTES)  # a longer file is refused below anyway
        except OSError as exc:
            raise ConfigError(name, f"cannot read {path}: {exc.strerror or exc}") from None
        if mode & 0o007:
            raise ConfigError(
                name,
                f"{path} is open to other users (mode {mode & 0o7777:04o}): give it to the owner"
                " and the client group only (e.g. 0640)",
            )
        text = raw.decode("ascii", errors="replace").strip()
        if not text:
            raise ConfigError(name, f"{path} is empty")
        if len(text) > _TOKEN_MAX_BYTES or not _TOKEN_RE.fullmatch(text):
            raise ConfigError(
                name,
                f"{path} must hold one token of 16 to {_TOKEN_MAX_BYTES} visible ASCII"
                " characters without spaces",
            )
        return Secret(text)


@dataclass(frozen=True)
class LoggingConfig:
    format: Annotated[str, _choice("json", "text")] = "json"
    level: Annotated[str, _choice(*_LEVELS, upper=True)] = "INFO"


@dataclass(frozen=True)
class Config:
    env: str
    vault: VaultConfig
    provider: ProviderConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: Path | None = None


def _parsers(settings: type) -> dict[str, Parser]:
    """The settings of a section's dataclass and their parsers (``Annotated[type, parser]``)."""
    hints = get_type_hints(settings, include_extras=True)
    return {f.name: hints[f.name].__metadata__[0] for f in fields(settings)}


# A section's settings are its dataclass's fields; the ones without a default are required.
_SECTIONS = {
    "vault": VaultConfig,
    "provider": ProviderConfig,
    "server": ServerConfig,
    "logging": LoggingConfig,
}
_SCHEMA = {section: _parsers(settings) for section, settings in _SECTIONS.items()}
_REQUIRED = {
    section: tuple(
        f.name for f in fields(settings) if f.default is MISSING and f.default_factory is MISSING
    )
    for section, settings in _SECTIONS.items()
}


def _env_name(name: str, value: Any) -> str:
    text = _str(name, value)
    if not _ENV_RE.fullmatch(text):
        raise ConfigError(name, f"must match {_ENV_RE.pattern}, got {text!r}")
    return text


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Overlay ``CAPTCHA_SOLVER_<SECTION>_<KEY>`` (and ``CAPTCHA_SOLVER_ENV``) onto *raw*."""
    for var, value in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_PATH_ENV:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        if rest == "env":
            raw["env"] = value
            continue
        for section in _SCHEMA:
            if rest.startswith(section + "_") and rest[len(section) + 1 :] in _SCHEMA[section]:
                table = raw.setdefault(section, {})
                if not isinstance(table, dict):
                    raise ConfigError(section, "must be a table")
                table[rest[len(section) + 1 :]] = value
                break
        else:
            raise ConfigError(var, "unknown setting in the environment")


def _section(raw: dict[str, Any], section: str) -> dict[str, Any]:
    table = raw.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(section, f"must be a table, got {type(table).__name__}")
    schema = _SCHEMA[section]
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{section}.{key}"
        if key not in schema:
            raise ConfigError(name, f"unknown setting (known: {', '.join(sorted(schema))})")
        out[key] = schema[key](name, value)
    for key in _REQUIRED.get(section, ()):
        if key not in out:
            raise ConfigError(f"{section}.{key}", "is required")
    return out


def parse_config(
    raw: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Config:
    """Validate a parsed TOML document (plus environment overrides) into a :class:`Config`."""
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    _apply_env(data, os.environ if environ is None else environ)
    for key in data:
        if key != "env" and key not in _SCHEMA:
            known = ", ".join(["env", *_SCHEMA])
            raise ConfigError(key, f"unknown setting (known: {known})")
    if "env" not in data:
        raise ConfigError("env", "is required")
    env = _env_name("env", data["env"])
    vault = _section(data, "vault")
    vault.setdefault("key_path", KEY_PATH_TEMPLATE.format(env=env))
    vault_cfg = VaultConfig(**vault)
    if vault_cfg.wrapped_secret_id_file == vault_cfg.secret_id_file:
        raise ConfigError("vault.wrapped_secret_id_file", "must differ from vault.secret_id_file")
    provider_cfg = ProviderConfig(**_section(data, "provider"))
    if provider_cfg.effective_poll_tick > provider_cfg.poll_interval:
        raise ConfigError("provider.poll_tick", "must be <= provider.poll_interval")
    if provider_cfg.backoff_max < provider_cfg.backoff_base:
        raise ConfigError("provider.backoff_max", "must be >= provider.backoff_base")
    return Config(
        env=env,
        vault=vault_cfg,
        provider=provider_cfg,
        server=ServerConfig(**_section(data, "server")),
        logging=LoggingConfig(**_section(data, "logging")),
        source=source,
    )


def _toml_value(name: str, value: Any) -> str:
    if isinstance(value, bool | int | float | str):
        return json.dumps(value)  # a JSON string, number or boolean is the same in TOML
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return json.dumps(list(value))
    raise ConfigError(name, f"cannot be written as TOML: {type(value).__name__}")


def render_config(data: Mapping[str, Any]) -> str:
    """The TOML text of a configuration given as a mapping (``env`` plus sections, as the file
    has them), validated first: what this returns always loads. The worker role's template
    writes the same document (solver/tests/test_config.py holds the two together)."""
    parse_config(json.loads(json.dumps(data, default=str)), environ={})
    lines = [f"env = {_toml_value('env', data['env'])}"]
    for section, values in data.items():
        if section == "env":
            continue
        tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        lines += ["", f"[{section}]"]
        lines += [
            f"{k} = {_toml_value(f'{section}.{k}', v)}"
            for k, v in values.items()
            if k not in tables
        ]
        for table, entries in tables.items():
            lines += ["", f"[{section}.{table}]"]
            lines += [
                f"{k} = {_toml_value(f'{section}.{table}.{k}', v)}" for k, v in entries.items()
            ]
    return "\n".join(lines) + "\n"


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at *path*."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw, environ, source=path)
