"""Path rules of the CLI options, checked before any heavy import: a wrong path is reported at once.

Rules (``Option.path``):
    ``file``          an existing file (``--config``, ``--resume FILE``)
    ``dir``           an existing folder (``--data``)
    ``file_or_dir``   an existing file or folder (``--checkpoint``, ``--pretrained``, ``--images``)
    ``out_dir``       a folder to write into, created when missing: not a file, inside a writable folder
    ``out_file``      a file to write: not a folder, inside a writable folder

Writability is ``os.access`` of the nearest existing folder (root passes permission bits anyway).
"""
from __future__ import annotations

import os
from pathlib import Path

RULES = ("file", "dir", "file_or_dir", "out_dir", "out_file")


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_parent_problem(p: Path, what: str) -> str | None:
    base = _nearest_existing(p.parent if what == "file" else p)
    if not base.is_dir():
        return f"{p} cannot be created: {base} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{p} is not writable (no write permission in {base})"
    return None


def path_problem(rule: str, value: str, *, expect: str | None = None) -> str | None:
    """What is wrong with ``value`` under ``rule`` (one phrase, ends with what was expected), or None."""
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
    p = Path(value)
    if rule == "out_dir":
        if p.exists() and not p.is_dir():
            return f"{p} is a file (expected {expect or 'a folder to write into'})"
        return _writable_parent_problem(p, "dir")
    if rule == "out_file":
        if p.is_dir():
            return f"{p} is a folder (expected {expect or 'the path of a file to write'})"
        return _writable_parent_problem(p, "file")
    default = {"file": "a file", "dir": "a folder", "file_or_dir": "a file or a folder"}[rule]
    expected = expect or default
    if not p.exists():
        return f"{p} does not exist (expected {expected})"
    if rule == "file" and not p.is_file():
        return f"{p} is a folder (expected {expected})"
    if rule == "dir" and not p.is_dir():
        return f"{p} is a file (expected {expected})"
    return None
