#!/usr/bin/env python3
"""GPU evidence: one command that measures what simmim-fast exists for, on one GPU, in under ~9 minutes.

    python benchmarks/gpu_evidence.py [--out DIR] [--budget SECONDS] [--skip S[,S]] [--only S[,S]] [--dry-run]

Sections, in priority order (each one skipped, recorded as "skipped: budget", when less time is left
than its estimate):

    env           device, capability, versions, xformers' native extension, what window attention's
                  ``auto`` dispatches to, git commit + dirty flag, source digest, nvidia-smi, date
    ceilings      device-to-device copy GB/s, bf16 and fp32 GEMM TFLOP/s, measured in this run
    e2e           one training step (forward, backward, grad-norm clip 5.0, AdamW, zero_grad), Swin-B/192
                  and ViT-B/224 at batch 128, bf16 autocast: official-equivalent, timm SDPA, (Swin) our
                  SDPA window attention, ours; img/s, MFU, peak memory, first-step time and loss (same
                  weights, images and mask for every variant, losses compared; drop path 0 for all)
    ops           every public op, Triton vs reference, forward and forward+backward, device time,
                  bytes moved (byte model stated per op), GB/s, % of the copy bandwidth, speedup
    attention     Swin-B window attention per stage (shifted and not), every backend: device time
                  forward and forward+backward, peak memory
    e2e_compiled  ours with ``--compile blocks`` and ``torch.compile`` of the official-equivalent model (the
                  variants of ``simmim_fast.benchmarking``, as benchmarks/test_end_to_end.py; runs only on time left
                  after keeping ``--tests-reserve`` seconds for the tests)
    tests         the CUDA test suite (``pytest tests --maxfail=25 -k "not sigkill and not ddp"``, without
                  the CPU-only kernel-compile and dry-run tests) with the remaining time as timeout

Every section is written to ``<out>/evidence.json`` (atomically: temp file + ``os.replace``) and
``<out>/summary.md`` as soon as it finishes, so a run killed at its time limit keeps what finished;
a section that fails records its error text and the next one runs.

If a kernel leaves the CUDA context unusable (a sticky error), the section stops and the remaining
sections continue in a fresh process (``os.execv``) that adds to the same evidence file.

``--dry-run`` runs every section's code on CPU at toy sizes (Triton kernels through Triton's
interpreter, ``TRITON_INTERPRET=1`` set before anything imports triton; wall-clock timers instead of
CUDA events; ``torch.compile(backend="eager")``; no tests) and marks the evidence ``"dry_run": true``:
its numbers are not GPU numbers.

On the lent GPU machine: ``bash benchmarks/run_gpu.sh`` (carry ``.whl`` from
``benchmarks/fetch_gpu_wheels.sh``) installs the carried wheels and runs this script.

Exit code: 0 when no section failed, 1 when one did (the JSON says which), 2 for bad arguments or no
CUDA device without ``--dry-run``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "ceilings", "e2e", "ops", "attention", "e2e_compiled", "tests")

#: Seconds a section needs at least to start (GPU run); the items inside check the budget again.
ESTIMATES_S = {"env": 10, "ceilings": 10, "e2e": 40, "ops": 20, "attention": 20, "e2e_compiled": 60, "tests": 45}
DRY_ESTIMATES_S = {"env": 1, "ceilings": 1, "e2e": 2, "ops": 2, "attention": 2, "e2e_compiled": 2, "tests": 0.5}

#: Vendor datasheet peaks (dense bf16 tensor TFLOP/s, HBM GB/s), matched on the device name in this
#: order. Nominal, not measured: MFU is given against the measured GEMM ceiling as well.
NOMINAL_PEAKS = (
    ("H200 NVL", 835.0, 4800.0),
    ("H200", 989.4, 4800.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.4, 3350.0),
    ("A100", 312.0, None),
)

SWIN_WINDOW = 6
LOSS_RTOL = {"bf16": 1e-2, "fp32": 1e-4}  # first-step losses of variants vs official_equiv


# ====================================================================================================
# small utilities


def now_utc() -> str:
    """ISO-8601 UTC timestamp (seconds)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def error_text(exc: BaseException, limit: int = 4000) -> str:
    """``Type: message`` plus the traceback's last lines, bounded in size."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f"{type(exc).__name__}: {exc}\n{tb[-2500:]}"
    return text[:limit]


def one_line(text: Any, limit: int = 400) -> str:
    """Whitespace collapsed, bounded: for reasons recorded in tables."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def rounded(x: Optional[float], digits: int = 4) -> Optional[float]:
    """``x`` to ``digits`` significant digits (None stays None)."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, max(0, digits - 1 - int(math.floor(math.log10(abs(x))))))


def run_command(cmd: list[str], timeout: float = 30.0) -> dict:
    """Run a short command; ``{"rc", "out"}`` or ``{"error"}`` (never raises)."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return {"rc": p.returncode, "out": (p.stdout + p.stderr).strip()[-8000:]}
    except Exception as exc:  # not installed, timed out
        return {"error": f"{type(exc).__name__}: {exc}"}


# ====================================================================================================
# budget, evidence file, log capture


class Budget:
    """Wall-clock budget of the whole run."""

    def __init__(self, seconds: float):
        self.total = float(seconds)
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.total - self.elapsed()

    def skip_reason(self, estimate: float, reserve: float = 0.0) -> Optional[str]:
        """None when ``estimate`` seconds fit (keeping ``reserve``), else the recorded reason."""
        left = self.remaining() - reserve
        if left >= estimate:
            return None
        kept = f", {reserve:.0f} s kept for later sections" if reserve else ""
        return f"skipped: budget ({max(left, 0):.0f} s left{kept}, needs ~{estimate:.0f} s)"


class Evidence:
    """The evidence JSON and its markdown summary, rewritten atomically after every change."""

    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir = out_dir
        self.data: dict = {"meta": meta, "sections": {}}
        out_dir.mkdir(parents=True, exist_ok=True)

    def set_section(self, name: str, value: dict) -> None:
        self.data["sections"][name] = value
        self.flush()

    def flush(self) -> None:
        """Write ``evidence.json`` and ``summary.md`` (temp file + ``os.replace`` each)."""
        self._write("evidence.json", json.dumps(self.data, indent=1, default=str, allow_nan=True))
        try:
            text = render_summary(self.data)
        except Exception as exc:  # a summary bug must not lose the JSON
            text = f"# GPU evidence\n\nsummary failed: {error_text(exc)}\n"
        self._write("summary.md", text)

    def _write(self, name: str, text: str) -> None:
        path = self.out_dir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


class LogCapture(logging.Handler):
    """Collects the project's log lines (backend choices, fallbacks) for the section that emits them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        if line not in self.lines:
            self.lines.append(one_line(line, 600))

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


# ====================================================================================================
# timing and memory


class Timer:
    """Time on the device: CUDA events on a GPU, ``time.perf_counter`` after a full wait on CPU.

    ``per_call`` reports device time per call of a short op: on CUDA the calls are queued behind a
    ``torch.cuda._sleep`` kernel long enough for the host to enqueue all of them, so the events
    measure the kernels back to back, not Python/launch overhead (``host_bound`` flags the case
    where enqueueing outlasted the sleep, i.e. the figure is an upper bound).
    """

    def __init__(self, torch_mod, device, warmup: int = 3):
        self.torch = torch_mod
        self.device = device
        self.cuda = device.type == "cuda"
        self.warmup = warmup
        self._cycles_per_ms: Optional[float] = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def total_s(self, fn: Callable[[], Any], reps: int) -> float:
        """Seconds for ``reps`` back-to-back calls, waited for (events on CUDA):
        ``simmim_fast.benchmarking.device_seconds``."""
        from simmim_fast.benchmarking import device_seconds

        return device_seconds(fn, reps, self.device)

    def _sleep_cycles_per_ms(self) -> float:
        if self._cycles_per_ms is None:
            torch = self.torch
            torch.cuda._sleep(1000)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            self._cycles_per_ms = 20_000_000 / max(start.elapsed_time(end), 1e-3)
        return self._cycles_per_ms

    def _padded(self, fn: Callable[[], Any], reps: int, pad_ms: float) -> tuple[float, float]:
        """(device ms per call, host ms per call) with the queue held behind a sleep kernel."""
        torch = self.torch
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(pad_ms * self._sleep_cycles_per_ms()))
        start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps, host_ms / reps

    def per_call(self, fn: Callable[[], Any], reps: int, repeats: int = 3, warmup: Optional[int] = None) -> dict:
        """``{"us", "launch_us", "host_bound"}``: median device µs per call (and unpadded µs per call)."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        launch_s = self.total_s(fn, reps)  # back to back, launch overhead included
        if not self.cuda:
            runs = [launch_s] + [self.total_s(fn, reps) for _ in range(repeats - 1)]
            us = statistics.median(runs) / reps * 1e6
            return {"us": us, "launch_us": launch_s / reps * 1e6, "host_bound": None}
        pad_ms = min(max(1.5 * launch_s * 1e3, 5.0), 400.0)
        samples, host_bound = [], False
        for _ in range(repeats):
            dev_ms, host_ms = self._padded(fn, reps, pad_ms)
            samples.append(dev_ms)
            host_bound = host_bound or host_ms * reps > pad_ms
        return {"us": statistics.median(samples) * 1e3, "launch_us": launch_s / reps * 1e6, "host_bound": host_bound}


def reset_peak(torch_mod, device) -> Optional[int]:
    """Reset the peak-memory counter; returns the bytes allocated now (None on CPU)."""
    if device.type != "cuda":
        return None
    torch_mod.cuda.synchronize()
    torch_mod.cuda.reset_peak_memory_stats()
    return torch_mod.cuda.memory_allocated()


def peak_bytes(torch_mod, device) -> Optional[int]:
    """Peak bytes allocated since the last reset (None on CPU)."""
    if device.type != "cuda":
        return None
    torch_mod.cuda.synchronize()
    return torch_mod.cuda.max_memory_allocated()


def free_memory(torch_mod, device) -> None:
    """Collect garbage and return cached blocks to the device."""
    gc.collect()
    if device.type == "cuda":
        torch_mod.cuda.synchronize()
        torch_mod.cuda.empty_cache()


def gib(n: Optional[int]) -> Optional[float]:
    return None if n is None else rounded(n / 2**30, 4)


# ====================================================================================================
# run plan (GPU sizes vs dry-run toy sizes)


@dataclass
class Plan:
    """Every size and count of one run; ``gpu_plan`` and ``dry_plan`` build the two kinds."""

    dry_run: bool
    precision: str  # "bf16" (autocast on CUDA) | "fp32"
    batch: int
    e2e_presets: list  # [(preset, encoder overrides)]
    warmup_steps: int
    timed_steps: int
    flop_batch: int
    ours_ops_backend: str
    compile_backend: Optional[str]  # torch.compile backend of e2e_compiled; None: not run
    copy_bytes: int
    gemm_n: int
    fp32_gemm_n: int
    ceiling_reps: int
    op_dims: list  # [dict(case, tokens, mask, pred, images, features)]
    op_reps: int
    op_repeats: int
    warmup_calls: int
    min_input_sets: int  # op timings rotate over input copies whose total exceeds 4x the L2 cache
    attn_batch: int
    attn_stages: list  # [(tokens per side, C, heads)]
    attn_reps: int
    tests_reserve_s: float
    estimates: dict = field(default_factory=dict)


def gpu_plan(tests_reserve_s: float) -> Plan:
    """Batch 128, the official Swin-B/192 and ViT-B/224 geometries."""
    B = 128
    return Plan(
        dry_run=False, precision="bf16", batch=B,
        # drop path 0 for every variant: identical first-step losses (ViT-B's recipe uses 0.1)
        e2e_presets=[("swin_base_192", {"drop_path_rate": 0.0}), ("vit_base_224", {"drop_path_rate": 0.0})],
        warmup_steps=3, timed_steps=12, flop_batch=2, ours_ops_backend="auto", compile_backend="inductor",
        copy_bytes=2**30, gemm_n=8192, fp32_gemm_n=8192, ceiling_reps=20,
        op_dims=[
            dict(case="swin_b", tokens=(B, 48, 48, 128), mask=(B, 6, 6), pred=(B, 6, 6, 3072),
                 images=(B, 3, 192, 192), features=(B, 6, 6, 1024)),
            dict(case="vit_b", tokens=(B, 14, 14, 768), mask=(B, 7, 7), pred=(B, 14, 14, 768),
                 images=(B, 3, 224, 224), features=(B, 14, 14, 768)),
        ],
        op_reps=40, op_repeats=3, warmup_calls=3, min_input_sets=1,
        attn_batch=B, attn_stages=[(48, 128, 4), (24, 256, 8), (12, 512, 16), (6, 1024, 32)], attn_reps=10,
        tests_reserve_s=tests_reserve_s, estimates=dict(ESTIMATES_S),
    )


def dry_plan() -> Plan:
    """CPU toy sizes that run every code path in well under two minutes on two cores."""
    B = 2
    swin = dict(img_size=64, depths=(2, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1), window_size=2,
                drop_path_rate=0.0)
    vit = dict(img_size=64, depth=1, drop_path_rate=0.0)
    return Plan(
        dry_run=True, precision="fp32", batch=B,
        e2e_presets=[("swin_tiny_cpu", swin), ("vit_tiny_cpu", vit)],
        warmup_steps=1, timed_steps=1, flop_batch=1, ours_ops_backend="triton", compile_backend="eager",
        copy_bytes=2**22, gemm_n=128, fp32_gemm_n=128, ceiling_reps=2,
        op_dims=[
            dict(case="swin_toy", tokens=(B, 8, 8, 16), mask=(B, 2, 2), pred=(B, 2, 2, 3 * 16 * 16),
                 images=(B, 3, 32, 32), features=(B, 2, 2, 32)),
            dict(case="vit_toy", tokens=(B, 4, 4, 32), mask=(B, 2, 2), pred=(B, 4, 4, 3 * 8 * 8),
                 images=(B, 3, 32, 32), features=(B, 4, 4, 32)),
        ],
        op_reps=1, op_repeats=1, warmup_calls=1, min_input_sets=2,
        attn_batch=B, attn_stages=[(12, 16, 2)], attn_reps=1,
        tests_reserve_s=0.0, estimates=dict(DRY_ESTIMATES_S),
    )


@dataclass
class Context:
    """What every section gets: plan, device, timer, budget, evidence, and results shared between sections."""

    args: argparse.Namespace
    plan: Plan
    torch: Any
    device: Any
    timer: Timer
    budget: Budget
    evidence: Evidence
    logs: LogCapture
    shared: dict = field(default_factory=dict)  # "ceilings", "refs" (per-preset reference loss/FLOPs)

    def autocast(self):
        """bf16 autocast on CUDA, nothing in an fp32 run."""
        if self.plan.precision == "bf16":
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def op_dtype(self):
        return self.torch.bfloat16 if self.plan.precision == "bf16" else self.torch.float32


# ====================================================================================================
# section: env


def versions() -> dict:
    """Versions of the stack; an import failure is recorded as its text."""
    out = {"python": sys.version.split()[0]}
    for mod in ("torch", "triton", "timm", "torchvision", "numpy", "xformers", "nvidia.dali", "pytest"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = str(getattr(m, "__version__", "unknown"))
        except Exception as exc:
            out[mod] = f"import failed: {type(exc).__name__}: {one_line(exc, 300)}"
    return out


def xformers_state() -> dict:
    """Whether xformers' C++/CUDA extension loaded (``_has_cpp_library``) and why not."""
    try:
        import xformers
    except Exception as exc:
        return {"importable": False, "error": f"{type(exc).__name__}: {one_line(exc)}"}
    res: dict = {"importable": True, "has_cpp_library": getattr(xformers, "_has_cpp_library", None)}
    try:
        from xformers import _cpp_lib

        exc = getattr(_cpp_lib, "_cpp_library_load_exception", None)
        res["cpp_load_exception"] = one_line(exc, 800) if exc is not None else None
    except Exception as exc:
        res["cpp_lib_error"] = f"{type(exc).__name__}: {one_line(exc)}"
    return res


def device_info(ctx: Context) -> dict:
    """Name, capability, memory and SM count of the device (or the CPU in a dry run)."""
    torch = ctx.torch
    if ctx.device.type != "cuda":
        import platform

        return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(0)
    return {
        "type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
        "memory_gib": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count,
        "cuda_runtime": torch.version.cuda, "device_count": torch.cuda.device_count(),
    }


def git_info() -> dict:
    """``git rev-parse HEAD`` and whether tracked files differ from it."""
    head = run_command(["git", "rev-parse", "HEAD"])
    status = run_command(["git", "status", "--porcelain", "--untracked-files=no"])
    res: dict = {"commit": head.get("out") if head.get("rc") == 0 else None}
    if res["commit"] is None:
        res["error"] = head.get("error") or head.get("out")
    if status.get("rc") == 0:
        res["dirty"] = bool(status["out"])
        res["changed_files"] = status["out"].splitlines()[:50]
    return res


def source_digest() -> dict:
    """sha256 over the package's and this script's sources: matches a run to a tree when git is absent."""
    files = sorted((ROOT / "simmim_fast").rglob("*.py")) + [Path(__file__).resolve()]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return {"sha256": h.hexdigest(), "files": len(files)}


def nvidia_smi() -> dict:
    """nvidia-smi's summary and a CSV of clocks/power (or why it is absent)."""
    full = run_command(["nvidia-smi"], timeout=30)
    query = run_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,"
                         "power.limit,temperature.gpu,persistence_mode", "--format=csv"], timeout=30)
    return {"summary": full.get("out", full.get("error")), "query": query.get("out", query.get("error"))}


def section_env(ctx: Context) -> dict:
    """Device, versions, xformers state, attention dispatch, git commit, nvidia-smi, date."""
    res: dict = {"date_utc": now_utc(), "dry_run": ctx.plan.dry_run, "argv": sys.argv[1:]}
    res["device"] = device_info(ctx)
    res["versions"] = versions()
    res["xformers"] = xformers_state()
    res["git"] = git_info()
    res["source_digest"] = source_digest()
    res["env_vars"] = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TIMM_FUSED_ATTN", "PYTHONPATH",
                                                      "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    try:
        from simmim_fast.models.window_attention import window_attention_report

        res["window_attention"] = window_attention_report()
    except Exception as exc:
        res["window_attention"] = {"unavailable": error_text(exc, 1500)}
    try:
        from simmim_fast.info import collect_info

        res["simmim_fast_info"] = collect_info()
    except Exception as exc:
        res["simmim_fast_info"] = {"unavailable": error_text(exc, 1500)}
    res["nvidia_smi"] = nvidia_smi() if ctx.device.type == "cuda" else "skipped (no CUDA device)"
    return res


# ====================================================================================================
# section: ceilings


def nominal_peaks(name: str) -> dict:
    """The datasheet peaks of a device name (None when unknown)."""
    for key, tflops, gbps in NOMINAL_PEAKS:
        if key.lower() in name.lower():
            return {"match": key, "bf16_tflops": tflops, "hbm_gbps": gbps,
                    "source": "vendor datasheet, dense (no sparsity); nominal, not measured"}
    return {"match": None, "bf16_tflops": None, "hbm_gbps": None}


def measure_copy(ctx: Context) -> dict:
    """Device-to-device ``dst.copy_(src)``; bytes = read + write."""
    torch = ctx.torch
    n = ctx.plan.copy_bytes
    src = torch.ones(n, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    t = ctx.timer.per_call(lambda: dst.copy_(src), reps=ctx.plan.ceiling_reps)
    moved = 2 * n
    del src, dst
    return {"bytes_per_copy": n, "bytes_moved_model": "read + write", "us": rounded(t["us"]),
            "gbps": rounded(moved / (t["us"] * 1e-6) / 1e9), "host_bound": t["host_bound"]}


def measure_gemm(ctx: Context, n: int, dtype) -> dict:
    """``torch.mm`` of two n x n matrices of ``dtype`` into a preallocated output: 2 n^3 FLOPs per call."""
    torch = ctx.torch
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    c = torch.empty(n, n, device=ctx.device, dtype=dtype)
    reps = ctx.plan.ceiling_reps if dtype == torch.bfloat16 else max(2, ctx.plan.ceiling_reps // 4)
    t = ctx.timer.per_call(lambda: torch.mm(a, b, out=c), reps=reps, repeats=3)
    del a, b, c
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "us": rounded(t["us"]),
            "tflops": rounded(2 * n**3 / (t["us"] * 1e-6) / 1e12)}


def section_ceilings(ctx: Context) -> dict:
    """Copy bandwidth and GEMM throughput measured now, plus the nominal datasheet peaks."""
    torch = ctx.torch
    res: dict = {}
    res["copy"] = measure_copy(ctx)
    res["gemm_bf16"] = measure_gemm(ctx, ctx.plan.gemm_n, torch.bfloat16)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        res["gemm_fp32"] = measure_gemm(ctx, ctx.plan.fp32_gemm_n, torch.float32)
        res["gemm_fp32"]["allow_tf32"] = False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    name = torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "cpu"
    res["nominal"] = nominal_peaks(name)
    free_memory(torch, ctx.device)
    ctx.shared["ceilings"] = res
    return res


# ====================================================================================================
# section: e2e (and e2e_compiled)


#: The variants are defined once, in ``simmim_fast.benchmarking`` (``benchmarks/test_end_to_end.py`` builds
#: its side-by-side table from the same definitions); these sections pick their rows from there.
EAGER_VARIANTS = ("official_equiv", "timm_sdpa", "sdpa_attn", "ours")
COMPILED_VARIANTS = ("ours_compiled", "official_equiv_compiled", "ours_compiled_graphs")  # graphs: CUDA only


def e2e_variants(arch: str, ours_ops: str, compiled: bool) -> list:
    """The shared variants (``simmim_fast.benchmarking.E2EVariant``) of one architecture this section runs."""
    from simmim_fast.benchmarking import e2e_variants as shared_variants

    by_name = {v.name: v for v in shared_variants(arch, ours_ops=ours_ops)}
    return [by_name[n] for n in (COMPILED_VARIANTS if compiled else EAGER_VARIANTS) if n in by_name]


def build_model(ctx: Context, preset: str, overrides: dict, create_kwargs: dict):
    from simmim_fast.benchmarking import build_model as shared_build_model

    return shared_build_model(preset, overrides, create_kwargs, ctx.device)


def make_batch(ctx: Context, model) -> dict:
    """Fixed images (device) and SimMIM mask (CPU + device copies): ``simmim_fast.benchmarking.make_batch``."""
    from simmim_fast.benchmarking import make_batch as shared_make_batch

    return shared_make_batch(img_size=model.img_size, patch_size=model.patch_size, batch=ctx.plan.batch,
                             device=ctx.device)


def official_variant(preset: str, ours_ops: str):
    return e2e_variants(preset_arch(preset), ours_ops, False)[0]


def prepare_preset(ctx: Context, preset: str, overrides: dict) -> tuple[dict, dict]:
    """(weights, reference): the official-equivalent model's weights for a fixed seed (every variant
    loads them) and the preset's shared reference (FLOPs per image, counted once; official first-step loss)."""
    from simmim_fast.benchmarking import set_timm_fused_attn

    ctx.torch.manual_seed(0)
    official = official_variant(preset, ctx.plan.ours_ops_backend)
    model = build_model(ctx, preset, overrides, official.create_kwargs)
    model.train()
    set_timm_fused_attn(model, False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = ctx.shared.setdefault("refs", {}).setdefault(preset, {})
    ref["geometry"] = (tuple(model.img_size), model.patch_size)
    if "flops" not in ref:
        try:
            ref["flops"] = count_flops(ctx, model, make_batch(ctx, model))
        except Exception as exc:
            ref["flops"], ref["flops_error"] = None, error_text(exc, 1500)
    del model
    return state, ref


def preset_arch(preset: str) -> str:
    from simmim_fast.models import get_preset

    return get_preset(preset).arch


def count_flops(ctx: Context, model, batch: dict) -> dict:
    """Forward and backward FLOPs per image of ``model`` (FlopCounterMode on ``flop_batch`` images)."""
    from torch.utils.flop_counter import FlopCounterMode

    k = ctx.plan.flop_batch
    images, mask = batch["images"][:k], batch["mask"][:k]
    with FlopCounterMode(display=False) as fwd:
        with ctx.autocast():
            loss = model(images, mask)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    f, b = fwd.get_total_flops() / k, bwd.get_total_flops() / k
    return {"forward_per_image": f, "backward_per_image": b, "train_per_image_3x_forward": 3 * f,
            "counted_at_batch": k, "counted_on": "official_equiv (full head, explicit attention matmuls)"}


def attn_decisions() -> list[str]:
    """What window attention's ``auto`` decided so far in this process."""
    try:
        from simmim_fast.models import window_attention as wa

        return sorted(set(wa._DECISIONS.values()))
    except Exception:
        return []


def mfu_fields(ctx: Context, img_per_s: float, flops: Optional[dict]) -> dict:
    """Achieved model TFLOP/s (3x forward FLOPs) and MFU vs the measured GEMM ceiling and the nominal peak."""
    if not flops:
        return {"mfu_note": "no FLOP count"}
    achieved = img_per_s * flops["train_per_image_3x_forward"]
    ceil = ctx.shared.get("ceilings", {})
    measured = (ceil.get("gemm_bf16") or {}).get("tflops")
    nominal = (ceil.get("nominal") or {}).get("bf16_tflops")
    return {
        "model_tflops_per_s": rounded(achieved / 1e12),
        "mfu_vs_measured_gemm": rounded(achieved / (measured * 1e12)) if measured else None,
        "mfu_vs_nominal": rounded(achieved / (nominal * 1e12)) if nominal else None,
    }


def run_variant(ctx: Context, preset: str, overrides: dict, variant, state: dict,
                flops: Optional[dict], warmup: int, timed: int) -> dict:
    """Build one shared variant (``simmim_fast.benchmarking.build_variant``) from ``state``, run its first step
    (loss, wall time) and time the steady state."""
    from simmim_fast.benchmarking import build_variant
    from simmim_fast.benchmarking import make_batch as shared_make_batch

    torch, plan = ctx.torch, ctx.plan
    res: dict = {"description": variant.description, "create_kwargs": variant.create_kwargs,
                 "compile": variant.compile, "cuda_graphs": variant.graphs}
    (img_size, patch_size) = ctx.shared["refs"][preset]["geometry"]
    batch = shared_make_batch(img_size=img_size, patch_size=patch_size, batch=plan.batch, device=ctx.device)
    built = build_variant(variant, preset, overrides=overrides, state=state, batch=batch, device=ctx.device,
                          amp_dtype=torch.bfloat16 if plan.precision == "bf16" else None,
                          compile_backend=plan.compile_backend or "inductor")
    res.update({k: v for k, v in built.info.items() if not callable(v)})
    step = built.step
    torch.manual_seed(1234)
    ctx.timer.sync()
    t0 = time.perf_counter()
    loss = step()
    ctx.timer.sync()
    res["first_step_s"] = rounded(time.perf_counter() - t0)
    res["first_step_loss"] = float(loss)
    for _ in range(warmup):
        step()
    if timed > 0:
        base = reset_peak(torch, ctx.device)
        total = ctx.timer.total_s(step, timed)
        res["timed_steps"] = timed
        res["step_ms"] = rounded(total / timed * 1e3)
        res["img_per_s"] = rounded(plan.batch * timed / total)
        res["peak_gib"] = gib(peak_bytes(torch, ctx.device))
        res["allocated_before_steps_gib"] = gib(base)
        res.update(mfu_fields(ctx, plan.batch * timed / total, flops))
    res["attention_auto_decisions"] = attn_decisions()
    del built, step, batch
    return res


def loss_check(ctx: Context, variants: dict, ref_loss: Optional[float]) -> dict:
    """Max relative first-step-loss difference vs official_equiv (eager) and whether it is within tolerance."""
    rtol = LOSS_RTOL[ctx.plan.precision]
    diffs = {}
    for name, r in variants.items():
        if isinstance(r, dict) and r.get("first_step_loss") is not None and ref_loss is not None:
            d = abs(r["first_step_loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
            r["loss_rel_diff_vs_official"] = d
            diffs[name] = d
    if ref_loss is None or not diffs:
        return {"reference_loss": ref_loss, "losses_agree": None, "note": "no reference loss or no variant ran"}
    return {"reference": "official_equiv (eager)", "reference_loss": ref_loss, "rtol": rtol, "compared": sorted(diffs),
            "max_rel_diff": max(diffs.values()), "losses_agree": all(d <= rtol for d in diffs.values())}


def run_preset_variants(ctx: Context, preset: str, overrides: dict, variants: list, out: dict,
                        estimate: float, reserve: float) -> None:
    """Run ``variants`` of one preset into ``out[preset]`` (flushed after each), with budget checks."""
    torch = ctx.torch
    entry = out.setdefault(preset, {"encoder_overrides": overrides, "batch": ctx.plan.batch,
                                    "precision": ctx.plan.precision, "variants": {}})
    if "drop_path_rate" in overrides:
        entry["note"] = "drop_path_rate forced to 0 for every variant so first-step losses compare exactly"
    state, ref = prepare_preset(ctx, preset, overrides)
    entry["flops"] = ref["flops"]
    if ref.get("flops_error"):
        entry["flops_error"] = ref["flops_error"]
    for v in variants:
        reason = ctx.budget.skip_reason(estimate, reserve)
        if reason:
            entry["variants"][v.name] = {"status": "skipped", "reason": reason}
            continue
        print(f"[e2e] {preset} {v.name} ...", flush=True)
        entry["variants"][v.name] = {"status": "running"}
        ctx.evidence.flush()
        try:
            r = run_variant(ctx, preset, overrides, v, state, ref["flops"], ctx.plan.warmup_steps,
                            ctx.plan.timed_steps)
            r["status"] = "ok"
            if v.name == "official_equiv":
                ref["loss"] = r["first_step_loss"]
        except Exception as exc:
            r = {"status": "error", "error": error_text(exc)}
        entry["variants"][v.name] = r
        print(f"[e2e] {preset} {v.name}: {r.get('img_per_s')} img/s, loss {r.get('first_step_loss')} "
              f"{r.get('error', '')[:300]}", flush=True)
        if v.compile != "off":
            torch._dynamo.reset()
        entry["loss_check"] = loss_check(ctx, entry["variants"], ref.get("loss"))
        ctx.evidence.flush()
        check_cuda(ctx)
        free_memory(torch, ctx.device)
    del state
    free_memory(torch, ctx.device)


def ensure_reference_loss(ctx: Context, preset: str, overrides: dict) -> None:
    """official_equiv's first-step loss when the eager section did not run (compiled section only)."""
    if ctx.shared.get("refs", {}).get(preset, {}).get("loss") is not None:
        return
    state, ref = prepare_preset(ctx, preset, overrides)
    official = official_variant(preset, ctx.plan.ours_ops_backend)
    ref["loss"] = run_variant(ctx, preset, overrides, official, state, None, 0, 0)["first_step_loss"]
    del state
    free_memory(ctx.torch, ctx.device)


def section_e2e(ctx: Context) -> dict:
    """Eager variants of every preset."""
    out: dict = {}
    ctx.evidence.set_section("e2e", {"status": "running", "presets": out})
    est = 25.0 if not ctx.plan.dry_run else 1.0
    for preset, overrides in ctx.plan.e2e_presets:
        arch = preset_arch(preset)
        run_preset_variants(ctx, preset, overrides, e2e_variants(arch, ctx.plan.ours_ops_backend, False),
                            out, est, 0.0)
    return {"presets": out, "timing": "CUDA events around the timed steps (synchronised), after warm-up"}


def section_e2e_compiled(ctx: Context) -> dict:
    """``torch.compile`` variants, ours first, each only if it fits before the tests' reserve."""
    if ctx.plan.compile_backend is None:
        return {"status": "skipped", "reason": "skipped in dry run (torch.compile takes minutes on CPU)"}
    out: dict = {}
    ctx.evidence.set_section("e2e_compiled", {"status": "running", "presets": out})
    reserve = ctx.plan.tests_reserve_s if "tests" in ctx.args.selected else 0.0
    for which in [n for n in COMPILED_VARIANTS if ctx.device.type == "cuda" or n != "ours_compiled_graphs"]:
        for preset, overrides in ctx.plan.e2e_presets:
            arch = preset_arch(preset)
            estimate = (150.0 if arch == "swin" else 100.0) if not ctx.plan.dry_run else 1.0
            if ctx.budget.skip_reason(estimate, reserve):
                out.setdefault(preset, {"variants": {}})["variants"][which] = {
                    "status": "skipped", "reason": ctx.budget.skip_reason(estimate, reserve)}
                continue
            ensure_reference_loss(ctx, preset, overrides)
            variants = [v for v in e2e_variants(arch, ctx.plan.ours_ops_backend, True) if v.name == which]
            run_preset_variants(ctx, preset, overrides, variants, out, estimate, reserve)
    return {"presets": out, "compile_backend": ctx.plan.compile_backend,
            "note": "first_step_s includes compilation (forward and backward graphs)"}


# ====================================================================================================
# section: ops


@dataclass
class OpCase:
    """One op at one geometry: inputs, how to call it per backend, which inputs get gradients, byte model."""

    op: str
    case: str
    make: Callable[[], dict]  # -> tensors
    call: Callable[[dict, str], Any]  # (tensors, backend) -> output
    grad_inputs: tuple  # names of tensors differentiated in forward+backward
    bytes_model: str
    bytes_fwd: Optional[Callable[[dict], float]]
    bytes_fwdbwd: Optional[Callable[[dict], float]]
    flops_fwd: Optional[Callable[[dict], float]] = None
    backends: tuple = ("triton", "reference")


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def masked_fraction(mask) -> float:
    """Fraction of mask cells that are masked (= of head tokens holding masked pixels, for aligned masks)."""
    return float(mask.float().mean())


def coarse_mask(ctx: Context, shape: tuple):
    """A SimMIM random mask at mask-cell resolution ``(B, h, w)`` bool, fixed seed, on the device."""
    from simmim_fast import MaskGenerator

    B, h, _ = shape
    gen = MaskGenerator(input_size=32 * h, mask_patch_size=32, model_patch_size=32, mask_ratio=0.6)
    return gen.generate_coarse(B, generator=ctx.torch.Generator().manual_seed(3)).to(ctx.device)


def fill_cases(ctx: Context, dims: dict) -> list[OpCase]:
    """mask_token_fill at this geometry (+ for ViT: an NCHW-strided view, as is and made contiguous)."""
    from simmim_fast import ops

    torch, dev, dt = ctx.torch, ctx.device, ctx.op_dtype
    B, H, W, C = dims["tokens"]

    def make(layout: str) -> Callable[[], dict]:
        def f():
            if layout == "nhwc":
                base = torch.randn(B, H, W, C, device=dev, dtype=dt)
            else:
                base = torch.randn(B, C, H, W, device=dev, dtype=dt)
            base.requires_grad_(True)
            mt = torch.randn(C, device=dev, dtype=torch.float32, requires_grad=True)
            return {"base": base, "mask": coarse_mask(ctx, dims["mask"]), "mask_token": mt}
        return f

    def call(layout: str):
        def f(t, backend):
            tok = t["base"] if layout == "nhwc" else t["base"].permute(0, 2, 3, 1)
            if layout == "nchw_view_contiguous":
                tok = tok.contiguous()
            return ops.mask_token_fill(tok, t["mask"], t["mask_token"], backend=backend)
        return f

    def b_fwd(t):
        T = nbytes(t["base"])
        return 2 * T + nbytes(t["mask"]) + nbytes(t["mask_token"])

    def b_fb(t):
        return 2 * b_fwd(t)

    model = "fwd: read tokens + write out + read coarse mask + read mask_token; bwd: the same sizes again"
    cases = [OpCase("mask_token_fill", dims["case"], make("nhwc"), call("nhwc"), ("base", "mask_token"),
                    model, b_fwd, b_fb)]
    if dims["case"].startswith("vit"):
        for layout in ("nchw_view", "nchw_view_contiguous"):
            extra = " (+ the .contiguous() copy, timed, not counted in bytes)" if layout.endswith("contiguous") else ""
            cases.append(OpCase("mask_token_fill", f"{dims['case']}_{layout}", make(layout), call(layout),
                                ("base", "mask_token"), model + extra, b_fwd, b_fb))
    return cases


def shuffle_case(ctx: Context, dims: dict) -> OpCase:
    """pixel_shuffle_head on the head's prediction."""
    from simmim_fast import ops

    torch = ctx.torch

    def make():
        return {"pred": torch.randn(*dims["pred"], device=ctx.device, dtype=ctx.op_dtype, requires_grad=True)}

    return OpCase("pixel_shuffle_head", dims["case"], make,
                  lambda t, b: ops.pixel_shuffle_head(t["pred"], backend=b), ("pred",),
                  "fwd: read pred + write image; bwd: read grad + write dpred",
                  lambda t: 2 * nbytes(t["pred"]), lambda t: 4 * nbytes(t["pred"]))


def loss_case(ctx: Context, dims: dict) -> OpCase:
    """masked_l1_loss from the head's token layout (fp32 images, as the loader gives them)."""
    from simmim_fast import ops

    torch = ctx.torch

    def make():
        return {"pred": torch.randn(*dims["pred"], device=ctx.device, dtype=ctx.op_dtype, requires_grad=True),
                "images": torch.randn(*dims["images"], device=ctx.device),
                "mask": coarse_mask(ctx, dims["mask"])}

    def b_fwd(t):
        f = masked_fraction(t["mask"])
        return nbytes(t["mask"]) + f * (nbytes(t["pred"]) + nbytes(t["images"]))

    return OpCase("masked_l1_loss", dims["case"], make,
                  lambda t, b: ops.masked_l1_loss(t["pred"], t["images"], t["mask"], backend=b), ("pred",),
                  "fwd: read mask + the masked fraction f of pred and images; bwd: + write dpred (all of it)",
                  b_fwd, lambda t: b_fwd(t) + nbytes(t["pred"]))


def head_case(ctx: Context, dims: dict) -> OpCase:
    """masked_head_loss (gather -> GEMM -> loss) vs its reference and vs the official full head + loss."""
    from simmim_fast import ops
    import torch.nn.functional as F

    torch = ctx.torch
    B, h, w, Fdim = dims["features"]
    K = dims["pred"][-1]

    def make():
        mask = coarse_mask(ctx, dims["mask"])
        images = torch.randn(*dims["images"], device=ctx.device)
        idx = ops.masked_token_index(mask, (h, w), tuple(images.shape[2:]))
        return {"features": torch.randn(B, h, w, Fdim, device=ctx.device, dtype=ctx.op_dtype, requires_grad=True),
                "weight": (torch.randn(K, Fdim, device=ctx.device) * Fdim**-0.5).requires_grad_(True),
                "bias": torch.zeros(K, device=ctx.device, requires_grad=True),
                "images": images, "mask": mask, "index": idx}

    def call(t, backend):
        with ctx.autocast():
            if backend == "full_head_reference":
                pred = F.linear(t["features"], t["weight"], t["bias"])
                return ops.masked_l1_loss(pred, t["images"], t["mask"], backend="reference")
            return ops.masked_head_loss(t["features"], t["weight"], t["bias"], t["images"], t["mask"],
                                        token_index=t["index"], backend=backend)

    return OpCase("masked_head_loss", dims["case"], make, call, ("features", "weight", "bias"),
                  "GEMM-bound: no byte model; TFLOP/s of the gathered head GEMM (2 N F K forward, x3 with backward)",
                  None, None, flops_fwd=lambda t: 2.0 * t["index"].numel() * Fdim * K,
                  backends=("triton", "reference", "full_head_reference"))


def op_cases(ctx: Context) -> list[OpCase]:
    cases: list[OpCase] = []
    for dims in ctx.plan.op_dims:
        cases += fill_cases(ctx, dims)
        cases += [shuffle_case(ctx, dims), loss_case(ctx, dims), head_case(ctx, dims)]
    return cases


def grad_call(ctx: Context, case: OpCase, t: dict, backend: str) -> Callable[[], Any]:
    """Forward + ``torch.autograd.grad`` w.r.t. the case's inputs (no ``.grad`` accumulation)."""
    torch = ctx.torch
    inputs = [t[n] for n in case.grad_inputs]
    out = case.call(t, backend)
    gout = None if out.dim() == 0 else torch.randn_like(out)

    def fn():
        o = case.call(t, backend)
        return torch.autograd.grad(o, inputs, gout)

    return fn


def rotating(calls: list) -> Callable[[], Any]:
    """One callable that runs ``calls`` in turn (each on its own copy of the inputs)."""
    it = itertools.cycle(calls)
    return lambda: next(it)()


def l2_bytes(ctx: Context) -> int:
    """The device's L2 cache size (50 MiB if torch does not say; 0 on CPU)."""
    if ctx.device.type != "cuda":
        return 0
    return int(getattr(ctx.torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


def input_sets(ctx: Context, case: OpCase) -> list[dict]:
    """Copies of the case's inputs, enough that one pass over them is 4x the L2 cache (max 16)."""
    first = case.make()
    size = sum(nbytes(v) for v in first.values() if hasattr(v, "element_size"))
    n = max(ctx.plan.min_input_sets, math.ceil(4 * l2_bytes(ctx) / max(size, 1)))
    return [first] + [case.make() for _ in range(min(n, 16) - 1)]


def output_diff(ctx: Context, case: OpCase, t: dict, backend: str) -> Optional[float]:
    """Max |triton - reference| of the forward output (relative for a scalar loss)."""
    if backend == "reference":
        return None
    with ctx.torch.no_grad():
        a = case.call(t, backend).float()
        b = case.call(t, "reference").float()
    d = (a - b).abs().max().item()
    return d / max(abs(b.item()), 1e-12) if a.dim() == 0 else d


def time_op(ctx: Context, case: OpCase, sets: list[dict], backend: str, mode: str) -> dict:
    """Device µs per call of one (op, backend, mode), with GB/s / TFLOP/s from the case's models."""
    if mode == "fwd":
        fn = rotating([functools.partial(case.call, t, backend) for t in sets])
    else:
        fn = rotating([grad_call(ctx, case, t, backend) for t in sets])
    r = ctx.timer.per_call(fn, reps=ctx.plan.op_reps, repeats=ctx.plan.op_repeats)
    row = {"us": rounded(r["us"]), "launch_us": rounded(r["launch_us"]), "host_bound": r["host_bound"],
           "input_sets": len(sets)}
    t = sets[0]
    bytes_fn = case.bytes_fwd if mode == "fwd" else case.bytes_fwdbwd
    copy_gbps = ((ctx.shared.get("ceilings") or {}).get("copy") or {}).get("gbps")
    if bytes_fn is not None:
        moved = bytes_fn(t)
        row["bytes"] = int(moved)
        row["gbps"] = rounded(moved / (r["us"] * 1e-6) / 1e9)
        row["pct_of_copy"] = rounded(100 * row["gbps"] / copy_gbps) if copy_gbps else None
    if case.flops_fwd is not None:
        fl = case.flops_fwd(t) * (1 if mode == "fwd" else 3)
        row["tflops"] = rounded(fl / (r["us"] * 1e-6) / 1e12)
    return row


def run_op_case(ctx: Context, case: OpCase) -> list[dict]:
    """Rows of one case: every backend x (fwd, fwd+bwd), then speedups vs reference (and the full head)."""
    torch = ctx.torch
    sets = input_sets(ctx, case)
    rows = []
    for backend in case.backends:
        for mode in ("fwd", "fwd+bwd"):
            row = {"op": case.op, "case": case.case, "backend": backend, "mode": mode}
            try:
                with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                    row.update(time_op(ctx, case, sets, backend, mode))
                if mode == "fwd":
                    row["max_diff_vs_reference"] = output_diff(ctx, case, sets[0], backend)
            except NotImplementedError as exc:
                row["unavailable"] = one_line(exc)
            except Exception as exc:
                row["error"] = error_text(exc, 1500)
            rows.append(row)
    for row in rows:
        for base in ("reference", "full_head_reference"):
            ref = next((r for r in rows if r["backend"] == base and r["mode"] == row["mode"] and r.get("us")), None)
            if ref and row.get("us") and row["backend"] != base:
                row[f"speedup_vs_{base}"] = rounded(ref["us"] / row["us"])
    del sets
    return rows


def section_ops(ctx: Context) -> dict:
    """Every public op, Triton vs reference, forward (no grad) and forward+backward."""
    rows: list = []
    cases = op_cases(ctx)
    res = {"rows": rows, "byte_models": {}, "skipped": [],
           "timing": ("device time per call: CUDA events around back-to-back calls queued behind a sleep kernel, "
                      "median of repeats; inputs rotated over copies (input_sets) totalling >= 4x L2"
                      if ctx.device.type == "cuda" else "perf_counter (dry run)"),
           "l2_bytes": l2_bytes(ctx),
           "dtype": str(ctx.op_dtype).replace("torch.", ""), "copy_gbps_reference": (
               (ctx.shared.get("ceilings") or {}).get("copy") or {}).get("gbps")}
    ctx.evidence.set_section("ops", dict(res, status="running"))
    for case in cases:
        res["byte_models"][case.op] = case.bytes_model
        reason = ctx.budget.skip_reason(4.0 if not ctx.plan.dry_run else 0.5)
        if reason:
            res["skipped"].append({"op": case.op, "case": case.case, "reason": reason})
            continue
        print(f"[ops] {case.op} {case.case} ...", flush=True)
        try:
            rows += run_op_case(ctx, case)
        except Exception as exc:
            rows.append({"op": case.op, "case": case.case, "error": error_text(exc, 1500)})
        ctx.evidence.set_section("ops", dict(res, status="running"))
        check_cuda(ctx)
        free_memory(ctx.torch, ctx.device)
    return res


# ====================================================================================================
# section: attention


ATTN_BACKENDS = ("timm", "timm_sdpa", "math", "sdpa", "xformers", "triton", "auto")


def timm_block(ctx: Context, R: int, C: int, heads: int, shifted: bool):
    """timm's SwinTransformerBlock of one Swin-B stage at 192 px (its attention module and shift mask)."""
    from timm.models.swin_transformer import SwinTransformerBlock

    with ctx.torch.device(ctx.device):
        return SwinTransformerBlock(dim=C, input_resolution=(R, R), num_heads=heads, window_size=SWIN_WINDOW,
                                    shift_size=SWIN_WINDOW // 2 if shifted else 0).to(ctx.device)


def attention_module(block, backend: str):
    """timm's module (explicit softmax or its SDPA branch) or ours sharing its parameters."""
    from simmim_fast.models.window_attention import WindowAttention

    attn = block.attn
    if backend in ("timm", "timm_sdpa"):
        attn.fused_attn = backend == "timm_sdpa"
        return attn
    attn.fused_attn = False
    return WindowAttention.from_timm(attn, backend=backend)


def peak_above(ctx: Context, fn: Callable[[], Any]) -> Optional[float]:
    """MiB allocated at the peak of one call of ``fn`` above what was allocated before it (None on CPU)."""
    base = reset_peak(ctx.torch, ctx.device)
    fn()
    peak = peak_bytes(ctx.torch, ctx.device)
    return None if peak is None else rounded((peak - base) / 2**20)


def time_attention(ctx: Context, module, x, mask, mode: str) -> dict:
    """Device µs per call and peak memory above the inputs, forward (no grad) or forward+backward."""
    torch = ctx.torch
    params = [p for p in module.parameters() if p.requires_grad]

    def fwd():
        with ctx.autocast():
            return module(x, mask)

    if mode == "fwd":
        with torch.no_grad():
            r = ctx.timer.per_call(fwd, reps=ctx.plan.attn_reps, repeats=ctx.plan.op_repeats)
            peak = peak_above(ctx, fwd)
        return {"us": rounded(r["us"]), "host_bound": r["host_bound"], "peak_mib_above_inputs": peak}
    gout = torch.randn_like(fwd())

    def fb():
        return torch.autograd.grad(fwd(), [x] + params, gout)

    r = ctx.timer.per_call(fb, reps=ctx.plan.attn_reps, repeats=ctx.plan.op_repeats)
    return {"us": rounded(r["us"]), "host_bound": r["host_bound"], "peak_mib_above_inputs": peak_above(ctx, fb)}


def attention_rows(ctx: Context, stage: int, R: int, C: int, heads: int, shifted: bool) -> list[dict]:
    """Rows of one stage/shift: every backend, forward and forward+backward."""
    torch = ctx.torch
    block = timm_block(ctx, R, C, heads, shifted)
    key = {"stage": stage, "tokens": f"{R}x{R}", "C": C, "heads": heads, "shifted": shifted}
    if shifted and block.attn_mask is None:
        return [dict(key, backend="all", unavailable="timm disables the shift: the window covers the feature map")]
    nW = (R // SWIN_WINDOW) ** 2
    x = torch.randn(nW * ctx.plan.attn_batch, SWIN_WINDOW**2, C, device=ctx.device, dtype=ctx.op_dtype,
                    requires_grad=True)
    mask = block.attn_mask
    rows = []
    for backend in ATTN_BACKENDS:
        row = dict(key, backend=backend, windows=x.shape[0])
        if backend == "triton" and ctx.plan.dry_run:
            row["unavailable"] = ("dry run: the Triton kernels would run in the interpreter (a correctness tool, "
                                  "tests/test_window_attention_triton.py)")
            rows.append(row)
            continue
        try:
            module = attention_module(block, backend)
            before = set(attn_decisions())
            row["fwd"] = time_attention(ctx, module, x, mask, "fwd")
            row["fwd+bwd"] = time_attention(ctx, module, x, mask, "fwd+bwd")
            if backend == "auto":
                row["auto_picked"] = sorted(set(attn_decisions()) - before) or attn_decisions()
        except NotImplementedError as exc:
            row["unavailable"] = one_line(exc)
        except Exception as exc:
            row["error"] = error_text(exc, 1500)
        rows.append(row)
        free_memory(torch, ctx.device)
    for row in rows:
        for base in ("timm", "timm_sdpa"):
            ref = next((r for r in rows if r["backend"] == base and "fwd+bwd" in r), None)
            if ref and "fwd+bwd" in row and row["backend"] != base:
                row[f"speedup_fwdbwd_vs_{base}"] = rounded(ref["fwd+bwd"]["us"] / row["fwd+bwd"]["us"])
    del block, x
    return rows


def section_attention(ctx: Context) -> dict:
    """Swin window attention per stage and shift, every backend."""
    rows: list = []
    res = {"rows": rows, "batch": ctx.plan.attn_batch, "window": SWIN_WINDOW,
           "dtype": str(ctx.op_dtype).replace("torch.", ""), "skipped": [],
           "input": "x (num_windows*B, 36, C) + timm's shift mask (num_windows, 36, 36) or None",
           "backends": {"timm": "timm WindowAttention, fused_attn=False (explicit softmax, official math)",
                        "timm_sdpa": "timm WindowAttention, fused_attn=True (its SDPA branch)",
                        "math/sdpa/xformers/triton/auto": "simmim_fast WindowAttention.from_timm(backend=...); "
                                                          "triton on windows: the fused kernel reads the mask"}}
    ctx.evidence.set_section("attention", dict(res, status="running"))
    for stage, (R, C, heads) in enumerate(ctx.plan.attn_stages, start=1):
        for shifted in (False, True):
            reason = ctx.budget.skip_reason(6.0 if not ctx.plan.dry_run else 0.5)
            if reason:
                res["skipped"].append({"stage": stage, "shifted": shifted, "reason": reason})
                continue
            print(f"[attention] stage {stage} shifted={shifted} ...", flush=True)
            try:
                rows += attention_rows(ctx, stage, R, C, heads, shifted)
            except Exception as exc:
                rows.append({"stage": stage, "shifted": shifted, "error": error_text(exc, 1500)})
            ctx.evidence.set_section("attention", dict(res, status="running"))
            check_cuda(ctx)
    return res


# ====================================================================================================
# section: tests


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")


def pytest_command() -> list[str]:
    """The CUDA test run; ``-n auto`` when pytest-xdist is importable."""
    # not -x: a first GPU run should show every failure (bounded by --maxfail and the timeout); the AOT
    # compile check and the dry run of this script are CPU checks that CI runs, not GPU evidence
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "--maxfail=25", "-p", "no:cacheprovider",
           "-k", "not sigkill and not ddp", "--ignore=tests/test_kernel_check.py",
           "--ignore=tests/test_gpu_evidence.py"]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", "auto"]
    except Exception:
        pass
    return cmd


def run_with_timeout(cmd: list[str], timeout: float) -> tuple[Optional[int], str, bool]:
    """(return code or None, combined output, timed out); the whole process group is killed on timeout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or "", True


def pytest_counts(text: str) -> dict:
    """Counts from pytest's final summary line (last occurrence of each word)."""
    counts: dict = {}
    for n, word in PYTEST_COUNT.findall(text[-3000:]):
        counts[word.rstrip("s") if word.startswith(("error", "warning")) else word] = int(n)
    return counts


def section_tests(ctx: Context) -> dict:
    """The test suite on this device, timeout = remaining budget; full log to ``tests.log``."""
    if ctx.plan.dry_run:
        return {"status": "skipped", "reason": "skipped in dry run"}
    free_memory(ctx.torch, ctx.device)
    timeout = max(ctx.budget.remaining() - 5.0, 1.0)
    cmd = pytest_command()
    print(f"[tests] {' '.join(cmd)} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    rc, out, timed_out = run_with_timeout(cmd, timeout)
    (ctx.evidence.out_dir / "tests.log").write_text(out[-15_000_000:])
    return {"command": cmd, "rc": rc, "timed_out": timed_out, "timeout_s": round(timeout),
            "wall_s": round(time.perf_counter() - t0, 1), "counts": pytest_counts(out),
            "passed_all": rc == 0, "tail": out[-6000:], "log": "tests.log"}


# ====================================================================================================
# summary


def fmt(x: Any, digits: int = 3) -> str:
    """Table cell: numbers to ``digits`` significant digits, None as a dash."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e6 else f"{x:.3e}"
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return lines


def summary_header(data: dict) -> list[str]:
    meta = data.get("meta", {})
    env = data.get("sections", {}).get("env", {})
    dev = env.get("device", {})
    vers = env.get("versions", {})
    git = env.get("git", {})
    lines = ["# simmim-fast GPU evidence", ""]
    if meta.get("dry_run"):
        lines += ["**DRY RUN on CPU at toy sizes: these numbers are NOT GPU numbers.**", ""]
    lines += [f"- device: {dev.get('name', '-')} (capability {dev.get('capability', '-')})",
              f"- torch {vers.get('torch', '-')}, triton {vers.get('triton', '-')}, timm {vers.get('timm', '-')}, "
              f"xformers {one_line(vers.get('xformers', '-'), 80)}",
              f"- commit {git.get('commit', '-')}{' (dirty)' if git.get('dirty') else ''}, "
              f"source sha256 {env.get('source_digest', {}).get('sha256', '-')[:16]}",
              f"- started {meta.get('started_utc', '-')}, elapsed {fmt(meta.get('elapsed_s'))} s of "
              f"{fmt(meta.get('budget_s'))} s budget", ""]
    status = [[name, s.get("status", "-"), one_line(s.get("reason") or s.get("error") or "", 160)]
              for name, s in data.get("sections", {}).items()]
    return lines + md_table(["section", "status", "note"], status) + [""]


def summary_ceilings(sec: dict) -> list[str]:
    if sec.get("status") != "ok":
        return []
    nominal = sec.get("nominal", {})
    rows = [["copy (read+write)", f"{fmt(sec['copy']['gbps'])} GB/s", fmt(nominal.get("hbm_gbps"))],
            ["GEMM bf16", f"{fmt(sec['gemm_bf16']['tflops'])} TFLOP/s", fmt(nominal.get("bf16_tflops"))],
            ["GEMM fp32 (no TF32)", f"{fmt(sec['gemm_fp32']['tflops'])} TFLOP/s", "-"]]
    return ["## Ceilings", ""] + md_table(["what", "measured", "nominal"], rows) + [""]


def summary_e2e(title: str, sec: dict) -> list[str]:
    presets = sec.get("presets") or {}
    if not presets:
        return []
    lines = [f"## {title}", ""]
    for preset, entry in presets.items():
        lc = entry.get("loss_check", {})
        lines += [f"### {preset} (batch {entry.get('batch', '-')}, {entry.get('precision', '-')}); losses agree: "
                  f"{fmt(lc.get('losses_agree'))} (max rel diff {fmt(lc.get('max_rel_diff'))}, "
                  f"rtol {fmt(lc.get('rtol'))})", ""]
        rows = []
        for name, r in entry.get("variants", {}).items():
            rows.append([name, r.get("img_per_s"), r.get("step_ms"), r.get("model_tflops_per_s"),
                         r.get("mfu_vs_measured_gemm"),
                         r.get("mfu_vs_nominal"), r.get("peak_gib"), r.get("first_step_s"),
                         r.get("first_step_loss"), r.get("loss_rel_diff_vs_official"),
                         one_line(r.get("reason") or r.get("status"), 80)])
        lines += md_table(["variant", "img/s", "step ms", "TFLOP/s", "MFU (GEMM)", "MFU (nominal)", "peak GiB",
                           "first step s", "first loss", "rel diff", "status"], rows) + [""]
    return lines


def summary_ops(sec: dict) -> list[str]:
    rows = [[r.get("op"), r.get("case"), r.get("mode"), r.get("backend"), r.get("us"), r.get("gbps"),
             r.get("pct_of_copy"), r.get("tflops"), r.get("speedup_vs_reference"),
             r.get("speedup_vs_full_head_reference"), r.get("max_diff_vs_reference"),
             one_line(r.get("unavailable") or r.get("error") or ("host-bound" if r.get("host_bound") else ""), 60)]
            for r in sec.get("rows", [])]
    if not rows:
        return []
    return ["## Ops (device µs per call)", ""] + md_table(
        ["op", "case", "mode", "backend", "µs", "GB/s", "% copy", "TFLOP/s", "x vs ref", "x vs full head",
         "max diff", "note"], rows) + [""]


def summary_attention(sec: dict) -> list[str]:
    rows = []
    for r in sec.get("rows", []):
        fwd, fb = r.get("fwd") or {}, r.get("fwd+bwd") or {}
        rows.append([r.get("stage"), r.get("tokens"), r.get("shifted"), r.get("backend"), fwd.get("us"),
                     fb.get("us"), fwd.get("peak_mib_above_inputs"), fb.get("peak_mib_above_inputs"),
                     r.get("speedup_fwdbwd_vs_timm"),
                     r.get("speedup_fwdbwd_vs_timm_sdpa"),
                     one_line(r.get("unavailable") or r.get("error") or ",".join(r.get("auto_picked") or []), 60)])
    if not rows:
        return []
    return ["## Window attention (Swin-B stages)", ""] + md_table(
        ["stage", "tokens", "shift", "backend", "fwd µs", "fwd+bwd µs", "fwd MiB", "fwd+bwd MiB", "x vs timm",
         "x vs timm sdpa",
         "note"], rows) + [""]


def summary_tests(sec: dict) -> list[str]:
    if "counts" not in sec:
        return []
    return ["## Tests", "", f"rc {sec.get('rc')}, timed out: {fmt(sec.get('timed_out'))}, counts {sec['counts']}",
            "", "```", sec.get("tail", "")[-1500:], "```", ""]


def render_summary(data: dict) -> str:
    """The markdown summary of an evidence dict."""
    s = data.get("sections", {})
    lines = summary_header(data)
    lines += summary_ceilings(s.get("ceilings", {}))
    lines += summary_e2e("End-to-end training step", s.get("e2e", {}))
    lines += summary_ops(s.get("ops", {}))
    lines += summary_attention(s.get("attention", {}))
    lines += summary_e2e("End-to-end, torch.compile", s.get("e2e_compiled", {}))
    lines += summary_tests(s.get("tests", {}))
    return "\n".join(lines) + "\n"


# ====================================================================================================
# driver


SECTION_FUNCS = {
    "env": section_env, "ceilings": section_ceilings, "e2e": section_e2e, "ops": section_ops,
    "attention": section_attention, "e2e_compiled": section_e2e_compiled, "tests": section_tests,
}


MAX_RELAUNCHES = 3


class CudaContextLost(RuntimeError):
    """The CUDA context is unusable (a sticky error such as an illegal memory access in a kernel)."""


def cuda_context_ok(ctx: Context) -> bool:
    """Whether a tiny kernel still runs and synchronises (always True on CPU, unless simulated)."""
    if ctx.args.simulate_context_loss and ctx.args.simulate_context_loss in ctx.evidence.data["sections"]:
        return False
    if ctx.device.type != "cuda":
        return True
    try:
        ctx.torch.ones(1, device=ctx.device).add_(1)
        ctx.torch.cuda.synchronize()
        return True
    except Exception:
        return False


def check_cuda(ctx: Context) -> None:
    """Raise :class:`CudaContextLost` so that a section stops at once after a sticky CUDA error."""
    if ctx.device.type == "cuda" and not cuda_context_ok(ctx):
        raise CudaContextLost("the CUDA context is unusable after the last item (sticky CUDA error); "
                              "the remaining sections run in a fresh process")


def relaunch(ctx: Context, sections: list[str]) -> None:
    """Continue ``sections`` in a fresh process (new CUDA context) writing into the same evidence file."""
    a = ctx.args
    argv = [sys.executable, str(Path(__file__).resolve()), "--out", str(ctx.evidence.out_dir),
            "--budget", f"{max(ctx.budget.remaining(), 0):.0f}", "--only", ",".join(sections),
            "--tests-reserve", str(a.tests_reserve), "--continue-from", str(ctx.evidence.out_dir / "evidence.json"),
            "--relaunch", str(a.relaunch + 1)] + (["--dry-run"] if a.dry_run else [])
    print(f"== CUDA context lost: continuing {sections} in a fresh process", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def run_section(ctx: Context, name: str) -> bool:
    """Run one section into the evidence (skip/ok/error); returns False when it failed."""
    if name not in ctx.args.selected:
        if ctx.args.continue_from and name in ctx.evidence.data["sections"]:
            return True  # recorded by the process this one continues
        why = "--skip" if name in ctx.args.skip else "not in --only"
        ctx.evidence.set_section(name, {"status": "skipped", "reason": f"skipped: {why}"})
        return True
    reason = ctx.budget.skip_reason(ctx.plan.estimates[name])
    if reason:
        ctx.evidence.set_section(name, {"status": "skipped", "reason": reason})
        return True
    print(f"== {name} ({ctx.budget.remaining():.0f} s left)", flush=True)
    ctx.evidence.set_section(name, {"status": "running"})
    t0 = time.perf_counter()
    ok = True
    try:
        res = SECTION_FUNCS[name](ctx)
        res.setdefault("status", "ok")
    except Exception as exc:
        res, ok = {"status": "error", "error": error_text(exc)}, False
        print(f"[{name}] error: {one_line(exc, 300)}", flush=True)
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    res["log"] = ctx.logs.take() + (res.get("log") or [])
    ctx.evidence.set_section(name, res)
    with contextlib.suppress(Exception):
        free_memory(ctx.torch, ctx.device)
    return ok


def parse_sections(text: Optional[str]) -> list[str]:
    if not text:
        return []
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; known: {', '.join(SECTIONS)}")
    return names


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results/local)")
    p.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for the whole run (default 540)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip ({', '.join(SECTIONS)})")
    p.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    p.add_argument("--tests-reserve", type=float, default=150.0,
                   help="seconds e2e_compiled leaves for the tests when they are selected (default 150)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, Triton interpreter: checks the code paths")
    # internal: a fresh process continuing a run whose CUDA context broke (see relaunch), and a test hook
    p.add_argument("--continue-from", default=None, help=argparse.SUPPRESS)
    p.add_argument("--relaunch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--simulate-context-loss", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.skip = parse_sections(args.skip)
    only = parse_sections(args.only) or list(SECTIONS)
    args.selected = [s for s in SECTIONS if s in only and s not in args.skip]
    return args


def setup_logging(capture: LogCapture) -> None:
    lg = logging.getLogger("simmim_fast")
    lg.setLevel(logging.INFO)
    lg.addHandler(capture)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("warning: triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (simmim_fast.ops does)
    sys.path.insert(0, str(ROOT))
    budget = Budget(args.budget)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --dry-run for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    plan = dry_plan() if args.dry_run else gpu_plan(args.tests_reserve)
    out_dir = Path(args.out or os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "local")
    meta = {"dry_run": args.dry_run, "started_utc": now_utc(), "budget_s": args.budget, "argv": sys.argv[1:],
            "sections_selected": args.selected, "out": str(out_dir), "plan": dataclasses.asdict(plan)}
    evidence = Evidence(out_dir, meta)
    capture = LogCapture()
    setup_logging(capture)
    ctx = Context(args=args, plan=plan, torch=torch, device=device, timer=Timer(torch, device, plan.warmup_calls),
                  budget=budget, evidence=evidence, logs=capture)
    if args.continue_from:
        continue_run(ctx)
    for i, name in enumerate(SECTIONS):
        run_section(ctx, name)
        if not cuda_context_ok(ctx):
            rest = [s for s in SECTIONS[i + 1:] if s in args.selected]
            ctx.evidence.data["meta"].setdefault("cuda_context_lost", []).append(
                {"after_section": name, "at_utc": now_utc(), "remaining": rest})
            evidence.flush()
            if rest and args.relaunch < MAX_RELAUNCHES:
                relaunch(ctx, rest)  # does not return
            break
    return finish(ctx, out_dir)


def continue_run(ctx: Context) -> None:
    """Adopt the evidence of the process this one continues (its sections, ceilings, metadata)."""
    data = json.loads(Path(ctx.args.continue_from).read_text())
    data["meta"].setdefault("relaunches", []).append(
        {"at_utc": now_utc(), "sections": ctx.args.selected, "budget_s": ctx.args.budget})
    ctx.evidence.data = data
    ceilings = data["sections"].get("ceilings", {})
    if ceilings.get("status") == "ok":
        ctx.shared["ceilings"] = ceilings


def finish(ctx: Context, out_dir: Path) -> int:
    """Final metadata, summary on stdout; exit code 1 when a section failed."""
    meta = ctx.evidence.data["meta"]
    started = datetime.datetime.fromisoformat(meta["started_utc"])
    failed = [n for n, s in ctx.evidence.data["sections"].items() if s.get("status") == "error"]
    meta.update(finished_utc=now_utc(), failed_sections=failed,
                elapsed_s=round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1))
    ctx.evidence.flush()
    print(render_summary(ctx.evidence.data), flush=True)
    print(f"evidence: {out_dir / 'evidence.json'}  summary: {out_dir / 'summary.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
