"""How every benchmark's command line ends: the figures as markdown, and as JSON on request."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_results(path: Path, title: str, command: str, setting: str, body: str) -> None:
    """A ``results-*.md`` file: the title, how and when it was recorded (``command``, today, this
    machine's CPUs, ``setting`` said of the run), then ``body``."""
    path.write_text(
        f"# {title}\n\nRecorded by `{command}` on {dt.date.today().isoformat()}, one machine with"
        f" {os.cpu_count()} CPUs{setting}. See the module docstring for the method.\n\n"
        f"{body}\n"
    )


def report(result: Any, markdown: Callable[[Any], str], json_path: Path | None) -> int:
    """Print ``markdown(result)``; write ``result`` as JSON to ``json_path`` when given."""
    print(markdown(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0
