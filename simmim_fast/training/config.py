"""YAML ``--config`` files of the CLIs: moved to :mod:`simmim_fast.cli.config` (kept importable here)."""
from __future__ import annotations

from ..cli.config import read_config


def load_yaml(path: str, known: set[str]) -> dict:
    """``{field: value}`` of a YAML mapping whose keys (``-`` or ``_``) are in ``known``; errors name the
    file and line (:func:`simmim_fast.cli.config.read_config`)."""
    return {name: value for name, (value, _, _) in read_config(path, known).items()}
