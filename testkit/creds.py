"""Keys and names made at run time, private files, and the assertion that none leaked."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def new_key() -> str:
    """A CaptchaAI-shaped key (32 hex), made now: no key of a test lives in the repository."""
    return secrets.token_hex(16)


def new_tag(prefix: str = "t") -> str:
    """A short unique name part (letters and digits, starts with a letter)."""
    return f"{prefix}{secrets.token_hex(3)}"


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to a new 0600 file (an existing one is replaced, never reused)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def assert_no_secrets(text: str, values: Iterable[str]) -> None:
    """Fail when any of ``values`` appears in ``text``; the message names only its last 4."""
    for value in values:
        assert value not in text, f"a secret (…{value[-4:]}) appeared in the output"


@contextmanager
def secret_vars_file(directory: Path, name: str, data: Mapping[str, Any]) -> Iterator[Path]:
    """Extra vars that hold secrets: a 0600 file in ``directory``, deleted after use."""
    path = write_private(directory / name, json.dumps(dict(data)))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
