# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Validation filters with the same rules as the modules (for checks before any change).

``cidr_errors(values)``     list of messages for malformed CIDRs/addresses (empty = all good)
``duration_errors(values)`` list of messages for values that are not Vault durations
"""

from __future__ import annotations

from ansible_collections.captcha_kit.vault.plugins.module_utils.normalize import (
    normalize_cidr,
    ttl_to_seconds,
)


def _items(values):
    if values is None:
        return []
    if isinstance(values, str | int):
        return [values]
    return list(values)


def _errors(check, values):
    """The message of each value in ``values`` that ``check`` refuses with ``ValueError``."""
    errors = []
    for value in _items(values):
        try:
            check(value)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def cidr_errors(values):
    """Messages for each malformed CIDR or address in ``values``."""
    return _errors(normalize_cidr, values)


def duration_errors(values):
    """Messages for each value in ``values`` that is not a duration (``300``, ``5m``, ``1h30m``)."""
    return _errors(ttl_to_seconds, values)


class FilterModule:
    """captcha_kit.vault validation filters."""

    def filters(self):
        return {"cidr_errors": cidr_errors, "duration_errors": duration_errors}
