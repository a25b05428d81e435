"""Atomic checkpoints: written to a temporary file, fsynced, then renamed into place.

A run killed at any moment leaves only complete ``checkpoint_<step>.pt`` files (and perhaps a stray
``.*.tmp`` of the killed writer, removed by the next run in that folder: ``clean_stale_temps``), so
resuming takes the newest complete one; ``load_latest`` also steps back past a damaged newest file.
Before a save the trainers check the weights and optimizer state are finite (``nonfinite_tensors``).

Two forms, one numbering: a single file ``checkpoint_<step>.pt`` (one process, DDP), or a sharded folder
``checkpoint_<step>.dcp/`` (FSDP, written by ``torch.distributed.checkpoint``: ``training.sharded_checkpoint``,
renamed into place when complete). Listing, resuming, pruning, branches and stale-temp cleanup treat both
alike; ``load_checkpoint`` reads a folder's metadata (and, asked for the weights, its consolidated model).

Branches (``plan_resume``). Resuming from a checkpoint at step ``s`` into a run folder that already
holds checkpoints of later steps (``--resume <output>/checkpoint_<s>.pt`` while ``checkpoint_<t>.pt``,
``t > s``, is there) starts a new line of training from ``s``. Continuing in the folder would let the
new line prune the later checkpoints, overwrite them at the same steps, and truncate ``metrics.csv``;
the next ``--resume`` would then mix the two lines. So:

* without ``--force`` the new line is written to its own run folder ``<output>/branch-<s>/`` (then
  ``branch-<s>-2``, ``-3``, ... if that exists) holding ``BRANCH.json`` (the parent checkpoint) and
  copies of the parent's ``metrics.csv``/``eval.csv`` (the new run drops their rows past ``s``). Nothing
  in ``<output>`` changes: ``--resume`` (auto) on ``<output>`` still continues its own newest checkpoint
  (and says which branch folders exist); the branch is continued with ``--output <output>/branch-<s>
  --resume``.
* with ``--force`` the new line continues in ``<output>`` itself, and what belongs to the later steps
  is moved, not deleted, into ``<output>/abandoned-<n>/``: the checkpoints and ``reconstruction_<t>.png``
  of steps after ``s``, a ``best.pt``/``best_ema.pt`` saved after ``s``, and copies of ``metrics.csv``,
  ``eval.csv``, ``loss.png``.

Resuming the newest checkpoint (``--resume`` auto, or its path) is not a branch; neither is a
checkpoint from another folder when ``<output>`` holds nothing newer than it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import serialization

_NAME = re.compile(r"^checkpoint_(\d+)\.(pt|dcp)$")


def checkpoint_path(output: str | os.PathLike, step: int) -> Path:
    return Path(output) / f"checkpoint_{step:08d}.pt"


def sharded_path(output: str | os.PathLike, step: int) -> Path:
    """The sharded (FSDP) checkpoint folder of ``step``: ``checkpoint_<step>.dcp``."""
    return Path(output) / f"checkpoint_{step:08d}.dcp"


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete sharded checkpoint folder (``checkpoint_<step>.dcp``)."""
    from .sharded_checkpoint import is_sharded_checkpoint

    return is_sharded_checkpoint(path)


def list_checkpoints(output: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``output``, oldest first: ``checkpoint_<step>.pt`` files
    and ``checkpoint_<step>.dcp`` folders (a folder sorts after a file of the same step)."""
    out = Path(output)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and (p.is_file() if m.group(2) == "pt" else is_sharded(p)):
            found.append((int(m.group(1)), m.group(2) == "dcp", p))
    return [(s, p) for s, _, p in sorted(found)]


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output)
    return ckpts[-1][1] if ckpts else None


_TEMP = re.compile(r"^\.(?:checkpoint_\d+|best|best_ema)\.pt\.(\d+)\.tmp$")
_TEMP_DIR = re.compile(r"^\.checkpoint_\d+\.dcp\.(\d+)(?:\.old)?\.tmp$")  # sharded_checkpoint.save_sharded


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
        m = _TEMP_DIR.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


class _RecordingFile:
    """A binary file whose ``write`` remembers the ``OSError`` it raised: torch's zip writer turns a failed
    write (disk full) into a ``RuntimeError`` about stream positions that no longer names the cause."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` to a temp file, fsync, rename into place. A failing write (disk full, permissions)
    removes its temp file and leaves the previous checkpoints as they were; it raises ``OSError`` with
    the cause's ``errno`` (``ENOSPC`` for a full disk) and a message naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rec = None
    try:
        with open(tmp, "wb") as f:
            rec = _RecordingFile(f)
            torch.save(obj, rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else (rec.error if rec is not None else None)
        if cause is not None and isinstance(e, Exception):
            raise OSError(cause.errno, f"checkpoint: could not save {path}: {cause.strerror or cause} (the partial "
                                       f"file was removed; earlier checkpoints are unchanged)") from e
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
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
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
            return path, load_checkpoint(path, map_location=map_location, weights=False), notes
        except serialization.UnsafeCheckpointError:
            raise
        except Exception as e:  # damaged: ValueError from the loader, or whatever a garbled pickle raises
            notes.append(f"skipped {path.name}: {e if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'}")
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
        return Path(resume), load_checkpoint(resume, weights=False)
    found = load_latest(output)
    if found is None:
        if is_main:
            log.warning("--resume: no checkpoint in %s; starting from scratch", output)
        return None, None
    path, state, notes = found
    for note in notes if is_main else ():
        log.warning("--resume: %s; resuming from %s instead", note, path.name)
    return path, state


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, weights: bool = True) -> dict:
    """A checkpoint of ours, read as data (``serialization.load``: never a full unpickle).

    A sharded ``checkpoint_<step>.dcp`` folder gives its metadata (``step``, ``args``, ``plan``, ``scheduler``,
    ``scaler``, ``rng``, ``world_size``, ``sharded: True``; its DCP index checked) and, with ``weights``, the
    model consolidated into ordinary CPU tensors under ``model`` (no optimizer state: a trainer loads the
    shards with ``sharded_checkpoint.load_sharded``). ``weights`` does not matter for a file.
    """
    if Path(path).is_dir() and Path(path).suffix == ".dcp":
        from . import sharded_checkpoint as sc

        meta = sc.read_meta(path)
        sc.read_dcp_metadata(path)  # data only, inside the folder: refused (raises) otherwise
        if weights:
            meta["model"] = sc.consolidated_state(path)
        return meta
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
    if path is not None and path.is_dir() and not is_sharded(path):  # a run folder: its newest checkpoint
        path = latest_checkpoint(path)
    if path is None or not (path.is_file() or is_sharded(path)):
        return {}
    try:
        if path.is_dir():
            from .sharded_checkpoint import read_meta

            state = read_meta(path)
        else:
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


# ---- branches -----------------------------------------------------------------------------------

_BRANCH = re.compile(r"^branch-(\d+)(?:-(\d+))?$")
_ABANDONED = re.compile(r"^abandoned-(\d+)$")
_STEP_FILES = re.compile(r"^(?:checkpoint_(\d+)\.(?:pt|dcp)|reconstruction_(\d+)\.png)$")
_BEST_FILES = ("best.pt", "best_ema.pt")
_LOG_FILES = ("metrics.csv", "eval.csv", "loss.png")
BRANCH_INFO = "BRANCH.json"


@dataclass(frozen=True)
class ResumePlan:
    """Where a run starts and where it writes (:func:`plan_resume`).

    ``path``/``state``: the checkpoint resumed from (``None`` for a fresh run); ``step`` its step (0 when
    fresh); ``write_dir``: the run folder this run writes checkpoints, logs and pictures to (``output``,
    or a new ``branch-<s>`` folder inside it); ``branched_from``: the checkpoint a branch starts at (None
    when this is no new branch); ``newer``: the later checkpoints of ``output`` that this run leaves alone
    (branch) or moved aside (``force``); ``moved_to``: the ``abandoned-<n>`` folder (``force``); ``notes``:
    lines for the log, already logged by :func:`plan_resume` on the main process.
    """

    path: Path | None
    state: dict | None
    step: int
    write_dir: Path
    branched_from: Path | None = None
    newer: tuple[Path, ...] = ()
    moved_to: Path | None = None
    notes: tuple[str, ...] = field(default=())


def _state_step(state: dict | None) -> int:
    try:
        return int(state.get("step", 0)) if isinstance(state, dict) else 0
    except (TypeError, ValueError):
        return 0


def _file_step(path: Path) -> int | None:
    """The ``step`` a small checkpoint (``best.pt``) records, read with mmap; None when unreadable."""
    try:
        return _state_step(serialization.load(path, mmap=True))
    except Exception:  # damaged or unsafe: it is not moved, and not ours to judge here
        return None


def branch_folders(output: str | os.PathLike) -> list[Path]:
    """The ``branch-<s>[-k]`` folders of ``output``, sorted by step and number."""
    out = Path(output)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _BRANCH.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2) or 1)), p))
    return [p for _, p in sorted(found)]


def _new_folder(output: Path, stem: str) -> Path:
    """``output/<stem>``, else ``<stem>-2``, ``-3``, ... : the first that could be created (atomically)."""
    k = 1
    while True:
        path = output / (stem if k == 1 else f"{stem}-{k}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            k += 1


def _next_abandoned(output: Path) -> Path:
    n = 1 + max((int(m.group(1)) for p in output.iterdir() if (m := _ABANDONED.match(p.name))), default=0)
    while True:
        path = output / f"abandoned-{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def _start_branch(output: Path, parent: Path, step: int) -> Path:
    """Create ``output/branch-<step>[-k]`` with ``BRANCH.json`` and copies of the parent's logs."""
    folder = _new_folder(output, f"branch-{step}")
    (folder / BRANCH_INFO).write_text(json.dumps(
        {"parent": str(parent.resolve()), "step": step, "parent_folder": str(output.resolve())}, indent=1) + "\n")
    for name in ("metrics.csv", "eval.csv"):
        if (output / name).is_file():
            shutil.copy2(output / name, folder / name)
    return folder


def _move_aside(output: Path, step: int) -> tuple[Path | None, list[Path]]:
    """Move what belongs to steps after ``step`` into a new ``abandoned-<n>``; copy the logs there."""
    later = []
    for p in sorted(output.iterdir()):
        m = _STEP_FILES.match(p.name)
        if m and (p.is_file() or is_sharded(p)) and int(m.group(1) or m.group(2)) > step:
            later.append(p)
        elif p.name in _BEST_FILES and p.is_file():
            best_step = _file_step(p)
            if best_step is not None and best_step > step:
                later.append(p)
    if not later:
        return None, []
    folder = _next_abandoned(output)
    for name in _LOG_FILES:
        if (output / name).is_file():
            shutil.copy2(output / name, folder / name)
    for p in later:
        os.replace(p, folder / p.name)
    return folder, later


def plan_resume(resume: str | os.PathLike | None, output: str | os.PathLike, *, force: bool = False,
                is_main: bool = True, write_dir: str | os.PathLike | None = None) -> ResumePlan:
    """Where a run in ``output`` starts and where it writes; branches as the module docstring says.

    ``resume``: None (fresh; an error if ``output`` already holds checkpoints), ``"auto"`` (the newest
    readable checkpoint of ``output``, stepping back past a damaged one; fresh with a warning if there
    is none), a checkpoint path, or a run folder (its newest readable checkpoint). ``force``: a resume
    from an older checkpoint continues in ``output`` and moves the later steps' files aside, instead of
    writing to a new branch folder.

    Only the main process (``is_main``) changes files (temp-file cleanup, the branch folder, the moves)
    and logs. Other ranks compute the same resume point without side effects and must take the main
    process's folder, passed as ``write_dir`` (e.g. broadcast with ``all_gather_objects``).
    """
    log = logging.getLogger("simmim_fast.checkpoint")
    output = Path(output)
    if is_main:
        for p in clean_stale_temps(output):
            log.info("removed %s, left by a save that was killed", p)
    notes: list[str] = []
    if resume is None:
        if list_checkpoints(output):
            raise ValueError(f"--output: {output} already holds checkpoints; pass --resume to continue that run "
                             f"or choose another --output")
        return ResumePlan(None, None, 0, Path(write_dir) if write_dir else output)
    if resume == "auto" or (Path(resume).is_dir() and not is_sharded(resume)):
        folder = output if resume == "auto" else Path(resume)
        found = load_latest(folder)
        if found is None:
            if resume != "auto":
                raise ValueError(f"--resume: {folder} holds no checkpoint")
            if is_main:
                log.warning("--resume: no checkpoint in %s; starting from scratch", output)
            return ResumePlan(None, None, 0, Path(write_dir) if write_dir else output)
        path, state, skipped = found
        notes += [f"--resume: {n}; resuming from {path.name} instead" for n in skipped]
    else:
        path, state = Path(resume), load_checkpoint(resume, weights=False)
    step = _state_step(state)
    newer = tuple(p for s, p in list_checkpoints(output) if s > step and p.resolve() != path.resolve())
    if resume == "auto":  # the newest readable one: anything newer is damaged, and is overwritten in time
        newer = ()
    branched_from = moved_to = None
    target = output
    if newer:
        branched_from = path
        shown = ", ".join(p.name for p in newer[:3]) + (" ..." if len(newer) > 3 else "")
        if force:
            if is_main:
                moved_to, _ = _move_aside(output, step)
            notes.append(f"--resume --force: continuing {output} from step {step} ({path.name}); the later "
                         f"checkpoints ({shown}) and their files were moved to {moved_to or output / 'abandoned-<n>'}")
        else:
            target = _start_branch(output, path, step) if is_main else output / f"branch-{step}"
            notes.append(f"--resume: {path.name} (step {step}) is older than {shown} in {output}: this run is a new "
                         f"branch written to {target} (the later checkpoints stay as they are; pass --force to "
                         f"continue in {output} and move them to an abandoned-<n> folder). Continue this branch "
                         f"with --output {target} --resume")
    elif resume == "auto" and is_main:
        others = [b for b in branch_folders(output) if list_checkpoints(b)]
        if others:
            notes.append(f"--resume: continuing {output}'s own newest checkpoint {path.name}; it also holds "
                         f"branch folders ({', '.join(b.name for b in others[:3])}"
                         f"{' ...' if len(others) > 3 else ''}): continue one with --output {others[-1]} --resume")
    if write_dir is not None:
        target = Path(write_dir)
    if is_main:
        for n in notes:
            log.warning("%s", n)
    return ResumePlan(path, state, step, target, branched_from, newer, moved_to, tuple(notes))
