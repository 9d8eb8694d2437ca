"""Run the key rotation unattended (systemd timer, cron, AWX) and map its outcome to exit codes.

    python -m tools.rotate_unattended --env prod --inventory inventories/prod \\
        --role-id-file /etc/captcha-rotator/role-id --secret-id-file /etc/captcha-rotator/secret-id

It runs ``playbooks/rotate-key.yml`` without a terminal, with the rotator AppRole (role-id and
secret-id read from files by the playbook itself: nothing secret on the command line or in the
environment), promotes the env's staged key, and stops at "awaiting revocation". A later run with
``--confirm-revoked`` finishes the rotation. ansible-playbook alone exits 2 on any failed task; the
role writes its outcome to a JSON status file (no secrets) and this wrapper turns it into:

====  =================================================================================
code  meaning
====  =================================================================================
0     done: rotation complete, rolled back, or nothing to do (no staged key, nothing pending)
75    awaiting revocation: every worker uses the new key; revoke the old key at the provider,
      then run again with --confirm-revoked (EX_TEMPFAIL: "try again later")
1     refused or failed before anything changed (bad key, no rights, worker unreachable, ...)
3     failed in the middle of a rotation (state propagating, e.g. a worker did not move within
      the window): needs an operator; a rerun resumes, or roll back
4     the playbook produced no outcome (could not start: inventory, syntax, Python); see output
64    usage error of this wrapper (EX_USAGE)
====  =================================================================================

The last line of output is always ``key-rotation: <outcome> exit=<code> ...`` for log scrapers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "playbooks" / "rotate-key.yml"

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_FAILED_MID_ROTATION = 3
EXIT_NO_OUTCOME = 4
EXIT_USAGE = 64
EXIT_AWAITING_REVOCATION = 75


def exit_code(status: dict | None) -> int:
    """Map the role's status file to the documented exit code."""
    if not status:
        return EXIT_NO_OUTCOME
    outcome = status.get("outcome")
    if outcome in ("complete", "rolled_back", "noop", "check"):
        return EXIT_DONE
    if outcome == "awaiting_revocation":
        return EXIT_AWAITING_REVOCATION
    if outcome == "failed" and status.get("rotation_state") == "propagating":
        return EXIT_FAILED_MID_ROTATION
    return EXIT_FAILED


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.rotate_unattended",
        description="Unattended key rotation with documented exit codes (see module docstring).",
    )
    p.add_argument("--env", required=True, help="environment to rotate")
    p.add_argument("--inventory", "-i", help="inventory (default: ansible.cfg's)")
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
        action="store_true",
        help="the old key was revoked at the provider: finalize the pending rotation",
    )
    p.add_argument("--rollback", action="store_true", help="roll back the pending rotation")
    p.add_argument(
        "--webhook-url-file",
        help="file holding a webhook URL for the awaiting notice (never logged)",
    )
    p.add_argument("--status-file", help="keep the JSON outcome here (default: a temporary file)")
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
    if args.confirm_revoked and args.rollback:
        print("key-rotation: --confirm-revoked and --rollback exclude each other", file=sys.stderr)
        return EXIT_USAGE

    variables: dict[str, object] = {
        "key_rotation_env": args.env,
        "key_rotation_unattended": True,
        "key_rotation_key_source": args.key_source,
    }
    if args.role_id_file:
        variables |= {
            "key_rotation_auth_method": "approle",
            "key_rotation_approle_role_id_file": str(Path(args.role_id_file).resolve()),
            "key_rotation_approle_secret_id_file": str(Path(args.secret_id_file).resolve()),
        }
    if args.confirm_revoked:
        variables["key_rotation_confirm_revoked"] = args.env
    if args.rollback:
        variables["key_rotation_rollback"] = True
    if args.webhook_url_file:
        variables["key_rotation_webhook_url"] = Path(args.webhook_url_file).read_text().strip()

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
        if args.inventory:
            cmd += ["-i", str(Path(args.inventory).resolve())]
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
