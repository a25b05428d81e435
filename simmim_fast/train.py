"""SimMIM pretraining: ``python -m simmim_fast.train`` (one GPU, torchrun, or CPU).

With no argument it pretrains the small ``swin_tiny_cpu`` preset on the embedded default photographs
on whatever device exists. Options mirror the official recipe (see ``--help``; declared in
``cli.commands.TRAIN``); a YAML ``--config`` may set any option (keys as the flags, ``-`` or ``_``);
flags on the command line win over it, and it wins over the preset's recipe.

This module only parses and checks the arguments (no torch: ``--help`` and argument errors are
immediate); the job itself is ``simmim_fast.jobs.pretrain``, imported when it runs. Its names
(``train``, ``make_plan``, ``Plan``, ``default_run_dir``, ...) are importable from here too.
"""
from __future__ import annotations

import sys
from typing import Sequence

from .cli.commands import TRAIN
from .cli.lazy import forward
from .training.cli import run_cli

__all__ = ["TrainArgs", "parse_args", "build_parser", "train", "main"]

TrainArgs = TRAIN.args_class("TrainArgs", module=__name__, doc=(
    "Every option of the CLI (``cli.commands.TRAIN``). ``None`` means: take the preset's recipe value."))


def build_parser():
    """The argparse parser of the CLI (values are typed and checked by :func:`parse_args`)."""
    return TRAIN.build_parser()


def parse_args(argv: Sequence[str] | None = None) -> TrainArgs:
    """Defaults < the resumed checkpoint's settings < YAML ``--config`` < command-line flags, all checked.

    Without ``--resume`` no torch is imported; with it, the checkpoint's stored settings are read.
    """
    given = TRAIN.parse(argv)
    merged = {**TRAIN.defaults(), **given}
    if merged["resume"] is not None:
        from .jobs.pretrain import default_run_dir
        from .training import checkpoint as ckpt

        output = merged["output"] or default_run_dir(merged["preset"], resume=True)
        saved = ckpt.resumed_settings(merged["resume"], output)
        merged = ckpt.merge_resumed(merged, given, saved, keep=TRAIN.not_resumed)
        TRAIN.check(merged, source="the setting of the resumed run")
    return TrainArgs(**merged)


def main(argv: Sequence[str] | None = None) -> int:
    def job():
        args = parse_args(argv)
        from .jobs.pretrain import train as run  # torch, timm, DALI: only now

        run(args)

    return run_cli(job, argv)


__getattr__ = forward("simmim_fast.jobs.pretrain", __name__)

if __name__ == "__main__":
    sys.exit(main())
