"""Process hardening for a worker that holds the key, its Vault token and its secret-id in memory.

``harden_process()`` runs first thing in ``captcha-solver serve``: no core file may be written
(``RLIMIT_CORE`` 0, which the systemd unit also sets with ``LimitCORE=0``), and the process is
marked non-dumpable, so a crash writes no memory image and other processes of the same user
cannot read its memory through ``/proc`` or ptrace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0))


def harden_process() -> list[str]:
    """Apply the hardening; return what could not be applied (empty when all of it was)."""
    missing: list[str] = []
    # Under systemd LimitCORE=0 has set it already (and the unit's syscall filter refuses
    # setrlimit): change it only when it is not 0 yet.
    if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ValueError, OSError) as exc:
            missing.append(f"core limit: {exc}")
    if sys.platform.startswith("linux"):
        if _prctl(_PR_SET_DUMPABLE, 0) != 0:
            missing.append(f"non-dumpable: errno {ctypes.get_errno()}")
    else:  # pragma: no cover - the worker runs on Linux
        missing.append("non-dumpable: only on Linux")
    return missing


def is_dumpable() -> bool:
    """Whether this process could still dump core or be read through /proc by its user."""
    return _prctl(_PR_GET_DUMPABLE) != 0
