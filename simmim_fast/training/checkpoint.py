"""Atomic checkpoints: written to a temporary file, fsynced, then renamed into place.

A run killed at any moment leaves only complete ``checkpoint_<step>.pt`` files (and perhaps a stray
``.*.tmp`` of the killed writer, removed by the next run in that folder: ``clean_stale_temps``), so
resuming takes the newest complete one; ``load_latest`` also steps back past a damaged newest file.
Before a save the trainers check the weights and optimizer state are finite (``nonfinite_tensors``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import re
from pathlib import Path
from typing import Iterator

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


_TEMP = re.compile(r"^\.(?:checkpoint_\d+|best|best_ema)\.pt\.(\d+)\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(output: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed saves left in ``output`` (ours only: matched by name, and only
    those whose writing process is gone). Returns what was removed."""
    out = Path(output)
    removed = []
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` to a temp file, fsync, rename into place. A failing write (disk full, permissions)
    removes its temp file and leaves the previous checkpoints as they were."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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


def nonfinite_tensors(state: dict, *, limit: int = 5) -> list[str]:
    """Names of floating-point tensors of a state dict (or nested dicts/lists) that hold NaN/inf.

    One stacked ``isfinite`` reduction and one synchronisation per device, so it is cheap at save steps.
    """
    named: list[tuple[str, torch.Tensor]] = []

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.numel():
                named.append((prefix, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("", state)
    ok: dict[str, bool] = {}
    for device in {t.device for _, t in named}:  # one stacked reduction and one sync per device
        group = [(n, t) for n, t in named if t.device == device]
        flags = torch.stack([torch.isfinite(t).all() for _, t in group]).tolist()
        ok.update({n: f for (n, _), f in zip(group, flags)})
    return [n for n, _ in named if not ok[n]][:limit]


def check_state_finite(model_state: dict, optimizer, *, step: int, last_good) -> None:
    """Stop a run (``TrainingDiverged``) whose weights or optimizer state became NaN/inf, before a save.

    The trainers' loss check sees the loss computed before the update; this sees what the update wrote.
    """
    from .cli import TrainingDiverged

    bad = nonfinite_tensors({"model": model_state, "optimizer": optimizer.state_dict()["state"]})
    if bad:
        raise TrainingDiverged(
            f"weights or optimizer state became NaN/inf by step {step} ({', '.join(bad)}); stopping without "
            f"saving. Last good checkpoint: {last_good or 'none'}"
        )


def load_latest(output: str | os.PathLike, map_location="cpu") -> tuple[Path, dict, list[str]] | None:
    """The newest checkpoint of ``output`` that reads: ``(path, state, notes)``; ``notes`` say which newer
    files were damaged (truncated, not a checkpoint) and skipped. A file refused as unsafe is not skipped:
    its error is raised. None when the folder has no checkpoint."""
    notes = []
    for _, path in reversed(list_checkpoints(output)):
        try:
            return path, load_checkpoint(path, map_location=map_location), notes
        except serialization.UnsafeCheckpointError:
            raise
        except ValueError as e:
            notes.append(f"skipped {path.name}: {e}")
    if notes:
        raise ValueError(f"--resume: no readable checkpoint in {output} ({'; '.join(notes)})")
    return None


LOCK_NAME = ".simmim_fast.lock"


@contextlib.contextmanager
def run_lock(output: str | os.PathLike) -> Iterator[Path]:
    """One run owns ``output`` at a time: ``<output>/.simmim_fast.lock`` holds the owner's host and pid.

    A lock of a live process on this host is a ``ValueError`` naming ``--output``; a stale one (its process
    is gone) is taken over with a warning. The lock is removed when the block ends.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = lock_owner(output)
            if owner is not None:
                raise ValueError(f"--output: {out} is in use by another run (host {owner[0]}, pid {owner[1]}); "
                                 f"wait for it, stop it, or choose another --output")
            logging.getLogger("simmim_fast.checkpoint").warning("--output: taking over the stale lock %s", path)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    try:
        yield path
    finally:
        try:
            if path.read_text().strip() == me:
                path.unlink()
        except OSError:
            pass


def lock_owner(output: str | os.PathLike) -> tuple[str, int] | None:
    """``(host, pid)`` of the live run holding ``output``'s lock, or None (no lock, or its process is gone).
    A lock from another host is taken as live (its process cannot be checked from here)."""
    path = Path(output) / LOCK_NAME
    try:
        host, pid = path.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname():
        return host, pid
    return (host, pid) if _pid_alive(pid) and pid != os.getpid() else None


def resume_point(resume: str | None, output: str | os.PathLike, *, is_main: bool = True) -> tuple[Path | None, dict | None]:
    """Where a run in ``output`` starts: ``(checkpoint path, state)`` or ``(None, None)`` for a fresh run.

    Removes temp files of killed saves first. ``resume``: None (fresh; an error if ``output`` already
    holds checkpoints), ``"auto"`` (the newest readable checkpoint of ``output``, stepping back past a
    damaged one with a warning; fresh with a warning if there is none) or a checkpoint path.
    """
    log = logging.getLogger("simmim_fast.checkpoint")
    if is_main:
        for p in clean_stale_temps(output):
            log.info("removed %s, left by a save that was killed", p)
    if resume is None:
        if list_checkpoints(output):
            raise ValueError(f"--output: {output} already holds checkpoints; pass --resume to continue that run "
                             f"or choose another --output")
        return None, None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    found = load_latest(output)
    if found is None:
        if is_main:
            log.warning("--resume: no checkpoint in %s; starting from scratch", output)
        return None, None
    path, state, notes = found
    for note in notes if is_main else ():
        log.warning("--resume: %s; resuming from %s instead", note, path.name)
    return path, state


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
