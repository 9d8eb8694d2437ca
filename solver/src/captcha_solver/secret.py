"""A masked string wrapper for keys, secret-ids and tokens.

``Secret`` is deliberately *not* a ``str`` subclass: every way of turning it into text
(``str``, ``repr``, f-strings, ``%`` formatting, JSON via ``default=str``) yields the masked
fingerprint ``***ab12``. Code that needs the real value calls :meth:`Secret.reveal` at the
last possible moment (the POST body, the hvac call).

Every value wrapped here is also registered with :data:`REGISTRY`, which the logging filter
uses to scrub the raw value from any log record that somehow got hold of it.
"""

from __future__ import annotations

import hmac
import threading
import weakref
from collections.abc import Iterator
from typing import NoReturn

MASK_PREFIX = "***"
_MIN_LEN_FOR_SUFFIX = 8


def fingerprint(value: str) -> str:
    """``***`` + the last four characters (only ``***`` for short values)."""
    if len(value) < _MIN_LEN_FOR_SUFFIX:
        return MASK_PREFIX
    return MASK_PREFIX + value[-4:]


class SecretRegistry:
    """Process-wide set of the secret values that must never appear in output: the values of
    the :class:`Secret` objects still alive. A key rotated away, a renewed-away token or a spent
    secret-id leaves it with its last ``Secret``, so the process holds no old value for masking
    (memory only means: not one copy more than needed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: weakref.WeakValueDictionary[int, Secret] = weakref.WeakValueDictionary()

    def add(self, secret: Secret) -> None:
        if len(secret) < 4:  # too short to scrub meaningfully; never log such values anyway
            return
        with self._lock:
            self._live[id(secret)] = secret

    def _values(self) -> frozenset[str]:
        with self._lock:
            return frozenset(s.reveal() for s in list(self._live.values()))

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())

    def mask(self, text: str) -> str:
        """Replace every registered value in *text* by its fingerprint."""
        values = self._values()
        if not values:
            return text
        # Longest first, so a value that contains another is replaced whole.
        for value in sorted(values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, fingerprint(value))
        return text


REGISTRY = SecretRegistry()


class Secret:
    """A secret string whose every text form is masked."""

    __slots__ = ("__weakref__", "_value")

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value
        REGISTRY.add(self)

    def reveal(self) -> str:
        """The real value. Use only where it leaves the process (POST body, Vault call)."""
        return self._value

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.fingerprint!r})"

    def __str__(self) -> str:
        return self.fingerprint

    def __format__(self, format_spec: str) -> str:
        return format(self.fingerprint, format_spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret values cannot be pickled")
