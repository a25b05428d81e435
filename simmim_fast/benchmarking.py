"""The end-to-end training-step variants the benchmarks compare, defined once.

``benchmarks/test_end_to_end.py`` (the side-by-side table) and ``benchmarks/gpu_evidence.py`` (its e2e
sections) build every variant from here. A variant is one way to run the same SimMIM pretraining step
(forward, backward, grad-norm clip 5.0, AdamW, zero_grad) on the same weights, images and mask:

==========================  ==========================================================================
``official_equiv``          the microsoft/SimMIM math: reference ops, the full 1x1-conv head, pixel
                            shuffle and the full-resolution-mask L1 loss, timm's attention with an
                            explicit softmax (``fused_attn=False``; Swin: timm's ``WindowAttention``),
                            foreach AdamW, the plain clip
``timm_sdpa``               as ``official_equiv`` with timm's SDPA attention (``fused_attn=True``; not
                            for SwinV2: timm's cosine attention has no SDPA branch)
``sdpa_attn``               (Swin, SwinV2) reference ops, full head, our window attention with
                            ``backend="sdpa"``
``official_equiv_compiled`` ``torch.compile`` of ``official_equiv`` (the whole model)
``ours``                    ``create_model(preset)`` defaults (fused ops and attention where they run),
                            the masked-only head with its static token count, AdamW ``auto`` (fused on
                            CUDA), the foreach clip: eager
``ours_compiled``           ``ours`` with ``--compile blocks`` (the trainer's CUDA default)
``ours_compiled_graphs``    ``ours_compiled`` with the whole step captured in a CUDA graph (CUDA only)
==========================  ==========================================================================

:func:`build_variant` returns a :class:`BuiltVariant` whose ``step()`` runs one training step and
returns the loss (a device tensor: no sync); :func:`count_train_flops` counts a step's FLOPs with
``torch.utils.flop_counter.FlopCounterMode``; :func:`measure_matmul_tflops` the matmul ceiling.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

CLIP = 5.0
LR = 1e-4


@dataclass(frozen=True)
class E2EVariant:
    """One way to run the step (see the module doc)."""

    name: str
    description: str
    create_kwargs: dict = field(default_factory=dict)
    timm_fused_attn: bool | None = None  # set on timm's attention modules; None: timm's default
    compile: str = "off"  # training.compile mode: "off" | "blocks" | "model"
    graphs: bool = False  # whole step in a CUDA graph
    head: str = "full"  # "full": the model decides; "static": head_count from static_head_count
    optimizer: str = "foreach"  # training.optim.ADAMW_IMPLEMENTATIONS
    foreach_clip: bool = False  # clip_grad_norm_(foreach=True) (False: torch's default choice)


def e2e_variants(arch: str, *, ours_ops: str = "auto") -> list[E2EVariant]:
    """Every variant of one architecture (``"swin"``, ``"swinv2"`` or ``"vit"``), in table order."""
    if arch not in ("swin", "swinv2", "vit"):
        raise ValueError(f"arch: expected 'swin', 'swinv2' or 'vit', got {arch!r}")
    windowed = arch in ("swin", "swinv2")
    official_kwargs = dict(ops_backend="reference", masked_head=False, **({"attn_backend": "timm"} if windowed else {}))
    official = E2EVariant(
        "official_equiv",
        "microsoft/SimMIM math: reference ops, full 1x1-conv head + pixel shuffle + full-resolution-mask L1, timm "
        "attention with explicit softmax (fused_attn off)" + (", timm WindowAttention" if arch == "swin" else "")
        + (", timm's cosine WindowAttention (no fused branch in timm)" if arch == "swinv2" else "")
        + ", foreach AdamW",
        official_kwargs, timm_fused_attn=False)
    out = [official]
    if arch != "swinv2":  # timm's SwinV2 attention has no SDPA branch: the row would repeat official_equiv
        out.append(dataclasses.replace(official, name="timm_sdpa", timm_fused_attn=True,
                                       description="as official_equiv with timm's SDPA attention (fused_attn=True)"))
    if windowed:
        out.append(E2EVariant("sdpa_attn", "reference ops, full head, our window attention backend='sdpa'"
                              + (" (cosine attention)" if arch == "swinv2" else ""),
                              dict(ops_backend="reference", masked_head=False, attn_backend="sdpa")))
    out.append(dataclasses.replace(official, name="official_equiv_compiled", compile="model",
                                   description="torch.compile of official_equiv (the whole model)"))
    ours = E2EVariant(
        "ours", f"create_model defaults (ops_backend={ours_ops!r}, attention auto), masked-only head with its static "
        "token count, AdamW auto (fused on CUDA), foreach clip; eager",
        dict(ops_backend=ours_ops), head="static", optimizer="auto", foreach_clip=True)
    out.append(ours)
    out.append(dataclasses.replace(ours, name="ours_compiled", compile="blocks",
                                   description="ours with --compile blocks (each transformer block compiled)"))
    out.append(dataclasses.replace(ours, name="ours_compiled_graphs", compile="blocks", graphs=True,
                                   description="ours_compiled with the whole step captured in a CUDA graph"))
    return out


def variant_skip_reason(variant: E2EVariant, device: torch.device) -> str | None:
    """Why ``variant`` cannot run on ``device`` (None: it can)."""
    if variant.graphs and device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run: {device.type})"
    return None


def set_timm_fused_attn(model: torch.nn.Module, flag: bool) -> int:
    """Set ``fused_attn`` on every timm attention module that has it (ours ignore it); returns the count."""
    from .models.window_attention import WindowAttention

    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn") and not isinstance(m, WindowAttention):
            m.fused_attn = flag
            n += 1
    return n


def attention_paths(model: torch.nn.Module) -> dict:
    """Count of attention modules per (class, backend / fused flag): what a variant really runs."""
    from timm.models.swin_transformer_v2 import WindowAttention as TimmWindowAttentionV2

    from .models.window_attention import WindowAttention
    from .models.window_attention_v2 import WindowAttentionV2

    counts: dict = {}
    for m in model.modules():
        if isinstance(m, (WindowAttention, WindowAttentionV2)):
            key = f"simmim_fast.{type(m).__name__}(backend={m.backend})"
        elif isinstance(m, TimmWindowAttentionV2):  # timm's cosine attention: explicit softmax, no fused branch
            key = f"timm.swin_transformer_v2.{type(m).__name__}"
        elif hasattr(m, "fused_attn"):
            key = f"timm.{type(m).__name__}(fused_attn={m.fused_attn})"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


def build_model(preset: str, overrides: dict, create_kwargs: dict, device: torch.device) -> torch.nn.Module:
    """``create_model`` with the parameters allocated on ``device`` (CPU build + ``.to`` as fallback)."""
    from .models import create_model

    kwargs = dict(overrides, **create_kwargs)
    try:
        with torch.device(device):
            model = create_model(preset, **kwargs)
    except Exception:
        model = create_model(preset, **kwargs)
    return model.to(device)


def make_batch(*, img_size: tuple[int, int], patch_size: int, batch: int, device: torch.device,
               mask_patch_size: int = 32, mask_ratio: float = 0.6, seed: int = 1) -> dict:
    """Fixed images (device) and a SimMIM mask at model-patch resolution (bool, CPU and device copies) for a
    model of ``img_size`` and ``patch_size``, and the ``generator`` that drew it."""
    from .data.masking import MaskGenerator

    h, w = img_size
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    gen = MaskGenerator(input_size=h, mask_patch_size=mask_patch_size, model_patch_size=patch_size,
                        mask_ratio=mask_ratio)
    mask_cpu = gen.generate(batch, generator=torch.Generator().manual_seed(seed + 1))
    return {"images": images, "mask_cpu": mask_cpu, "mask": mask_cpu.to(device), "generator": gen}


class _ConstantLr:
    def __init__(self, lr: float):
        self.lr = lr

    def lr_for_step(self, t: int) -> float:
        return self.lr

    def state_dict(self) -> dict:
        return {"lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.lr = state["lr"]


@dataclass
class BuiltVariant:
    """A variant ready to step: ``step()`` runs one training step and returns its loss (device tensor)."""

    variant: E2EVariant
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], torch.Tensor]
    info: dict = field(default_factory=dict)


def build_variant(
    variant: E2EVariant,
    preset: str,
    *,
    overrides: dict,
    state: dict | None,
    batch: dict,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    compile_backend: str = "inductor",
) -> BuiltVariant:
    """Build ``variant`` of ``preset`` (weights from ``state`` when given) stepping on ``batch``."""
    from .training.compile import compile_model
    from .training.cuda_graphs import DeviceLr, GraphedStepper, make_capturable
    from .training.distributed import DistInfo
    from .training.optim import build_optimizer

    reason = variant_skip_reason(variant, device)
    if reason:
        raise ValueError(f"variant {variant.name}: {reason}")
    model = build_model(preset, overrides, variant.create_kwargs, device)
    if state is not None:
        model.load_state_dict(state, strict=True)
    model.train()
    info: dict = {}
    if variant.timm_fused_attn is not None:
        info["timm_fused_attn_set"] = set_timm_fused_attn(model, variant.timm_fused_attn)
    info["attention_modules"] = attention_paths(model)
    if variant.compile != "off":
        info["compile"] = compile_model(model, variant.compile, backend=compile_backend, device=device).lines()
    head_kwargs: dict = {}
    if variant.head == "static":
        n, why = model.static_head_count(batch["images"].shape[0], batch["generator"])
        info["masked_head_tokens"] = n
        if n is not None:
            head_kwargs["head_count"] = n
        else:
            info["masked_head_off"] = why
    optimizer = build_optimizer(model, lr=LR, implementation=variant.optimizer)
    info["adamw"] = "fused" if optimizer.defaults.get("fused") else ("foreach" if optimizer.defaults.get("foreach")
                                                                     else "single")
    params = [p for p in model.parameters() if p.requires_grad]
    images, mask = batch["images"], batch["mask"]

    if variant.graphs:
        lr = make_capturable(optimizer)
        dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
        stepper = GraphedStepper(model, optimizer, DeviceLr(_ConstantLr(LR), lr), info=dist, clip_grad=CLIP,
                                 head_count=head_kwargs.get("head_count"), amp_dtype=amp_dtype,
                                 capture=device.type == "cuda")
        counter = [0]

        def step() -> torch.Tensor:
            stepper.train_step(counter[0], images, mask)
            counter[0] += 1
            return stepper.loss_sum  # the running sum: the graph writes no per-step loss tensor

        info["graphs"] = lambda: stepper.status
        return BuiltVariant(variant, model, optimizer, step, info)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(images, mask, **head_kwargs)
        loss.backward()
        if variant.foreach_clip:
            torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        else:
            torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return BuiltVariant(variant, model, optimizer, step, info)


def count_train_flops(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor,
                      amp_dtype: torch.dtype | None) -> dict:
    """FLOPs of one forward and one backward per image (``FlopCounterMode``, matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    k = images.shape[0]
    with FlopCounterMode(display=False) as fwd:
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(images, mask)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    f, b = fwd.get_total_flops() / k, bwd.get_total_flops() / k
    return {"forward_per_image": f, "backward_per_image": b, "train_per_image": f + b, "counted_at_batch": k}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, *, n: int, reps: int) -> float:
    """Achieved TFLOP/s of an ``n x n x n`` matmul in ``dtype`` (CUDA events on a GPU, wall clock on CPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    seconds = device_seconds(lambda: a @ b, reps, device)
    return 2.0 * n ** 3 * reps / seconds / 1e12


def device_seconds(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Seconds for ``reps`` back-to-back calls: CUDA events around all of them (synchronised once),
    ``time.perf_counter`` on CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3
