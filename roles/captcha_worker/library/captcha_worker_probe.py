#!/usr/bin/python
# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Everything the captcha_worker role reads on a host before it changes anything, in one run."""

from __future__ import annotations

DOCUMENTATION = r"""
module: captcha_worker_probe
short_description: Read what the captcha_worker role must know about a worker host, changing nothing
description:
  - One module run instead of a task per question (a stat, a slurp, ss, systemctl show, getent,
    wait_for), because each task costs a round trip and a Python start on the host, which adds
    up over a fleet and a daily schedule.
  - Reads whether the host holds a secret-id and the accessor beside it, whether a wrapping
    token is waiting or was refused (and the accessor of the refused one), what listens on the
    worker port (ss), the worker unit's main PID and control group, the service user's uid,
    whether systemd is the service manager (and its version), which Vault addresses accept
    a TCP connection from the host, which of some more paths exist, and which of the Debian
    packages the role needs are not installed (so that a rerun on a host that has them all
    starts no package manager).
  - Never reads the secret-id or a wrapping token, only whether their files exist.
  - Changes nothing; supports check mode.
options:
  secret_id_file:
    description: The worker's secret-id file.
    type: path
    required: true
  accessor_file:
    description: The accessor of that secret-id.
    type: path
    required: true
  wrapped_file:
    description: A wrapping token the worker has not taken yet.
    type: path
    required: true
  refused_file:
    description: A wrapping token the worker refused.
    type: path
    required: true
  refused_accessor_file:
    description: The accessor of the secret-id in the last wrapping token.
    type: path
    required: true
  port:
    description: The worker's TCP port.
    type: int
    required: true
  service:
    description: The worker's systemd unit, without C(.service).
    type: str
    required: true
  user:
    description: The service user.
    type: str
    required: true
  vault_addrs:
    description: Vault addresses (URLs) to try from the host.
    type: list
    elements: str
    default: []
  connect_timeout:
    description: Seconds to keep trying each Vault address.
    type: float
    default: 5
  paths:
    description: More paths whose existence the role needs (files it may have to remove).
    type: list
    elements: path
    default: []
  packages:
    description:
      - Debian package names the role installs. Each one dpkg does not list as installed, and
        each entry that is not a plain package name (a version or release pin), is returned
        in RV(packages_missing).
    type: list
    elements: str
    default: []
"""

RETURN = r"""
secret_id_present:
  description: Whether the secret-id file exists.
  type: bool
accessor:
  description: The accessor beside the secret-id, empty when there is no secret-id or no accessor.
  type: str
wrapped_pending:
  description: Whether a wrapping token waits for the worker.
  type: bool
wrapped_refused:
  description: Whether the worker refused a wrapping token.
  type: bool
refused_accessor:
  description: The accessor of the secret-id in the refused token, empty when none was refused.
  type: str
port_listeners:
  description: The lines of C(ss -Htlne) for listeners on O(port).
  type: list
  elements: str
main_pid:
  description: The worker unit's MainPID, C(0) when it does not run.
  type: str
control_group:
  description: The worker unit's ControlGroup, empty when it does not run.
  type: str
service_uid:
  description: The service user's uid, null when there is no such user yet.
  type: str
service_mgr:
  description: C(systemd) when systemd runs the host, else C(other).
  type: str
systemd_version:
  description: The systemd version, 0 when unknown.
  type: int
vault_reachable:
  description: The O(vault_addrs) that accepted a TCP connection within O(connect_timeout).
  type: list
  elements: str
paths_present:
  description: The O(paths) that exist on the host (a dangling link counts).
  type: list
  elements: str
packages_missing:
  description: >-
    The O(packages) that are not installed, in their order; all of them when the host has no
    dpkg-query.
  type: list
  elements: str
"""

import os
import pwd
import re
import socket
import time
from urllib.parse import urlsplit

from ansible.module_utils.basic import AnsibleModule

OPTIONS = {
    "secret_id_file": {"type": "path", "required": True},
    "accessor_file": {"type": "path", "required": True},
    "wrapped_file": {"type": "path", "required": True},
    "refused_file": {"type": "path", "required": True},
    "refused_accessor_file": {"type": "path", "required": True},
    "port": {"type": "int", "required": True},
    "service": {"type": "str", "required": True},
    "user": {"type": "str", "required": True},
    "vault_addrs": {"type": "list", "elements": "str", "default": []},
    "connect_timeout": {"type": "float", "default": 5},
    "paths": {"type": "list", "elements": "path", "default": []},
    "packages": {"type": "list", "elements": "str", "default": []},
}
# A package name as dpkg spells it (Debian policy 5.6.1); anything else is left to apt.
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


def read_text(path):
    """The file's content without surrounding whitespace; '' when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def reachable(url, timeout):
    """Whether ``url``'s host and port accept a TCP connection within ``timeout`` seconds,
    trying again after a refusal (a server that is starting), like wait_for."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme != "http" else 80)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(left, 0.1)):
                return True
        except (OSError, ValueError):
            if time.monotonic() + 0.5 >= deadline:
                return False
            time.sleep(0.5)


def listeners(module, port):
    """The ss lines of TCP listeners on ``port`` (with uid and cgroup: ss -e)."""
    ss = module.get_bin_path("ss")
    if ss is None:
        module.fail_json(
            msg="ss (Debian: iproute2) is missing on the host: the role needs it to tell "
            "whether another process holds the worker port. Nothing was changed."
        )
    rc, out, err = module.run_command([ss, "-Htlne", f"sport = :{port}"])
    if rc != 0:
        module.fail_json(msg=f"ss failed on the host ({err.strip() or rc}). Nothing was changed.")
    return [line for line in out.splitlines() if line.strip()]


def unit_state(module, service):
    """``(MainPID, ControlGroup)`` of the unit; ``("0", "")`` without systemd or the unit."""
    systemctl = module.get_bin_path("systemctl")
    if systemctl is None:
        return "0", ""
    rc, out, _err = module.run_command(
        [systemctl, "show", "--property=MainPID,ControlGroup", f"{service}.service"]
    )
    state = dict(line.split("=", 1) for line in out.splitlines() if "=" in line) if rc == 0 else {}
    return state.get("MainPID", "0") or "0", state.get("ControlGroup", "")


def systemd_version(module):
    """The number in ``systemctl --version``'s first line, 0 when there is none."""
    systemctl = module.get_bin_path("systemctl")
    if systemctl is None:
        return 0
    rc, out, _err = module.run_command([systemctl, "--version"])
    words = out.split()
    return int(words[1]) if rc == 0 and len(words) > 1 and words[1].isdigit() else 0


def missing_packages(module, names):
    """The ``names`` dpkg does not list as installed (``install ok installed``), in order."""
    plain = [name for name in names if PACKAGE_NAME.fullmatch(name)]
    dpkg_query = module.get_bin_path("dpkg-query") if plain else None
    installed = set()
    if dpkg_query is not None:
        # rc 1 when some name is unknown to dpkg: the others are still listed.
        _rc, out, _err = module.run_command(
            [dpkg_query, "--show", "--showformat=${Package}\t${Status}\n", *plain]
        )
        for line in out.splitlines():
            name, _tab, status = line.partition("\t")
            if status == "install ok installed":
                installed.add(name)
    return [name for name in names if name not in installed]


def uid_of(user):
    try:
        return str(pwd.getpwnam(user).pw_uid)
    except KeyError:
        return None


def probe(module):
    p = module.params
    secret_id_present = os.path.exists(p["secret_id_file"])
    wrapped_refused = os.path.exists(p["refused_file"])
    # sd_booted(): systemd runs the host when this directory exists.
    booted = os.path.isdir("/run/systemd/system")
    main_pid, control_group = unit_state(module, p["service"]) if booted else ("0", "")
    return {
        "changed": False,
        "secret_id_present": secret_id_present,
        "accessor": read_text(p["accessor_file"]) if secret_id_present else "",
        "wrapped_pending": os.path.exists(p["wrapped_file"]),
        "wrapped_refused": wrapped_refused,
        "refused_accessor": read_text(p["refused_accessor_file"]) if wrapped_refused else "",
        "port_listeners": listeners(module, p["port"]),
        "main_pid": main_pid,
        "control_group": control_group,
        "service_uid": uid_of(p["user"]),
        "service_mgr": "systemd" if booted else "other",
        "systemd_version": systemd_version(module) if booted else 0,
        "vault_reachable": [
            url for url in p["vault_addrs"] if reachable(url, p["connect_timeout"])
        ],
        "paths_present": [path for path in p["paths"] if os.path.lexists(path)],
        "packages_missing": missing_packages(module, p["packages"]),
    }


def main():
    module = AnsibleModule(argument_spec=OPTIONS, supports_check_mode=True)
    module.exit_json(**probe(module))


if __name__ == "__main__":
    main()
