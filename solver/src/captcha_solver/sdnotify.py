"""Minimal sd_notify(3): tell systemd ``READY=1`` / ``STOPPING=1`` (``Type=notify`` units).

A no-op unless systemd set ``NOTIFY_SOCKET``; never raises (a lost datagram must not stop
the worker).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send *state* (e.g. ``"READY=1"``) to systemd; True when a datagram was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed", extra={"error": str(exc)})
        return False
    return True
