"""The whole SimMIM training step side by side: official-equivalent, timm SDPA, compiled reference, ours.

    pytest benchmarks/test_end_to_end.py --benchmark-only [--benchmark-json e2e.json]
    python benchmarks/results_table.py e2e.json            # the README's Markdown table

One process, interleaved rounds: every variant of a preset (``simmim_fast.benchmarking``: the one
definition ``gpu_evidence.py`` uses too) is built from the same weights, images and mask, warmed up,
then timed round by round, variant after variant, so that clock and thermal drift hit all of them
alike. A round is ``STEPS`` back-to-back steps between two CUDA events (wall clock on CPU); a row
reports the median round.

CUDA: Swin-B/192, ViT-B/224 and SwinV2-B/192 (drop path 0 for every variant, so that first-step losses compare),
batch 128, bf16 autocast, Inductor. CPU: the small presets at 64 px, batch 2, fp32, and
``torch.compile`` with the ``aot_eager`` backend (Inductor's C++ code generation takes minutes per graph
on two cores; aot_eager traces the same graphs without it: on CPU the compiled rows check the code path,
they say nothing about compiled speed). ``ours_compiled_graphs`` is skipped on CPU (no CUDA graphs).

Each row (``benchmark.extra_info``): img/s, speed-up over ``official_equiv`` and over
``official_equiv_compiled``, MFU (train FLOPs per image of ``official_equiv`` from ``FlopCounterMode``,
forward + backward, against a bf16 (CPU: fp32) matmul measured in this run), peak memory (CUDA:
``max_memory_allocated`` during the variant's build, warm-up and first steps, minus what was allocated
before it was built; CPU: not measured, no allocator statistics), first-step and compile time (host
wall time of the first step, synchronised; compile = first step minus the median step), first-step loss.
pytest-benchmark's own timing of each test is one more round of that variant (wall clock, synchronised
at its end). Environment: ``SIMMIM_E2E_BATCH``, ``SIMMIM_E2E_ROUNDS``, ``SIMMIM_E2E_STEPS``,
``SIMMIM_E2E_COMPILE_BACKEND`` override the sizes.
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import pytest
import torch

from results_table import E2E_ROWS
from simmim_fast.benchmarking import (
    build_variant,
    count_train_flops,
    device_seconds,
    e2e_variants,
    make_batch,
    measure_matmul_tflops,
    set_timm_fused_attn,
    variant_skip_reason,
)
from simmim_fast.models import get_preset

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    CASES = {"swin_base_192": {"drop_path_rate": 0.0}, "vit_base_224": {"drop_path_rate": 0.0},
             "swinv2_base_192": {"drop_path_rate": 0.0}}
else:
    CASES = {"swin_tiny_cpu": dict(img_size=64, depths=(2, 2, 2, 1), drop_path_rate=0.0),
             "vit_tiny_cpu": dict(img_size=64, depth=2, drop_path_rate=0.0),
             "swinv2_tiny_cpu": dict(img_size=64, window_size=4, depths=(2, 2, 2, 1), drop_path_rate=0.0)}
BATCH = int(os.environ.get("SIMMIM_E2E_BATCH", 128 if CUDA else 2))
ROUNDS = int(os.environ.get("SIMMIM_E2E_ROUNDS", 5 if CUDA else 3))
STEPS = int(os.environ.get("SIMMIM_E2E_STEPS", 10 if CUDA else 2))
WARMUP = 3 if CUDA else 1
AMP = torch.bfloat16 if CUDA else None
COMPILE_BACKEND = os.environ.get("SIMMIM_E2E_COMPILE_BACKEND", "inductor" if CUDA else "aot_eager")
PEAK_DTYPE = torch.bfloat16 if CUDA else torch.float32


def _variants(preset: str):
    return e2e_variants(get_preset(preset).arch, ours_ops="auto")


PARAMS = [(p, v.name) for p in CASES for v in _variants(p)]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _free():
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def peak_tflops() -> dict:
    n, reps = (8192, 20) if CUDA else (512, 5)
    return {"tflops": measure_matmul_tflops(DEVICE, PEAK_DTYPE, n=n, reps=reps), "dtype": str(PEAK_DTYPE),
            "n": n}


def run_preset(preset: str, peak: dict) -> dict:
    """Build every variant of ``preset``, warm them up, time interleaved rounds; ``{variant: row}``."""
    overrides = CASES[preset]
    variants = _variants(preset)
    official = variants[0]
    torch.manual_seed(0)
    from simmim_fast.benchmarking import build_model

    ref = build_model(preset, overrides, official.create_kwargs, DEVICE).train()
    set_timm_fused_attn(ref, False)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    batch = make_batch(img_size=ref.img_size, patch_size=ref.patch_size, batch=BATCH, device=DEVICE)
    k = min(2, BATCH)
    flops = count_train_flops(ref, batch["images"][:k], batch["mask"][:k], AMP)
    del ref
    _free()

    built, rows = {}, {}
    for v in variants:
        reason = variant_skip_reason(v, DEVICE)
        if reason:
            rows[v.name] = {"status": "skipped", "reason": reason}
            continue
        before = torch.cuda.memory_allocated() if CUDA else None
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        b = build_variant(v, preset, overrides=overrides, state=state, batch=batch, device=DEVICE, amp_dtype=AMP,
                          compile_backend=COMPILE_BACKEND)
        torch.manual_seed(1234)
        _sync()
        t0 = time.perf_counter()
        loss = float(b.step())
        first = time.perf_counter() - t0
        for _ in range(WARMUP):
            b.step()
        _sync()
        row = {"status": "ok", "description": v.description, "first_step_s": first, "first_step_loss": loss,
               "compile": v.compile, "compile_backend": COMPILE_BACKEND if v.compile != "off" else None,
               "cuda_graphs": v.graphs, "adamw": b.info.get("adamw"),
               "masked_head_tokens": b.info.get("masked_head_tokens"),
               "attention_modules": b.info.get("attention_modules")}
        if CUDA:
            row["peak_memory_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        else:
            row["peak_memory_gib"] = None
            row["peak_memory_note"] = "CPU: not measured (no allocator statistics)"
        if "graphs" in b.info:
            row["cuda_graph_status"] = b.info["graphs"]()
        built[v.name], rows[v.name] = b, row

    times: dict = {name: [] for name in built}
    for _ in range(ROUNDS):
        for name, b in built.items():
            times[name].append(device_seconds(b.step, STEPS, DEVICE) / STEPS)

    ref_loss = rows[official.name].get("first_step_loss")
    for name, b in built.items():
        row = rows[name]
        step_s = statistics.median(times[name])
        row.update(step_ms=step_s * 1e3, step_ms_rounds=[t * 1e3 for t in times[name]], img_per_s=BATCH / step_s,
                   batch=BATCH, rounds=ROUNDS, steps_per_round=STEPS)
        achieved = row["img_per_s"] * flops["train_per_image"]
        row["model_tflops_per_s"] = achieved / 1e12
        row["mfu"] = achieved / (peak["tflops"] * 1e12)
        if row["compile"] != "off":
            row["compile_s"] = max(row["first_step_s"] - step_s, 0.0)
        if ref_loss is not None:
            row["loss_rel_diff_vs_official"] = abs(row["first_step_loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
    for name, row in rows.items():
        if row.get("status") != "ok":
            continue
        for base in ("official_equiv", "official_equiv_compiled"):
            other = rows.get(base, {})
            if other.get("status") == "ok":
                row[f"speedup_vs_{base}"] = row["img_per_s"] / other["img_per_s"]
    common = {"preset": preset, "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
              "precision": "bf16" if AMP is not None else "fp32", "encoder_overrides": overrides,
              "flops": flops, "peak_matmul": peak}
    return {"rows": {n: dict(r, **common, variant=n) for n, r in rows.items()}, "built": built}


@pytest.fixture(scope="module")
def results(peak_tflops):
    cache: dict = {}

    def get(preset: str) -> dict:
        if preset not in cache:
            cache[preset] = run_preset(preset, peak_tflops)
        return cache[preset]

    yield get
    cache.clear()
    _free()


@pytest.mark.parametrize("preset,variant", PARAMS, ids=[f"{p}-{v}" for p, v in PARAMS])
def test_end_to_end(benchmark, results, preset, variant):
    res = results(preset)
    row = res["rows"][variant]
    E2E_ROWS.append(row)
    if row["status"] != "ok":
        pytest.skip(row["reason"])
    benchmark.extra_info.update(row)
    step = res["built"][variant].step

    def one_round():
        for _ in range(STEPS):
            step()
        _sync()

    benchmark.pedantic(one_round, rounds=1, iterations=1)
    assert row["img_per_s"] > 0
