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


# ----------------------------------------------------------------------------------------------------
# --quick: one representative case per suite, for a first look in a few minutes on a CPU

#: Substrings of node ids that ``--quick`` keeps (every other case is deselected).
QUICK_CASES = (
    "test_train_step.py::test_train_step[swin_tiny_cpu]",
    "test_train_step.py::test_train_step[swin_base_192]",
    "test_ops.py::test_copy_bandwidth",
    "-fp32-triton-swin_b]",  # every op, fwd and fwd+bwd, Triton (GPU or interpreter) and reference
    "-fp32-reference-swin_b]",
    "test_stage_attention[stage1-shift-",  # then bf16 only, below
    "test_loader.py::test_loader_throughput",
    "test_end_to_end.py::",  # every row: they share one interleaved measurement per preset
)


def _quick(nodeid: str) -> bool:
    if "test_stage_attention[" in nodeid and "-bf16-" not in nodeid:
        return False
    return any(q in nodeid for q in QUICK_CASES)


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="one representative case per benchmark suite (a few minutes on 2 CPU cores)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    keep = [item for item in items if _quick(item.nodeid)]
    config.hook.pytest_deselected(items=[item for item in items if not _quick(item.nodeid)])
    items[:] = keep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The end-to-end table (test_end_to_end.py) at the end of the run, as results_table.py prints it."""
    try:
        from results_table import E2E_ROWS, markdown_table
    except ImportError:
        return
    if E2E_ROWS:
        terminalreporter.write_sep("-", "end-to-end training step (benchmarks/test_end_to_end.py)")
        terminalreporter.write_line(markdown_table(E2E_ROWS))
