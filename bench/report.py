"""How every benchmark's command line ends: the figures as markdown, and as JSON on request."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def report(result: Any, markdown: Callable[[Any], str], json_path: Path | None) -> int:
    """Print ``markdown(result)``; write ``result`` as JSON to ``json_path`` when given."""
    print(markdown(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return 0
