# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Normalising and comparing: pure functions shared by the modules and the filter plugins.

This file imports neither hvac nor requests. The filters (``filter/validate.py``) check input
before any change with the modules' own rules, and a filter is imported again in every task's
worker process on the controller, so loading hvac there would cost every such task about 0.2
CPU-seconds.

``ttl_to_seconds(value) -> int``
    ``"1h30m"``, ``"90s"``, ``"45"``, ``45``, ``None``/``""`` -> seconds (``None``/``""`` -> 0).
    Raises ``ValueError`` on garbage.
``normalize_cidr(value) -> str``
    ``"127.0.0.1"`` -> ``"127.0.0.1/32"``, ``"::1"`` -> ``"::1/128"``, ``"10.0.0.0/8"`` unchanged;
    raises ``ValueError`` on a malformed value or on host bits set (``10.0.0.1/8``).
``normalize_cidr_list(values) -> list[str]``
    List or comma separated string -> sorted, deduplicated normalised CIDRs.
``normalize_str_list(values) -> list[str]``
    List or comma separated string -> sorted, deduplicated, stripped strings without empties.
``dict_difference(current, desired) -> dict``
    The keys of ``desired`` whose value differs from ``current`` (missing keys in ``current``
    count as different), with the desired values.
"""

from __future__ import annotations

import ipaddress
import re

_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TTL_PART = re.compile(r"(\d+)([smhd]?)")


def ttl_to_seconds(value):
    """Normalise a Vault duration (``45``, ``"90s"``, ``"1h30m"``, ``"7d"``) to int seconds."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative duration: {value}")
        return value
    text = str(value).strip().lower()
    if not text:
        return 0
    pos = 0
    total = 0
    while pos < len(text):
        match = _TTL_PART.match(text, pos)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 300, '300s', '5m', '1h30m')")
        total += int(match.group(1)) * _TTL_UNITS[match.group(2)]
        pos = match.end()
    return total


def normalize_cidr(value):
    """``"127.0.0.1"`` -> ``"127.0.0.1/32"``; raises ``ValueError`` on malformed input."""
    text = str(value).strip()
    if not text:
        raise ValueError("empty CIDR")
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError as exc:
        raise ValueError(f"malformed CIDR {text!r}: {exc}") from None


def _as_list(values):
    if values is None:
        return []
    if isinstance(values, str):
        return values.split(",")
    return list(values)


def normalize_cidr_list(values):
    """List (or comma separated string) of addresses/CIDRs -> sorted unique normalised CIDRs."""
    return sorted({normalize_cidr(v) for v in _as_list(values) if str(v).strip()})


def normalize_str_list(values):
    """List (or comma separated string) -> sorted unique stripped strings, no empties."""
    return sorted({str(v).strip() for v in _as_list(values) if str(v).strip()})


def dict_difference(current, desired):
    """Keys of ``desired`` whose value differs from ``current``, with the desired values."""
    current = current or {}
    return {k: v for k, v in desired.items() if k not in current or current[k] != v}
