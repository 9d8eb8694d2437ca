"""Loopback ports, and waiting for something to happen on them."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_RANDOM = random.SystemRandom()


# Above every fixed port of the kit (18200-18599, docs/interfaces.md).
_LOWEST = 19000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _pick_range() -> tuple[int, int] | None:
    """The ports below the kernel's ephemeral range and above the kit's fixed ones."""
    try:
        first_ephemeral = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (_LOWEST, first_ephemeral - 1) if first_ephemeral - _LOWEST > 1000 else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, outside the kernel's ephemeral
    range: outgoing connections take their local port from that range, so a port picked from
    it (as ``bind(0)`` does) can be taken by one of the run's many connections (an SSH master,
    a worker's keep-alive to Vault) between the pick and the server's bind, for as long as
    that connection lives. A server that starts on the port then fails."""
    span = _pick_range()
    for _ in range(200 if span is not None else 0):
        port = _RANDOM.randint(*span) if span is not None else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no range to pick from (or all 200 picks were in use)
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something true (returned); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
