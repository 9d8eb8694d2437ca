"""The interactive rotation, answered through a real pseudo-terminal (python ``pty``)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import time

import pytest

from testkit.creds import assert_no_secrets
from testkit.paths import REPO
from testkit.rotation import RotEnv, rotation_argv, rotation_env, write_inventory

KEY_PROMPT = "(input hidden"
CONFIRM_PROMPT = "to confirm the old key is revoked"


def run_in_pty(rot_env: RotEnv, inventory, variables, token, answers, timeout=240):
    """Run the playbook on a pty; answer each (prompt text, reply) in turn (a callable reply is
    called when its prompt shows). -> (rc, out, status)."""
    argv, status_file = rotation_argv(rot_env, inventory, variables, check=False)
    env = rotation_env(rot_env, token) | {"TERM": "xterm"}
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal, it is the foreground group
        os.chdir(REPO)
        os.execve(argv[0], argv, env)  # noqa: S606 (fixed argv, no shell)
    out = b""
    seen = 0
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if pending and pending[0][0].encode() in out[seen:]:
                seen = out.index(pending[0][0].encode(), seen) + len(pending[0][0])
                time.sleep(0.3)
                reply = pending.pop(0)[1]
                os.write(fd, (reply() if callable(reply) else reply).encode() + b"\r")
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(
                "the interactive run did not finish: " + out.decode(errors="replace")[-3000:]
            )
    finally:
        _, wait_status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert not pending, f"prompts never shown: {pending[0][0]!r}\n{text[-3000:]}"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    assert_no_secrets(text + json.dumps(status), rot_env.secrets)
    return os.waitstatus_to_exitcode(wait_status), text, status


def test_interactive_rotation_prompts_privately_and_confirms(rot_env: RotEnv, start_workers):
    """Key typed at a hidden prompt; the confirm prompt shows only the masked old key."""
    workers = start_workers(2)
    inv = write_inventory(rot_env, workers)
    key = rot_env.next_key()

    def revoke_and_confirm():
        """The operator revokes the old key, then types the id of the rotation the prompt names."""
        rot_env.emulator.admin.revoke_key(rot_env.old_key)
        return rot_env.record()["rotation_id"]

    rc, text, status = run_in_pty(
        rot_env,
        inv,
        {},
        rot_env.rotator_token(),
        [(KEY_PROMPT, key), (CONFIRM_PROMPT, revoke_and_confirm)],
    )

    assert rc == 0, text[-3000:]
    assert status["outcome"] == "complete"
    assert f"Now revoke the OLD key ***{rot_env.old_key[-4:]}" in text
    assert rot_env.current_key() == key
    assert rot_env.record()["rotation_state"] == "complete"
    assert {w.health()["key_version"] for w in workers} == {rot_env.current_version()}
    assert status["put_to_prompt_seconds"] is not None
    print("interactive put->prompt", status["put_to_prompt_seconds"])


def test_interactive_wrong_answer_leaves_the_rotation_awaiting(rot_env: RotEnv):
    """Anything but the rotation id at the confirm prompt (here the env name, the old form)
    keeps the old version (awaiting)."""
    inv = write_inventory(
        rot_env, [], {"key_rotation_wait_mode": "fixed", "key_rotation_window_margin": 0}
    )
    key = rot_env.next_key()

    rc, text, status = run_in_pty(
        rot_env,
        inv,
        {"key_rotation_new_key": key},
        rot_env.rotator_token(),
        [(CONFIRM_PROMPT, rot_env.name)],
    )

    assert rc == 0, text[-3000:]
    assert status["outcome"] == "awaiting_revocation"
    assert rot_env.record()["rotation_state"] == "awaiting_revocation"
    versions = rot_env.metadata()["versions"]
    assert not any(v["destroyed"] for v in versions.values())
