"""Reconstruction pictures from a pretraining checkpoint: ``python -m simmim_fast.visualize``.

    python -m simmim_fast.visualize --checkpoint runs/swin_tiny_cpu [--images photos/ extra.jpg]

loads the newest checkpoint of the run folder (or the given checkpoint file), rebuilds the model,
takes the first ``--num-images`` images (files and folders, folders searched recursively; all
candidates in sorted path order) through a deterministic eval transform (shorter side resized to
the checkpoint's image size, bicubic, then a center crop), masks them with the checkpoint's mask
settings (overridable) seeded by ``--seed``, and writes the 4-column grid of
:func:`simmim_fast.viz.save_reconstruction_grid` (original | masked input | prediction | prediction
pasted into the masked pixels). It prints the PNG's path and the model's loss on those images.
Options: ``cli.commands.VISUALIZE``; exit code 2 for bad input.

This module only parses and checks the arguments (no torch); the work is ``simmim_fast.jobs.visualize``
(imported when it runs), whose API (``reconstruct``, ``reconstruct_with_stats``, ``build_eval_transform``,
...) is importable from here.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from .cli.commands import VISUALIZE
from .cli.lazy import forward
from .training.cli import run_cli

__all__ = ["build_eval_transform", "resolve_checkpoint", "load_model", "collect_images", "Reconstruction",
           "reconstruct", "reconstruct_with_stats", "VisualizeArgs", "parse_args", "build_parser", "main"]

VisualizeArgs = VISUALIZE.args_class("VisualizeArgs", module=__name__, doc=(
    "Every option of the CLI (``cli.commands.VISUALIZE``)."))


def build_parser():
    """The argparse parser of the CLI (values are typed and checked by :func:`parse_args`)."""
    return VISUALIZE.build_parser()


def parse_args(argv: Sequence[str] | None = None) -> VisualizeArgs:
    merged = {**VISUALIZE.defaults(), **VISUALIZE.parse(argv)}
    VISUALIZE.require(merged)
    return VisualizeArgs(**merged)


def main(argv: Sequence[str] | None = None) -> int:
    def job():
        a = parse_args(argv)
        from .jobs.visualize import reconstruct_with_stats  # torch, timm: only now

        if a.images is None:
            from .data.default_data import default_data_dir

            a.images = [str(default_data_dir())]
        r = reconstruct_with_stats(
            a.checkpoint, a.images, output=a.output, num_images=a.num_images, seed=a.seed,
            mask_ratio=a.mask_ratio, mask_patch_size=a.mask_patch_size, mask_strategy=a.mask_strategy,
            device=a.device,
        )
        if r.skipped:
            print(f"warning: skipped {len(r.skipped)} unreadable image file(s), e.g. {r.skipped[0]}", file=sys.stderr)
        print(f"checkpoint {r.checkpoint} (step {r.step}), {len(r.images)} image(s): "
              f"loss {r.loss:.4f} ({r.loss_name})")
        print(r.output)

    return run_cli(job, argv, level=logging.WARNING)


__getattr__ = forward("simmim_fast.jobs.visualize", __name__)

if __name__ == "__main__":
    sys.exit(main())
