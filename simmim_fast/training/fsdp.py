"""FSDP for the SimMIM models: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) per transformer block.

Sharding (:func:`shard_model`). One FSDP unit per transformer block (timm ``SwinTransformerBlock``, our
``SwinBlock`` subclass of it, ``SwinTransformerV2Block``, BEiT's ``Block``: :func:`transformer_blocks`), then
the root unit, the whole model, which keeps everything else: patch embedding, mask token, Swin patch merging,
the final norm, ViT's cls token and shared relative-position bias, and the prediction head. Every parameter
lives as a 1/N shard (a ``DTensor``, dim 0 split over the ranks) between uses; a unit's parameters are
all-gathered right before its forward (and again in backward), its gradients reduce-scattered right after.
torch.distributed is the engine: nothing here slices a tensor.

Precision. ``--precision bf16`` gives the blocks ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``:
they are all-gathered in bf16 (half the traffic, no bf16 copy of the weights held through the step), and
their gradients are reduce-scattered and kept in fp32 for the fp32 optimizer. The block units cast their
floating-point inputs to bf16 (FSDP's ``cast_forward_inputs``): the residual stream enters each block in the
dtype of its weights (a LayerNorm on CPU refuses an fp32 input with bf16 weights). The root unit keeps fp32
parameters and casts nothing (``cast_forward_inputs=False``): the images, the masks and the normalised-target
statistics reach the loss exactly as under DDP. ``torch.autocast`` stays on as with DDP, and the two combine
without double work: inside the blocks autocast's casts of the weights are no-ops (they already are bf16)
while it still runs its float32 ops (softmax, norms on CUDA, ...) in fp32; in the root unit it runs the patch
embedding and the head's GEMM in bf16 as under DDP. Our loss ops take the bf16 prediction and compute in fp32,
as today. Against DDP + autocast the difference is that the blocks see bf16-rounded weights and a bf16
residual stream at their inputs (DDP + autocast on CUDA keeps that stream in fp32); fp32 runs are unchanged.
``fp16`` is refused (it needs a gradient scaler that understands sharded gradients).

Activation checkpointing (``--grad-checkpointing``): each block is wrapped in PyTorch's ``checkpoint_wrapper``
(non-reentrant ``torch.utils.checkpoint``) *inside* its FSDP unit, and the model's own checkpointing is
turned off. The model's own (timm's ``checkpoint_seq`` / our ViT's per-block ``checkpoint``) composes with
``fully_shard`` in fp32, but with a bf16 policy torch 2.11 recomputes the block from its saved fp32 input
without FSDP's input cast (its pre-forward returns early during backward), which fails (checked here,
torch 2.11 and 2.14). Inside the unit the checkpoint saves the already-cast input. Parameter names stay the
model's: the wrapper's ``_checkpoint_wrapped_module.`` is removed from state dicts by its own hooks and by
``torch.distributed.checkpoint.state_dict``.

Gradient accumulation: micro-steps before the last skip the reduce-scatter (:func:`no_gradient_sync`, FSDP2's
``set_requires_gradient_sync(False)``); FSDP2 then keeps each unit's unsharded gradient in fp32 until the
last micro-step, which costs a full fp32 gradient copy per GPU while accumulating (the planner counts it).
Grad-norm clipping is ``torch.nn.utils.clip_grad_norm_`` on the ``DTensor`` gradients (the norm is reduced
over the ranks by DTensor): :func:`clip_grad_norm` returns it as a plain tensor.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["FSDP_PRECISIONS", "TOLERANCES", "block_classes", "transformer_blocks", "mixed_precision_policies", "shard_model",
           "is_fsdp", "no_gradient_sync", "clip_grad_norm", "local_tensor", "check_sharded_state_finite",
           "unsharded_numels"]

log = logging.getLogger("simmim_fast.fsdp")

FSDP_PRECISIONS = ("fp32", "bf16")

#: How close a sharded model is to the unsharded one (tests/test_fsdp.py, and the 2-process run against one
#: process). fp32: the same arithmetic in another order (per-unit all-gather and reduce-scatter, sums over
#: ranks): losses ``rtol 1e-5``, gradients ``1e-5`` relative (L2). bf16: FSDP rounds the blocks' weights, their
#: inputs and their gradients to bf16, where autocast alone keeps fp32 weights and casts per op; measured on
#: the tiny presets both are 5 to 17 % (L2) from the fp32 gradients, within 3 % of each other: FSDP's
#: gradients must be as close to the fp32 ones as autocast's own, within 10 % (``grad_vs_autocast``), its
#: loss within ``1e-3`` of autocast's.
TOLERANCES = {"fp32": dict(loss_rtol=1e-5, grad_rel=1e-5), "bf16": dict(loss_rtol=1e-3, grad_vs_autocast=1.1)}
CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."

# FSDP2 warns when a unit returns a view (timm's blocks end in ``x.reshape(B, H, W, C)``): an in-place op on
# that view would skip the pre-backward hook. Nothing in these models writes into a block's output in
# place; tests/test_fsdp.py checks the sharded gradients against the unsharded model's.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def block_classes() -> tuple[type, ...]:
    """The transformer block classes that become FSDP units: timm's Swin (and our ``SwinBlock`` subclass), SwinV2
    and BEiT blocks, and timm's plain ViT block (for a timm ViT given to :func:`shard_model`)."""
    from timm.models.beit import Block as BeitBlock
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block
    from timm.models.vision_transformer import Block as ViTBlock

    return SwinTransformerBlock, SwinTransformerV2Block, BeitBlock, ViTBlock


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every transformer block of ``model`` in module order (outermost matches only).

    Raises ``ValueError`` when there is none (the model would be one FSDP unit: no memory saved).
    """
    classes = block_classes()
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        inner = getattr(m, "_checkpoint_wrapped_module", None)
        if isinstance(m, classes) or isinstance(inner, classes):
            found.append((name, m))
            inside.append(name)
    if not found:
        raise ValueError(f"model: no transformer block ({', '.join(c.__name__ for c in classes)}) found in "
                         f"{type(model).__name__}; FSDP shards per block")
    return found


def unsharded_numels(model: nn.Module) -> tuple[int, int, int]:
    """``(largest block, all blocks, root unit)`` parameter counts: what one FSDP unit all-gathers at most,
    the blocks together, and what stays in the root unit (patch embedding, mask token, head, ...)."""
    blocks = [sum(p.numel() for p in b.parameters()) for _, b in transformer_blocks(model)]
    total = sum(p.numel() for p in model.parameters())
    return max(blocks), sum(blocks), total - sum(blocks)


def mixed_precision_policies(precision: str):
    """``(block policy, root policy)`` of ``--precision`` (see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in FSDP_PRECISIONS:
        raise ValueError(f"--precision: FSDP runs fp32 or bf16 (fp16 would need a gradient scaler for sharded "
                         f"gradients), got {precision!r}")
    root = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if precision == "fp32":
        return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32), root
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), root


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, child)


def shard_model(model: nn.Module, *, device: torch.device, precision: str = "fp32",
                grad_checkpointing: bool = False, mesh=None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over the default process group (or ``mesh``); returns it.

    The model may be on the CPU: each unit's parameters move to ``device`` as they are sharded, so the whole
    model is never on the device at once. Rank 0's weights are then broadcast into every rank's shards (as
    DDP broadcasts them at construction): the ranks need not have initialised alike. ``precision``: ``"fp32"`` or ``"bf16"``. ``grad_checkpointing``:
    activation checkpointing per block (the model's own checkpointing is switched off).
    Equivalent PyTorch: ``fully_shard(block, mp_policy=...)`` for each block, then ``fully_shard(model)``.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    reasons = []
    if not dist.is_available() or not dist.is_initialized():
        reasons.append("FSDP needs an initialised process group (run under torchrun)")
    if precision not in FSDP_PRECISIONS:
        reasons.append(f"precision: expected one of {', '.join(FSDP_PRECISIONS)}, got {precision!r} "
                       f"(fp16 needs a gradient scaler for sharded gradients)")
    if is_fsdp(model):
        reasons.append("model: already sharded")
    if reasons:
        raise ValueError("; ".join(reasons))
    block_policy, root_policy = mixed_precision_policies(precision)
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # FSDP keeps each rank's own initialisation (DDP would broadcast rank 0's): rank 0's weights are
    # broadcast into every rank's shards once sharded (below)
    full = model.state_dict() if dist.get_rank() == 0 else {}
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)  # per-block checkpointing is the wrapper's below
    for name, block in transformer_blocks(model):
        if grad_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            block = checkpoint_wrapper(block)  # non-reentrant torch.utils.checkpoint, RNG state preserved
            _set_child(model, name, block)
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    if hasattr(model, "predict"):  # reconstructions: the root unit must all-gather for predict() too
        register_fsdp_forward_method(model, "predict")
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (:func:`shard_model`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Accumulate gradients locally for one micro-step: DDP's ``no_sync()``, FSDP2's
    ``set_requires_gradient_sync(False)`` (restored after); nothing when ``enabled`` is false or the model is
    neither."""
    if not enabled:
        yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a ``DTensor`` (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, its total norm returned as a plain tensor (DTensor grads included:
    the norm over all shards, the same on every rank)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def check_sharded_state_finite(model: nn.Module, optimizer: torch.optim.Optimizer, *, step: int, last_good) -> None:
    """:func:`~simmim_fast.training.checkpoint.check_state_finite` for a sharded model: each rank checks its
    shards, and every rank stops (``TrainingDiverged``) when any found NaN/inf (names gathered from all)."""
    import torch.distributed as dist

    from .checkpoint import nonfinite_tensors
    from .cli import TrainingDiverged

    state = {"model": {k: local_tensor(v) for k, v in model.state_dict().items()},
             "optimizer": {i: {k: local_tensor(v) for k, v in s.items()}
                           for i, s in optimizer.state_dict()["state"].items()}}
    bad = nonfinite_tensors(state)
    everyone = [None] * dist.get_world_size() if dist.is_initialized() else [bad]
    if dist.is_initialized():
        dist.all_gather_object(everyone, bad)
    names = sorted({n for b in everyone for n in b})[:5]
    if names:
        raise TrainingDiverged(
            f"weights or optimizer state became NaN/inf by step {step} ({', '.join(names)}); stopping without "
            f"saving. Last good checkpoint: {last_good or 'none'}"
        )
