"""``python -m testkit.emulator --port P --admin-port A [--solve-delay SPEC] …``"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .core import DelaySpec, Emulator, Options
from .server import EmulatorServer, check_loopback, serve_forever


def _parse_option(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option wants NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m testkit.emulator",
        description="CaptchaAI / 2captcha protocol emulator (in.php, res.php) with an admin API.",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address (default %(default)s)")
    p.add_argument("--port", type=int, default=18300, help="public port (default %(default)s)")
    p.add_argument("--admin-port", type=int, default=18301, help="admin JSON port (%(default)s)")
    p.add_argument(
        "--solve-delay",
        default=d.solve_delay,
        help="fixed:S | uniform:LO:HI | normal:MU:SIGMA | exp:MEAN, nominal seconds "
        "(default %(default)s)",
    )
    p.add_argument("--time-scale", type=float, default=d.time_scale, help="multiplies solve delays")
    p.add_argument("--seed", type=int, default=None, help="seed for delays, failures, answers")
    p.add_argument("--unsolvable-rate", type=float, default=d.unsolvable_rate)
    p.add_argument("--ban-threshold", type=int, default=d.ban_threshold)
    p.add_argument("--ban-window", type=float, default=d.ban_window, help="seconds")
    p.add_argument("--ban-duration", type=float, default=d.ban_duration, help="seconds")
    p.add_argument(
        "--option",
        action="append",
        type=_parse_option,
        default=[],
        metavar="NAME=VALUE",
        help="any other Options field (VALUE is JSON), e.g. --option default_max_slots=50",
    )
    p.add_argument(
        "--keys-file",
        type=Path,
        help='JSON list of {"key": …, "balance": …, "max_slots": …} to register at start',
    )
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        check_loopback(args.host)
        DelaySpec.parse(args.solve_delay)
        opts = Options().updated(
            {
                "solve_delay": args.solve_delay,
                "time_scale": args.time_scale,
                "seed": args.seed,
                "unsolvable_rate": args.unsolvable_rate,
                "ban_threshold": args.ban_threshold,
                "ban_window": args.ban_window,
                "ban_duration": args.ban_duration,
                **dict(args.option),
            }
        )
        emu = Emulator(opts)
        if args.keys_file:
            for entry in json.loads(args.keys_file.read_text()):
                emu.add_key(entry["key"], entry.get("balance"), entry.get("max_slots"))
    except (ValueError, OSError, KeyError, TypeError) as exc:
        print(f"testkit.emulator: {exc}", file=sys.stderr)
        return 2
    server = EmulatorServer(args.port, args.admin_port, host=args.host, emulator=emu)
    try:
        asyncio.run(serve_forever(server))
    except OSError as exc:
        raise SystemExit(f"testkit.emulator: cannot listen: {exc}") from None  # exit status 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
