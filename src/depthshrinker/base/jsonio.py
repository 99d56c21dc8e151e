"""JSON files of the pipeline's stages (metrics, masks, reports): written atomically, read with a one-line error
naming the file. No torch here: the JSON-only stages (row, summaries, comparisons) start without it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from depthshrinker.base.config import ConfigError


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (indent 2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err})") from None
