"""YAML ``--config`` files of the CLIs: keys mirror the flags (``-`` or ``_``), unknown keys are errors."""
from __future__ import annotations

from pathlib import Path

import yaml


def load_yaml(path: str, known: set[str]) -> dict:
    """``{field: value}`` from a YAML mapping; ``known`` lists the accepted field names."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config: {path} does not exist")
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of option: value")
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise ValueError(f"--config: unknown key {k!r} in {path}; known keys: {', '.join(sorted(known))}")
        out[key] = v
    return out
