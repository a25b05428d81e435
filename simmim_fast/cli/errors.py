"""The error of bad user input at the command line."""
from __future__ import annotations


class UsageError(ValueError):
    """Bad user input: one line that starts with the flag (or ``file:line: key`` of a YAML value) and says
    what was expected. The CLIs print it and exit with code 2 (``training.cli.run_cli``)."""
