"""A CLI module's heavy names, imported on first use (PEP 562): ``simmim_fast.train.train`` etc."""
from __future__ import annotations

import importlib
from typing import Callable


def forward(job_module: str, front: str) -> Callable[[str], object]:
    """A module ``__getattr__`` that looks names up in ``job_module`` (imported then), so that the CLI module
    ``front`` stays light while ``from simmim_fast.train import train`` keeps working."""

    def __getattr__(name: str):
        if name.startswith("__"):  # dunder probes (pickle, inspect, doctest) must not import the job
            raise AttributeError(f"module {front!r} has no attribute {name!r}")
        try:
            return getattr(importlib.import_module(job_module), name)
        except AttributeError:
            raise AttributeError(f"module {front!r} has no attribute {name!r}") from None

    return __getattr__
