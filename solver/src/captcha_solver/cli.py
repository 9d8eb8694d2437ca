"""``captcha-solver {serve,status,solve,check-config,take-secret-id} --config PATH``.

Exit status: 0 ok; 1 failure (unhealthy, solve failed); 2 usage; 75 (EX_TEMPFAIL) when
``serve`` read no key from Vault within ``vault.startup_timeout`` (a restart may succeed);
78 (EX_CONFIG) for a bad configuration and for a used or expired wrapping token (possible
tampering; a restart cannot fix it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import CONFIG_PATH_ENV, DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .log import configure_logging
from .secret import REGISTRY, Secret

EX_OK = 0
EX_FAIL = 1
EX_TEMPFAIL = 75
EX_CONFIG = 78

log = logging.getLogger("captcha_solver")
# The API is on loopback: never send it through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captcha-solver", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    default = os.environ.get(CONFIG_PATH_ENV, str(DEFAULT_CONFIG_PATH))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=Path(default), help=f"(default {default})")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the worker service")
    sub.add_parser("status", parents=[common], help="print the running worker's /healthz")
    check = sub.add_parser("check-config", parents=[common], help="validate the configuration")
    check.add_argument(
        "--syntax-only",
        action="store_true",
        help="check the file alone, not the files it names (how the role validates a new one)",
    )
    sub.add_parser(
        "take-secret-id",
        parents=[common],
        help="unwrap a delivered wrapped secret-id now (the role runs this right after delivery)",
    )
    solve = sub.add_parser("solve", parents=[common], help="one solve through the running worker")
    solve.add_argument("--method", required=True, help="e.g. userrecaptcha, hcaptcha, turnstile")
    solve.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a provider parameter (repeatable), e.g. --param googlekey=... --param pageurl=...",
    )
    solve.add_argument(
        "--timeout", type=float, default=None, help="seconds (default: task_timeout + 10)"
    )
    return parser


def _base_url(cfg: Config) -> str:
    host = cfg.server.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.server.port}"


def _http(
    url: str, body: dict[str, Any] | None, timeout: float, token: Secret | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token is not None:  # server.token_file: the worker's /solve requires it
        headers["Authorization"] = f"Bearer {token.reveal()}"
    request = urllib.request.Request(  # noqa: S310 (loopback http from our own config)
        url,
        data=data,
        method="POST" if body is not None else "GET",
        headers=headers,
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload or b"null")
        except ValueError:
            return exc.code, {"error": payload.decode(errors="replace")[:200]}


def read_health(base_url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """A running worker's ``/healthz``: the HTTP status and the JSON body (also on 503).
    ``OSError`` when nothing answers. ``captcha-solver status`` prints this."""
    status, body = _http(f"{base_url.rstrip('/')}/healthz", None, timeout=timeout)
    return status, body if isinstance(body, dict) else {"body": body}


def _missing_files(cfg: Config) -> list[str]:
    """The files the configuration names that are not there (role-id, secret-id, CA, state)."""
    problems: list[str] = []
    v = cfg.vault
    if not v.role_id_file.is_file():
        problems.append(f"vault.role_id_file: {v.role_id_file} does not exist")
    has_wrapped = v.wrapped_secret_id_file is not None and v.wrapped_secret_id_file.is_file()
    if not has_wrapped and not v.secret_id_file.is_file():
        problems.append(
            f"vault.secret_id_file: neither {v.secret_id_file} nor a wrapped secret-id file exists"
        )
    if v.ca_file is not None and not v.ca_file.is_file():
        problems.append(f"vault.ca_file: {v.ca_file} does not exist")
    if not v.secret_id_file.parent.is_dir():
        problems.append(f"vault.secret_id_file: directory {v.secret_id_file.parent} does not exist")
    try:
        cfg.server.read_token()  # missing, empty, unreadable or open to others: a problem
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def cmd_check_config(cfg: Config, syntax_only: bool = False) -> int:
    problems: list[str] = []
    v = cfg.vault
    if not syntax_only:
        problems = _missing_files(cfg)
    summary = {
        "config": str(cfg.source),
        "env": cfg.env,
        "vault_addrs": list(v.addrs),
        "key": f"{v.kv_mount}/{v.key_path}",
        "refresh_interval": v.refresh_interval,
        "max_staleness": v.max_staleness,
        "provider": cfg.provider.url,
        "listen": _base_url(cfg),
        "problems": problems,
    }
    print(json.dumps(summary, indent=2))
    return EX_CONFIG if problems else EX_OK


def cmd_status(cfg: Config) -> int:
    try:
        status, body = read_health(_base_url(cfg))
    except OSError as exc:
        print(f"captcha-solver: cannot reach {_base_url(cfg)}: {exc}", file=sys.stderr)
        return EX_FAIL
    print(json.dumps(body, indent=2))
    return EX_OK if status == 200 else EX_FAIL


def cmd_solve(cfg: Config, method: str, raw_params: Sequence[str], timeout: float | None) -> int:
    params: dict[str, str] = {}
    for item in raw_params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"captcha-solver: --param {item!r} must be NAME=VALUE", file=sys.stderr)
            return 2
        params[name] = value
    wait = timeout if timeout is not None else cfg.provider.task_timeout + 10
    try:
        token = cfg.server.read_token()
    except ConfigError as exc:
        print(f"captcha-solver: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        status, body = _http(
            f"{_base_url(cfg)}/solve", {"method": method, "params": params}, wait, token
        )
    except OSError as exc:
        print(f"captcha-solver: cannot reach {_base_url(cfg)}: {exc}", file=sys.stderr)
        return EX_FAIL
    print(REGISTRY.mask(json.dumps(body, indent=2)))
    return EX_OK if status == 200 else EX_FAIL


def cmd_take_secret_id(cfg: Config) -> int:
    """Unwrap the wrapped secret-id file now, as the worker would at its next login: the role
    runs this right after delivering the wrapping token, so the token lives seconds whatever
    the size of the batch. 0 when a secret-id was unwrapped or none was waiting; 78 when the
    token was refused (used or expired: possible interception), the message on stderr."""
    from .vault import VaultClient, VaultError, WrappingTokenError

    wrapped = cfg.vault.wrapped_secret_id_file
    if wrapped is None or not wrapped.exists():
        print("no wrapped secret-id waiting")
        return EX_OK
    client = VaultClient(cfg.vault)
    try:
        taken = client.unwrap_secret_id()
    except WrappingTokenError as exc:
        print(f"captcha-solver: {exc}", file=sys.stderr)
        return EX_CONFIG
    except VaultError as exc:  # Vault unreachable: the worker unwraps it at its next login
        print(f"captcha-solver: cannot unwrap now: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    if not taken:
        if client.refused_wrapping:
            print(
                f"captcha-solver: wrapped secret-id refused ({client.refused_wrapping}); the"
                " secret-id this host already has is kept",
                file=sys.stderr,
            )
            return EX_CONFIG
        print("no wrapped secret-id waiting")
        return EX_OK
    print(f"secret-id unwrapped into {cfg.vault.secret_id_file}")
    return EX_OK


def cmd_serve(cfg: Config) -> int:
    from .hardening import harden_process
    from .service import Service, StartupTimeout  # the light commands need no aiohttp/hvac
    from .vault import WrappingTokenError

    # Before any secret is read: no core file, no memory image for other processes.
    for problem in harden_process():
        log.warning("process hardening incomplete", extra={"problem": problem})

    async def run() -> None:
        await Service(cfg).serve_forever()

    try:
        asyncio.run(run())
    except WrappingTokenError as exc:
        log.critical("refusing to start: %s", exc)
        print(f"captcha-solver: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ConfigError as exc:  # e.g. server.token_file unreadable: no restart can fix it
        log.critical("refusing to start: %s", exc)
        print(f"captcha-solver: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StartupTimeout as exc:  # fail closed; the supervisor starts us again
        print(f"captcha-solver: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except OSError as exc:  # e.g. the port is taken
        log.critical("cannot start: %s", exc)
        return EX_FAIL
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"captcha-solver: invalid configuration: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        return cmd_check_config(cfg, args.syntax_only)
    if args.command == "status":
        return cmd_status(cfg)
    if args.command == "solve":
        return cmd_solve(cfg, args.method, args.param, args.timeout)
    if args.command == "take-secret-id":
        configure_logging(cfg.logging.format, cfg.logging.level)
        return cmd_take_secret_id(cfg)
    configure_logging(cfg.logging.format, cfg.logging.level)
    return cmd_serve(cfg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
