"""One training step's memory estimate and the fail-fast check (issue 15, item 3): ``training.memory``.

The estimate runs the step on fake tensors; here it is compared with the real step on CPU, measured
by the CPU allocator's own events (``torch.profiler`` with ``profile_memory``: every allocation and
free, in order), for the Swin and ViT CPU presets with the reference ops, SDPA and math attention,
fp32 and bf16, with and without gradient checkpointing. Measured agreement (2 cores): equal to the byte
in fp32, within 1 % in bf16; the tolerance below is 3 %.
"""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from simmim_fast import MaskGenerator, create_model
from simmim_fast.training import memory
from simmim_fast.training.memory import GiB, check_fits, estimate_step_memory
from simmim_fast.training.optim import build_optimizer

MiB = 2 ** 20


def _swin(**kw):
    return create_model("swin_tiny_cpu", ops_backend="reference", img_size=96, **kw)


def _vit(**kw):
    return create_model("vit_tiny_cpu", ops_backend="reference", img_size=128, **kw)


def _real_step_peak(model, *, batch_size: int, precision: str) -> int:
    """Peak bytes the CPU allocator holds during a real second training step, above what it held before."""
    from torch.profiler import ProfilerActivity, profile

    size = model.img_size[0]
    gen = MaskGenerator(input_size=size, mask_patch_size=32, model_patch_size=model.patch_size, mask_ratio=0.6)
    opt = build_optimizer(model, lr=1e-4)
    amp = memory.PRECISIONS[precision]
    model.train()

    def step():
        images = torch.randn(batch_size, 3, size, size)
        mask = gen.generate(batch_size, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext():
            loss = model(images, mask)
        loss.backward()
        del images, mask, loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state, as every later step finds it
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"), key=lambda t: t[0])
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("build, precision, checkpointing", [
    (lambda: _swin(attn_backend="sdpa"), "fp32", False),
    (lambda: _swin(attn_backend="math"), "bf16", True),
    (lambda: _vit(), "bf16", False),
    (lambda: _vit(), "fp32", True),
], ids=["swin-sdpa-fp32", "swin-math-bf16-ckpt", "vit-bf16", "vit-fp32-ckpt"])
def test_estimate_matches_the_real_cpu_step(build, precision, checkpointing):
    torch.manual_seed(0)
    model = build()
    model.set_grad_checkpointing(checkpointing)
    est = estimate_step_memory(model, batch_size=4, precision=precision, per_image=False)
    assert est.grad_checkpointing is checkpointing and est.per_image is None
    real = _real_step_peak(model, batch_size=4, precision=precision)
    estimated = est.total - est.params - est.buffers - est.optimizer  # held before the step: model + state
    assert abs(estimated - real) <= 0.03 * real, f"estimated {estimated / MiB:.2f} MiB, measured {real / MiB:.2f} MiB"


def test_parts_precision_checkpointing_and_batch_scaling():
    model = _vit()
    n = sum(p.numel() for p in model.parameters())
    tensors = sum(1 for _ in model.parameters())
    flags = [m.grad_checkpointing for m in model.modules() if hasattr(m, "grad_checkpointing")]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = estimate_step_memory(model, batch_size=6)
    assert fp32.params == fp32.grads == 4 * n
    assert fp32.optimizer == 8 * n + 4 * tensors  # AdamW: two fp32 moments and a step count per tensor
    assert fp32.total == fp32.at_batch(6) and fp32.per_image > 0 and fp32.fixed > fp32.resident
    # linear in the batch: the slope from batches 1 and 6 predicts a simulation at 3
    three = estimate_step_memory(model, batch_size=3, per_image=False)
    assert abs(fp32.at_batch(3) - three.total) <= 0.01 * three.total
    bf16 = estimate_step_memory(model, batch_size=6, precision="bf16", per_image=False)
    ckpt = estimate_step_memory(model, batch_size=6, grad_checkpointing=True, per_image=False)
    assert bf16.activations < fp32.activations and ckpt.activations < 0.75 * fp32.activations
    assert bf16.params == fp32.params  # autocast keeps fp32 weights
    ddp = estimate_step_memory(model, batch_size=6, world_size=2, per_image=False)
    assert ddp.ddp_buckets == ddp.grads and ddp.total == fp32.total + ddp.grads
    # the model is left as it was: flags, weights, no gradients, training mode
    assert [m.grad_checkpointing for m in model.modules() if hasattr(m, "grad_checkpointing")] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_check_fits_fails_fast_naming_the_flags_and_the_batch_that_fits():
    model = _vit()
    est = estimate_step_memory(model, batch_size=64)
    room = est.at_batch(10) + est.per_image // 2 - est.resident  # room for 10.5 images (the model is resident)
    available = int(room / 0.9) + 1
    with pytest.raises(ValueError) as info:
        check_fits(est, "cpu", available=available, accum_steps=2)
    msg = str(info.value)
    assert msg.startswith("--batch-size: a training step at batch 64") and "--accum-steps" in msg and "GiB" in msg
    assert "the largest batch that fits is about 10" in msg
    assert "--batch-size 10 --accum-steps 13" in msg  # 128 images per step kept: 13 x 10 >= 64 x 2
    # the batch it proposes fits, by a fresh simulation at that batch
    ten = estimate_step_memory(model, batch_size=10, per_image=False)
    assert check_fits(ten, "cpu", available=available) >= 0
    # not even one image
    with pytest.raises(ValueError, match="not even batch 1 fits: use gradient checkpointing"):
        check_fits(est, "cpu", available=est.fixed // 2)
    # enough room: the bytes left
    assert check_fits(est, "cpu", available=10 * est.total) > 0
    # the model's bytes count when it is not yet on the device
    tight = int((est.total - est.resident) / 0.9) + 1
    assert check_fits(est, "cpu", available=tight) >= 0
    with pytest.raises(ValueError):
        check_fits(est, "cpu", available=tight, resident=False)
    with pytest.raises(ValueError, match="for 2 processes"):
        check_fits(est, "cpu", available=tight, share=2)


def test_check_step_memory_for_the_trainer(monkeypatch, caplog):
    model = _vit()
    monkeypatch.setattr(memory, "available_memory", lambda device: 10 * GiB)
    assert memory.check_step_memory(model, device="cpu", batch_size=2).total > 0
    monkeypatch.setattr(memory, "available_memory", lambda device: 40 * MiB)
    with pytest.raises(ValueError, match="largest batch that fits is about"):
        memory.check_step_memory(model, device="cpu", batch_size=512)

    def cannot(*a, **k):
        raise RuntimeError("no fake kernel")

    monkeypatch.setattr(memory, "_simulate", cannot)
    with caplog.at_level(logging.WARNING):
        assert memory.check_step_memory(model, device="cpu", batch_size=2) is None
    assert "memory check skipped" in caplog.text and "no fake kernel" in caplog.text
    monkeypatch.setattr(memory, "available_memory", lambda device: None)  # free memory unknown: no check
    assert check_fits(memory.MemoryEstimate(1, "fp32", False, "cpu", 1, 0, 1, 2, 10, 1, 14), "cpu") is None


def test_bad_arguments_are_listed():
    with pytest.raises(ValueError) as info:
        estimate_step_memory(torch.nn.Linear(2, 2), batch_size=0, precision="fp8", optimizer="sgd")
    msg = str(info.value)
    for needle in ("model:", "batch_size:", "precision:", "optimizer:"):
        assert needle in msg
    with pytest.raises(ValueError, match="img_size"):
        estimate_step_memory(_vit(), batch_size=1, img_size=224)


def test_available_memory():
    cpu = memory.available_memory("cpu")
    total = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    assert isinstance(cpu, int) and 0 < cpu <= total
    if not torch.cuda.is_available():
        assert memory.available_memory("cuda") is None
