"""Image-classification fine-tuning of a SimMIM encoder: ``python -m simmim_fast.finetune``.

    python -m simmim_fast.finetune --pretrained runs/swin_tiny_cpu          # CPU demo on the embedded photos
    python -m simmim_fast.finetune --preset swin_base_224 --pretrained simmim_pretrain__swin_base.pth \\
        --data /imagenet --output runs/ft_swinb                                # official Swin-B recipe
    torchrun --nproc_per_node 8 -m simmim_fast.finetune --preset vit_base_224 --pretrained ... --data ...
    python -m simmim_fast.finetune --eval --resume runs/ft_swinb/best.pt --data /imagenet   # top-1 / top-5

The official recipe (``main_finetune.py`` + ``configs/*finetune*``): AdamW with layer-wise lr decay
(``training.layer_decay``), per-step linear warmup then cosine, label smoothing 0.1, Mixup 0.8 /
CutMix 1.0, RandAugment + random erasing (timm), drop-path, grad-norm clip 5; lr scaled by total
batch / 512. ``--pretrained`` takes our pretraining run/checkpoint, an official microsoft/SimMIM
``.pth`` (key layout mapped, tables resized 192/window 6 -> 224/window 7), or a fine-tuned one.
Each epoch evaluates top-1/top-5 on ``val`` (and on the EMA weights with ``--ema``); the run folder
gets ``checkpoint_<step>.pt`` (resumable, atomic), ``best.pt`` (best top-1; ``best_ema.pt`` for the
EMA), ``metrics.csv`` (training rows) and ``eval.csv`` (one row per evaluation). Options as in the
pretraining CLI (declared in ``cli.commands.FINETUNE``): YAML ``--config`` < flags; exit code 2 for bad
input, 3 for a NaN loss.

This module only parses and checks the arguments (no torch); the job is ``simmim_fast.jobs.finetune``,
imported when it runs. Its names (``finetune``, ``make_plan``, ``evaluate``, ...) are importable from here.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from .cli.commands import FINETUNE
from .cli.lazy import forward
from .training.cli import run_cli

__all__ = ["FinetuneArgs", "parse_args", "build_parser", "finetune", "main"]

FinetuneArgs = FINETUNE.args_class("FinetuneArgs", module=__name__, doc=(
    "Every option of the CLI (``cli.commands.FINETUNE``). ``None`` means: the preset's recipe value."))


def build_parser():
    """The argparse parser of the CLI (values are typed and checked by :func:`parse_args`)."""
    return FINETUNE.build_parser()


def parse_args(argv: Sequence[str] | None = None) -> FinetuneArgs:
    """Defaults < the resumed checkpoint's settings < YAML ``--config`` < command-line flags, all checked."""
    given = FINETUNE.parse(argv)
    merged = {**FINETUNE.defaults(), **given}
    if merged["resume"] is not None:
        from .training import checkpoint as ckpt  # torch: only when resuming

        output = merged["output"] or os.path.join("runs", "finetune_" + merged["preset"])
        saved = ckpt.resumed_settings(merged["resume"], output)
        merged = ckpt.merge_resumed(merged, given, saved, keep=FINETUNE.not_resumed)
        FINETUNE.check(merged, source="the setting of the resumed run")
    return FinetuneArgs(**merged)


def main(argv: Sequence[str] | None = None) -> int:
    def job():
        args = parse_args(argv)
        from .jobs.finetune import finetune as run  # torch, timm, DALI: only now

        run(args)

    return run_cli(job, argv)


__getattr__ = forward("simmim_fast.jobs.finetune", __name__)

if __name__ == "__main__":
    sys.exit(main())
