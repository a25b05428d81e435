"""Checkpoint files are read as data, never as code: the one loader every path uses.

A ``.pt``/``.pth`` file is a pickle, and a pickle can name any importable callable and call it while it
is read (``os.system``, ``exec``, ...). :func:`load` never does a full unpickle:

1. ``torch.load(weights_only=True)``: PyTorch's restricted unpickler (tensors, containers, primitives),
   plus NumPy arrays/dtypes (the NumPy RNG state in our own checkpoints) and ``argparse.Namespace``.
2. Only if that refuses the file: the same allow-list in a restricted unpickler that also reads the
   configuration objects official checkpoints carry (microsoft/SimMIM pickles a yacs ``CfgNode``, a
   ``dict`` subclass that PyTorch's unpickler cannot rebuild) as inert ``dict`` stand-ins.

Any other class stops the load with :class:`UnsafeCheckpointError`, which names the class and says how
to convert a file one trusts: ``python -m simmim_fast.convert --trust-pickle IN OUT.safetensors``.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import os
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["UnsafeCheckpointError", "load", "CONFIG_CLASSES"]

CONVERT_HINT = "python -m simmim_fast.convert --trust-pickle {path} OUT.safetensors"


class UnsafeCheckpointError(ValueError):
    """The file needs a class that loading would have to import and run (``.classes`` names them)."""

    def __init__(self, path: os.PathLike | str, classes: list[str], detail: str = ""):
        self.path, self.classes = Path(path), classes
        names = ", ".join(classes) if classes else "an object that is not plain data"
        super().__init__(
            f"checkpoint: {path} needs {names} to be unpickled; simmim-fast reads checkpoints as data only "
            f"(a pickle can run code while it loads). If you trust this file, convert it once with: "
            + CONVERT_HINT.format(path=path) + (f" ({detail})" if detail else "")
        )


class ConfigStandIn(dict):
    """An official checkpoint's configuration object (e.g. yacs ``CfgNode``) read as a plain ``dict``.

    Its pickled attributes land in ``__dict__``; nothing of the original class is imported or run.
    """

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


#: Configuration classes that official checkpoints pickle, read as :class:`ConfigStandIn`.
CONFIG_CLASSES = ("yacs.config.CfgNode",)


def _numpy_globals() -> list:
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = {type(np.dtype(t)) for t in (np.uint8, np.int32, np.int64, np.uint32, np.float32, np.float64, np.bool_)}
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


def _safe_globals() -> list:
    return [*_numpy_globals(), argparse.Namespace]


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _allowed() -> dict[str, Any]:
    """``"module.name" -> object`` of everything the restricted unpickler may look up."""
    from torch import _weights_only_unpickler as wou

    allowed = dict(wou._get_allowed_globals())
    allowed.update({_qualified(g): g for g in _safe_globals()})
    for name in CONFIG_CLASSES:
        allowed[name] = type(name.rsplit(".", 1)[1], (ConfigStandIn,), {"__module__": "simmim_fast.serialization"})
    # NumPy 1.x pickles name numpy.core.*; NumPy 2 also answers to those names
    allowed.update({k.replace("numpy._core.", "numpy.core."): v for k, v in list(allowed.items())
                    if k.startswith("numpy._core.")})
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    allowed: dict[str, Any] = {}
    refused: list[str] = []

    def find_class(self, module: str, name: str):
        # Python 2 names that protocol-2 pickles (torch.save's) use, mapped as pickle's fix_imports does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        self.refused.append(full)
        raise pickle.UnpicklingError(f"global {full} is not allowed")


def _restricted_pickle_module(refused: list[str]) -> types.SimpleNamespace:
    cls = type("RestrictedUnpickler", (_RestrictedUnpickler,), {"allowed": _allowed(), "refused": refused})
    return types.SimpleNamespace(__name__="simmim_fast_restricted_pickle", Unpickler=cls,
                                 load=lambda f, **kw: cls(f, **kw).load())


def load(path: os.PathLike | str, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Read a ``.pt``/``.pth`` checkpoint as data (see the module docstring).

    Raises ``FileNotFoundError`` for a missing file, :class:`UnsafeCheckpointError` for a file that needs
    a class outside the allow-list, ``ValueError`` for a damaged or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as first:
        refused: list[str] = []
        try:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap,
                              pickle_module=_restricted_pickle_module(refused))
        except pickle.UnpicklingError as e:
            if refused:
                raise UnsafeCheckpointError(path, sorted(set(refused))) from e
            raise ValueError(f"checkpoint: {path} is not a readable checkpoint ({first}; {e})") from e
        except Exception as e:
            raise ValueError(f"checkpoint: {path} is not a readable checkpoint ({e})") from e
    except Exception as e:  # truncated, garbled, not a torch file (RuntimeError, EOFError, IndexError, ...)
        raise ValueError(f"checkpoint: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
