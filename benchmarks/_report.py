"""How every benchmark hands over its figures: one JSON object on stdout and, with --out, in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | None, indent: int | None = 1) -> None:
    """Print `result` as JSON; with `out`, also write it there (parent folders made)."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
