"""Memory per GPU of one training step under DDP and FSDP, the largest batch each fits, and ``--strategy auto``.

Built on :func:`~simmim_fast.training.memory.estimate_step_memory` (the step simulated on fake tensors, its
parts measured). For ``N`` processes, per GPU:

DDP (a full replica per GPU; one process: the same without buckets)
    the simulated peak ``total`` (parameters, gradients, AdamW state and activations at the worst moment of
    the step) plus DDP's gradient buckets (a second copy of the gradients) when ``N > 1``.

FSDP (``training.fsdp``: one unit per transformer block plus the root unit, fp32 master shards)
    params       each parameter's shard along dim 0: ``ceil(rows / N)`` rows (FSDP2 pads every tensor to N
                 equal chunks), 4 bytes per element
    grads        the same shards (fp32)
    optimizer    AdamW's two moments on the shards; its per-parameter ``step`` scalars whole
    buffers      whole (FSDP does not shard buffers)
    activations  the larger of the simulated forward + backward peak without autocast's copies of the blocks'
                 weights (``MemoryEstimate.fsdp_activations``: a bf16 policy all-gathers them in bf16 instead)
                 and 1/N of the clip + AdamW temporaries (``update_temporaries``: the parameters' size)
    working set  what is unsharded at once: the largest block's parameters in the compute dtype twice (the
                 unit running and the next one, prefetched), its unsharded gradient (compute dtype) and the
                 fp32 copy reduce-scattered; the root unit's parameters and gradients, fp32 (FSDP2 does not
                 reshard the root between forward and backward); with gradient accumulation every block's
                 unsharded fp32 gradient, kept between micro-steps (FSDP2 without gradient sync)
    total        the sum of the parts: an upper bound of the peak (gradient shards and the activation peak
                 counted together, though gradients mostly exist after it; DDP's ``total`` is the simulated peak)

Largest batch: the forward + backward part grows linearly with the batch (the slope from a second simulation
at batch 1), the clip + AdamW part does not (``at_batch`` is the larger of the two).

Not counted (as for DDP, see ``training.memory``): the CUDA context, cuBLAS/NCCL workspaces, allocator
fragmentation, NCCL's communication buffers; ``safety`` (90 % of the memory) leaves room for them.

A preset is planned without its memory: :func:`meta_model` builds it with parameters on the ``meta`` device
(no storage), and the simulation only reads shapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .memory import GiB, MemoryEstimate, MemoryEstimateError, available_memory, check_fits, estimate_step_memory

__all__ = ["STRATEGIES", "StrategyMemory", "shard_bytes", "strategy_memory", "meta_model", "plan_preset",
           "format_plan", "StrategyChoice", "choose_strategy", "min_free_memory", "SAFETY"]

log = logging.getLogger("simmim_fast.planner")

STRATEGIES = ("auto", "ddp", "fsdp")
SAFETY = 0.9  # the fraction of the device memory a step may plan on (as training.memory.check_fits)
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class StrategyMemory:
    """Bytes per GPU of one step under ``strategy`` (``"single"``, ``"ddp"`` or ``"fsdp"``) on ``world_size``
    processes (see the module docstring). ``comm``: DDP's buckets, or FSDP's unsharded working set."""

    strategy: str
    world_size: int
    batch_size: int
    precision: str
    grad_checkpointing: bool
    params: int
    buffers: int
    grads: int
    optimizer: int
    activations: int
    comm: int
    total: int
    per_image: int | None
    estimate: MemoryEstimate
    forward_total: int  # ``total`` while forward + backward run (grows with the batch) ...
    update_total: int  # ... and during clip + AdamW (does not); ``total`` is the larger

    @property
    def fixed(self) -> int:
        """Bytes of the forward + backward total that do not grow with the batch."""
        if self.per_image is None:
            raise ValueError("per_image: planned at one batch size only")
        return self.forward_total - self.per_image * self.batch_size

    def at_batch(self, batch_size: int) -> int:
        return max(self.fixed + self.per_image * int(batch_size), self.update_total)

    def largest_batch(self, budget: int) -> int:
        """The largest batch per GPU whose ``total`` fits in ``budget`` bytes (0: not even one image)."""
        if self.update_total > budget:
            return 0
        if self.per_image is None or self.per_image <= 0:
            return self.batch_size if self.total <= budget else 0
        return max(0, (int(budget) - self.fixed) // self.per_image)

    def as_estimate(self) -> MemoryEstimate:
        """A ``MemoryEstimate`` with these parts and totals (for ``check_fits``: messages, largest batch)."""
        return dataclasses.replace(
            self.estimate, params=self.params, buffers=self.buffers, grads=self.grads, optimizer=self.optimizer,
            activations=self.activations, total=self.total, forward_peak=self.forward_total,
            update_peak=self.update_total, ddp_buckets=self.comm if self.strategy == "ddp" else 0,
            working_set=self.comm if self.strategy == "fsdp" else 0)


def shard_bytes(tensors: Iterable[torch.Tensor], world_size: int, *, element_size: int | None = None) -> int:
    """Bytes of one rank's FSDP2 shards of ``tensors``: ``ceil(rows / N)`` rows of each (a 0-d tensor whole).

    ``element_size``: bytes per element (default: each tensor's own)."""
    n = int(world_size)
    total = 0
    for t in tensors:
        size = t.element_size() if element_size is None else element_size
        if t.dim() == 0:
            total += size
            continue
        rows = t.shape[0]
        total += -(-rows // n) * (t.numel() // max(rows, 1)) * size
    return total


def _fsdp_numels(model: nn.Module) -> tuple[int, int, int]:
    from .fsdp import unsharded_numels

    return unsharded_numels(model)


def strategy_memory(est: MemoryEstimate, model: nn.Module, *, strategy: str, world_size: int,
                    accum_steps: int = 1) -> StrategyMemory:
    """Per-GPU bytes of ``est``'s step (made by ``estimate_step_memory`` for ``model``) under ``strategy``
    (``"ddp"``/``"single"`` or ``"fsdp"``) on ``world_size`` processes; see the module docstring."""
    if strategy not in ("single", "ddp", "fsdp"):
        raise ValueError(f"strategy: expected single, ddp or fsdp, got {strategy!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    common = dict(world_size=world_size, batch_size=est.batch_size, precision=est.precision,
                  grad_checkpointing=est.grad_checkpointing, per_image=est.per_image, estimate=est)
    if strategy != "fsdp":
        buckets = est.grads if world_size > 1 else 0
        shift = buckets - est.ddp_buckets  # the estimate may have been made for another world size
        forward = (est.forward_peak if est.forward_peak is not None else est.total) + shift
        update = (est.update_peak if est.update_peak is not None else 0) + shift
        return StrategyMemory(strategy="ddp" if world_size > 1 else "single", params=est.params,
                              buffers=est.buffers, grads=est.grads, optimizer=est.optimizer,
                              activations=est.activations, comm=buckets, total=est.total + shift,
                              forward_total=forward, update_total=update, **common)
    if est.precision not in _COMPUTE_BYTES:
        raise ValueError(f"precision: FSDP runs fp32 or bf16, got {est.precision!r} (fp16 needs a gradient scaler "
                         f"for sharded gradients)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = shard_bytes(model.parameters(), world_size)
    grads = shard_bytes(trainable, world_size)
    moments = 2 * est.grads  # AdamW: exp_avg and exp_avg_sq, one of each per trainable element
    scalars = max(0, est.optimizer - moments)  # the per-parameter ``step`` tensors: not sharded
    optimizer = 2 * grads + scalars
    largest, blocks, root = _fsdp_numels(model)
    cb = _COMPUTE_BYTES[est.precision]
    working = 3 * largest * cb + 4 * largest + 8 * root + (4 * blocks if accum_steps > 1 else 0)
    forward_act = est.fsdp_activations if est.fsdp_activations is not None else est.activations
    # clip + AdamW temporaries: the parameters' size, sharded with them
    update_act = -(-est.update_temporaries // world_size) if est.update_temporaries is not None else 0
    act = max(forward_act, update_act)
    base = params + est.buffers + grads + optimizer + working
    return StrategyMemory(strategy="fsdp", params=params, buffers=est.buffers, grads=grads, optimizer=optimizer,
                          activations=act, comm=working, total=base + act, forward_total=base + forward_act,
                          update_total=base + update_act, **common)


# ---------------------------------------------------------------------------------------------
# a preset without its memory


@contextlib.contextmanager
def meta_model():
    """Build modules inside this block with their parameters on the ``meta`` device (shapes only).

    Each parameter and buffer is created as usual (``torch.empty``: nothing written, nothing kept) and moved
    to ``meta`` as it is registered, so the initialisation that follows runs on meta tensors: a 3B-parameter
    model is built in seconds and a few MB (the simulation reads shapes only).
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self, name, tensor, persistent=True):
        if tensor is not None and tensor.device.type != "meta":
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def plan_preset(preset: str, *, gpus: int, gpu_memory_gib: float, batch_size: int | None = None,
                precision: str = "bf16", grad_checkpointing: Sequence[bool] = (False, True),
                img_size: int | None = None, accum_steps: int = 1, device: str | torch.device | None = None) -> dict:
    """The planner's numbers for ``preset`` on ``gpus`` GPUs of ``gpu_memory_gib`` GiB each.

    Returns ``{"rows": [StrategyMemory ...], "budget": bytes, "seconds": float, "notes": [...], ...}``: DDP and
    FSDP (``gpus > 1``) for each ``grad_checkpointing`` setting, at ``batch_size`` per GPU (default the
    preset's). The model is built on the meta device (:func:`meta_model`); the step is simulated for CUDA
    (on a machine without CUDA with CPU kernels: see ``training.memory``).
    """
    from ..models import create_model, get_preset

    reasons = []
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        reasons.append(f"--gpus: expected an integer >= 1, got {gpus!r}")
    if not isinstance(gpu_memory_gib, (int, float)) or isinstance(gpu_memory_gib, bool) or not gpu_memory_gib > 0 \
            or not math.isfinite(gpu_memory_gib):
        reasons.append(f"--gpu-memory: expected a positive number of GiB, got {gpu_memory_gib!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        reasons.append(f"--batch-size: expected an integer >= 1, got {batch_size!r}")
    if precision not in ("fp32", "bf16", "fp16"):
        reasons.append(f"--precision: expected fp32, bf16 or fp16, got {precision!r}")
    if reasons:
        raise ValueError("; ".join(reasons))
    p = get_preset(preset)
    batch = batch_size or p.recipe.batch_size
    overrides = {} if img_size is None else {"img_size": img_size}
    t0 = time.perf_counter()
    with meta_model():
        model = create_model(preset, **overrides)
    dev = torch.device(device) if device is not None else torch.device("cuda")  # planning for GPUs
    rows, notes = [], []
    for ckpt_on in grad_checkpointing:
        est = estimate_step_memory(model, batch_size=batch, precision=precision, grad_checkpointing=ckpt_on,
                                   device=dev,
                                   mask_patch_size=p.recipe.mask_patch_size, mask_ratio=p.recipe.mask_ratio,
                                   clip_grad=p.recipe.clip_grad)
        notes.extend(n for n in est.notes if n not in notes and not n.startswith("simulated at"))
        rows.append(strategy_memory(est, model, strategy="ddp", world_size=gpus, accum_steps=accum_steps))
        if gpus > 1 and precision != "fp16":
            rows.append(strategy_memory(est, model, strategy="fsdp", world_size=gpus, accum_steps=accum_steps))
    if gpus > 1 and precision == "fp16":
        notes.append("FSDP rows left out: FSDP runs fp32 or bf16 (fp16 needs a gradient scaler for sharded gradients)")
    n_params = sum(q.numel() for q in model.parameters())
    return {"preset": preset, "gpus": gpus, "gpu_memory_gib": float(gpu_memory_gib), "batch_size": batch,
            "precision": precision, "img_size": model.img_size[0], "parameters": n_params,
            "budget": int(SAFETY * gpu_memory_gib * GiB), "rows": rows, "notes": notes,
            "seconds": time.perf_counter() - t0}


def format_plan(plan: dict) -> str:
    """The planner's table (GiB per GPU) and the largest batch per GPU that fits each way."""
    budget = plan["budget"]
    big = max([r.total for r in plan["rows"]] + [budget]) >= GiB
    unit, scale = ("GiB", GiB) if big else ("MiB", 2 ** 20)
    g = lambda b: f"{b / scale:8.2f}" if big else f"{b / scale:8.1f}"  # noqa: E731
    lines = [
        f"memory plan: {plan['preset']} ({plan['parameters'] / 1e6:.1f}M parameters, {plan['img_size']} px), "
        f"batch {plan['batch_size']} per GPU, {plan['precision']}, {plan['gpus']} GPU(s) of "
        f"{plan['gpu_memory_gib']:g} GiB (a step may plan on {SAFETY:.0%}: {budget / GiB:.1f} GiB)",
        "",
        f"{'strategy':<22}{'params':>8}{'grads':>8}{'AdamW':>8}{'activ.':>8}{'comm':>8}{'total':>8}  fits  "
        f"largest batch/GPU",
    ]
    for r in plan["rows"]:
        name = {"single": "one GPU", "ddp": "DDP", "fsdp": "FSDP"}[r.strategy]
        name += " + act. ckpt" if r.grad_checkpointing else ""
        fits = "yes " if r.total <= budget else "no  "
        lines.append(f"{name:<22}{g(r.params)}{g(r.grads)}{g(r.optimizer)}{g(r.activations)}{g(r.comm)}"
                     f"{g(r.total)}  {fits}  {r.largest_batch(budget)}")
    lines += ["", f"{unit} per GPU. comm: DDP's gradient buckets, or FSDP's unsharded working set (largest block "
                  "twice + its gradients, the root unit). DDP total: the simulated peak; FSDP total: the sum of "
                  "its parts (an upper bound). Buffers and the CUDA context are not in the columns; "
                  "python -m simmim_fast.train --strategy auto picks with the same numbers."]
    lines += [f"note: {n}" for n in plan["notes"]]
    lines.append(f"(planned in {plan['seconds']:.1f} s, without allocating the model)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the trainer's choice


@dataclass(frozen=True)
class StrategyChoice:
    """What :func:`choose_strategy` decided: ``strategy`` in single | ddp | fsdp, and why (one line)."""

    strategy: str
    why: str
    memory: StrategyMemory | None = None


_ASK = object()


def min_free_memory(device: torch.device, info) -> int | None:
    """The smallest free memory of ``device`` over all ranks (None when any rank cannot tell), so that every
    rank makes the same choice."""
    from .distributed import all_gather_objects

    frees = all_gather_objects(available_memory(device), info)
    return None if any(f is None for f in frees) else min(frees)


def choose_strategy(requested: str, model: nn.Module, *, device: torch.device, world_size: int, batch_size: int,
                    precision: str, accum_steps: int = 1, share: int = 1, free=_ASK,
                    safety: float = SAFETY, **estimate_kwargs) -> StrategyChoice:
    """The strategy of ``--strategy requested`` for a run of ``world_size`` processes, memory checked.

    ``auto``: DDP when its step fits the device (a full replica per GPU: no extra communication), FSDP when
    only FSDP fits, and when neither does the FSDP check's error (``ValueError`` naming ``--batch-size`` and
    the batch that fits). ``ddp``/``fsdp``: as asked, checked. One process: ``single`` (neither), whatever
    was asked. ``free``: the device's free bytes, None when they cannot be told (every rank must pass the
    same, e.g. :func:`min_free_memory`: a choice that differs between ranks would hang the job); not given:
    ask the device. When the step cannot be simulated or the free memory cannot be told, ``auto`` takes DDP
    and says so.
    """
    if requested not in STRATEGIES:
        raise ValueError(f"--strategy: expected one of {', '.join(STRATEGIES)}, got {requested!r}")
    if world_size == 1:
        why = "one process: neither DDP nor FSDP" + (f" (--strategy {requested} has no effect)"
                                                      if requested != "auto" else "")
        return StrategyChoice("single", why)
    if requested == "fsdp" and precision not in _COMPUTE_BYTES:
        raise ValueError(f"--precision: --strategy fsdp runs fp32 or bf16, got {precision} (fp16 needs a gradient "
                         f"scaler for sharded gradients); use --precision bf16")
    if requested == "auto" and precision not in _COMPUTE_BYTES:
        return StrategyChoice("ddp", f"auto: DDP ({precision} runs under DDP only)")
    free = available_memory(device) if free is _ASK else free
    kw = dict(batch_size=batch_size, precision=precision, device=device, world_size=world_size, **estimate_kwargs)
    try:
        est = estimate_step_memory(model, per_image=False, **kw)
    except MemoryEstimateError as e:
        if requested == "auto":
            return StrategyChoice("ddp", f"auto: DDP (no memory estimate: {e})")
        log.warning("%s; memory check skipped", e)
        return StrategyChoice(requested, f"--strategy {requested} (no memory estimate)")
    ddp = strategy_memory(est, model, strategy="ddp", world_size=world_size, accum_steps=accum_steps)
    fsdp = strategy_memory(est, model, strategy="fsdp", world_size=world_size, accum_steps=accum_steps)
    budget = None if free is None else int(safety * free / max(1, int(share)))
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    if requested == "auto":
        if budget is None:
            return StrategyChoice("ddp", "auto: DDP (the free memory of the device cannot be told here)", ddp)
        if ddp.total <= budget:
            return StrategyChoice("ddp", f"auto: DDP (a replica fits: {gib(ddp.total)} of {gib(budget)} per process; "
                                         f"FSDP would need {gib(fsdp.total)})", ddp)
        if fsdp.total <= budget:
            return StrategyChoice("fsdp", f"auto: FSDP over {world_size} processes ({gib(fsdp.total)} per process "
                                          f"of {gib(budget)}; DDP would need {gib(ddp.total)})", fsdp)
        requested = "fsdp"  # neither fits: FSDP's check explains (largest batch, accumulation)
    chosen = fsdp if requested == "fsdp" else ddp
    if free is not None and check_fits(chosen.as_estimate(), device, safety=safety, resident=False, share=share,
                                       accum_steps=accum_steps, available=free, _raise=False) is False:
        est = estimate_step_memory(model, per_image=True, **kw)  # for the batch that would fit
        chosen = strategy_memory(est, model, strategy=requested, world_size=world_size, accum_steps=accum_steps)
        check_fits(chosen.as_estimate(), device, safety=safety, resident=False, share=share, accum_steps=accum_steps,
                   available=free)
    return StrategyChoice(requested, f"--strategy {requested}: {gib(chosen.total)} per process"
                                     + (f" of {gib(budget)}" if budget is not None else ""), chosen)


def _row_dict(r: StrategyMemory, budget: int) -> dict:
    d = {k: getattr(r, k) for k in ("strategy", "world_size", "batch_size", "precision", "grad_checkpointing",
                                    "params", "buffers", "grads", "optimizer", "activations", "comm", "total",
                                    "per_image")}
    d.update(fits=r.total <= budget, largest_batch=r.largest_batch(budget))
    return d


def plan_cli(args) -> int:
    """``python -m simmim_fast.info --plan ...`` (arguments from ``info``'s parser): print the plan; 2 for bad input."""
    import json

    try:
        plan = plan_preset(args.plan, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, batch_size=args.batch_size,
                           precision=args.precision, img_size=args.img_size, accum_steps=args.accum_steps,
                           grad_checkpointing=(True,) if args.grad_checkpointing else (False, True))
    except (ValueError, MemoryEstimateError) as e:
        import sys

        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        out = {k: v for k, v in plan.items() if k != "rows"}
        out["rows"] = [_row_dict(r, plan["budget"]) for r in plan["rows"]]
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(plan))
    return 0
