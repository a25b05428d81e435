"""Swin window attention: Triton (ours, fused) vs xformers (ours) vs SDPA (ours) vs timm's SDPA branch vs math.

    pytest benchmarks/test_window_attention.py --benchmark-only [--benchmark-json out.json]

Geometry of Swin-B at 192 px, window 6 (N = 36 tokens): per stage 64/16/4/1 windows, 4/8/16/32 heads
(head dim 32), dim 128/256/512/1024; shifted and unshifted blocks (stage 4 is one window: unshifted).
Also one whole Swin-B block (stage 1, shifted, 48x48 tokens) and the whole ``swin_base_192`` encoder.
Each case: ``fwd`` (forward with autograd recording, as in training) or ``fwd_bwd``; autocast bf16 or
fp16 over fp32 weights, as the trainer runs.

Backends: ``xformers`` / ``sdpa`` = :class:`simmim_fast.models.window_attention.WindowAttention`
(per-window bias broadcast over the batch); ``triton`` = the same module on the fused kernel
(``ops.swin_window_attention``; on windows with the mask read in-kernel, in a block without roll /
partition / reverse); ``timm_sdpa`` = timm's ``WindowAttention`` with ``fused_attn=True`` (its SDPA
branch, bias + mask expanded to ``(B*nW, nH, N, N)`` every block); ``math`` = timm's explicit-softmax
branch (timm's default for Swin).

Per block (the issue-12 target, "window attention fwd+bwd per block"): ``test_block_attention`` times
a Swin block's whole attention path ``_attn`` (norm1 output -> proj output: qkv GEMM, shift, partition,
attention, reverse, proj GEMM; the GEMMs are the same for every backend) per Swin-B/192 stage, and
``test_attention_core`` the part the fused kernel replaces, qkv projection output -> proj input
``(B, H, W, 3C) -> (B, H, W, C)``: the Triton op vs timm's math on the same boundary (roll, partition,
explicit softmax in the input dtype, reverse, roll). ``extra_info``: ``attn_flops`` (``4 N^2 hd`` per
window and head forward, ``10 N^2 hd`` backward), ``tflops`` over the mean time, and for the Triton
kernel ``hbm_bytes`` (compulsory bytes from the kernels' loads/stores, ``ops.window_attention.
kernel_traffic``; ``issued_bytes`` counts every load, re-reads L2 may serve) and ``gbps``. Triton
cases need CUDA (the interpreter is a correctness tool) and skip on CPU with that reason.

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
from simmim_fast.ops import _common
from simmim_fast.ops import window_attention as fused

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = int(os.environ.get("SIMMIM_BENCH_BATCH", 128 if CUDA else 2))
WINDOW = 6
N = WINDOW * WINDOW
# (stage, windows per image, heads, dim) of Swin-B / 192 px / window 6
STAGES = [(1, 64, 4, 128), (2, 16, 8, 256), (3, 4, 16, 512), (4, 1, 32, 1024)]
STAGE_CASES = [(s, nW, h, d, shift) for s, nW, h, d in STAGES for shift in ((True, False) if nW > 1 else (False,))]
BACKENDS = ["triton", "xformers", "sdpa", "timm_sdpa", "math"]
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


def _triton_skip_reason() -> str | None:
    if not CUDA or _common.INTERPRET:
        return "needs CUDA: the Triton kernels run on CPU only through the interpreter, a correctness tool"
    return None


def _skip_reason(backend: str, dtype: torch.dtype, heads: int) -> str | None:
    if backend == "triton":
        return _triton_skip_reason()
    if backend == "xformers":
        return _xformers_skip_reason(dtype, heads)
    return None


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
    reason = _skip_reason(backend, dtype, heads)
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
    if reason := _skip_reason(backend, dtype, 4):
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
    if reason := _skip_reason(backend, dtype, 4):
        pytest.skip(reason)
    torch.manual_seed(0)
    enc = create_model("swin_base_192", attn_backend="timm").encoder.to(DEVICE)
    _set_backend(enc, backend)
    images = torch.randn(BATCH, 3, 192, 192, device=DEVICE, requires_grad=True)
    mask = (torch.rand(BATCH, 48, 48, device=DEVICE) < 0.6).long()
    _measure(benchmark, _step(enc, (images, mask), dtype, mode), what="swin_base_192_encoder", backend=backend,
             dtype=dtype_name, mode=mode)


# --------------------------------------------------------------------------------------------------
# per block: the attention path of a block, and the part the fused kernel replaces

BLOCK_CASES = [(s, nW, h, d, shift) for s, nW, h, d, shift in STAGE_CASES]


def _stage_block(nW: int, heads: int, dim: int, shift: bool) -> SwinTransformerBlock:
    side = WINDOW * int(nW**0.5)
    torch.manual_seed(0)
    return SwinTransformerBlock(dim=dim, input_resolution=(side, side), num_heads=heads, window_size=WINDOW,
                                shift_size=WINDOW // 2 if shift else 0).to(DEVICE)


def _attn_flops(B: int, nW: int, heads: int, dim: int, mode: str) -> int:
    per = B * nW * heads * N * N * (dim // heads)
    return 4 * per + (10 * per if mode == "fwd_bwd" else 0)


def _record_rates(benchmark, flops: int, nbytes: int | None = None) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(attn_flops=flops, tflops=flops / mean / 1e12)
    if nbytes is not None:
        benchmark.extra_info.update(hbm_bytes=nbytes, gbps=nbytes / mean / 1e9)


def _kernel_bytes(B, side, heads, dim, shift, dtype, mode) -> dict:
    geo = fused.Geometry(B, side, side, side, side, WINDOW, WINDOW, WINDOW // 2 if shift else 0,
                         WINDOW // 2 if shift else 0, heads, dim // heads)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count if CUDA else 132
    cap = tuple(torch.cuda.get_device_capability(DEVICE)) if CUDA else (9, 0)
    t = fused.kernel_traffic(geo, dtype=dtype, sms=sms, capability=cap)
    parts = ["forward"] + (["backward"] if mode == "fwd_bwd" else [])
    return {"compulsory": sum(t[p]["compulsory_bytes"] for p in parts),
            "issued": sum(t[p]["issued_bytes"] for p in parts), "tiles": t["tiles"]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage,nW,heads,dim,shift", BLOCK_CASES,
                         ids=[f"stage{s}-{'shift' if sh else 'noshift'}" for s, _, _, _, sh in BLOCK_CASES])
def test_block_attention(benchmark, stage, nW, heads, dim, shift, backend, dtype_name, mode):
    """A block's attention path ``_attn`` on (B, H, W, C) tokens (norm1 output -> proj output)."""
    dtype = DTYPES[dtype_name]
    if reason := _skip_reason(backend, dtype, heads):
        pytest.skip(reason)
    blk = _stage_block(nW, heads, dim, shift)
    _set_backend(blk, backend)
    if backend != "timm_sdpa" and backend != "math":
        from simmim_fast.models.swin_block import SwinBlock

        blk.__class__ = SwinBlock  # a lone block (no parent to swap it in): the fused block path
    side = WINDOW * int(nW**0.5)
    x = torch.randn(BATCH, side, side, dim, device=DEVICE, requires_grad=True)
    params = [p for p in blk.attn.parameters() if p.requires_grad]  # _attn uses only the attention's

    def fn():
        with torch.autocast(DEVICE.type, dtype=dtype):
            y = blk._attn(x)
        if mode == "fwd_bwd":
            grads = torch.autograd.grad(y.float().sum(), [*params, x])
            del grads
        del y
        if CUDA:
            torch.cuda.synchronize()

    _measure(benchmark, fn, what="block_attention", stage=stage, windows=nW, heads=heads, tokens=N, shift=shift,
             backend=backend, dtype=dtype_name, mode=mode)
    kb = _kernel_bytes(BATCH, side, heads, dim, shift, dtype, mode) if backend == "triton" else None
    _record_rates(benchmark, _attn_flops(BATCH, nW, heads, dim, mode))
    if kb:
        benchmark.extra_info.update(kernel_hbm_bytes=kb["compulsory"], kernel_issued_bytes=kb["issued"],
                                    tiles=kb["tiles"])


def _math_core(qkv, table, index, mask, heads: int, shift: int) -> torch.Tensor:
    """timm's math branch on the fused op's boundary, in qkv's dtype: (B, H, W, 3C) -> (B, H, W, C)."""
    B, H, W, C3 = qkv.shape
    C, hd = C3 // 3, C3 // 3 // heads
    x = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2)) if shift else qkv
    win = x.view(B, H // WINDOW, WINDOW, W // WINDOW, WINDOW, 3, heads, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = win.reshape(3, -1, heads, N, hd).unbind(0)
    attn = (q * hd**-0.5) @ k.transpose(-2, -1)
    attn = attn + table[index.view(-1)].view(N, N, heads).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = (attn.view(-1, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, N, N)
    out = (attn.softmax(-1).to(v.dtype) @ v).view(B, H // WINDOW, W // WINDOW, heads, WINDOW, WINDOW, hd)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, C)
    return torch.roll(out, shifts=(shift, shift), dims=(1, 2)) if shift else out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", ["triton", "math"])
@pytest.mark.parametrize("stage,nW,heads,dim,shift", BLOCK_CASES,
                         ids=[f"stage{s}-{'shift' if sh else 'noshift'}" for s, _, _, _, sh in BLOCK_CASES])
def test_attention_core(benchmark, stage, nW, heads, dim, shift, backend, dtype_name, mode):
    """qkv projection output -> proj input, (B, H, W, 3C) -> (B, H, W, C): what the fused kernel replaces."""
    dtype = DTYPES[dtype_name]
    if reason := _skip_reason(backend, dtype, heads):
        pytest.skip(reason)
    side = WINDOW * int(nW**0.5)
    s = WINDOW // 2 if shift else 0
    qkv = torch.randn(BATCH, side, side, 3 * dim, device=DEVICE).to(dtype).requires_grad_(True)
    table = torch.randn((2 * WINDOW - 1) ** 2, heads, device=DEVICE, requires_grad=True)
    index = fused.relative_position_index(WINDOW, WINDOW, device=DEVICE)
    mask = fused.shift_mask(side, side, (WINDOW, WINDOW), (s, s), device=DEVICE).to(dtype) if s else None

    def run():
        if backend == "triton":
            return fused.swin_window_attention(qkv, table, num_heads=heads, window_size=WINDOW, shift_size=s,
                                               backend="triton")
        return _math_core(qkv, table.to(dtype), index, mask, heads, s)

    def fn():
        y = run()
        if mode == "fwd_bwd":
            grads = torch.autograd.grad(y.float().sum(), [qkv, table])
            del grads
        del y
        if CUDA:
            torch.cuda.synchronize()

    _measure(benchmark, fn, what="attention_core", stage=stage, windows=nW, heads=heads, tokens=N, shift=shift,
             backend=backend, dtype=dtype_name, mode=mode)
    kb = _kernel_bytes(BATCH, side, heads, dim, shift, dtype, mode)
    _record_rates(benchmark, _attn_flops(BATCH, nW, heads, dim, mode), kb["compulsory"] if backend == "triton" else None)
    if backend == "triton":
        benchmark.extra_info.update(issued_bytes=kb["issued"], tiles=kb["tiles"])
