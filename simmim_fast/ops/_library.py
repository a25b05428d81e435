"""``torch.library`` registration of the Triton paths, so ``torch.compile`` traces them without graph breaks.

Each kernel entry point is registered twice from one host function ``impl(launch, *args)``:

- ``simmim_fast::<name>`` with ``torch.library.custom_op`` + ``register_fake``: an opaque op whose
  kernels are launched directly. It is what runs under ``TRITON_INTERPRET=1`` on CPU (a ``triton_op``
  cannot be traced there: fake tensors have no data pointer) and it works on CUDA too.
- ``simmim_fast::<name>_traceable`` with ``torch.library.triton_op``: kernels launched through
  ``wrap_triton`` so Inductor sees into them (CUDA, compiled kernels). Only registered when Triton
  imports.

``_common.use_traceable`` picks one per call. Backward formulas are registered on both with
``register_autograd``; they call the matching registration of the backward op.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._common import HAS_TRITON, use_traceable

NAMESPACE = "simmim_fast"


def _direct(kernel):
    return kernel


def _wrapped(kernel):
    wrap = getattr(torch.library, "wrap_triton", None) or torch.library.capture_triton
    return wrap(kernel)


@dataclass
class OpPair:
    """The two registrations of one kernel entry point (``traceable`` is None without Triton)."""

    opaque: Any
    traceable: Any | None

    def pick(self, *tensors: torch.Tensor):
        if self.traceable is not None and use_traceable(*tensors):
            return self.traceable
        return self.opaque


def register(
    name: str,
    schema: str,
    impl: Callable[..., Any],
    fake: Callable[..., Any],
    *,
    autograd: Callable[[bool], tuple[Callable, Callable]] | None = None,
) -> OpPair:
    """Register ``impl(launch, *args)`` as ``simmim_fast::<name>`` (custom_op) and
    ``simmim_fast::<name>_traceable`` (triton_op).

    ``autograd(traceable) -> (setup_context, backward)`` builds the autograd formula of each one.
    """
    opaque = torch.library.custom_op(
        f"{NAMESPACE}::{name}", functools.partial(impl, _direct), mutates_args=(), schema=schema
    )
    opaque.register_fake(fake)
    traceable = None
    if HAS_TRITON:
        traceable = torch.library.triton_op(
            f"{NAMESPACE}::{name}_traceable", functools.partial(impl, _wrapped), mutates_args=(), schema=schema
        )
    if autograd is not None:
        setup, backward = autograd(False)
        opaque.register_autograd(backward, setup_context=setup)
        if traceable is not None:
            setup, backward = autograd(True)
            traceable.register_autograd(backward, setup_context=setup)
    return OpPair(opaque, traceable)
