"""CPU threads of a training process: the cores the loader workers leave, one share per rank.

torch uses every core for intra-op work by default; with DataLoader workers (one thread each) on the
same cores that oversubscribes the machine. Reported on a loaded 2-core machine (issue 14): 6.65 s/step
with torch's default against 0.93 s/step with one thread. Measured here on an idle 2-core machine, the
default 200-step run: the same wall time (1:08 vs 1:09) with 1:16 against 1:57 of CPU time.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("simmim_fast.threads")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_threads(*, requested: int | None, num_workers: int, local_world_size: int = 1) -> tuple[int, str]:
    """``(threads, why)``: ``requested`` if given, else the cores per rank minus the loader workers (>= 1)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--threads: expected a positive integer, got {requested!r}")
        return requested, "--threads"
    per_rank = max(1, available_cores() // max(1, local_world_size))
    return max(1, per_rank - num_workers), (
        f"{available_cores()} cores / {local_world_size} rank(s) - {num_workers} loader worker(s)")


def set_threads(*, device: torch.device, requested: int | None, num_workers: int,
                local_world_size: int | None = None, log_it: bool = True) -> int | None:
    """Set torch's intra-op threads for a CPU run (see :func:`choose_threads`) and log the choice once.

    On CUDA the step runs on the GPU and torch's default is kept unless ``requested``. An
    ``OMP_NUM_THREADS`` in the environment (torchrun sets 1 per rank) wins over the automatic choice.
    ``local_world_size`` defaults to torchrun's ``LOCAL_WORLD_SIZE`` (1 without torchrun). Returns the
    number set, or None when nothing was changed.
    """
    if requested is None and (device.type != "cpu" or "OMP_NUM_THREADS" in os.environ):
        return None
    if local_world_size is None:  # ranks on this machine, as torchrun tells them
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n, why = choose_threads(requested=requested, num_workers=num_workers, local_world_size=local_world_size)
    torch.set_num_threads(n)
    if log_it:
        log.info("using %d CPU thread(s) for the step (%s)", n, why)
    return n
