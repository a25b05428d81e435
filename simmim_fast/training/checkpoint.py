"""Atomic checkpoints: written to a temporary file, fsynced, then renamed into place.

A run killed at any moment leaves only complete ``checkpoint_<step>.pt`` files (and perhaps a stray
``*.tmp`` that is ignored), so resuming takes the newest complete one.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from .. import serialization

_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


def checkpoint_path(output: str | os.PathLike, step: int) -> Path:
    return Path(output) / f"checkpoint_{step:08d}.pt"


def list_checkpoints(output: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``output``, oldest first."""
    out = Path(output)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output)
    return ckpts[-1][1] if ckpts else None


def atomic_save(obj, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def prune_checkpoints(output: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(output)[:-keep]:
        p.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint of ours, read as data (``serialization.load``: never a full unpickle)."""
    state = serialization.load(path, map_location=map_location)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint: {path} holds a {type(state).__name__}, not a simmim-fast checkpoint")
    return state


def resumed_settings(resume: str | None, output: str | os.PathLike) -> dict:
    """The CLI arguments stored in the checkpoint that ``--resume`` continues from ({} if none).

    ``resume`` is ``"auto"`` (newest checkpoint in ``output``) or a path. Loaded with ``mmap`` so only the
    pickled structure is read, not the weights; a damaged file gives {} (the run reports it when it loads).
    """
    if resume is None:
        return {}
    path = latest_checkpoint(output) if resume == "auto" else Path(resume)
    if path is None or not path.is_file():
        return {}
    try:
        state = serialization.load(path, mmap=True)
    except (ValueError, FileNotFoundError):  # damaged or unsafe: reported when the run loads it
        return {}
    return dict(state.get("args", {})) if isinstance(state, dict) else {}


def merge_resumed(merged: dict, explicit: dict, saved: dict, *, keep: tuple[str, ...]) -> dict:
    """``merged`` with the resumed run's ``saved`` settings for every key not in ``explicit`` nor ``keep``."""
    out = dict(merged)
    for k, v in saved.items():
        if k in out and k not in explicit and k not in keep:
            out[k] = v
    return out
