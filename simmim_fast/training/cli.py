"""What the training CLIs share at their edge: the divergence error and the exit codes.

Exit codes: 0 done, 2 bad input (the message names the argument), 3 the loss became NaN/inf.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; nothing was saved after it."""


def run_cli(job: Callable[[], object]) -> int:
    """Run ``job`` with logging set up; turn bad input and divergence into a message and an exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        job()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def quiet_other_ranks(rank: int, log_all_ranks: bool) -> None:
    """Under torchrun, INFO lines once per job: ranks other than 0 log warnings and errors only
    (``--log-all-ranks`` keeps INFO everywhere)."""
    if rank > 0 and not log_all_ranks:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("simmim_fast").setLevel(logging.WARNING)
