"""A log of Triton kernel launches: which kernel, with which argument types, alignments and values.

It is the input of the ahead-of-time compile check (``python -m simmim_fast.kernel_check``): every
distinct launch signature recorded here (under the interpreter, on CPU) is compiled again for a GPU
target. ``_library`` routes every direct launch through :func:`wrap` while a log is open.

A record::

    {"kernel": "simmim_fast.ops.mask_token_fill:_fill_fwd_kernel",
     "args": [{"kind": "tensor", "dtype": "bfloat16", "align16": true}, {"kind": "int", "value": 9216}, ...],
     "constexprs": {"BLOCK_R": 32, "BLOCK_C": 128}, "options": {"num_warps": 4}, "grid": [288, 1]}

Records are deduplicated by :func:`signature_key`, which keeps what Triton specialises a compiled
kernel on: tensor dtypes and 16-byte alignment, for integers whether they equal 1, are multiples
of 16, or need 64 bits; constexpr values and compile options.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import torch

#: Keyword arguments of a launch that are compile options, not kernel parameters.
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")

_logs: list[tuple[list[dict], bool]] = []  # open logs (innermost last) and their ``execute`` flags


def active() -> bool:
    """True while a :func:`record` block is open."""
    return bool(_logs)


@contextlib.contextmanager
def record(*, execute: bool = True) -> Iterator[list[dict]]:
    """Record every direct kernel launch inside the block into the yielded list.

    ``execute=False`` records without running the kernels (their outputs stay uninitialised): enough
    to collect signatures of large launches that the interpreter would take minutes to run. Blocks
    nest: a launch goes into every open log, and runs unless one of them says ``execute=False``.
    """
    entry: tuple[list[dict], bool] = ([], execute)
    _logs.append(entry)
    try:
        yield entry[0]
    finally:
        _logs.remove(entry)


def describe_arg(value: Any) -> dict:
    """One launch argument as data (tensors by dtype and 16-byte alignment, scalars by value)."""
    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "dtype": str(value.dtype).removeprefix("torch."), "align16": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value}
    if isinstance(value, float):
        return {"kind": "float", "value": value}
    raise TypeError(f"launch_log: cannot describe a kernel argument of type {type(value).__name__}")


def describe_launch(kernel: Any, grid: Any, args: tuple, kwargs: dict) -> dict:
    fn = getattr(kernel, "fn", kernel)
    return {
        "kernel": f"{fn.__module__}:{fn.__name__}",
        "args": [describe_arg(a) for a in args],
        "constexprs": {k: v for k, v in kwargs.items() if k not in OPTION_NAMES},
        "options": {k: v for k, v in kwargs.items() if k in OPTION_NAMES},
        "grid": list(grid) if isinstance(grid, (tuple, list)) else str(grid),
    }


def _int_class(v: int) -> tuple:
    return (v == 1, v % 16 == 0, not (-(2**31) <= v < 2**31))


def signature_key(rec: dict) -> str:
    """What Triton compiles a separate variant for (see the module docstring)."""
    args = []
    for a in rec["args"]:
        if a["kind"] == "tensor":
            args.append(("t", a["dtype"], a["align16"]))
        elif a["kind"] == "int":
            args.append(("i",) + _int_class(a["value"]))
        else:
            args.append((a["kind"][0],))
    return json.dumps([rec["kernel"], args, sorted(rec["constexprs"].items()), sorted(rec["options"].items())])


def unique(records: list[dict]) -> list[dict]:
    """One record per :func:`signature_key`, first seen first."""
    seen: dict[str, dict] = {}
    for rec in records:
        seen.setdefault(signature_key(rec), rec)
    return list(seen.values())


class _Launcher:
    def __init__(self, kernel: Any, grid: Any, runner: Any):
        self.kernel, self.grid, self.runner = kernel, grid, runner

    def __call__(self, *args, **kwargs):
        if _logs:
            rec = describe_launch(self.kernel, self.grid, args, kwargs)
            for log, _ in _logs:
                log.append(rec)
            if not all(execute for _, execute in _logs):
                return None
        return self.runner[self.grid](*args, **kwargs)


class _Recording:
    """``runner[grid](*args, **kwargs)`` that logs the launch (as ``kernel``'s) first."""

    def __init__(self, kernel: Any, runner: Any):
        self.kernel, self.runner = kernel, runner

    def __getitem__(self, grid: Any) -> _Launcher:
        return _Launcher(self.kernel, grid, self.runner)


def wrap(kernel: Any, runner: Any = None) -> Any:
    """What launches ``kernel``: ``runner`` (default: the kernel itself; ``wrap_triton(kernel)`` on the
    traceable path), or a recording stand-in for it while a log is open."""
    runner = kernel if runner is None else runner
    return _Recording(kernel, runner) if _logs else runner
