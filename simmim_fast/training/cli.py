"""What the CLIs share at their edge: the divergence error and the exit codes.

Exit codes: 0 done, 2 bad input (one line that names the argument), 3 the loss became NaN/inf.
Bad input never shows a traceback unless ``--debug`` is given. Imports no torch.
"""
from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable, Sequence

# Bad input: a wrong value, a missing or unwritable path, an unsupported option combination.
USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, PermissionError, IsADirectoryError,
               NotADirectoryError)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; nothing was saved after it."""


def _message(e: BaseException) -> str:
    """``e``'s message on one line; an error re-raised from a DataLoader worker (its message is the worker's
    whole traceback, "Caught X in DataLoader worker process N. Original Traceback ...") gives its last line,
    the original message, without the ``module.Class:`` prefix."""
    text = str(e)
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(e).__module__ + "." + type(e).__qualname__
        for prefix in (name + ": ", type(e).__qualname__ + ": "):
            if last.startswith(prefix):
                last = last[len(prefix):]
        text = last
    return " ".join(text.split())


def _report(e: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    print("error: " + _message(e), file=sys.stderr)


def run_cli(job: Callable[[], object], argv: Sequence[str] | None = None, *, level: int = logging.INFO) -> int:
    """Run ``job`` with logging set up; turn bad input and divergence into one line and an exit code.

    ``argv``: the CLI's arguments (``sys.argv[1:]`` when None); ``--debug`` among them prints the
    traceback before the line. ``--help`` (argparse's exit) returns its code instead of exiting.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        job()
    except SystemExit as e:  # argparse after --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except TrainingDiverged as e:
        _report(e, debug)
        return 3
    except USER_ERRORS as e:
        _report(e, debug)
        return 2
    return 0


def quiet_other_ranks(rank: int, log_all_ranks: bool) -> None:
    """Under torchrun, INFO lines once per job: ranks other than 0 log warnings and errors only
    (``--log-all-ranks`` keeps INFO everywhere)."""
    if rank > 0 and not log_all_ranks:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("simmim_fast").setLevel(logging.WARNING)
