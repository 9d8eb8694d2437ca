"""The example systemd units (examples/systemd/) hold together with the tools they run.

Both services run Ansible over SSH under `ProtectSystem=strict` and `ProtectHome=read-only`:
Ansible's local temp files and SSH control sockets must then live where the unit may write, or
the first SSH connection fails ("Unable to create local directories" / "Cannot write to
ControlPath"). The rotation service's arguments must be ones `tools/rotate-unattended` takes,
and its status file (with the textfile metrics written beside it) must be in a writable
directory, or the rotation alerts of monitoring/ never see a run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from testkit.paths import REPO
from tools.rotate_unattended import parse_args

UNITS = REPO / "examples" / "systemd"
SERVICES = sorted(p.name for p in UNITS.glob("*.service"))


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``[Service]`` settings of a unit file: key -> values in order (continuations joined)."""
    settings: dict[str, list[str]] = {}
    section = ""
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.startswith("["):
            section = logical.strip("[]")
        elif section == "Service":
            key, _, value = logical.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
        logical = ""
    return settings


def environment(settings: dict[str, list[str]]) -> dict[str, str]:
    pairs = [item for value in settings.get("Environment", []) for item in shlex.split(value)]
    return dict(pair.split("=", 1) for pair in pairs)


def writable(settings: dict[str, list[str]], path: str) -> bool:
    """Whether the unit may write ``path`` under ProtectSystem=strict / ProtectHome=read-only."""
    private_tmp = ("/tmp/", "/var/tmp/")  # noqa: S108 (the unit's own private temp dirs)
    if settings.get("PrivateTmp") == ["true"] and path.startswith(private_tmp):
        return True
    roots = [r for value in settings.get("ReadWritePaths", []) for r in value.split()]
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def test_there_are_example_services():
    assert SERVICES == ["captcha-key-rotation.service", "captcha-worker-deploy.service"]


@pytest.mark.parametrize("name", SERVICES)
def test_ansible_can_write_its_temp_files_and_control_sockets(name):
    settings = unit_settings(UNITS / name)
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ProtectHome"] == ["read-only"]
    env = environment(settings)
    for var in ("ANSIBLE_LOCAL_TEMP", "ANSIBLE_SSH_CONTROL_PATH_DIR"):
        assert var in env, f"{name} leaves {var} in the read-only home"
        assert writable(settings, env[var]), f"{name}: {var}={env[var]} is not writable"


def test_the_rotation_service_runs_the_tool_with_a_status_file_it_may_write():
    settings = unit_settings(UNITS / "captcha-key-rotation.service")
    (exec_start,) = settings["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/tools/rotate-unattended")
    args = parse_args(argv[1:])  # exits (SystemExit) on an argument the tool does not take
    assert args.status_file, "no --status-file: the rotation's textfile metrics are not written"
    assert writable(settings, args.status_file), f"{args.status_file} is not writable"
    assert "75" in settings["SuccessExitStatus"][0].split()
