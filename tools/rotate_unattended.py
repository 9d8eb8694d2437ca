"""Run the key rotation unattended (systemd timer, cron, AWX) and map its outcome to exit codes.

    python -m tools.rotate_unattended --env prod --inventory inventories/prod \\
        --role-id-file /etc/captcha-rotator/role-id --secret-id-file /etc/captcha-rotator/secret-id

It runs ``playbooks/rotate-key.yml`` without a terminal, with the rotator AppRole (role-id and
secret-id read from files by the playbook itself: nothing secret on the command line or in the
environment), promotes the env's staged key, and stops at "awaiting revocation". A later run with
``--confirm-revoked <rotation id>`` finishes the rotation. ansible-playbook alone exits 2 on any
failed task; the role writes its outcome to a JSON status file (no secrets) and this wrapper turns
it into:

====  =================================================================================
code  meaning
====  =================================================================================
0     done: rotation complete, rolled back, or nothing to do (no staged key, nothing pending)
75    awaiting revocation: every worker uses the new key; revoke the old key at the provider,
      then run again with --confirm-revoked (EX_TEMPFAIL: "try again later")
76    old key still active: the revocation was confirmed but the provider still accepts the
      old key; NOT finalized (old version kept, state awaiting_revocation). Revoke it at the
      provider, then confirm again (or finalize anyway with key_rotation_force_finalize=true)
1     refused or failed before anything changed (bad key, no rights, worker unreachable, ...)
3     failed in the middle of a rotation (state propagating, e.g. a worker did not move within
      the window): needs an operator; a rerun resumes, or roll back
4     the playbook produced no outcome (could not start: inventory, syntax, Python); see output
64    usage error of this wrapper (EX_USAGE)
====  =================================================================================

The last line of output is always ``key-rotation: <outcome> exit=<code> ...`` for log scrapers.

With ``--status-file DIR/NAME.json`` the run also writes node_exporter textfile metrics to
``DIR/NAME.prom`` (or to ``--metrics-file``): ``captcha_key_rotation_running`` 1 while a run
is going (the previous run's values kept), then the outcome, exit code, rotation state,
versions, the record's timestamps and put->converged seconds, each labelled with ``env``. The
file is replaced atomically (temporary file in the same directory, then rename), so the
collector never reads half of it. The metrics are listed in monitoring/README.md.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "playbooks" / "rotate-key.yml"

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_FAILED_MID_ROTATION = 3
EXIT_NO_OUTCOME = 4
EXIT_USAGE = 64
EXIT_AWAITING_REVOCATION = 75
EXIT_OLD_KEY_ACTIVE = 76


def exit_code(status: dict | None) -> int:
    """Map the role's status file to the documented exit code."""
    if not status:
        return EXIT_NO_OUTCOME
    outcome = status.get("outcome")
    if outcome in ("complete", "rolled_back", "noop", "check"):
        return EXIT_DONE
    if outcome == "awaiting_revocation":
        return EXIT_AWAITING_REVOCATION
    if outcome == "old_key_active":
        return EXIT_OLD_KEY_ACTIVE
    if outcome == "failed" and status.get("rotation_state") == "propagating":
        return EXIT_FAILED_MID_ROTATION
    return EXIT_FAILED


# ---------------------------------------------------------------- node_exporter textfile metrics
METRIC_PREFIX = "captcha_key_rotation_"
OUTCOMES = (
    "complete",
    "awaiting_revocation",
    "old_key_active",
    "rolled_back",
    "noop",
    "check",
    "failed",
    "none",
)
STATES = ("none", "propagating", "awaiting_revocation", "complete", "rolled_back", "unknown")
# The record's times (``%Y-%m-%dT%H:%M:%SZ``) -> ``<name>_timestamp_seconds``.
RECORD_TIMES = {"started_at": "started", "converged_at": "converged", "confirmed_at": "confirmed"}
_HELP = {
    "running": "1 while a rotate-unattended run is going, 0 once it ended.",
    "run_started_timestamp_seconds": "Unix time the last (or current) run started.",
    "last_run_timestamp_seconds": "Unix time the last run ended.",
    "last_run_duration_seconds": "Wall time of the last run.",
    "last_exit_code": "Exit code of the last run (0 done, 75 awaiting revocation, 76, 1, 3, 4).",
    "last_outcome": "1 for the outcome of the last run.",
    "state": "1 for the rotation state recorded in Vault after the last run.",
    "current_version": "KV version of the key after the last run.",
    "previous_version": "The rotation record's previous_version.",
    "new_version": "The rotation record's new_version.",
    "started_timestamp_seconds": "Unix time the recorded rotation started (record started_at).",
    "converged_timestamp_seconds": "Unix time every worker reported the new version.",
    "confirmed_timestamp_seconds": "Unix time the revocation was confirmed (rotation complete).",
    "put_to_converged_seconds": "Seconds from the put to every worker on the new version.",
    "put_to_prompt_seconds": "Seconds from the put to the revocation prompt.",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> float | None:
    """A finite number from a status value (int, float or numeric string); None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def _timestamp(text: Any) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render_textfile(
    env: str,
    status: Mapping[str, Any] | None,
    *,
    code: int | None,
    started: float,
    ended: float | None,
) -> str:
    """The textfile of one run: ``code``/``ended`` None while it is still running (then only
    ``running`` and the start are known and the caller keeps the previous run's lines)."""
    samples: list[tuple[str, dict[str, str], float]] = [
        ("running", {}, 0.0 if ended is not None else 1.0),
        ("run_started_timestamp_seconds", {}, started),
    ]
    if ended is not None and code is not None:
        status = status or {}
        outcome = str(status.get("outcome") or "none")
        raw_state = str(status.get("rotation_state") or "none").strip()
        state = raw_state if raw_state in STATES else "unknown"
        samples += [
            ("last_run_timestamp_seconds", {}, ended),
            ("last_run_duration_seconds", {}, round(max(0.0, ended - started), 3)),
            ("last_exit_code", {}, float(code)),
        ]
        samples += [("last_outcome", {"outcome": o}, float(o == outcome)) for o in OUTCOMES]
        samples += [("state", {"state": s}, float(s == state)) for s in STATES]
        raw_record = status.get("rotation")
        record: Mapping[str, Any] = raw_record if isinstance(raw_record, dict) else {}
        numbers = {
            "current_version": status.get("current_version"),
            "previous_version": record.get("previous_version"),
            "new_version": record.get("new_version"),
            "put_to_converged_seconds": status.get("put_to_converged_seconds"),
            "put_to_prompt_seconds": status.get("put_to_prompt_seconds"),
        }
        numbers |= {
            f"{n}_timestamp_seconds": _timestamp(record.get(f)) for f, n in RECORD_TIMES.items()
        }
        for name, value in numbers.items():
            number = _number(value)
            if number is not None:
                samples.append((name, {}, number))
    lines: list[str] = []
    seen: set[str] = set()
    for name, labels, value in samples:
        full = METRIC_PREFIX + name
        if name not in seen:
            seen.add(name)
            lines += [f"# HELP {full} {_HELP[name]}", f"# TYPE {full} gauge"]
        label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in {"env": env, **labels}.items())
        lines.append(f"{full}{{{label_text}}} {_format(value)}")
    return "\n".join(lines) + "\n"


def _previous_run_lines(path: Path) -> list[str]:
    """The lines of the last finished run in an existing textfile (all but the running ones)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    own = (f"{METRIC_PREFIX}running", f"{METRIC_PREFIX}run_started_timestamp_seconds")
    keep: list[str] = []
    for line in text.splitlines():
        words = line.split()
        name = words[2] if line.startswith("#") and len(words) > 2 else line.split("{")[0]
        if name not in own:
            keep.append(line)
    return keep


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a temporary file in its directory (not ``*.prom``, which
    node_exporter would read), flushed, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mark_running(path: Path, env: str, started: float) -> None:
    """At the start of a run: ``running`` 1, the previous run's outcome kept."""
    head = render_textfile(env, None, code=None, started=started, ended=None)
    rest = _previous_run_lines(path)
    write_textfile(path, head + "".join(f"{line}\n" for line in rest))


def metrics_path(args: argparse.Namespace) -> Path | None:
    if args.metrics_file:
        return Path(args.metrics_file)
    if args.status_file:
        return Path(args.status_file).with_suffix(".prom")
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.rotate_unattended",
        description="Unattended key rotation with documented exit codes (see module docstring).",
    )
    p.add_argument("--env", required=True, help="environment to rotate")
    p.add_argument(
        "--inventory",
        "-i",
        action="append",
        default=[],
        help="inventory (repeatable; default: ansible.cfg's)",
    )
    p.add_argument("--role-id-file", help="rotator role-id file (else VAULT_TOKEN is used)")
    p.add_argument("--secret-id-file", help="rotator secret-id file (0600)")
    p.add_argument(
        "--key-source",
        default="staged",
        choices=["staged", "auto"],
        help="staged (default): promote only the staged key",
    )
    p.add_argument(
        "--confirm-revoked",
        nargs="?",
        const="",
        default=None,
        metavar="ROTATION_ID",
        help="the old key was revoked at the provider: finalize the pending rotation, named by"
        " its id (the status file's rotation_id; without one, the env name is passed)",
    )
    p.add_argument("--rollback", action="store_true", help="roll back the pending rotation")
    p.add_argument(
        "--webhook-url-file",
        help="file holding a webhook URL for the awaiting notice (never logged)",
    )
    p.add_argument("--status-file", help="keep the JSON outcome here (default: a temporary file)")
    p.add_argument(
        "--metrics-file",
        help="node_exporter textfile (*.prom) for the outcome (default: the status file's name"
        " with .prom, when --status-file is given; else none)",
    )
    p.add_argument(
        "--extra-vars-file",
        action="append",
        default=[],
        help="more variables for the playbook (YAML/JSON file; repeatable)",
    )
    p.add_argument("--check", action="store_true", help="show the plan only (--check --diff)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bool(args.role_id_file) != bool(args.secret_id_file):
        print("key-rotation: --role-id-file and --secret-id-file go together", file=sys.stderr)
        return EXIT_USAGE
    for f in (args.role_id_file, args.secret_id_file, args.webhook_url_file, *args.extra_vars_file):
        if f and not os.access(f, os.R_OK):
            print(f"key-rotation: cannot read {f}", file=sys.stderr)
            return EXIT_USAGE
    if args.confirm_revoked is not None and args.rollback:
        print("key-rotation: --confirm-revoked and --rollback exclude each other", file=sys.stderr)
        return EXIT_USAGE

    variables: dict[str, object] = {
        "key_rotation_env": args.env,
        "key_rotation_unattended": True,
        "key_rotation_key_source": args.key_source,
        # The role's messages then name this wrapper's flags (--env, --confirm-revoked).
        "key_rotation_caller": "rotate-unattended",
    }
    if args.role_id_file:
        variables |= {
            "key_rotation_auth_method": "approle",
            "key_rotation_approle_role_id_file": str(Path(args.role_id_file).resolve()),
            "key_rotation_approle_secret_id_file": str(Path(args.secret_id_file).resolve()),
        }
    if args.confirm_revoked is not None:
        variables["key_rotation_confirm_revoked"] = args.confirm_revoked or args.env
    if args.rollback:
        variables["key_rotation_rollback"] = True
    if args.webhook_url_file:
        variables["key_rotation_webhook_url"] = Path(args.webhook_url_file).read_text().strip()

    prom = metrics_path(args)
    if prom is not None and args.status_file and prom.resolve() == Path(args.status_file).resolve():
        print("key-rotation: the metrics file must not be the status file", file=sys.stderr)
        return EXIT_USAGE
    if prom is not None and not os.access(prom.parent, os.W_OK):
        print(f"key-rotation: cannot write in {prom.parent}", file=sys.stderr)
        return EXIT_USAGE
    started = time.time()
    if prom is not None:
        mark_running(prom, args.env, started)

    with tempfile.TemporaryDirectory(prefix="key-rotation-") as tmp:
        status_file = Path(args.status_file) if args.status_file else Path(tmp) / "status.json"
        status_file.unlink(missing_ok=True)
        variables["key_rotation_status_file"] = str(status_file.resolve())
        vars_file = Path(tmp) / "vars.json"
        fd = os.open(vars_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(variables, fh)
        cmd = [str(Path(sys.executable).parent / "ansible-playbook")]
        if not Path(cmd[0]).exists():
            cmd = ["ansible-playbook"]
        for inventory in args.inventory:
            cmd += ["-i", str(Path(inventory).resolve())]
        cmd += [str(PLAYBOOK), "-e", f"@{vars_file}"]
        for extra in args.extra_vars_file:
            cmd += ["-e", f"@{Path(extra).resolve()}"]
        if args.check:
            cmd += ["--check", "--diff"]
        env = dict(os.environ)
        env.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))
        sys.stdout.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, check=False)
        status = None
        if status_file.exists():
            try:
                status = json.loads(status_file.read_text())
            except ValueError:
                status = None
    code = exit_code(status)
    if prom is not None:
        text = render_textfile(args.env, status, code=code, started=started, ended=time.time())
        write_textfile(prom, text)
    outcome = (status or {}).get("outcome", "none")
    state = (status or {}).get("rotation_state", "unknown")
    rid = (status or {}).get("rotation_id", "")
    print(
        f"key-rotation: {outcome} exit={code} env={args.env} state={state} "
        f"rotation={rid or '-'} ansible_rc={proc.returncode}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
