"""Swin window attention: xformers (ours) vs SDPA (ours) vs timm's fused SDPA branch vs math.

    pytest benchmarks/test_window_attention.py --benchmark-only [--benchmark-json out.json]

Geometry of Swin-B at 192 px, window 6 (N = 36 tokens): per stage 64/16/4/1 windows, 4/8/16/32 heads
(head dim 32), dim 128/256/512/1024; shifted and unshifted blocks (stage 4 is one window: unshifted).
Also one whole Swin-B block (stage 1, shifted, 48x48 tokens) and the whole ``swin_base_192`` encoder.
Each case: ``fwd`` (forward with autograd recording, as in training) or ``fwd_bwd``; autocast bf16 or
fp16 over fp32 weights, as the trainer runs.

Backends: ``xformers`` / ``sdpa`` = :class:`simmim_fast.models.window_attention.WindowAttention`
(per-window bias broadcast over the batch); ``timm_sdpa`` = timm's ``WindowAttention`` with
``fused_attn=True`` (its SDPA branch, bias + mask expanded to ``(B*nW, nH, N, N)`` every block);
``math`` = timm's explicit-softmax branch (timm's default for Swin).

Batch: ``SIMMIM_BENCH_BATCH`` (default 128 on CUDA, 2 on CPU; recorded in ``extra_info.batch``).
On CUDA every timed call synchronises, and ``extra_info`` records the peak memory of one extra
untimed call (``peak_mib``: allocated at peak; ``extra_mib``: above what was allocated before the
call). xformers cases skip, with xformers' reasons, where its kernel does not dispatch (always on CPU).
"""
from __future__ import annotations

import os

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

from simmim_fast.models import create_model
from simmim_fast.models import window_attention as wa
from simmim_fast.models.window_attention import WindowAttention, swap_window_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = int(os.environ.get("SIMMIM_BENCH_BATCH", 128 if CUDA else 2))
WINDOW = 6
N = WINDOW * WINDOW
# (stage, windows per image, heads, dim) of Swin-B / 192 px / window 6
STAGES = [(1, 64, 4, 128), (2, 16, 8, 256), (3, 4, 16, 512), (4, 1, 32, 1024)]
STAGE_CASES = [(s, nW, h, d, shift) for s, nW, h, d in STAGES for shift in ((True, False) if nW > 1 else (False,))]
BACKENDS = ["xformers", "sdpa", "timm_sdpa", "math"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ["fwd", "fwd_bwd"]
ROUNDS = 10 if CUDA else 3


def _xformers_skip_reason(dtype: torch.dtype, heads: int, head_dim: int = 32) -> str | None:
    """Why the xformers kernel cannot run a training step of this geometry here (None: it can)."""
    Np = -(-N // wa.BIAS_ALIGNMENT) * wa.BIAS_ALIGNMENT
    q = torch.zeros(2, N, heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.zeros(heads, N, Np, device=DEVICE, dtype=dtype, requires_grad=True)[..., :N]
    bias = bias.unsqueeze(0).expand(2, -1, -1, -1)
    reasons = wa.xformers_not_supported_reasons(q, q, q, bias, scale=head_dim**-0.5, needs_grad=True)
    return "xformers kernel not usable here: " + "; ".join(reasons) if reasons else None


def _set_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """``model`` (with timm's window attention) set to ``backend``: ours swapped in, or timm's branch."""
    if backend in ("timm_sdpa", "math"):
        for m in model.modules():
            if type(m) is TimmWindowAttention:
                m.fused_attn = backend == "timm_sdpa"
        return model
    return swap_window_attention(model, backend=backend)


def _measure(benchmark, fn, **info) -> None:
    """Warm up, record peak memory (CUDA) of one call, then time ``fn``."""
    fn()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        info.update(peak_mib=round(peak / 2**20, 1), extra_mib=round((peak - before) / 2**20, 1))
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(device=str(DEVICE), batch=BATCH, **info)


def _step(module, inputs, dtype, mode):
    params = [p for p in module.parameters() if p.requires_grad]

    def fn():
        with torch.autocast(DEVICE.type, dtype=dtype):
            y = module(*inputs)
        if mode == "fwd_bwd":
            grads = torch.autograd.grad(y.float().sum(), [*params, inputs[0]])
            del grads
        del y
        if CUDA:
            torch.cuda.synchronize()

    return fn


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage,nW,heads,dim,shift", STAGE_CASES,
                         ids=[f"stage{s}-{'shift' if sh else 'noshift'}" for s, _, _, _, sh in STAGE_CASES])
def test_stage_attention(benchmark, stage, nW, heads, dim, shift, backend, dtype_name, mode):
    dtype = DTYPES[dtype_name]
    if backend == "xformers":
        reason = _xformers_skip_reason(dtype, heads)
        if reason:
            pytest.skip(reason)
    torch.manual_seed(0)
    # the block computes the real shift mask (0 / -100) for a grid of nW windows
    side = WINDOW * int(nW**0.5)
    blk = SwinTransformerBlock(dim=dim, input_resolution=(side, side), num_heads=heads, window_size=WINDOW,
                               shift_size=WINDOW // 2 if shift else 0).to(DEVICE)
    attn = blk.attn
    if backend in ("timm_sdpa", "math"):
        attn.fused_attn = backend == "timm_sdpa"
    else:
        attn = WindowAttention.from_timm(attn, backend=backend)
    x = torch.randn(BATCH * nW, N, dim, device=DEVICE, requires_grad=True)
    _measure(benchmark, _step(attn, (x, blk.attn_mask), dtype, mode), stage=stage, windows=nW, heads=heads,
             tokens=N, shift=shift, backend=backend, dtype=dtype_name, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_swin_b_block(benchmark, backend, dtype_name, mode):
    """One whole Swin-B block of stage 1 (48x48 tokens, dim 128, 4 heads, shifted windows)."""
    dtype = DTYPES[dtype_name]
    if backend == "xformers" and (reason := _xformers_skip_reason(dtype, 4)):
        pytest.skip(reason)
    torch.manual_seed(0)
    blk = SwinTransformerBlock(dim=128, input_resolution=(48, 48), num_heads=4, window_size=WINDOW,
                               shift_size=WINDOW // 2).to(DEVICE)
    _set_backend(blk, backend)
    x = torch.randn(BATCH, 48, 48, 128, device=DEVICE, requires_grad=True)
    _measure(benchmark, _step(blk, (x,), dtype, mode), what="swin_b_stage1_shifted_block", backend=backend,
             dtype=dtype_name, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_swin_b_encoder(benchmark, backend, dtype_name, mode):
    """The whole ``swin_base_192`` encoder (mask token, 24 blocks, final norm) on masked images."""
    dtype = DTYPES[dtype_name]
    if backend == "xformers" and (reason := _xformers_skip_reason(dtype, 4)):
        pytest.skip(reason)
    torch.manual_seed(0)
    enc = create_model("swin_base_192", attn_backend="timm").encoder.to(DEVICE)
    _set_backend(enc, backend)
    images = torch.randn(BATCH, 3, 192, 192, device=DEVICE, requires_grad=True)
    mask = (torch.rand(BATCH, 48, 48, device=DEVICE) < 0.6).long()
    _measure(benchmark, _step(enc, (images, mask), dtype, mode), what="swin_base_192_encoder", backend=backend,
             dtype=dtype_name, mode=mode)
