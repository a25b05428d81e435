"""Ahead-of-time compile check of every Triton kernel variant the project launches, without a GPU.

    python -m simmim_fast.kernel_check collect --out launches.json [--op-tests] [--presets ...]
    python -m simmim_fast.kernel_check compile --launches launches.json [--arch 90 80] [--json report.json]
    python -m simmim_fast.kernel_check all [--json report.json]       # both, what CI runs

``collect`` runs, on CPU under Triton's interpreter, one training step of each preset (every
precision: fp32, bf16 and fp16 autocast; the masked-only head of the trainer, the full head that
``torch.compile`` traces, and ``predict``'s pixel shuffle) and, with ``--op-tests``, the Triton op
tests (``tests/test_ops_triton.py``), recording every kernel launch (``simmim_fast.ops.launch_log``),
and the Swin window-attention kernels' launches for the presets' geometries and the corners of their
tile space (``WINDOW_ATTENTION_VARIANTS``; the model steps run the encoders' attention on SDPA).
The encoders are built with one block per stage: the fused ops only see the patch embedding and the
encoder output, whose shapes, dtypes and strides do not depend on the depth, so the launches are
those of the full preset. The default batch is 4: the only batch-sized kernel argument is the fill's
token count ``B*H*W``, a multiple of 16 for every batch that is a multiple of 4 (ViT: 196 tokens),
so batch 4 compiles the same variants as batch 128.

``compile`` compiles each distinct launch signature (what Triton specialises on: dtypes, 16-byte
alignment, integers equal to 1 / multiples of 16 / 64-bit, constexprs, num_warps) through Triton's
own JIT path with a stub driver that reports a GPU target (``GPUTarget("cuda", 90, 32)`` for sm_90)
and ``warmup=True`` (compiles, never launches), then runs the bundled ``ptxas -v`` on the PTX for
registers and spills, and counts global loads and stores in the PTX by vector width. It fails (exit 1)
on any compile error or register spill. The interpreter and the compiler cannot share a process
(``TRITON_INTERPRET`` is read when the kernels are defined), so each subcommand re-executes itself
with the setting it needs.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import MaskGenerator, create_model
from .models.presets import get_preset
from .ops import _common, launch_log

#: Presets whose training step is collected by default: the official ones and the CPU ones.
DEFAULT_PRESETS = ("swin_base_192", "swin_large_192", "vit_base_224", "swin_tiny_cpu", "vit_tiny_cpu")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_ARCHS = (90, 80)
REPO = Path(__file__).resolve().parent.parent

_VECTOR = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9_]+)*?(?:\.(v2|v4|v8))?\.(?:b|u|s|f)(8|16|32|64)\b")


# ----------------------------------------------------------------------------------------------------
# collect (interpreter)


def _shallow_overrides(preset: str) -> dict:
    enc = get_preset(preset).encoder
    if "depths" in enc:
        return {"depths": (1,) * len(enc["depths"])}
    return {"depth": 1}


def model_step_launches(preset: str, precision: str, *, batch: int = 4, execute: bool = False) -> list[dict]:
    """Kernel launches of one pretraining step of ``preset`` (forward + backward of the masked-only
    head and of the full head, and ``predict``) on CPU with ``ops_backend="triton"``.

    ``execute=False`` (default) records the launches without running them under the interpreter
    (minutes at these sizes; the op tests check the numbers): the step's values are then garbage.
    """
    torch.manual_seed(0)
    model = create_model(preset, ops_backend="triton", **_shallow_overrides(preset)).train()
    recipe = get_preset(preset).recipe
    h, w = model.img_size
    images = torch.randn(batch, 3, h, w)
    gen = MaskGenerator(input_size=h, mask_patch_size=recipe.mask_patch_size, model_patch_size=model.patch_size,
                        mask_ratio=recipe.mask_ratio)
    mask = gen.generate(batch, generator=torch.Generator().manual_seed(0))
    dtype = PRECISIONS[precision]
    autocast = torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    with launch_log.record(execute=execute) as log, autocast:
        tokens = model.masked_head_tokens(images, mask)  # the trainer's path: index from the CPU mask
        model(images, mask, head_tokens=tokens).backward()
        model.masked_head = False  # what torch.compile traces
        model(images, mask).backward()
        model.predict(images, mask)
    return list(log)


#: Swin window-attention variants whose launches are compiled (``window_attention_launches``): the
#: presets' geometries and the corners of the kernels' tile space (shapes: qkv grid, window, shift,
#: heads, head dim, dtype, with a window-level mask). Each compiles 2 (fused backward) or 3 kernels.
WINDOW_ATTENTION_VARIANTS = (
    dict(grid=(12, 12), window=6, shift=3, heads=4, head_dim=32, dtype="bfloat16"),   # Swin-B/192, Swin-L stage 4
    dict(grid=(12, 12), window=6, shift=0, heads=4, head_dim=32, dtype="bfloat16"),
    dict(grid=(24, 24), window=12, shift=6, heads=2, head_dim=32, dtype="bfloat16"),  # Swin-L/192
    dict(grid=(14, 14), window=7, shift=3, heads=4, head_dim=32, dtype="float16"),    # Swin-B/224 fine-tuning
    dict(grid=(12, 12), window=6, shift=3, heads=4, head_dim=32, dtype="float32"),
    dict(grid=(32, 32), window=16, shift=8, heads=2, head_dim=64, dtype="bfloat16"),  # largest tiles accepted
    dict(grid=(12, 12), window=6, shift=3, heads=2, head_dim=64, dtype="bfloat16", mask=True),  # on windows
)


def window_attention_launches(batch: int = 2) -> list[dict]:
    """Launches of ``ops.swin_window_attention`` forward + backward for :data:`WINDOW_ATTENTION_VARIANTS`,
    recorded without running them (``tests/test_window_attention_triton.py`` checks the numbers), once
    with the tiles the op picks on sm_90+ and once with those of older GPUs; a record of one plan only
    carries ``"archs"`` and is compiled for those targets only (:func:`arch_applies`). The kernels do
    not specialise on the geometry integers (``do_not_specialize``), so these shapes compile the same
    variants as the presets' real batch and resolution."""
    from .ops.window_attention import planned_for

    plans = {}  # signature -> (record, archs it is planned for)
    for capability, archs in (((9, 0), "sm90+"), ((8, 0), "below-sm90")):
        with planned_for(capability):
            for rec in _window_attention_variant_launches(batch):
                key = launch_log.signature_key(rec)
                first, seen = plans.get(key, (rec, set()))
                plans[key] = (first, seen | {archs})
    records = []
    for rec, seen in plans.values():
        if len(seen) == 1:  # a tile plan of one GPU generation only (the op picks tiles by capability)
            rec = dict(rec, archs=next(iter(seen)))
        records.append(rec)
    return records


def arch_applies(rec: dict, arch: int) -> bool:
    """Whether a launch record is meant for ``arch`` (``"archs"``: ``"sm90+"`` / ``"below-sm90"``; absent: all)."""
    archs = rec.get("archs")
    if archs is None:
        return True
    return arch >= 90 if archs == "sm90+" else arch < 90


def _window_attention_variant_launches(batch: int) -> list[dict]:
    from .ops.window_attention import shift_mask, swin_window_attention

    records: list[dict] = []
    for v in WINDOW_ATTENTION_VARIANTS:
        ws, hd, heads = v["window"], v["head_dim"], v["heads"]
        qkv = torch.zeros(batch, *v["grid"], 3 * heads * hd, dtype=_DTYPES[v["dtype"]], requires_grad=True)
        table = torch.zeros((2 * ws - 1) ** 2, heads, requires_grad=True)
        kw = dict(num_heads=heads, window_size=ws, shift_size=v["shift"])
        if v.get("mask"):  # the window-level module: each window an image, timm's shift mask per window
            m = shift_mask(*v["grid"], (ws, ws), (ws // 2, ws // 2))
            qkv = torch.zeros(batch * m.shape[0], ws, ws, 3 * heads * hd, dtype=qkv.dtype, requires_grad=True)
            kw = dict(num_heads=heads, window_size=ws, attn_mask=m)
        with launch_log.record(execute=False) as log:
            swin_window_attention(qkv, table, backend="triton", **kw).float().sum().backward()
        records += log
    return records


def op_test_launches(pytest_args: Sequence[str] = ()) -> list[dict]:
    """Kernel launches of ``tests/test_ops_triton.py`` (run in a subprocess that writes its launch log)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launches.json"
        env = dict(os.environ, TRITON_INTERPRET="1", SIMMIM_FAST_LAUNCH_LOG=str(path))
        cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "test_ops_triton.py"), "-q", "-x",
               "-p", "no:cacheprovider", *pytest_args]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("kernel_check: the op tests failed while collecting launches:\n" + r.stdout[-3000:])
        return json.loads(path.read_text())


def collect(presets: Sequence[str], precisions: Sequence[str], *, batch: int, op_tests: bool) -> list[dict]:
    records: list[dict] = []
    for preset in presets:
        for precision in precisions:
            records += model_step_launches(preset, precision, batch=batch)
    records += window_attention_launches()
    if op_tests:
        records += op_test_launches()
    return launch_log.unique(records)


# ----------------------------------------------------------------------------------------------------
# compile (GPU target, no GPU)


def _stub_driver(arch: int):
    """A Triton driver that reports a CUDA target of compute capability ``arch`` and launches nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StubCudaDriver(DriverBase):
        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("kernel_check: the stub driver cannot run kernels")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=0):
            return divmod(arch, 10)

        def get_device_interface(self):
            return torch.cuda

        def set_current_device(self, device):
            pass

    return StubCudaDriver()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8,
           "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
           "float64": torch.float64, "bool": torch.bool}


def _replay_arg(a: dict) -> Any:
    if a["kind"] == "tensor":
        dtype = _DTYPES[a["dtype"]]
        buf = torch.empty(64, dtype=dtype)
        return buf[:32] if a["align16"] else buf[1:33]  # one element off: not 16-byte aligned
    return a["value"]


#: The only modules a launch record may name: the launches file is data, so it never chooses what to import.
KERNEL_MODULES = ("simmim_fast.ops.mask_token_fill", "simmim_fast.ops.masked_l1_loss",
                  "simmim_fast.ops.norm_target", "simmim_fast.ops.pixel_shuffle_head",
                  "simmim_fast.ops.window_attention")


def _kernel(name: str):
    """The Triton kernel a record names (``module:function``), from :data:`KERNEL_MODULES` only."""
    module, _, fn = str(name).partition(":")
    if module not in KERNEL_MODULES or not fn.isidentifier():
        raise ValueError(f"launches: kernel {name!r} is not one of this project's kernels ({', '.join(KERNEL_MODULES)})")
    kernel = getattr(importlib.import_module(module), fn, None)
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise ValueError(f"launches: {name!r} is not a Triton kernel")
    return kernel


def ptxas_info(ptx: str, arch: int) -> dict:
    """Registers, spills and stack of one kernel from the bundled ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    target = re.search(r"\.target\s+(\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas.path, "-v", f"--gpu-name={target}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    log = r.stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "target": target,
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack_bytes": num(r"(\d+) bytes stack frame"),
    }


def memory_instructions(ptx: str) -> dict:
    """Global loads/stores in the PTX by kind: ``{"ld": {"v4.b32": 2, "b16": 8, ...}, "st": {...}}``."""
    out: dict[str, dict[str, int]] = {"ld": {}, "st": {}}
    for op, vec, bits in _VECTOR.findall(ptx):
        key = f"{vec + '.' if vec else ''}b{bits}"
        out[op][key] = out[op].get(key, 0) + 1
    return out


def vectorised_fraction(counts: dict[str, int]) -> float:
    total = sum(counts.values())
    return sum(n for k, n in counts.items() if k.startswith("v")) / total if total else 1.0


def compile_one(rec: dict, arch: int) -> dict:
    """Compile one recorded launch for ``arch`` (stub driver already active) and describe the result."""
    result = {"kernel": rec["kernel"], "arch": arch, "key": launch_log.signature_key(rec),
              "constexprs": rec["constexprs"], "options": rec["options"]}
    t0 = time.perf_counter()
    try:
        kernel = _kernel(rec["kernel"])
        compiled = kernel.run(*[_replay_arg(a) for a in rec["args"]], grid=(1,), warmup=True,
                              **rec["constexprs"], **rec["options"])
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        ptx = compiled.asm["ptx"]
        result.update(ok=True, **ptxas_info(ptx, arch), memory=memory_instructions(ptx),
                      shared_bytes=getattr(compiled.metadata, "shared", None),
                      num_warps=getattr(compiled.metadata, "num_warps", None))
        result["load_vectorised_fraction"] = vectorised_fraction(result["memory"]["ld"])
        result["store_vectorised_fraction"] = vectorised_fraction(result["memory"]["st"])
    except Exception as exc:  # a compile error is a finding, not a crash of the check
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-3000:])
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _forget_compiled_kernels() -> None:
    """Drop every project kernel's in-memory compiled variants (``JITFunction.device_caches``, keyed by
    device only, holds the target it was first built for), so the next ``run`` compiles for the active
    driver's target. Triton's on-disk cache is keyed by target and stays valid."""
    from triton.runtime.jit import JITFunction

    for module in KERNEL_MODULES:
        for value in vars(importlib.import_module(module)).values():
            if isinstance(value, JITFunction) and hasattr(value, "device_caches"):
                value.device_caches.clear()


def compile_all(records: Sequence[dict], archs: Sequence[int]) -> list[dict]:
    from triton.runtime import driver

    results = []
    previous = getattr(driver, "_active", None)  # None without a GPU: reset_active() would look for one
    for arch in archs:
        driver.set_active(_stub_driver(arch))
        _forget_compiled_kernels()  # a JIT kernel caches its target per device: else arch 2 reuses arch 1's binaries
        try:
            for rec in launch_log.unique(list(records)):
                if arch_applies(rec, arch):
                    results.append(compile_one(rec, arch))
        finally:
            driver._active = previous
    return results


def failures(results: Sequence[dict]) -> list[str]:
    """One line per compile error or register spill."""
    bad = []
    for r in results:
        if not r["ok"]:
            bad.append(f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {r['error'].splitlines()[-1]}")
        elif r["spill_stores"] or r["spill_loads"]:
            bad.append(f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: spills "
                       f"{r['spill_stores']} B stored / {r['spill_loads']} B loaded ({r['registers']} registers)")
    return bad


def summary_table(results: Sequence[dict]) -> str:
    lines = ["| arch | kernel | constexprs | warps | regs | spills | loads vectorised | stores vectorised |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = r["kernel"].split(":")[1]
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        if not r["ok"]:
            lines.append(f"| sm_{r['arch']} | {name} | {cx} | | | | compile error | |")
            continue
        lines.append(f"| sm_{r['arch']} | {name} | {cx} | {r['num_warps']} | {r['registers']} | "
                     f"{r['spill_stores'] + r['spill_loads']} | {r['load_vectorised_fraction']:.0%} | "
                     f"{r['store_vectorised_fraction']:.0%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# CLI


def _reexec_with_interpret(value: str, argv: Sequence[str]) -> int:
    """Run this command again in a fresh process with ``TRITON_INTERPRET=value`` (see module doc)."""
    env = dict(os.environ, TRITON_INTERPRET=value, SIMMIM_FAST_KERNEL_CHECK_CHILD="1")
    return subprocess.run([sys.executable, "-m", "simmim_fast.kernel_check", *argv], env=env).returncode


def _needs_reexec(want_interpret: bool) -> bool:
    if _common.INTERPRET == want_interpret:
        return False
    if os.environ.get("SIMMIM_FAST_KERNEL_CHECK_CHILD"):
        raise RuntimeError(f"kernel_check: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} did not take effect")
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simmim_fast.kernel_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="record the launches of a train step per preset (and the op tests)")
    c.add_argument("--out", required=True, help="JSON file for the launch records")
    k = sub.add_parser("compile", help="compile recorded launches for GPU targets")
    k.add_argument("--launches", required=True, help="JSON file written by collect")
    a = sub.add_parser("all", help="collect, then compile")
    for q in (c, a):
        q.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
        q.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
        q.add_argument("--batch", type=int, default=4,
                       help="batch of the collected train steps (default 4: the kernels specialise on the same "
                            "integer classes as at batch 128; the loss and shuffle kernels take no batch-sized integer)")
        q.add_argument("--op-tests", action="store_true", help="also record the launches of tests/test_ops_triton.py")
    for q in (k, a):
        q.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                       help="compute capabilities to compile for (default: 90 80)")
        q.add_argument("--json", help="write the per-variant report here")
    args = p.parse_args(argv)
    if getattr(args, "batch", 1) < 1:
        p.error(f"--batch: expected a positive integer, got {args.batch}")
    for preset in getattr(args, "presets", ()):
        try:
            get_preset(preset)
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.command == "all":
        with tempfile.TemporaryDirectory() as tmp:
            launches = str(Path(tmp) / "launches.json")
            collect_argv = ["collect", "--out", launches, "--presets", *args.presets, "--precisions",
                            *args.precisions, "--batch", str(args.batch)] + (["--op-tests"] if args.op_tests else [])
            rc = main(collect_argv)
            if rc:
                return rc
            compile_argv = ["compile", "--launches", launches, "--arch", *map(str, args.arch)]
            return main(compile_argv + (["--json", args.json] if args.json else []))
    if args.command == "collect":
        if _needs_reexec(True):
            return _reexec_with_interpret("1", argv)
        records = collect(args.presets, args.precisions, batch=args.batch, op_tests=args.op_tests)
        Path(args.out).write_text(json.dumps(records, indent=1))
        print(f"kernel_check: {len(records)} distinct launch signatures -> {args.out}")
        return 0
    if not _common.HAS_TRITON:
        print(f"kernel_check: {'; '.join(_common.triton_reasons())}", file=sys.stderr)
        return 2
    if _needs_reexec(False):
        return _reexec_with_interpret("0", argv)
    records = json.loads(Path(args.launches).read_text())
    import triton

    results = compile_all(records, args.arch)
    report = {"triton": triton.__version__, "torch": torch.__version__, "archs": args.arch, "variants": results,
              "failures": failures(results)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(summary_table(results))
    n_ok = sum(r["ok"] for r in results)
    print(f"kernel_check: triton {triton.__version__}: {n_ok}/{len(results)} variants compiled "
          f"({len(launch_log.unique(records))} signatures x {len(args.arch)} targets), "
          f"{len(report['failures'])} failures")
    for line in report["failures"]:
        print("  FAIL " + line)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
