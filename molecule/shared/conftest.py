"""Shared testinfra fixtures for every molecule scenario.

The base config (``.config/molecule/config.yml``) loads this module into pytest with
``-p conftest`` (``PYTHONPATH`` points here), so scenarios keep no conftest of their own.

* The playbooks reach the instances over SSH as ``deploy`` with become (as production does);
  the checks reach them as root with testinfra's podman backend (``podman exec``), which is
  faster than going through Ansible: the molecule inventory only names them.
* ``host_vars`` gives the inventory variables of the host under test (group and host vars of the
  scenario's inventory, unrendered).
* ``secret_probe`` searches a host for secret values without the value ever being on a command
  line, in the test output or in an assertion message; every search first proves it would find
  a harmless canary put in the same kind of place.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shlex
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROJECT_DIR = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).parents[2]))


class Secret:
    """A secret value for tests: masked in repr/str, so pytest never prints it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            raise ValueError("empty secret")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('***{self._value[-4:]}')" if len(self._value) >= 16 else "Secret('***')"

    __str__ = __repr__


# --------------------------------------------------------------------------- hosts
def converge(*args: str) -> dict[str, Any]:
    """Run the scenario's converge playbook again (``args``: --limit, --check, -e ...); the json
    callback's document, with the exit status as ``rc``."""
    scenario = os.environ["MOLECULE_SCENARIO_DIRECTORY"]
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    res = subprocess.run(
        ["ansible-playbook", "-i", inventory, *args, f"{scenario}/converge.yml"],
        env={**os.environ, "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"},
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    doc: dict[str, Any] = json.loads(res.stdout[res.stdout.index("{") :])
    doc["rc"] = res.returncode
    return doc


def _inventory() -> dict[str, Any]:
    inventory_file = os.environ.get("MOLECULE_INVENTORY_FILE")
    if not inventory_file:
        return {}
    res = subprocess.run(
        ["ansible-inventory", "-i", str(Path(inventory_file).parent), "--list"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(res.stdout)


@functools.cache
def molecule_inventory() -> dict[str, Any]:
    """The scenario's inventory as `ansible-inventory --list` prints it (cached)."""
    return _inventory()


def _podman_hosts(inventory: dict[str, Any]) -> list[str]:
    """The scenario's instances: every host but the controller (localhost)."""
    hostvars = inventory.get("_meta", {}).get("hostvars", {})
    return sorted(name for name in hostvars if name != "localhost")


def pytest_configure(config: pytest.Config) -> None:
    """Test the molecule instances through `podman exec` rather than through Ansible."""
    if getattr(config.option, "connection", None) != "ansible":
        return
    hosts = _podman_hosts(molecule_inventory())
    if hosts:
        config.option.connection = None
        config.option.hosts = ",".join(f"podman://{name}" for name in hosts)


@pytest.fixture(scope="session")
def inventory() -> dict[str, Any]:
    """The scenario's whole inventory (`ansible-inventory --list`)."""
    return molecule_inventory()


@pytest.fixture
def host_vars(host: Any, inventory: dict[str, Any]) -> dict[str, Any]:
    """Inventory variables of the host under test."""
    name = host.backend.get_hostname()
    return dict(inventory.get("_meta", {}).get("hostvars", {}).get(name, {}))


@pytest.fixture(scope="session")
def project_dir() -> Path:
    return PROJECT_DIR


# --------------------------------------------------------------------------- secret search
_SKIP_TOP = {"/proc", "/sys", "/dev"}

# The patterns arrive on file descriptor 3 (the script's stdin is moved there), never in argv.
_FILES_SCRIPT = r"""
exec 3<&0 </dev/null
set --
for d in /* /.[!.]*; do
  [ -e "$d" ] && [ ! -L "$d" ] || continue
  case "$d" in /proc|/sys|/dev) continue ;; esac
  set -- "$@" "$d"
done
grep -rlF --devices=skip --no-messages -f /dev/fd/3 "$@"
exit 0
"""

_JOURNAL_SCRIPT = r"""
exec 3<&0 </dev/null
journalctl --flush >/dev/null 2>&1 || true
journalctl --no-pager --output=export | grep -cF -f /dev/fd/3
exit 0
"""

_PROC_SCRIPT = r"""
pat=$(cat)
exec </dev/null
for pid in "$@"; do
  for f in environ cmdline; do
    # printf is a shell builtin: the patterns go through a pipe, not through an argv.
    if printf '%s\n' "$pat" | (tr '\0' '\n' <"/proc/$pid/$f" | grep -qF -f /dev/fd/3) 3<&0
    then echo "/proc/$pid/$f"; fi
  done
done
exit 0
"""


def _podman_sh(container: str, script: str, args: Iterable[str], stdin: str) -> str:
    res = subprocess.run(
        ["podman", "exec", "-i", container, "sh", "-c", script, "probe", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if res.returncode != 0:
        # Only the script's own errors can be here; the patterns never reach stderr.
        raise RuntimeError(f"search in {container} failed ({res.returncode}): {res.stderr[-500:]}")
    return res.stdout


@dataclass
class SecretProbe:
    """Searches one container for secret values (fed on stdin, never in argv)."""

    container: str

    def _patterns(self, values: Iterable[Secret]) -> str:
        text = "".join(v.reveal() + "\n" for v in values)
        if not text:
            raise ValueError("nothing to search for")
        return text

    def files_with(self, values: Iterable[Secret]) -> list[str]:
        """Paths of files (outside /proc, /sys, /dev) that contain any of the values."""
        out = _podman_sh(self.container, _FILES_SCRIPT, [], self._patterns(values))
        return sorted(line for line in out.splitlines() if line)

    def journal_hits(self, values: Iterable[Secret]) -> int:
        """Number of journal export lines (any field of any entry) containing a value."""
        out = _podman_sh(self.container, _JOURNAL_SCRIPT, [], self._patterns(values))
        return int(out.strip() or 0)

    def proc_hits(self, pids: Iterable[int], values: Iterable[Secret]) -> list[str]:
        """/proc/<pid>/environ and cmdline files of `pids` that contain a value."""
        args = [str(int(p)) for p in pids]
        out = _podman_sh(self.container, _PROC_SCRIPT, args, self._patterns(values))
        return sorted(line for line in out.splitlines() if line)

    # Canaries: prove each search finds a value placed where a leak would be.
    def plant_file_canary(self, directory: str = "/root") -> tuple[Secret, Callable[[], None]]:
        """A file holding a canary; returns the canary and a function that removes the file."""
        canary = Secret("canary" + secrets.token_hex(16))
        path = f"{directory}/.probe-canary-{secrets.token_hex(4)}"
        subprocess.run(
            ["podman", "exec", "-i", self.container, "sh", "-c", f"cat > {shlex.quote(path)}"],
            input=canary.reveal() + "\n",
            text=True,
            check=True,
        )

        def remove() -> None:
            subprocess.run(["podman", "exec", self.container, "rm", "-f", path], check=False)

        return canary, remove

    def plant_journal_canary(self) -> Secret:
        canary = Secret("canary" + secrets.token_hex(16))
        subprocess.run(
            ["podman", "exec", "-i", self.container, "systemd-cat", "-t", "probe-canary"],
            input=canary.reveal() + "\n",
            text=True,
            check=True,
        )
        return canary

    def start_proc_canary(self) -> tuple[int, Secret, Callable[[], None]]:
        """A process holding a canary in its environment and command line."""
        canary = Secret("canary" + secrets.token_hex(16))
        res = subprocess.run(
            [
                "podman",
                "exec",
                "-i",
                self.container,
                "sh",
                "-c",
                'read -r c; PROBE_CANARY="$c" setsid sh -c "sleep 120; :" "$c" '
                ">/dev/null 2>&1 & echo $!",
            ],
            input=canary.reveal() + "\n",
            capture_output=True,
            text=True,
            check=True,
        )
        pid = int(res.stdout.strip())

        def stop() -> None:
            subprocess.run(
                ["podman", "exec", self.container, "kill", str(pid)],
                check=False,
                capture_output=True,
            )

        return pid, canary, stop


@pytest.fixture
def secret_probe(host: Any) -> SecretProbe:
    """A :class:`SecretProbe` for the host under test."""
    return SecretProbe(host.backend.get_hostname())
