"""Images/s of one full pretraining step (forward, backward, grad clip, AdamW) per preset.

    pytest benchmarks/test_train_step.py --benchmark-only [--benchmark-json out.json]

Batch: ``SIMMIM_BENCH_BATCH`` (default 8 on CPU, 128 on CUDA); precision fp32 on CPU, bf16 on CUDA.
The model's defaults run (``auto``: Triton ops and xformers/SDPA window attention on CUDA, the
references on CPU); the masked-only head's token index is computed on the CPU mask before timing, as
the trainer does, so no step waits on the device. CUDA timings synchronise inside the timed call.
``peak_step_memory_gib`` (CUDA only): ``max_memory_allocated`` during the first step minus what the
model, its inputs and the (still empty) optimizer held before it: activations, gradients, AdamW state.
``swinv2_base_192`` is the SwinV2-B SimMIM config (normalised targets, cosine attention on SDPA).
The side-by-side GPU comparison (official-equivalent, SDPA, ours, compiled) is ``gpu_evidence.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

from simmim_fast import MaskGenerator, create_model
from simmim_fast.training.optim import build_optimizer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BATCH = int(os.environ.get("SIMMIM_BENCH_BATCH", 128 if CUDA else 8))
PRESETS = ["swin_tiny_cpu", "swin_base_192", "vit_base_224", "swinv2_base_192"]


@pytest.mark.parametrize("preset", PRESETS)
def test_train_step(benchmark, preset):
    torch.manual_seed(0)
    model = create_model(preset).to(DEVICE).train()
    h, w = model.img_size
    images = torch.randn(BATCH, 3, h, w, device=DEVICE)
    gen = MaskGenerator(input_size=h, mask_patch_size=32, model_patch_size=model.patch_size, mask_ratio=0.6)
    mask = gen.generate(BATCH, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(0))
    head_tokens = model.masked_head_tokens(images, mask.cpu())  # on the CPU mask, as the trainer: no sync
    head_tokens = head_tokens.to(DEVICE) if head_tokens is not None else None
    opt = build_optimizer(model, lr=1e-4)
    dtype = torch.bfloat16 if CUDA else torch.float32

    def step():
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=CUDA):
            loss = model(images, mask, head_tokens=head_tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    step()  # warm-up (allocations, autotuning)
    peak = torch.cuda.max_memory_allocated() - before if CUDA else None
    rounds = 3 if (not CUDA and preset != "swin_tiny_cpu") else 10
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(preset=preset, batch=BATCH, device=str(DEVICE), img_per_s=BATCH / mean,
                                precision="bf16" if CUDA else "fp32",
                                peak_step_memory_gib=None if peak is None else peak / 2**30)
