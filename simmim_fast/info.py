"""Environment and backend report: ``python -m simmim_fast.info [--json]``.

Every backend is probed for what actually *dispatches* here, not just for whether the
package imports (xformers, for instance, imports fine on a CPU-only machine but has no
CPU kernels). Each probe returns a :class:`BackendStatus`; any exception raised while
probing becomes a reason, never a crash. In the style of xformers' ``not_supported_reasons``,
``reasons`` lists why a backend is not usable (empty when usable); ``notes`` carries
informational lines (mode, devices, files found).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = [
    "BackendStatus",
    "OP_NAMES",
    "probe_triton",
    "probe_xformers",
    "probe_sdpa",
    "probe_dali",
    "probe_dali_gpu",
    "probe_native_dali_plugin",
    "probe_ops",
    "probe_window_attention",
    "format_window_attention",
    "collect_info",
    "format_report",
    "main",
]

OP_NAMES = ("mask_token_fill", "pixel_shuffle_head", "masked_l1_loss", "masked_head_loss")

NO_CUDA_TRITON = "no CUDA device; set TRITON_INTERPRET=1 before import to run kernels on CPU (slow, for tests)"
NO_CUDA_XFORMERS = "no CUDA device (xformers has no CPU kernels)"
NATIVE_NOT_BUILT = "not built (build it with: python -m simmim_fast.data.native --build)"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class BackendStatus:
    name: str
    usable: bool
    version: str | None = None
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- helpers


def _err(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except Exception:
            continue
    return None


def _cuda_available() -> tuple[bool, str | None]:
    """(available, reason-if-not). Never raises."""
    try:
        import torch

        if torch.cuda.is_available():
            return True, None
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return False, f"no CUDA device (torch {torch.__version__} is a CPU-only build)"
        return False, "no CUDA device"
    except Exception as exc:
        return False, f"torch not importable: {_err(exc)}"


def _safe(name: str, probe: Callable[[], BackendStatus]) -> BackendStatus:
    try:
        return probe()
    except Exception as exc:  # a probe bug must not take the report down
        return BackendStatus(name, False, None, [f"probe failed: {_err(exc)}"])


# --------------------------------------------------------------------------- probes


def probe_triton() -> BackendStatus:
    try:
        import triton

        version = getattr(triton, "__version__", None)
    except Exception as exc:
        return BackendStatus("triton", False, _dist_version("triton"), [f"not importable: {_err(exc)}"])
    cuda, _ = _cuda_available()
    if cuda:
        return BackendStatus("triton", True, version, [], ["GPU kernels (CUDA)"])
    if os.environ.get("TRITON_INTERPRET") == "1":
        return BackendStatus("triton", True, version, [], ["interpreter mode on CPU (TRITON_INTERPRET=1; slow)"])
    return BackendStatus("triton", False, version, [NO_CUDA_TRITON])


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def probe_xformers() -> BackendStatus:
    reasons: list[str] = []
    notes: list[str] = []
    # xformers reports a failed native-extension load through its logger (and sometimes
    # warnings); capture both so the report carries them and stderr stays clean.
    logger = logging.getLogger("xformers")
    handler = _ListHandler()
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    version = None
    ops = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                import xformers

                version = getattr(xformers, "__version__", None)
                import xformers.ops as ops  # noqa: F811
            except Exception as exc:
                reasons.append(f"not importable: {_err(exc)}")
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
    if version is None:
        version = _dist_version("xformers")

    native_msgs: list[str] = []
    try:
        from xformers import _cpp_lib

        exc = getattr(_cpp_lib, "_cpp_library_load_exception", None)
        if exc is not None:
            native_msgs.append(_one_line(str(exc)))
    except Exception:
        pass
    if not native_msgs:  # fall back to what was logged / warned during import
        for rec in handler.records:
            msg = rec.getMessage()
            if "C++" in msg or "extension" in msg.lower():
                native_msgs.append(_one_line(msg.replace("WARNING[XFORMERS]:", "")))
    for msg in native_msgs:
        reasons.append(f"native extension not loadable: {msg}")
    for w in caught:
        notes.append(f"import warning: {_one_line(str(w.message), 200)}")

    cuda, why = _cuda_available()
    if not cuda:
        reasons.append(NO_CUDA_XFORMERS if why == "no CUDA device" or why is None else f"{NO_CUDA_XFORMERS}; {why}")
        return BackendStatus("xformers", False, version, reasons, notes)
    if ops is None:
        return BackendStatus("xformers", False, version, reasons, notes)

    # CUDA present: verify memory_efficient_attention actually dispatches on a tiny input.
    try:
        import torch

        q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        out = ops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
        if tuple(out.shape) != (1, 8, 1, 64):
            raise RuntimeError(f"unexpected output shape {tuple(out.shape)}")
        notes.append("memory_efficient_attention dispatched on (1, 8, 1, 64) fp16")
        try:
            from xformers.ops.fmha import Inputs
            from xformers.ops.fmha.dispatch import _dispatch_fw

            notes.append(f"forward op: {_dispatch_fw(Inputs(q, q, q), False).NAME}")
        except Exception:
            pass
    except Exception as exc:
        reasons.append(f"memory_efficient_attention failed: {_err(exc)}")
        return BackendStatus("xformers", False, version, reasons, notes)
    # Usable through the PyTorch-kernel ops even if the xformers native extension did not load.
    notes.extend(f"(ignored) {r}" for r in reasons)
    return BackendStatus("xformers", True, version, [], notes)


def probe_sdpa() -> BackendStatus:
    try:
        import torch
        import torch.nn.functional as F

        version = torch.__version__
    except Exception as exc:
        return BackendStatus("sdpa", False, None, [f"torch not importable: {_err(exc)}"])
    if not hasattr(F, "scaled_dot_product_attention"):
        return BackendStatus("sdpa", False, version, ["torch.nn.functional.scaled_dot_product_attention missing"])
    notes: list[str] = []
    try:
        q = torch.randn(1, 1, 8, 16)
        F.scaled_dot_product_attention(q, q, q)
        notes.append("cpu: ok")
    except Exception as exc:
        return BackendStatus("sdpa", False, version, [f"cpu call failed: {_err(exc)}"])
    cuda, _ = _cuda_available()
    if cuda:
        try:
            b = torch.backends.cuda
            enabled = {
                "flash": b.flash_sdp_enabled(),
                "mem_efficient": b.mem_efficient_sdp_enabled(),
                "math": b.math_sdp_enabled(),
            }
            if hasattr(b, "cudnn_sdp_enabled"):
                enabled["cudnn"] = b.cudnn_sdp_enabled()
            notes.append("cuda kernels enabled: " + ", ".join(k for k, v in enabled.items() if v))
        except Exception as exc:
            notes.append(f"cuda kernel flags unknown: {_err(exc)}")
    return BackendStatus("sdpa", True, version, [], notes)


def _import_dali() -> tuple[Any, str | None, str | None]:
    """(module or None, version, error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import nvidia.dali as dali
        return dali, getattr(dali, "__version__", None), None
    except Exception as exc:
        return None, _dist_version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"), _err(exc)


def probe_dali() -> BackendStatus:
    """DALI CPU-only pipelines (``device_id=None``)."""
    dali, version, err = _import_dali()
    if dali is None:
        return BackendStatus("dali", False, version, [f"not importable: {err}"])
    return BackendStatus("dali", True, version, [], ["CPU pipelines (device_id=None)"])


def probe_dali_gpu() -> BackendStatus:
    """DALI pipelines with GPU / mixed operators."""
    dali, version, err = _import_dali()
    reasons = []
    if dali is None:
        reasons.append(f"not importable: {err}")
    cuda, why = _cuda_available()
    if not cuda:
        reasons.append(f"{why} (GPU and mixed operators need CUDA; CPU pipelines still work)")
    return BackendStatus("dali_gpu", not reasons, version, reasons)


def probe_native_dali_plugin() -> BackendStatus:
    pattern = os.path.join(_PACKAGE_DIR, "_native", "*.so")
    files = sorted(glob.glob(pattern))
    if not files:
        return BackendStatus("native_dali_plugin", False, None, [NATIVE_NOT_BUILT])
    return BackendStatus(
        "native_dali_plugin", True, None, [], [f"found {os.path.relpath(f, _PACKAGE_DIR)}" for f in files]
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    return str(x)


def probe_ops() -> tuple[BackendStatus, dict[str, Any]]:
    """Status of the ``simmim_fast.ops`` module and its per-op report ``{op: reasons}``."""
    try:
        ops = importlib.import_module("simmim_fast.ops")
    except Exception as exc:
        reason = f"not importable: {_err(exc)}"
        return BackendStatus("ops", False, None, [reason]), {name: [reason] for name in OP_NAMES}
    report_fn = getattr(ops, "backend_report", None)
    if not callable(report_fn):
        reason = "simmim_fast.ops has no backend_report()"
        return BackendStatus("ops", True, None, [], [reason]), {name: [reason] for name in OP_NAMES}
    try:
        raw = report_fn()
    except Exception as exc:
        reason = f"backend_report() failed: {_err(exc)}"
        return BackendStatus("ops", True, None, [], [reason]), {name: [reason] for name in OP_NAMES}
    if not isinstance(raw, dict):
        reason = f"backend_report() returned {type(raw).__name__}, expected dict"
        return BackendStatus("ops", True, None, [], [reason]), {name: [reason] for name in OP_NAMES}
    report = {str(k): _jsonable(v) for k, v in raw.items()}
    for name in OP_NAMES:
        report.setdefault(name, ["not reported by backend_report()"])
    return BackendStatus("ops", True, None, []), report


def probe_window_attention() -> dict:
    """Which Swin window-attention backend ``auto`` runs here and why (see
    ``simmim_fast.models.window_attention.window_attention_report``). Never raises."""
    try:
        from simmim_fast.models.window_attention import window_attention_report

        return _jsonable(window_attention_report())
    except Exception as exc:
        return {"auto": None, "error": f"probe failed: {_err(exc)}"}


def format_window_attention(report: dict) -> list[str]:
    """Report lines of :func:`probe_window_attention`."""
    lines = ["window attention (Swin, attn_backend='auto')"]
    if report.get("error"):
        lines.append(f"  {report['error']}")
        return lines
    lines.append(f"  auto -> {report.get('auto')}")
    for r in report.get("triton_reasons", []):
        lines.append(f"      - triton: {r}")
    for r in report.get("xformers_reasons", []):
        lines.append(f"      - xformers: {r}")
    for r in report.get("sdpa_reasons", []):
        lines.append(f"      - sdpa: {r}")
    for n in report.get("notes", []):
        lines.append(f"      . {n}")
    return lines


# --------------------------------------------------------------------------- collection


def _torch_info() -> dict:
    info: dict[str, Any] = {}
    try:
        import torch
    except Exception as exc:
        return {"error": f"not importable: {_err(exc)}"}
    info["version"] = torch.__version__
    info["cuda_build"] = getattr(torch.version, "cuda", None)
    info["hip_build"] = getattr(torch.version, "hip", None)
    try:
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception as exc:
        info["cudnn"] = f"error: {_err(exc)}"
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
    except Exception as exc:
        info["cuda_available"] = False
        info["cuda_error"] = _err(exc)
    devices = []
    if info["cuda_available"]:
        try:
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                devices.append(
                    {
                        "index": i,
                        "name": p.name,
                        "capability": f"{p.major}.{p.minor}",
                        "memory_gib": round(p.total_memory / 2**30, 1),
                    }
                )
        except Exception as exc:
            devices.append({"error": _err(exc)})
    info["devices"] = devices
    info["num_threads"] = torch.get_num_threads()
    return info


def _package_versions() -> dict[str, str | None]:
    return {
        "torch": _dist_version("torch"),
        "triton": _dist_version("triton"),
        "timm": _dist_version("timm"),
        "torchvision": _dist_version("torchvision"),
        "numpy": _dist_version("numpy"),
        "pillow": _dist_version("pillow", "Pillow"),
        "xformers": _dist_version("xformers"),
        "nvidia-dali": _dist_version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
        "simmim-fast": _dist_version("simmim-fast", "simmim_fast"),
    }


def collect_info() -> dict:
    """Everything the report prints, as a JSON-serialisable dict.

    Keys: ``python``, ``platform``, ``packages``, ``torch``, ``backends`` (name -> status
    dict with ``usable``, ``version``, ``reasons``, ``notes``), ``ops`` (op name -> the
    entry of ``simmim_fast.ops.backend_report()`` or the reason it is unavailable) and
    ``window_attention`` (the backend ``auto`` picks for Swin window attention, with reasons).
    """
    backends: list[BackendStatus] = [
        _safe("triton", probe_triton),
        _safe("xformers", probe_xformers),
        _safe("sdpa", probe_sdpa),
        _safe("dali", probe_dali),
        _safe("dali_gpu", probe_dali_gpu),
        _safe("native_dali_plugin", probe_native_dali_plugin),
    ]
    try:
        ops_status, ops_report = probe_ops()
    except Exception as exc:
        reason = f"probe failed: {_err(exc)}"
        ops_status, ops_report = BackendStatus("ops", False, None, [reason]), {n: [reason] for n in OP_NAMES}
    backends.append(ops_status)
    window_attention = probe_window_attention()
    from simmim_fast.training.step_report import fast_step_report  # the training step's fast paths

    training_step = fast_step_report()
    try:
        torch_info = _torch_info()
    except Exception as exc:
        torch_info = {"error": _err(exc)}
    try:
        packages = _package_versions()
    except Exception as exc:
        packages = {"error": _err(exc)}
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "packages": packages,
        "torch": torch_info,
        "backends": {b.name: b.to_dict() for b in backends},
        "ops": ops_report,
        "window_attention": window_attention,
        "training_step": training_step,
    }


def format_report(info: dict) -> str:
    lines: list[str] = []
    add = lines.append
    pkgs = info.get("packages", {})
    add(f"simmim-fast {pkgs.get('simmim-fast') or '?'} environment")
    py = info.get("python", {})
    add(f"  python       {py.get('version')} ({py.get('executable')})")
    add(f"  platform     {info.get('platform')}")
    t = info.get("torch", {})
    if "error" in t:
        add(f"  torch        {t['error']}")
    else:
        add(f"  torch        {t.get('version')} (CUDA build {t.get('cuda_build')}, cuDNN {t.get('cudnn')})")
        add(f"  cuda         {'available' if t.get('cuda_available') else 'not available'}")
        for d in t.get("devices", []):
            if "error" in d:
                add(f"    device     {d['error']}")
            else:
                add(f"    cuda:{d['index']}     {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)")
    for name in ("triton", "timm", "torchvision", "numpy", "pillow", "xformers", "nvidia-dali"):
        add(f"  {name:<12} {pkgs.get(name) or 'not installed'}")
    add("")
    add("backends")
    for name, b in info.get("backends", {}).items():
        ver = f"  [{b.get('version')}]" if b.get("version") else ""
        add(f"  {name:<20} {'yes' if b.get('usable') else 'no '}{ver}")
        for r in b.get("reasons", []):
            add(f"      - {r}")
        for n in b.get("notes", []):
            add(f"      . {n}")
    add("")
    add("ops (simmim_fast.ops.backend_report)")
    for name, reasons in info.get("ops", {}).items():
        if isinstance(reasons, (list, tuple)):
            if not reasons:
                add(f"  {name:<20} (no reasons reported)")
            else:
                add(f"  {name}")
                for r in reasons:
                    add(f"      - {r}")
        elif isinstance(reasons, dict):
            add(f"  {name}")
            for k, v in reasons.items():
                add(f"      {k}: {v if v else 'ok'}")
        else:
            add(f"  {name:<20} {reasons}")
    if "window_attention" in info:
        add("")
        lines.extend(format_window_attention(info["window_attention"]))
    if "training_step" in info:
        from simmim_fast.training.step_report import format_fast_step

        add("")
        lines.extend(format_fast_step(info["training_step"]))
    return "\n".join(lines)


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """``--plan PRESET`` and its options (torch is imported only when it runs)."""
    from simmim_fast.cli import names

    def positive(kind):
        def parse(text):
            try:
                v = kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
            if not v > 0 or v != v or v in (float("inf"),):
                raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
            return v
        return parse

    g = parser.add_argument_group("memory planner (--plan): per-GPU memory of a training step, DDP vs FSDP")
    g.add_argument("--plan", metavar="PRESET", choices=names.PRESETS,
                   help="plan a pretraining preset: parameters, gradients, AdamW state, activations and the total per "
                        "GPU under DDP and FSDP, with and without activation checkpointing, and the largest batch per "
                        "GPU that fits (simulated on fake tensors: no GPU needed, nothing allocated)")
    g.add_argument("--gpus", type=positive(int), default=8, metavar="N", help="GPUs, one process each (default: 8)")
    g.add_argument("--gpu-memory", type=positive(float), default=80.0, metavar="GIB",
                   help="memory of one GPU in GiB (default: 80)")
    g.add_argument("--batch-size", type=positive(int), default=None, metavar="B",
                   help="images per GPU (default: the preset's)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16",
                   help="autocast dtype of the step (default: bf16, the trainer's choice on CUDA)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="only the rows with activation checkpointing (default: with and without)")
    g.add_argument("--img-size", type=positive(int), default=None, metavar="N", help="input size (default: the preset's)")
    g.add_argument("--accum-steps", type=positive(int), default=1, metavar="N",
                   help="gradient accumulation micro-steps (FSDP then keeps unsharded gradients; default: 1)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simmim_fast.info", description="Report the environment and which fast paths are usable."
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_plan_arguments(parser)
    args = parser.parse_args(argv)
    if args.plan is not None:  # the memory planner (training.planner), not the environment report
        from simmim_fast.training.planner import plan_cli

        return plan_cli(args)
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
