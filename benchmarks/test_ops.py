"""Fused ops vs their PyTorch references at the real sizes (Swin-B/192 and ViT-B/224, batch 128).

    pytest benchmarks/test_ops.py --benchmark-only [--benchmark-json out.json]

Parametrised op x {fwd, fwd+bwd} x {bf16, fp32} x {triton, reference} x {swin_b, vit_b}:

- ``mask_token_fill``: tokens (B, 48, 48, 128) / (B, 14, 14, 768), the mask at model-patch resolution
  as the model passes it (MaskGenerator: 32 px cells, ratio 0.6).
- ``pixel_shuffle_head``: head output (B, 6, 6, 3072) / (B, 14, 14, 768) to images.
- ``masked_l1_loss``: head output + images (float32, as the model feeds them) + mask -> loss.
- ``head_full`` / ``head_masked``: the prediction head and loss from encoder features
  (B, 6, 6, 1024) / (B, 14, 14, 768): ``F.linear`` on every token + ``masked_l1_loss`` vs
  ``masked_head_loss`` (token selection + gather + GEMM on the ~60% masked tokens + fused loss).
- ``masked_l1_loss_norm``: ``masked_l1_loss`` with SwinV2 SimMIM's normalised targets (``norm_target=47``):
  float64 integral images + 4 corner reads per masked pixel (Triton) vs the official two 47 x 47
  ``avg_pool2d`` passes (reference). On CPU at batch 1 unless ``SIMMIM_BENCH_BATCH`` is set (the
  reference's pooling takes ~0.4 s per image batch of 4 per pass on 2 cores).
- ``copy``: a device-to-device copy, the bandwidth yardstick for "% of measured bandwidth".

``extra_info`` records ``bytes`` (what the op must move: inputs read once, outputs written once, the
fused design's gradient buffer; see ``_bytes_*``), ``gbps`` (bytes / mean time), ``flops``/``tflops``
for the head cases, the batch and where it came from. Batch: ``SIMMIM_BENCH_BATCH``, else 128 on CUDA
and 4 on CPU (the references at batch 128 take minutes on 2 cores). Triton cases skip without CUDA
(the interpreter is a correctness tool). CUDA timings synchronise inside the timed call.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from simmim_fast import MaskGenerator, ops
from simmim_fast.ops import _common

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if os.environ.get("SIMMIM_BENCH_BATCH"):
    BATCH, BATCH_SOURCE = int(os.environ["SIMMIM_BENCH_BATCH"]), "SIMMIM_BENCH_BATCH"
else:
    BATCH, BATCH_SOURCE = (128, "default (CUDA)") if CUDA else (4, "default (CPU: reduced from 128)")
ROUNDS = 20 if CUDA else 3

SIZES = {
    # image px, model patch px, token grid + dim (mask_token_fill), encoder stride, features dim
    "swin_b": dict(img=192, patch=4, tok=(48, 48, 128), stride=32, feat=1024),
    "vit_b": dict(img=224, patch=16, tok=(14, 14, 768), stride=16, feat=768),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
OPS = ["mask_token_fill", "pixel_shuffle_head", "masked_l1_loss", "masked_l1_loss_norm", "head_full", "head_masked"]
NORM_PATCH = 47  # the official NORM_TARGET.PATCH_SIZE
#: batch of the normalised-target case: the suite's batch on CUDA or when set, else 1 (CPU rows small)
NORM_BATCH = BATCH if (CUDA or os.environ.get("SIMMIM_BENCH_BATCH")) else 1


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _mask(size, batch=None):
    cfg = SIZES[size]
    gen = MaskGenerator(input_size=cfg["img"], mask_patch_size=32, model_patch_size=cfg["patch"], mask_ratio=0.6)
    return gen.generate(batch or BATCH, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(0))


def _randn(*shape, dtype=torch.float32, grad=False):
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)
    return t.requires_grad_(grad)


def _masked_fraction(mask, size):
    """Fraction of head tokens holding masked pixels (what the fused loss and masked head read)."""
    cfg = SIZES[size]
    h = cfg["img"] // cfg["stride"]
    return ops.masked_token_index(mask, (h, h), (cfg["img"], cfg["img"])).numel() / (mask.shape[0] * h * h)


# bytes each op must move (e = element size of the op's dtype; images are float32)


def _bytes_fill(n_tok, e, mask_bytes, bwd):
    fwd = 2 * n_tok * e + mask_bytes
    return fwd + (2 * n_tok * e + mask_bytes if bwd else 0)


def _bytes_shuffle(n_pred, e, bwd):
    return 2 * n_pred * e * (2 if bwd else 1)


def _bytes_loss(n_pred, n_img, e, frac, mask_bytes, bwd):
    read = frac * (n_pred * e + n_img * 4) + mask_bytes  # masked tokens' predictions and pixels
    if not bwd:
        return read
    return read + n_pred * e + 2 * n_pred * e  # gradient buffer written in forward; backward reads + writes it


def _bytes_norm_loss(n_pred, n_img, e, frac, mask_bytes, bwd):
    """The loss's bytes plus the float64 integral images of x and x**2: written once, read (at least) once
    for the masked pixels' windows."""
    return _bytes_loss(n_pred, n_img, e, frac, mask_bytes, bwd) + 2 * 8 * n_img * (1 + frac)


def _batch(op):
    return NORM_BATCH if op == "masked_l1_loss_norm" else BATCH


def _setup(op, size, dtype, bwd):
    """Inputs, the callable for one backend and the (bytes, flops) of the case."""
    cfg = SIZES[size]
    B, img, s = _batch(op), cfg["img"], cfg["stride"]
    h = img // s
    mask = _mask(size, B)
    e = torch.finfo(dtype).bits // 8
    mask_bytes = mask.numel() * mask.element_size()
    if op == "mask_token_fill":
        H, W, C = cfg["tok"]
        tokens = _randn(B, H, W, C, dtype=dtype, grad=bwd)
        mt = _randn(C, dtype=dtype, grad=bwd)
        g = _randn(B, H, W, C, dtype=dtype)

        def run(backend):
            out = ops.mask_token_fill(tokens, mask, mt, backend=backend)
            if bwd:
                torch.autograd.grad(out, (tokens, mt), g)

        return run, _bytes_fill(tokens.numel(), e, mask_bytes, bwd), 0
    if op == "pixel_shuffle_head":
        pred = _randn(B, h, h, 3 * s * s, dtype=dtype, grad=bwd)
        g = _randn(B, 3, img, img, dtype=dtype)

        def run(backend):
            out = ops.pixel_shuffle_head(pred, backend=backend)
            if bwd:
                torch.autograd.grad(out, pred, g)

        return run, _bytes_shuffle(pred.numel(), e, bwd), 0
    images = _randn(B, 3, img, img)
    frac = _masked_fraction(mask, size)
    if op == "masked_l1_loss":
        pred = _randn(B, h, h, 3 * s * s, dtype=dtype, grad=bwd)

        def run(backend):
            loss = ops.masked_l1_loss(pred, images, mask, backend=backend)
            if bwd:
                torch.autograd.grad(loss, pred)

        return run, _bytes_loss(pred.numel(), images.numel(), e, frac, mask_bytes, bwd), 0
    if op == "masked_l1_loss_norm":
        pred = _randn(B, h, h, 3 * s * s, dtype=dtype, grad=bwd)

        def run(backend):
            loss = ops.masked_l1_loss(pred, images, mask, norm_target=NORM_PATCH, backend=backend)
            if bwd:
                torch.autograd.grad(loss, pred)

        return run, _bytes_norm_loss(pred.numel(), images.numel(), e, frac, mask_bytes, bwd), 0
    # prediction head + loss from encoder features
    Fdim, K = cfg["feat"], 3 * s * s
    feats = _randn(B, h, h, Fdim, dtype=dtype, grad=bwd)
    weight = (_randn(K, Fdim) * 0.02).to(dtype).requires_grad_(bwd)
    bias = _randn(K, dtype=dtype, grad=bwd)
    rows = B * h * h if op == "head_full" else frac * B * h * h
    flops = 2 * rows * Fdim * K * (3 if bwd else 1)
    gemm_bytes = (rows * Fdim + K * Fdim + rows * K) * e * (3 if bwd else 1)
    byts = gemm_bytes + _bytes_loss(B * h * h * K, images.numel(), e, frac, mask_bytes, bwd)

    def run(backend):
        if op == "head_full":
            loss = ops.masked_l1_loss(F.linear(feats, weight, bias), images, mask, backend=backend)
        else:
            index, reason = ops.masked_head_plan(mask, (h, h), (img, img))
            assert index is not None, reason
            loss = ops.masked_head_loss(feats, weight, bias, images, mask, token_index=index, backend=backend)
        if bwd:
            torch.autograd.grad(loss, (feats, weight, bias))

    return run, byts, flops


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, mode, dtype_name, backend, size):
    if backend == "triton":
        if not CUDA:
            pytest.skip("Triton kernels need a CUDA device (the CPU interpreter is a correctness tool, not a benchmark)")
        if not _common.HAS_TRITON:
            pytest.skip(f"triton unavailable: {_common.TRITON_IMPORT_ERROR}")
    dtype = DTYPES[dtype_name]
    run, nbytes, flops = _setup(op, size, dtype, mode == "fwd+bwd")

    def step():
        run(backend)
        _sync()

    step()  # warm-up: kernel compilation, allocator
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        op=op, mode=mode, dtype=dtype_name, backend=backend, size=size, device=str(DEVICE),
        batch=_batch(op), batch_source=BATCH_SOURCE if _batch(op) == BATCH else "norm-target default (CPU: 1)",
        bytes=int(nbytes), gbps=nbytes / mean / 1e9,
    )
    if flops:
        benchmark.extra_info.update(flops=int(flops), tflops=flops / mean / 1e12)


def test_copy_bandwidth(benchmark):
    """Device-to-device copy (read + write), the yardstick for the ops' GB/s."""
    n = (1 << 30) if CUDA else (1 << 26)  # bytes
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)
        _sync()

    step()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(op="copy", device=str(DEVICE), bytes=2 * n, gbps=2 * n / mean / 1e9)
