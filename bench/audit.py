"""Reading a Vault (OpenBao) file audit log, for the benchmarks that count requests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def audit_requests(log: Path, offset: int = 0) -> Iterator[dict[str, Any]]:
    """The request entries of the audit log ``log`` from byte ``offset`` on (responses and lines
    that are not JSON are passed over)."""
    with open(log, "rb") as fh:
        fh.seek(offset)
        for raw in fh:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("type") == "request":
                yield entry
