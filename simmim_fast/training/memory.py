"""How much memory one training step needs, and a fail-fast check against what the device has.

Method: the step is *run* on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and
devices without data, so it costs no memory and almost no compute) with the model's own code: the
forward under the run's autocast, the backward (recomputing checkpointed blocks when gradient
checkpointing is on), grad-norm clipping and the AdamW update, starting with the optimizer state in
place (created first by an update from zero gradients) as every step after the first does. A dispatch mode follows every
storage the step creates and frees (its bytes, from allocation until its last reference is gone), which
gives the peak of what is live at once: saved activations, temporaries, gradients, optimizer state and
the batch itself. That is what a caching allocator must hold at the worst moment of the step; it does
not include the allocator's fragmentation or the CUDA context (hence ``safety`` in :func:`check_fits`).

The parts are reported separately (``params``, ``buffers``, ``grads``, ``optimizer``, ``activations``,
``per_image``), so that a planner can divide parameters, gradients and optimizer state by N for FSDP
sharding and keep the activations per GPU (issue 13; ``training.planner``). For that planner the
"everything else" peak is also split in two: ``fsdp_activations``, its forward + backward part without
autocast's low-precision copies of the transformer blocks' weights (the ``_to_copy`` of a block parameter,
followed like any storage: FSDP with a bf16 policy all-gathers those weights in bf16 per block instead,
``training.fsdp``, so it never makes them), and ``update_temporaries``, its part during grad-norm clipping
and the AdamW update (temporaries the size of the parameters, which FSDP shards with them). ``activations`` is the largest amount of
"everything else" live at one moment (it peaks at the end of the forward, when few gradients exist
yet); ``total`` is the measured peak of everything together, which is less than the sum of the parts.

Accuracy. Measured on CPU (2 cores) for ``swin_tiny_cpu`` (reference ops, SDPA and math attention)
and ``vit_tiny_cpu``: see tests/test_memory.py, which compares the estimate with the CPU allocator's
real peak (``torch.profiler`` memory events) of the same step. What the fake run cannot see:

* CUDA kernels chosen at run time: on a machine with CUDA the fake tensors are CUDA tensors and SDPA,
  autocast and the Triton ops decide as they will for real; planning for CUDA on a machine without it
  (``device="cuda"`` while ``torch.cuda.is_available()`` is false) runs the CPU path under CPU autocast
  (same dtypes for matmuls, math attention: an over-estimate for attention, noted in ``notes``).
* cuDNN/cuBLAS workspaces, the CUDA context, allocator fragmentation: ``check_fits``' ``safety`` margin.
* DDP's gradient buckets (a second copy of the gradients unless ``gradient_as_bucket_view``): added as
  ``ddp_buckets`` when ``world_size > 1``.

Equivalent measurement: ``torch.cuda.max_memory_allocated()`` after the second real training step.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PRECISIONS", "MemoryEstimate", "MemoryEstimateError", "estimate_step_memory", "available_memory",
           "check_fits", "check_step_memory", "GiB"]

log = logging.getLogger("simmim_fast.memory")

GiB = 1024 ** 3
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw",)


class MemoryEstimateError(RuntimeError):
    """The step could not be simulated (an op without a fake-tensor implementation, ...): no estimate."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step needs (see the module docstring); shapes: plain ints.

    ``total`` is the simulated peak at ``batch_size`` (plus ``ddp_buckets``); ``per_image`` the growth of
    the activation peak per image (from a second simulation at another batch; None when that was not
    asked for, ``estimate_step_memory(..., per_image=False)``); ``fixed`` what does not grow with the batch.
    """

    batch_size: int
    precision: str
    grad_checkpointing: bool
    device: str
    params: int
    buffers: int
    grads: int
    optimizer: int
    activations: int
    per_image: int | None
    total: int
    ddp_buckets: int = 0
    notes: tuple[str, ...] = field(default=())
    fsdp_activations: int | None = None  # forward + backward part of ``activations``, without autocast's block-weight copies
    update_temporaries: int | None = None  # the clip + AdamW part: temporaries of the parameters' size
    forward_peak: int | None = None  # ``total`` during forward + backward (grows with the batch) ...
    update_peak: int | None = None  # ... and during clip + AdamW (does not); ``total`` is the larger
    working_set: int = 0  # FSDP: parameters/gradients unsharded at once (training.planner), in ``total``

    @property
    def resident(self) -> int:
        """Bytes of the model itself (parameters and buffers): already on the device once it is moved there."""
        return self.params + self.buffers

    def _slope(self) -> int:
        if self.per_image is None:
            raise ValueError("per_image: this estimate was made with per_image=False (one batch size only)")
        return self.per_image

    @property
    def fixed(self) -> int:
        """Bytes of the forward + backward peak that do not grow with the batch (of ``total`` when the
        phases were not told apart)."""
        peak = self.forward_peak if self.forward_peak is not None else self.total
        return peak - self._slope() * self.batch_size

    def at_batch(self, batch_size: int) -> int:
        """``total`` at another batch size: the forward + backward peak, linear in the batch (within 1 % of a
        simulation at that batch for the presets, tests/test_memory.py), or the update's peak (clip + AdamW:
        the parameters' size, the same at every batch) when that is larger."""
        return max(self.fixed + self._slope() * int(batch_size), self.update_peak or 0)

    def largest_batch(self, budget: int) -> int:
        """The largest batch whose ``total`` fits in ``budget`` bytes (0 when not even 1 does)."""
        if self.update_peak is not None and self.update_peak > budget:
            return 0
        if self._slope() <= 0:
            return self.batch_size if self.total <= budget else 0
        return max(0, (int(budget) - self.fixed) // self._slope())

    def summary(self) -> str:
        parts = [f"parameters {self.params / GiB:.2f}", f"gradients {self.grads / GiB:.2f}",
                 f"optimizer state {self.optimizer / GiB:.2f}",
                 f"activations {self.activations / GiB:.2f}"
                 + (f" ({self.per_image / 2**20:.1f} MiB per image)" if self.per_image is not None else "")]
        if self.ddp_buckets:
            parts.append(f"DDP buckets {self.ddp_buckets / GiB:.2f}")
        if self.working_set:
            parts.append(f"FSDP unsharded working set {self.working_set / GiB:.2f}")
        return ", ".join(parts) + " GiB"


# ---------------------------------------------------------------------------------------------
# the storage tracker


class _StorageTracker(TorchDispatchMode):
    """Follows every storage an op returns: bytes live now, and an event log ``(+/-bytes, sid)``."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.events: list[tuple[int, int]] = []  # (signed bytes, storage id), in order
        self._ids: dict[int, tuple[weakref.ref, int]] = {}  # id(storage object) -> (ref, sid)
        self._next = 0
        self.watch: set[int] = set()  # storages whose copies are recorded (the parameters)
        self.copy_of: dict[int, int] = {}  # sid of a dtype copy (``_to_copy``) -> sid of the watched source

    def sid(self, t: torch.Tensor) -> int | None:
        st = t.untyped_storage()
        got = self._ids.get(id(st))
        return got[1] if got is not None and got[0]() is st else None

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        got = self._ids.get(key)
        if got is not None and got[0]() is st:
            return
        n = int(st.nbytes())
        sid = self._next
        self._next += 1

        def freed(_, n=n, sid=sid, key=key, tracker=weakref.ref(self)):
            me = tracker()
            if me is not None:
                me.live -= n
                me.events.append((-n, sid))
                if me._ids.get(key, (None, -1))[1] == sid:
                    del me._ids[key]

        self._ids[key] = (weakref.ref(st, freed), sid)
        self.live += n
        self.events.append((n, sid))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = None
        if func is torch.ops.aten._to_copy.default and args and isinstance(args[0], torch.Tensor):
            src = self.sid(args[0])  # autocast's weight casts arrive here
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
                if src is not None and src in self.watch:
                    self.copy_of[self.sid(t)] = src
        return out


# ---------------------------------------------------------------------------------------------
# simulation


def _checkpointing_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, bool(m.grad_checkpointing)) for m in model.modules() if isinstance(getattr(m, "grad_checkpointing", None), bool)]


@contextlib.contextmanager
def _grad_checkpointing(model: nn.Module, enable: bool | None):
    """The model with gradient checkpointing ``enable``d (None: as it is), and its head-token content
    check off (fake tensors have no values to check; the index given is the right size by construction);
    both restored afterwards."""
    saved = _checkpointing_flags(model)
    had_check = "check_head_tokens" in vars(model)
    check = getattr(model, "check_head_tokens", None)
    if enable is not None:
        model.set_grad_checkpointing(bool(enable))
    if hasattr(model, "check_head_tokens"):
        model.check_head_tokens = False
    try:
        yield bool(enable) if enable is not None else any(v for _, v in saved)
    finally:
        for m, v in saved:
            m.grad_checkpointing = v
        if had_check:
            model.check_head_tokens = check
        elif "check_head_tokens" in vars(model):
            del model.check_head_tokens


def _masked_tokens_per_image(model: nn.Module, img_size: int, mask_patch_size: int, mask_ratio: float) -> int | None:
    """How many head tokens the masked-only head gathers per image (None: the full head runs)."""
    from ..data.masking import MaskGenerator

    gen = MaskGenerator(input_size=img_size, mask_patch_size=mask_patch_size, model_patch_size=model.patch_size,
                        mask_ratio=mask_ratio)
    mask = gen.generate(1, generator=torch.Generator().manual_seed(0))
    index = model.masked_head_tokens(torch.empty(1, model.in_chans, img_size, img_size, device="meta"), mask)
    return None if index is None else int(index.numel())


def _simulate(model: nn.Module, *, batch_size: int, img_size: int, device: torch.device, autocast_device: str,
              amp_dtype, clip_grad: float, head_tokens_per_image: int | None) -> dict:
    """One fake training step that starts with the optimizer state in place: its peak and parts, in bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module  # torch.func.functional_call's own (2.0 - 2.14)

    from .optim import adamw_flags, param_groups

    fake = FakeTensorMode(allow_non_fake_inputs=False)
    tracker = _StorageTracker()
    gh, gw = model.encoder.grid_size
    with fake:
        params = {n: torch.empty(p.shape, dtype=p.dtype, device=device).requires_grad_(p.requires_grad)
                  for n, p in model.named_parameters()}
        buffers = {n: torch.empty(b.shape, dtype=b.dtype, device=device) for n, b in model.named_buffers()}
    fixed_p = sum(p.untyped_storage().nbytes() for p in params.values())
    fixed_b = sum(b.untyped_storage().nbytes() for b in buffers.values())
    trainable = [p for p in params.values() if p.requires_grad]
    amp = torch.autocast(autocast_device, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with fake, tracker:
        for t in [*params.values(), *buffers.values()]:
            tracker.track(t)
        block_sids = {tracker.sid(params[n]) for n in _block_parameter_names(model)}
        tracker.watch = block_sids
        # the trainer's parameter groups, in its order: AdamW's per-tensor temporaries of one parameter
        # are still alive when the next one's are made, so the peak depends on which follows which
        name_of = {id(p): n for n, p in model.named_parameters()}
        groups = [{"params": [params[name_of[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
                  for g in param_groups(model, weight_decay=0.05)]
        opt = torch.optim.AdamW(groups, lr=1e-4, **adamw_flags(trainable))  # the trainer's: fused on CUDA, else foreach
        # the state every step after the first starts with: one update from zero gradients creates it
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        start = len(tracker.events)
        images = torch.empty(batch_size, model.in_chans, img_size, img_size, device=device)
        mask = torch.zeros(batch_size, gh, gw, dtype=torch.bool, device=device)
        kwargs = {}
        if head_tokens_per_image is not None:
            kwargs["head_tokens"] = torch.zeros(batch_size * head_tokens_per_image, dtype=torch.int64, device=device)
        # the fake tensors stand in for the model's own for the forward and the backward (which
        # recomputes checkpointed blocks with the module's parameters)
        with _reparametrize_module(model, {**params, **buffers}, tie_weights=True, strict=True):
            with amp:
                loss = model(images, mask, **kwargs)
            loss.backward()
        del images, mask, loss, kwargs
        update_from = len(tracker.events)  # what follows: clip and AdamW (temporaries of the parameters' size)
        grad_sids = {tracker.sid(p.grad) for p in trainable if p.grad is not None}
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(trainable, clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state_sids = {tracker.sid(t) for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
        state_bytes = sum(t.untyped_storage().nbytes() for s in opt.state.values() for t in s.values()
                          if isinstance(t, torch.Tensor))
        grad_bytes = sum(p.untyped_storage().nbytes() for p in trainable)  # one gradient per parameter, same dtype
        # replay step 2: everything live, and "activations" = live - model - optimizer state - gradients
        # ("fsdp": also without the autocast copies of the blocks' parameters)
        cast_sids = set(tracker.copy_of)
        live = sum(n for n, _ in tracker.events[:start])
        grads_live = state_live = casts_live = 0
        peak = act_peak = fsdp_peak = update_peak = forward_peak = forward_act = update_live_peak = 0
        for i, (n, sid) in enumerate(tracker.events[start:], start):
            live += n
            if sid in grad_sids:
                grads_live += n
            elif sid in state_sids:
                state_live += n
            elif sid in cast_sids:
                casts_live += n
            peak = max(peak, live)
            act_peak = max(act_peak, live - fixed_p - fixed_b - state_live - grads_live)
            other = live - fixed_p - fixed_b - state_live - grads_live - casts_live
            if i < update_from:  # forward + backward: grows with the batch
                fsdp_peak = max(fsdp_peak, other)
                forward_act = max(forward_act, other + casts_live)
                forward_peak = max(forward_peak, live)
            else:  # clip + AdamW: the parameters' size, whatever the batch
                update_peak = max(update_peak, other)
                update_live_peak = max(update_live_peak, live)
        del opt, params, buffers, trainable
    return {"params": fixed_p, "buffers": fixed_b, "grads": grad_bytes, "optimizer": state_bytes,
            "activations": act_peak, "total": peak, "fsdp_activations": fsdp_peak, "update_temporaries": update_peak,
            "forward_activations": forward_act, "forward_peak": forward_peak, "update_peak": update_live_peak}


def _block_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters inside the model's transformer blocks (FSDP's block units); [] if none."""
    from .fsdp import transformer_blocks

    try:
        blocks = transformer_blocks(model)
    except ValueError:
        return []
    return [f"{name}.{n}" for name, b in blocks for n, _ in b.named_parameters()]


def estimate_step_memory(
    model: nn.Module,
    *,
    batch_size: int,
    img_size: int | None = None,
    precision: str = "fp32",
    grad_checkpointing: bool | None = None,
    optimizer: str = "adamw",
    clip_grad: float = 5.0,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    device: str | torch.device | None = None,
    world_size: int = 1,
    per_image: bool = True,
) -> MemoryEstimate:
    """Bytes one SimMIM training step of ``model`` needs at ``batch_size`` images per process.

    ``model``: a :class:`~simmim_fast.models.SimMIM` (its parameters are not touched, their data is not
    read; the model's own forward runs on fake tensors). ``img_size``: default the model's.
    ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast, as the trainer's ``--precision``.
    ``grad_checkpointing``: ``None`` as the model is set, else on/off for the estimate (restored after).
    ``optimizer``: ``"adamw"`` (two fp32 moments per parameter, the trainer's). ``device``: where the step
    runs (default: the model's parameters' device). ``world_size > 1`` adds DDP's gradient buckets.
    ``per_image``: also simulate a second batch size, for ``per_image`` (what ``largest_batch`` needs);
    False halves the time.
    Raises :class:`MemoryEstimateError` when the step cannot run on fake tensors, ``ValueError`` for bad
    arguments.

    Equivalent PyTorch: ``torch.cuda.max_memory_allocated()`` after a second real training step.
    """
    from ..models.simmim import SimMIM

    reasons = []
    if not isinstance(model, SimMIM):
        reasons.append(f"model: expected a simmim_fast SimMIM model, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        reasons.append(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if precision not in PRECISIONS:
        reasons.append(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimizer not in OPTIMIZERS:
        reasons.append(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        reasons.append(f"world_size: expected an int >= 1, got {world_size!r}")
    if reasons:
        raise ValueError("; ".join(reasons))
    size = model.img_size[0] if img_size is None else img_size
    if tuple(model.img_size) != (size, size):
        raise ValueError(f"img_size: the model is built for {model.img_size}, got {size}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    notes: list[str] = []
    sim_device, amp_device = dev, dev.type
    if dev.type == "cuda" and not torch.cuda.is_available():
        sim_device, amp_device = torch.device("cpu"), "cpu"
        notes.append("planned for CUDA without CUDA: simulated with CPU kernels and CPU autocast (math attention, "
                     "an over-estimate where CUDA would use a fused attention kernel)")
    elif dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected a CPU or CUDA device, got {dev}")
    was_training = model.training
    model.train()
    try:
        with _grad_checkpointing(model, grad_checkpointing) as ckpt_on:
            tokens = _masked_tokens_per_image(model, size, mask_patch_size, mask_ratio)
            sims = {}
            for b in sorted({batch_size, 1 if batch_size > 1 else 2} if per_image else {batch_size}):
                try:
                    sims[b] = _simulate(model, batch_size=b, img_size=size, device=sim_device, autocast_device=amp_device,
                                        amp_dtype=PRECISIONS[precision], clip_grad=clip_grad, head_tokens_per_image=tokens)
                except Exception as e:  # an op the fake run cannot take: no estimate, the caller decides
                    raise MemoryEstimateError(f"memory estimate: the step could not be simulated on fake tensors "
                                              f"({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        model.train(was_training)
    main = sims[batch_size]
    slope = None
    if len(sims) > 1:  # the forward + backward part: the update's temporaries do not grow with the batch
        slope = max(0, (sims[max(sims)]["forward_activations"] - sims[min(sims)]["forward_activations"])
                    // (max(sims) - min(sims)))
        notes.append(f"simulated at batch {min(sims)} and {max(sims)}")
    ddp = main["grads"] if world_size > 1 else 0
    return MemoryEstimate(
        batch_size=batch_size, precision=precision, grad_checkpointing=ckpt_on, device=str(dev),
        params=main["params"], buffers=main["buffers"], grads=main["grads"], optimizer=main["optimizer"],
        activations=main["activations"], per_image=slope, total=main["total"] + ddp, ddp_buckets=ddp,
        notes=tuple(notes), fsdp_activations=main["fsdp_activations"],
        update_temporaries=main["update_temporaries"], forward_peak=main["forward_peak"] + ddp,
        update_peak=main["update_peak"] + ddp,
    )


# ---------------------------------------------------------------------------------------------
# what the device has


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        text = open(path).read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """Room left under this process's cgroup memory limit (v2, else v1), reclaimable page cache counted
    as free; None when there is no limit or it cannot be read."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":  # cgroup v2
            base = "/sys/fs/cgroup" + parts[2].rstrip("/")
            limit, used, stat = f"{base}/memory.max", f"{base}/memory.current", f"{base}/memory.stat"
            cache_key = "inactive_file"
        elif "memory" in parts[1].split(","):  # cgroup v1
            base = "/sys/fs/cgroup/memory" + parts[2].rstrip("/")
            limit, used, stat = f"{base}/memory.limit_in_bytes", f"{base}/memory.usage_in_bytes", f"{base}/memory.stat"
            cache_key = "total_inactive_file"
        else:
            continue
        lim, cur = _read_int(limit), _read_int(used)
        if lim is None or cur is None or lim >= 1 << 60:
            continue
        reclaimable = 0
        try:
            for row in open(stat):
                k, _, v = row.partition(" ")
                if k == cache_key:
                    reclaimable = int(v)
        except (OSError, ValueError):
            pass
        return max(0, lim - cur + reclaimable)
    return None


def available_memory(device: str | torch.device) -> int | None:
    """Bytes a new allocation of this process can still get on ``device``; None when it cannot be told.

    CUDA: ``torch.cuda.mem_get_info`` free bytes plus what this process's caching allocator holds but does
    not use (``memory_reserved - memory_allocated``). CPU: ``MemAvailable`` of ``/proc/meminfo``, lowered
    to the room under the cgroup's memory limit where there is one (containers); elsewhere
    ``psutil.virtual_memory().available`` if psutil is installed, else None.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type != "cpu":
        return None
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if found:
        return min(found)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def check_fits(estimate: MemoryEstimate, device: str | torch.device, *, safety: float = 0.9, resident: bool = True,
               accum_steps: int = 1, share: int = 1, available: int | None = None, _raise: bool = True):
    """Raise ``ValueError`` when the step of ``estimate`` cannot fit on ``device``; else the bytes left.

    ``safety``: the fraction of the free memory a step may plan to use (the rest for fragmentation,
    workspaces, the loader). ``resident``: the model is already on ``device`` (the trainer checks after
    ``model.to(device)``), so its bytes are not asked for again. ``share``: processes sharing this memory
    (CPU ranks of one host: the local world size). ``accum_steps``: the run's, for the suggestion that
    keeps the total batch. ``available``: the free bytes, instead of asking the device (tests, planning).
    Returns None (and logs why) when the free memory cannot be told.

    The message names ``--batch-size`` and gives the estimate in GiB, the largest batch that would fit,
    and the ``--batch-size``/``--accum-steps`` pair that keeps the total batch.
    """
    if not 0 < safety <= 1:
        raise ValueError(f"safety: expected a fraction in (0, 1], got {safety!r}")
    free = available if available is not None else available_memory(device)
    if free is None:
        log.info("memory check skipped: the free memory of %s cannot be told here", device)
        return None
    budget = int(safety * free / max(1, int(share)))
    held = estimate.resident if resident else 0
    need = estimate.total - held
    if need <= budget:
        return budget - need
    if not _raise:
        return False
    B, accum = estimate.batch_size, max(1, int(accum_steps))
    if estimate.per_image is None:  # no slope measured: every activation byte taken as per image (fewer fit)
        fit = max(0, (budget + held - (estimate.total - estimate.activations)) // max(1, estimate.activations // B))
    else:
        fit = estimate.largest_batch(budget + held)
    mode = estimate.precision + (", gradient checkpointing" if estimate.grad_checkpointing else "")
    head = (f"--batch-size: a training step at batch {B} ({mode}) needs about {need / GiB:.2f} GiB on {device} beyond "
            f"the weights already there ({estimate.summary()}), but {free / GiB:.2f} GiB are free there"
            + (f" for {share} processes" if share > 1 else "") + f" and a step may plan on {safety:.0%} of it")
    if fit < 1:
        raise ValueError(head + "; not even batch 1 fits: use gradient checkpointing (--grad-checkpointing), "
                                "--precision bf16, a smaller --img-size or preset, or a device with more memory")
    total = B * accum
    k = math.ceil(total / fit)
    b = math.ceil(total / k)
    raise ValueError(head + f"; the largest batch that fits is about {fit}: use --batch-size {b} --accum-steps {k} "
                            f"to keep a total batch of {b * k} per process (now {B} x {accum})")


def check_step_memory(model: nn.Module, *, device: str | torch.device, batch_size: int, precision: str = "fp32",
                      grad_checkpointing: bool | None = None, accum_steps: int = 1, world_size: int = 1,
                      share: int = 1, safety: float = 0.9, **estimate_kwargs) -> MemoryEstimate | None:
    """:func:`estimate_step_memory` + :func:`check_fits` for a trainer, before its first step.

    ``ValueError`` (from ``check_fits``) when the batch cannot fit. A step that cannot be simulated is
    no reason to stop a run: then a warning and None. One simulation when the batch fits, a second one
    (for the largest batch that would) when it does not.
    """
    kw = dict(batch_size=batch_size, precision=precision, grad_checkpointing=grad_checkpointing, device=device,
              world_size=world_size, **estimate_kwargs)
    try:
        est = estimate_step_memory(model, per_image=False, **kw)
        if check_fits(est, device, safety=safety, accum_steps=accum_steps, share=share, _raise=False) is False:
            est = estimate_step_memory(model, per_image=True, **kw)
    except MemoryEstimateError as e:
        log.warning("%s; memory check skipped", e)
        return None
    check_fits(est, device, safety=safety, accum_steps=accum_steps, share=share)
    log.info("memory estimate for one step at batch %d: %.2f GiB (%s)", batch_size, est.total / GiB, est.summary())
    return est
