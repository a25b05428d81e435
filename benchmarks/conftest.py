"""Benchmark metadata: every recorded JSON carries the device, the stack's versions and the commit."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod, fromlist=["__version__"])
        return getattr(m, "__version__", "unknown")
    except Exception as e:  # not installed / not loadable here
        return f"unavailable ({type(e).__name__})"


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except Exception:
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    cuda = torch.cuda.is_available()
    machine_info["simmim_fast"] = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                             f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "dali": _version("nvidia.dali"),
        "timm": _version("timm"),
        "commit": _commit(),
    }
