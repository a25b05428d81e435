"""Sharded checkpoints: a folder ``checkpoint_<step>.dcp/`` written by ``torch.distributed.checkpoint`` (DCP).

Layout. ``__<rank>_0.distcp`` (each rank's shards of the model and optimizer state, as
``torch.distributed.checkpoint.state_dict.get_state_dict`` gives them: parameters by name), ``.metadata``
(DCP's index: every tensor's global shape and which file holds which chunk), and ``simmim_fast.pt``, ours:
``format``, ``step``, ``epoch``, ``args``, ``plan``, ``scheduler``, ``scaler``, ``rng`` (one state per rank),
``world_size``, ``sharded: True``. Written by every rank into ``.checkpoint_<step>.dcp.<pid>.tmp/`` (rank 0's
pid), then rank 0 adds ``simmim_fast.pt`` and renames the folder into place: a run killed at any moment leaves
only complete ``.dcp`` folders (and a temp folder that the next run removes). For several nodes the run
folder must be on a file system every node sees (each rank writes its own file into the folder).

Resharding. Because DCP records global shapes, a checkpoint saved by N processes loads into M (FSDP with
another world size, DDP, or one process with an unsharded model: :func:`load_sharded`). ``consolidated_state``
reads the whole model back as ordinary tensors without building it (``python -m simmim_fast.models.interchange
consolidate`` writes it as our single-file checkpoint).

Loaded as data. DCP reads ``.metadata`` with ``pickle.load`` and every non-tensor value (the optimizer's
hyperparameters) with ``torch.load(weights_only=False)`` (torch 2.11 to 2.14: ``FileSystemReader.read_metadata``,
``DefaultLoadPlanner.load_bytes``): a crafted file runs code while it loads. Here the metadata goes through a
restricted unpickler that knows only DCP's own metadata classes, ``torch.Size``, dtypes and layouts
(:class:`SafeFileSystemReader`; anything else raises :class:`UnsafeShardedCheckpointError` naming it), its file
names must stay inside the folder, non-tensor values are read with ``torch.load(weights_only=True)``
(:class:`SafeLoadPlanner`; tensors already are), and ``simmim_fast.pt`` goes through
``simmim_fast.serialization.load``.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import serialization

__all__ = ["SUFFIX", "META_NAME", "FORMAT", "UnsafeShardedCheckpointError", "is_sharded_checkpoint", "read_meta",
           "read_dcp_metadata", "SafeFileSystemReader", "SafeLoadPlanner", "save_sharded", "load_sharded",
           "load_full_state", "consolidated_state", "named_optimizer_state"]

log = logging.getLogger("simmim_fast.checkpoint")

SUFFIX = ".dcp"
META_NAME = "simmim_fast.pt"
DCP_METADATA = ".metadata"
FORMAT = "simmim_fast.pretrain.v1"
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")  # a plain file name inside the folder


class UnsafeShardedCheckpointError(serialization.UnsafeCheckpointError):
    """A ``.dcp`` folder whose ``.metadata`` needs a class outside DCP's own metadata (``.classes`` names them)."""

    def __init__(self, path: os.PathLike | str, classes: list[str]):
        self.path, self.classes = Path(path), classes
        ValueError.__init__(
            self, f"checkpoint: {path} needs {', '.join(classes)} to be unpickled, which is not DCP checkpoint "
                  f"metadata; simmim-fast reads checkpoints as data only (a pickle can run code while it loads)")


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete sharded checkpoint folder (DCP's ``.metadata`` and our ``simmim_fast.pt``)."""
    p = Path(path)
    return p.is_dir() and (p / DCP_METADATA).is_file() and (p / META_NAME).is_file()


# ---------------------------------------------------------------------------------------------
# reading as data


def _metadata_classes() -> dict[str, Any]:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[str, Any] = {
        f"torch.distributed.checkpoint.metadata.{n}": getattr(metadata, n)
        for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                  "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
        if hasattr(metadata, n)
    }
    allowed["torch.distributed.checkpoint.filesystem._StorageInfo"] = filesystem._StorageInfo
    allowed["torch.Size"] = torch.Size
    allowed["torch.serialization._get_layout"] = torch.serialization._get_layout  # str -> torch.layout lookup
    for name, v in vars(torch).items():
        if isinstance(v, (torch.dtype, torch.memory_format)):
            allowed[f"torch.{name}"] = v
    import collections
    import pathlib

    allowed.update({"pathlib.PosixPath": pathlib.PosixPath, "pathlib.PurePosixPath": pathlib.PurePosixPath,
                    "collections.OrderedDict": collections.OrderedDict, "builtins.set": set,
                    "builtins.frozenset": frozenset})
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    allowed: dict[str, Any] = {}

    def __init__(self, f, refused: list[str]):
        super().__init__(f)
        self.refused = refused

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        self.refused.append(full)
        raise pickle.UnpicklingError(f"global {full} is not allowed")


def read_dcp_metadata(path: str | os.PathLike):
    """DCP's ``.metadata`` of a checkpoint folder, read by the restricted unpickler and checked.

    Raises :class:`UnsafeShardedCheckpointError` for a class outside DCP's metadata, ``ValueError`` for a
    damaged file or one that points outside the folder, ``FileNotFoundError`` when it is missing.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    folder = Path(path)
    file = folder / DCP_METADATA
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint: {folder} has no {DCP_METADATA} (not a complete sharded checkpoint)")
    refused: list[str] = []
    unpickler = type("DCPMetadataUnpickler", (_MetadataUnpickler,), {"allowed": _metadata_classes()})
    try:
        with open(file, "rb") as f:
            md = unpickler(f, refused).load()
    except pickle.UnpicklingError as e:
        if refused:
            raise UnsafeShardedCheckpointError(file, sorted(set(refused))) from e
        raise ValueError(f"checkpoint: {file} is not readable DCP metadata ({e})") from e
    except Exception as e:  # truncated, garbled
        raise ValueError(f"checkpoint: {file} is not readable DCP metadata ({type(e).__name__}: {e})") from e
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise ValueError(f"checkpoint: {file} does not hold DCP metadata (got {type(md).__name__})")
    for index, info in (md.storage_data or {}).items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not _SHARD_FILE.match(name) or name in (".", ".."):
            raise ValueError(f"checkpoint: {file} names a data file {name!r} outside the checkpoint folder")
    return md


class SafeFileSystemReader:
    """A ``FileSystemReader`` whose metadata comes from :func:`read_dcp_metadata` (read and checked once, here).

    Built lazily as a subclass of torch's reader (``torch.distributed`` is imported only when used).
    """

    def __new__(cls, path: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import StorageMeta

        md = read_dcp_metadata(path)

        class _Reader(FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any):
                if kwargs.get("rank") is not None:  # per-rank metadata: never written by us
                    raise FileNotFoundError(f"checkpoint: {path} has no per-rank metadata")
                if getattr(md, "storage_meta", None) is None:
                    md.storage_meta = StorageMeta()
                md.storage_meta.load_id = self.load_id
                return md

        reader = _Reader(str(path))
        reader.metadata = md
        return reader


def SafeLoadPlanner(**kwargs):
    """DCP's ``DefaultLoadPlanner`` reading non-tensor values with ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class _Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(f"checkpoint: the value {read_item.dest_index.fqn!r} needs more than plain data to "
                                 f"be read ({e}); refused (a pickle can run code while it loads)") from e
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return _Planner(**kwargs)


def read_meta(path: str | os.PathLike) -> dict:
    """Our ``simmim_fast.pt`` of a sharded checkpoint folder (``serialization.load``: data only)."""
    folder = Path(path)
    file = folder / META_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint: {folder} does not exist (expected a checkpoint_<step>.dcp folder)")
    if not file.is_file():
        raise ValueError(f"checkpoint: {folder} has no {META_NAME} (an incomplete or foreign sharded checkpoint)")
    meta = serialization.load(file)
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("simmim_fast.pretrain"):
        raise ValueError(f"checkpoint: {file} is not the metadata of a simmim-fast sharded checkpoint")
    return meta


# ---------------------------------------------------------------------------------------------
# DCP's errors


def _dcp(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (``dcp.save``/``dcp.load``) with DCP's ``CheckpointException`` (a
    ``BaseException`` that wraps each failing rank's error) replaced by the first rank's own error, so that a
    refused or damaged file is the ``ValueError``/``OSError`` it is."""
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # no_dist is passed on purpose (one process, no group)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            return fn(*args, **kwargs)
    except CheckpointException as e:
        failures = getattr(e, "failures", {}) or {}
        for rank in sorted(failures):
            exc = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
            if isinstance(exc, BaseException):
                raise exc from e
        raise RuntimeError(f"torch.distributed.checkpoint failed: {e}") from e


# ---------------------------------------------------------------------------------------------
# saving


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_sharded(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
                 info) -> Path:
    """Write the sharded checkpoint folder ``path`` (``checkpoint_<step>.dcp``) atomically. Every rank calls it.

    ``meta``: our part (step, args, plan, scheduler, scaler, rng, world_size), written by rank 0. A failing
    write (disk full) raises ``OSError`` on every rank with the cause's ``errno`` and removes the temp folder;
    earlier checkpoints are unchanged.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .checkpoint import atomic_save
    from .distributed import all_gather_objects, barrier

    path = Path(path)
    tmp = path.with_name(all_gather_objects(f".{path.name}.{os.getpid()}.tmp", info)[0])  # rank 0's name
    made = None
    if info.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            made = (e.errno, str(e))
    made = all_gather_objects(made, info)[0]  # every rank waits for the folder (and learns if it failed)
    if made is not None:
        raise OSError(made[0], f"checkpoint: could not create {tmp} ({made[1]}); earlier checkpoints are unchanged")
    error: BaseException | None = None
    try:
        msd, osd = get_state_dict(model, optimizer)
        _dcp(dcp.save, {"model": msd, "optimizer": osd}, storage_writer=FileSystemWriter(str(tmp), sync_files=True),
             no_dist=not info.distributed)
        if info.is_main:
            atomic_save({**meta, "format": FORMAT, "sharded": True}, tmp / META_NAME)
    except Exception as e:  # DCP fails on every rank when one failed (its CheckpointException, unwrapped by _dcp)
        error = e
    failed = [r for r, bad in enumerate(all_gather_objects(error is not None, info)) if bad]
    if failed:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        errno_ = getattr(cause, "errno", None) if cause is not None else None
        raise OSError(errno_, f"checkpoint: could not save {path} (rank(s) {failed} failed: "
                              f"{error if error is not None else 'see their log'}); the partial folder was removed, "
                              f"earlier checkpoints are unchanged") from error
    if info.is_main:
        _fsync_dir(tmp)
        old = None
        if path.exists():  # the same step saved again (a branch): move the old one aside first
            old = path.with_name(f".{path.name}.{os.getpid()}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return path


# ---------------------------------------------------------------------------------------------
# loading


def _check_shapes(md, msd: dict, path: Path) -> None:
    """Every tensor the model expects is in the checkpoint with the same global shape (else one ValueError)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    missing, wrong = [], []
    for k, v in msd.items():
        if not isinstance(v, torch.Tensor):
            continue
        entry = md.state_dict_metadata.get(f"model.{k}")
        if not isinstance(entry, TensorStorageMetadata):
            missing.append(k)
        elif tuple(entry.size) != tuple(v.shape):
            wrong.append(f"{k} {tuple(entry.size)} in the checkpoint, {tuple(v.shape)} in the model")
    if missing or wrong:
        parts = ([f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else []) + \
                ([f"shapes differ: {'; '.join(wrong[:3])}" + (" ..." if len(wrong) > 3 else "")] if wrong else [])
        raise ValueError(f"checkpoint: {path} does not fit this model ({'; '.join(parts)})")


def _set_optimizer(optimizer: torch.optim.Optimizer, groups: list[dict]):
    """Before ``set_state_dict``: the loaded ``groups`` keep this optimizer's implementation switches (fused,
    foreach, capturable) and hyper-parameters become floats, as ``optim_state.load_portable_state_dict`` does
    for single files. Returns a function to call afterwards, which puts this optimizer's tensor hyper-parameters
    (a CUDA-graph run's device ``lr``) back, filled with the loaded values."""
    from .optim_state import IMPLEMENTATION_KEYS, _plain

    live = []
    for i, (cur, g) in enumerate(zip(optimizer.param_groups, groups)):
        for k in list(g):
            if k != "params":
                g[k] = _plain(g[k])
        for k in IMPLEMENTATION_KEYS:
            if k in cur:
                g[k] = cur[k]
        live += [(i, k, v) for k, v in cur.items() if k != "params" and isinstance(v, torch.Tensor)]

    def restore() -> None:
        for i, k, tensor in live:
            value = optimizer.param_groups[i][k]
            with torch.no_grad():
                tensor.fill_(float(value) if not isinstance(value, torch.Tensor) else float(value.detach().cpu()))
            optimizer.param_groups[i][k] = tensor

    return restore


def load_sharded(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint folder into ``model`` (and ``optimizer``), in place.

    ``model`` may be sharded with any world size (FSDP2), or an ordinary module (DDP before wrapping, one
    process): DCP reads the chunks each rank needs. With an initialised process group every rank calls it.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict, set_state_dict
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    path = Path(path)
    reader = SafeFileSystemReader(path)
    if optimizer is None:
        msd = get_model_state_dict(model)
        state = {"model": msd}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
    _check_shapes(reader.metadata, msd, path)
    _dcp(dcp.load, state, storage_reader=reader, planner=SafeLoadPlanner(),
         no_dist=not (dist.is_available() and dist.is_initialized()))
    if optimizer is None:
        set_model_state_dict(model, msd)
    else:
        restore = _set_optimizer(optimizer, state["optimizer"]["param_groups"])
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=state["optimizer"])
        restore()


def named_optimizer_state(optimizer_state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An ``optimizer.state_dict()`` (parameters by index) keyed by parameter name instead, for ``optimizer``
    (built by the same rules, so group ``g``'s ``i``-th index is its ``i``-th parameter): the form
    ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` takes."""
    from .fsdp import CHECKPOINT_WRAPPER_PREFIX

    name_of = {id(p): n.replace(CHECKPOINT_WRAPPER_PREFIX, "") for n, p in model.named_parameters()}
    saved = optimizer_state.get("param_groups", [])
    if len(saved) != len(optimizer.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, optimizer.param_groups)):
        raise ValueError("checkpoint: its optimizer state has other parameter groups than this run's optimizer "
                         f"({[len(s['params']) for s in saved]} vs {[len(g['params']) for g in optimizer.param_groups]} "
                         f"parameters per group)")
    index_name = {}
    groups = []
    for s, g in zip(saved, optimizer.param_groups):
        names = [name_of[id(p)] for p in g["params"]]
        index_name.update(dict(zip(s["params"], names)))
        groups.append({**{k: v for k, v in s.items() if k != "params"}, "params": names})
    state = {index_name[i]: v for i, v in optimizer_state.get("state", {}).items() if i in index_name}
    return {"state": state, "param_groups": groups}


def load_full_state(state: dict, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A single-file checkpoint (full tensors) into a sharded ``model`` and its ``optimizer``: every rank holds
    the full state and keeps its shards (``set_state_dict(..., full_state_dict=True)``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if "optimizer" not in state:
        raise ValueError("checkpoint: it holds no optimizer state (a consolidated export?); resume from the "
                         "checkpoint_<step>.dcp folder or a training checkpoint")
    named = named_optimizer_state(state["optimizer"], model, optimizer)
    restore = _set_optimizer(optimizer, named["param_groups"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=named,
                   options=StateDictOptions(full_state_dict=True))
    restore()


def consolidated_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model's state dict of a sharded checkpoint as ordinary CPU tensors, read in one process without
    building the model (shapes and dtypes from DCP's metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = SafeFileSystemReader(path)
    flat = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for k, m in reader.metadata.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not flat:
        raise ValueError(f"checkpoint: {path} holds no model tensors")
    _dcp(dcp.load, flat, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return {k[len("model."):]: v for k, v in flat.items()}


def write_consolidated(source: str | os.PathLike, output: str | os.PathLike) -> tuple[Path, Path, int]:
    """Write a sharded checkpoint (a ``.dcp`` folder, or a run folder: its newest one) as our single-file
    checkpoint ``output`` (``.pt``: the model's full tensors with step, args, plan, scheduler, scaler, rng;
    no optimizer state). Every command that reads our checkpoints (export, fine-tuning, visualize, probe)
    reads it. Returns ``(output, source folder, tensors)``."""
    from .checkpoint import atomic_save, list_checkpoints

    src = Path(source).expanduser()
    if src.is_dir() and not is_sharded_checkpoint(src) and src.suffix != SUFFIX:
        found = [p for _, p in list_checkpoints(src) if p.is_dir()]
        if not found:
            raise FileNotFoundError(f"--checkpoint: no checkpoint_<step>.dcp folder in {src}")
        src = found[-1]
    out = Path(output)
    if out.suffix not in (".pt", ".pth"):
        raise ValueError(f"--output: expected a .pt (or .pth) file name, got {out}")
    if out.is_dir():
        raise ValueError(f"--output: {out} is a folder (expected the checkpoint file to write)")
    meta = read_meta(src)
    model = consolidated_state(src)
    state = {k: v for k, v in meta.items() if k != "sharded"}
    state.update(format=FORMAT, model=model, consolidated_from=str(src.resolve()))
    atomic_save(state, out)
    return out, src, len(model)
