"""CaptchaAI (2captcha-compatible) protocol emulator for tests, the demo and benchmarks.

Run it: ``python -m testkit.emulator --port 18300 --admin-port 18301``.
From Python: ``EmulatorProcess(port, admin_port, **options)`` (a subprocess, as a context
manager) and ``EmulatorAdmin(admin_url)``; in-process: ``EmulatorServer``.
See ``core`` for the wire formats and ``Options`` for every setting.
"""

from .client import (
    EmulatorAdmin,
    EmulatorAdminError,
    EmulatorProcess,
    start_detached,
    stop_detached,
)
from .core import COUNTER_NAMES, DelaySpec, Emulator, Options, key_id, mask_key
from .server import EmulatorServer

__all__ = [
    "COUNTER_NAMES",
    "DelaySpec",
    "Emulator",
    "EmulatorAdmin",
    "EmulatorAdminError",
    "EmulatorProcess",
    "EmulatorServer",
    "Options",
    "key_id",
    "mask_key",
    "start_detached",
    "stop_detached",
]
