"""``torch.compile`` of the training step's model, in place: the encoder's blocks (regional) or the whole model.

    report = compile_model(model, mode="blocks")   # "auto" | "off" | "blocks" | "model"

``"blocks"`` compiles the forward of every transformer block of the encoder (timm's Swin / SwinV2 /
BEiT / ViT blocks, our :class:`~simmim_fast.models.swin_block.SwinBlock`), where the memory-bound glue
is (LayerNorm, GELU, residual adds, drop path, layer scale, the casts of bf16 autocast, Swin's window
shift / partition / reverse), so that the compiler fuses it. All blocks share one forward code object,
so one compiled graph serves every block of the same shape and configuration: Swin-B compiles 7 block
graphs for its 24 blocks (per stage: unshifted, shifted; the last stage has no shift), ViT-B one for its
12. Two things would defeat that, and are handled here:

- drop path: timm gives every block its own ``drop_prob`` (a Python float, hence a guard and a graph
  per block). Where the blocks of one kind have drop path, each ``DropPath`` (and ``nn.Identity`` in its
  place, the first block's rate 0) becomes a :class:`TensorDropPath`, whose rate is a buffer under
  ``torch.compile`` (one graph) and which runs timm's ``drop_path`` exactly in eager;
- Dynamo's recompile limit (8 per code object): raised to the number of block instances sharing a
  forward, so that a model with more distinct blocks never silently falls back to eager.

``"model"`` compiles the model's whole ``forward`` (for the SimMIM model: encoder, head and loss; pass
``head_count=`` to keep the masked-only head, see ``models.simmim``). ``"auto"`` is ``"blocks"`` on
CUDA and ``"off"`` elsewhere (Inductor's CPU code generation takes about half a minute per block
graph on a small machine: a CPU user is not made to wait).

Compiled modules keep their class, parameters, buffers and ``state_dict`` keys (no ``_orig_mod.``):
checkpoints of a compiled run load into an eager one and back. Compilation is lazy (the first
training step) and covers training only: the compiled forward runs when the module is in training
mode with gradients enabled; evaluation, ``predict`` and ``torch.no_grad()`` calls run the eager
forward (no recompilation for other batch sizes or modes).

Equivalent PyTorch: ``for blk in blocks: blk.compile(dynamic=False)`` / ``model.compile()``.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn

log = logging.getLogger("simmim_fast.compile")

COMPILE_MODES = ("auto", "off", "blocks", "model")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

_MARK = "_simmim_fast_compiled"

#: Compiled vs eager (and vs the full-head reference) loss and every gradient, by autocast dtype (None:
#: fp32). fp32: summation order (Inductor's fused reductions, the masked-only head's fewer rows); bf16
#: autocast: Inductor may keep in fp32 what eager autocast rounds to bf16 between two ops (a fused
#: LayerNorm + cast, a residual add), one bf16 rounding (2**-8 relative) per fused boundary.
TOLERANCES = {
    None: dict(loss=dict(rtol=1e-5, atol=1e-6), grad=dict(rtol=1e-4, atol=1e-6)),
    torch.bfloat16: dict(loss=dict(rtol=2e-2, atol=1e-3), grad=dict(rtol=5e-2, atol=2e-3)),
}


def resolve_compile_mode(mode: str, device: torch.device | str) -> tuple[str, str]:
    """``(mode, why)``: ``"auto"`` resolved for ``device`` (``why`` says why it is off, else empty)."""
    if not isinstance(mode, str) or mode not in COMPILE_MODES:
        raise ValueError(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode != "auto":
        return mode, "off as asked" if mode == "off" else ""
    if device.type == "cuda":
        return "blocks", ""
    return "off", (f"auto on {device.type}: compiled on CUDA only (Inductor's CPU code generation takes minutes "
                   f"for a model; pass --compile blocks to compile here anyway)")


# ----------------------------------------------------------------------------------------------------
# what gets compiled


def _block_types() -> tuple[type, ...]:
    from timm.models.beit import Block as BeitBlock
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block
    from timm.models.vision_transformer import Block as ViTBlock

    return SwinTransformerBlock, SwinTransformerV2Block, BeitBlock, ViTBlock


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (timm Swin / SwinV2 / BEiT / ViT blocks and their subclasses), in order."""
    kinds = _block_types()
    return [m for m in model.modules() if isinstance(m, kinds)]


class TensorDropPath(nn.Module):
    """timm's ``DropPath`` whose rate is a buffer under ``torch.compile`` (one graph for every rate).

    Eager: ``timm.layers.drop_path(x, drop_prob, training, scale_by_keep)`` exactly. Compiled: the same
    distribution (each sample kept with probability ``1 - drop_prob``, scaled by ``1 / (1 - drop_prob)``
    with ``scale_by_keep``) from ``torch.rand`` against the ``keep_prob`` buffer; rate 0 is the identity.
    No parameters; the buffer is not persistent (``state_dict`` unchanged).

    Equivalent PyTorch: ``timm.layers.DropPath(drop_prob, scale_by_keep)``.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True, *, device=None):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = bool(scale_by_keep)
        self.register_buffer("keep_prob", torch.tensor(1.0 - self.drop_prob, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if not torch.compiler.is_compiling():
            from timm.layers import drop_path

            return drop_path(x, self.drop_prob, True, self.scale_by_keep)
        keep = self.keep_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        kept = (torch.rand(shape, device=x.device) < keep).to(x.dtype)
        if self.scale_by_keep:
            kept = torch.where(keep > 0, kept / keep.clamp_min(torch.finfo(torch.float32).tiny), kept)
        return x * kept

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def _drop_path_slots(block: nn.Module) -> list[tuple[str, nn.Module]]:
    from timm.layers import DropPath

    return [(n, m) for n, m in block.named_children()
            if isinstance(m, (DropPath, TensorDropPath)) or (n.startswith("drop_path") and isinstance(m, nn.Identity))]


def unify_drop_path(blocks: list[nn.Module]) -> int:
    """Give the blocks of each kind one drop-path module type (:class:`TensorDropPath`) where any has drop
    path, so that their compiled graphs are one; returns how many modules were replaced."""
    from timm.layers import DropPath

    by_forward: dict = {}
    for b in blocks:
        by_forward.setdefault(type(b).forward, []).append(b)
    replaced = 0
    for group in by_forward.values():
        slots = [(b, n, m) for b in group for n, m in _drop_path_slots(b)]
        if not any(isinstance(m, DropPath) and m.drop_prob > 0 for _, _, m in slots):
            continue
        for b, n, m in slots:
            if isinstance(m, TensorDropPath):
                continue
            p = next(iter(b.parameters()), None)
            rate = m.drop_prob if isinstance(m, DropPath) else 0.0
            scale = m.scale_by_keep if isinstance(m, DropPath) else True
            new = TensorDropPath(rate, scale, device=p.device if p is not None else None)
            new.train(m.training)
            setattr(b, n, new)
            replaced += 1
    return replaced


def _recompile_limit_name() -> str:
    cfg = torch._dynamo.config
    return "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"


def raise_recompile_limit(needed: int) -> tuple[int, int] | None:
    """Raise Dynamo's per-code-object recompile limit to ``needed`` (process-wide); ``(old, new)`` or None."""
    name = _recompile_limit_name()
    old = int(getattr(torch._dynamo.config, name))
    if needed <= old:
        return None
    setattr(torch._dynamo.config, name, needed)
    return old, needed


# ----------------------------------------------------------------------------------------------------
# compiling in place


def _install(module: nn.Module, compiled) -> None:
    """Make ``module``'s forward the compiled one in training with gradients, the eager one otherwise."""
    eager = type(module).forward

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return compiled(self, *args, **kwargs)
        return eager(self, *args, **kwargs)

    module.forward = types.MethodType(forward, module)
    setattr(module, _MARK, True)


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_model` compiled ``module`` (or a module inside it)."""
    return any(getattr(m, _MARK, False) for m in module.modules())


@dataclass
class CompileReport:
    """What :func:`compile_model` did (``lines()`` for the log)."""

    requested: str
    mode: str  # "off" | "blocks" | "model"
    backend: str
    why_off: str = ""
    compiled: int = 0  # modules whose forward is compiled
    kinds: dict = field(default_factory=dict)  # block class -> count
    drop_path_replaced: int = 0
    recompile_limit: tuple | None = None  # (old, new) when raised

    def lines(self) -> list[str]:
        if self.mode == "off":
            return [f"torch.compile: off ({self.why_off or 'off'})"]
        what = (", ".join(f"{n} x{c}" for n, c in self.kinds.items()) if self.mode == "blocks" else "the whole model")
        out = [f"torch.compile: {self.mode} ({what}), backend {self.backend}, training steps only; "
               f"compiles at the first step"]
        if self.drop_path_replaced:
            out.append(f"torch.compile: {self.drop_path_replaced} drop-path modules take their rate from a buffer "
                       f"(one graph for blocks of different rates)")
        if self.recompile_limit:
            out.append(f"torch.compile: Dynamo's recompile limit raised from {self.recompile_limit[0]} to "
                       f"{self.recompile_limit[1]} (blocks sharing one forward)")
        return out


def compile_model(
    model: nn.Module,
    mode: str = "auto",
    *,
    backend: str = "inductor",
    device: torch.device | str | None = None,
    fullgraph: bool = False,
    dynamic: bool = False,
) -> CompileReport:
    """Compile ``model`` in place (see the module doc); returns a :class:`CompileReport`.

    ``mode``: ``"auto"`` (``"blocks"`` on CUDA, ``"off"`` elsewhere; ``device`` defaults to the model's),
    ``"off"``, ``"blocks"`` or ``"model"``. ``backend``: a ``torch.compile`` backend of
    ``COMPILE_BACKENDS`` (``"aot_eager"`` traces the same forward and backward graphs without
    Inductor's code generation: for tests and debugging). ``fullgraph=True`` makes a graph break an
    error; with False a break splits the graph (see :func:`compile_stats`). ``dynamic=False``: one
    static graph per shape. Call it once, before wrapping the model in DDP.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str) or backend not in COMPILE_BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(COMPILE_BACKENDS)}, got {backend!r}")
    for name, v in (("fullgraph", fullgraph), ("dynamic", dynamic)):
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected True or False, got {v!r}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("model: compile the module before wrapping it in DistributedDataParallel")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    resolved, why = resolve_compile_mode(mode, device)
    report = CompileReport(requested=mode, mode=resolved, backend=backend, why_off=why)
    if resolved == "off":
        return report
    if is_compiled(model):
        raise ValueError("model: already compiled by compile_model (compile it once)")
    options = dict(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    if resolved == "model":
        _install(model, torch.compile(type(model).forward, **options))
        report.compiled = 1
        return report
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"compile: mode 'blocks' found no transformer block (timm Swin / SwinV2 / BEiT / ViT) in "
                         f"{type(model).__name__}; use mode 'model'")
    report.drop_path_replaced = unify_drop_path(blocks)
    compiled_by_forward: dict = {}
    for b in blocks:
        fwd = type(b).forward
        if fwd not in compiled_by_forward:
            compiled_by_forward[fwd] = torch.compile(fwd, **options)
        _install(b, compiled_by_forward[fwd])
        report.kinds[type(b).__name__] = report.kinds.get(type(b).__name__, 0) + 1
    report.compiled = len(blocks)
    per_code: dict = {}
    for b in blocks:
        per_code[type(b).forward.__code__] = per_code.get(type(b).forward.__code__, 0) + 1
    report.recompile_limit = raise_recompile_limit(max(per_code.values()) + 1)
    return report


def compile_stats() -> dict:
    """Process-wide Dynamo counters: ``graphs`` compiled so far and ``graph_breaks`` with their reasons."""
    from torch._dynamo.utils import counters

    breaks = dict(counters.get("graph_break", {}))
    return {"graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
            "graph_breaks": int(sum(breaks.values())), "break_reasons": sorted(breaks)[:10]}
