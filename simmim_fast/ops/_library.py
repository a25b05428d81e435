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

The schema of both comes from the type annotations of the op's ``fake`` function (the same
parameters as ``impl`` without ``launch``). Version note: torch 2.11 (and up to 2.13)
``triton_op(..., schema=...)`` ignores ``schema`` and infers it from the function, reading
``fn.__globals__`` (a ``functools.partial`` fails there), so no explicit schema string is passed
anywhere: each registered function is a plain function whose ``__signature__`` is the fake's
signature with its annotations resolved, which every torch from 2.11 to 2.14 infers the same way.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import launch_log
from ._common import HAS_TRITON, use_traceable

NAMESPACE = "simmim_fast"


def _direct(kernel):
    return launch_log.wrap(kernel)  # the kernel itself unless a launch log is open


def _wrapped(kernel):
    wrap = getattr(torch.library, "wrap_triton", None) or torch.library.capture_triton
    return launch_log.wrap(kernel, wrap(kernel))  # logged too while a launch log is open (CUDA tests)


@dataclass
class OpPair:
    """The two registrations of one kernel entry point (``traceable`` is None without Triton)."""

    opaque: Any
    traceable: Any | None

    def pick(self, *tensors: torch.Tensor):
        if self.traceable is not None and use_traceable(*tensors):
            return self.traceable
        return self.opaque


def _bind(impl: Callable[..., Any], launch: Callable[[Any], Any], signature: inspect.Signature, name: str):
    """``impl`` with ``launch`` bound, as a plain annotated function (what ``infer_schema`` reads)."""

    def op_function(*args, **kwargs):
        if kwargs:  # torch may pass schema arguments by name: put them in schema order
            args = signature.bind(*args, **kwargs).args
        return impl(launch, *args)

    op_function.__signature__ = signature
    op_function.__name__ = op_function.__qualname__ = name
    op_function.__module__ = impl.__module__
    return op_function


def register(
    name: str,
    impl: Callable[..., Any],
    fake: Callable[..., Any],
    *,
    autograd: Callable[[bool], tuple[Callable, Callable]] | None = None,
) -> OpPair:
    """Register ``impl(launch, *args)`` as ``simmim_fast::<name>`` (custom_op) and
    ``simmim_fast::<name>_traceable`` (triton_op).

    ``fake(*args)`` is the fake (meta) implementation; its type annotations are the op's schema.
    ``autograd(traceable) -> (setup_context, backward)`` builds the autograd formula of each one.
    """
    signature = inspect.signature(fake, eval_str=True)
    opaque = torch.library.custom_op(
        f"{NAMESPACE}::{name}", _bind(impl, _direct, signature, name), mutates_args=()
    )
    opaque.register_fake(fake)
    traceable = None
    if HAS_TRITON:
        traceable = torch.library.triton_op(
            f"{NAMESPACE}::{name}_traceable", _bind(impl, _wrapped, signature, f"{name}_traceable"), mutates_args=()
        )
    if autograd is not None:
        setup, backward = autograd(False)
        opaque.register_autograd(backward, setup_context=setup)
        if traceable is not None:
            setup, backward = autograd(True)
            traceable.register_autograd(backward, setup_context=setup)
    return OpPair(opaque, traceable)
