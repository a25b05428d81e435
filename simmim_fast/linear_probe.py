"""Frozen-encoder linear evaluation: ``python -m simmim_fast.linear_probe``.

    python -m simmim_fast.linear_probe --pretrained runs/swin_tiny_cpu --precompute      # CPU demo, embedded photos
    python -m simmim_fast.linear_probe --pretrained simmim_pretrain__vit_base.pth --data /imagenet --output runs/lp

The encoder of a pretraining checkpoint (ours or official) is frozen (eval mode, no gradient); its
final features are average-pooled (Swin: over the last stage; ViT: over the patch tokens, cls token
dropped), passed through a BatchNorm without affine parameters and a linear head, the protocol of
MAE's linear probing (He et al. 2022), with SGD (momentum 0.9, no weight decay; MAE uses LARS at batch
16384), lr = base_lr x batch / 256, linear warmup then cosine, RandomResizedCrop + flip. The official
SimMIM code ships no linear-probe script, so the paper's 56.7 % (ViT-B) is not guaranteed by this
recipe. ``--precompute`` extracts the features once (center crops, no augmentation) and trains the
head on them: much faster, slightly different from the augmented protocol.

Writes ``checkpoint_<step>.pt`` after each epoch (head + optimizer, resumable; named by optimizer step as
fine-tuning's), ``best.pt``, ``eval.csv``; prints top-1/top-5. Options: ``cli.commands.LINEAR_PROBE``,
YAML ``--config`` < flags. Exit code 2 for bad input, 3 for a NaN loss.

This module only parses and checks the arguments (no torch); the job is ``simmim_fast.jobs.linear_probe``,
imported when it runs. Its names (``linear_probe``, ``LinearProbe``, ...) are importable from here.
"""

from __future__ import annotations

import sys
from typing import Sequence

from .cli.commands import LINEAR_PROBE
from .cli.lazy import forward
from .training.cli import run_cli

__all__ = ["ProbeArgs", "parse_args", "build_parser", "linear_probe", "main"]

ProbeArgs = LINEAR_PROBE.args_class("ProbeArgs", module=__name__, doc=(
    "Every option of the CLI (``cli.commands.LINEAR_PROBE``)."))


def build_parser():
    """The argparse parser of the CLI (values are typed and checked by :func:`parse_args`)."""
    return LINEAR_PROBE.build_parser()


def parse_args(argv: Sequence[str] | None = None) -> ProbeArgs:
    """Defaults < YAML ``--config`` < command-line flags, all checked."""
    merged = {**LINEAR_PROBE.defaults(), **LINEAR_PROBE.parse(argv)}
    LINEAR_PROBE.require(merged)
    return ProbeArgs(**merged)


def main(argv: Sequence[str] | None = None) -> int:
    def job():
        args = parse_args(argv)
        from .jobs.linear_probe import linear_probe as run  # torch, timm: only now

        run(args)

    return run_cli(job, argv)


__getattr__ = forward("simmim_fast.jobs.linear_probe", __name__)

if __name__ == "__main__":
    sys.exit(main())
