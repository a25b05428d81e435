"""Occlusion-invariance probe: CKA between encoder features of the same images under two masks.

    python -m simmim_fast.probe --checkpoint runs/swin_tiny_cpu                 # newest checkpoint, embedded photos
    python -m simmim_fast.probe --checkpoint runs/swin_tiny_cpu --all            # every checkpoint: watch it over training
    python -m simmim_fast.probe --checkpoint simmim_pretrain__swin_base.pth --images val_photos/ --num-images 64

Kong & Zhang ("Understanding Masked Image Modeling via Learning Occlusion Invariant Feature") read
MIM as learning features invariant to occlusion. This probe measures it directly: the images go
through the pretraining encoder twice with two independent SimMIM masks (mask token substituted,
as in pretraining) and the linear CKA of the two feature sets is printed (1 = the same
representation up to rotation and scale). For reference it also prints the CKA between a masked
view and the unmasked image. Features: ``mean`` = one vector per image (final features averaged over
positions), ``tokens`` = one per position (CKA over ``B*h*w`` samples). Few images bias linear CKA
upwards: compare numbers taken with the same images and settings. Options: ``cli.commands.PROBE``;
exit code 2 for bad input.

This module only parses and checks the arguments (no torch); the work is ``simmim_fast.jobs.probe``
(imported when it runs), whose API (``linear_cka``, ``occlusion_invariance``, ``probe_checkpoint``, ...)
is importable from here.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from .cli.commands import PROBE
from .cli.lazy import forward
from .training.cli import run_cli

__all__ = ["linear_cka", "occlusion_invariance", "ProbeResult", "probe_checkpoint", "OcclusionProbeArgs",
           "parse_args", "build_parser", "main"]

OcclusionProbeArgs = PROBE.args_class("OcclusionProbeArgs", module=__name__, doc=(
    "Every option of the CLI (``cli.commands.PROBE``)."))


def build_parser():
    """The argparse parser of the CLI (values are typed and checked by :func:`parse_args`)."""
    return PROBE.build_parser()


def parse_args(argv: Sequence[str] | None = None) -> OcclusionProbeArgs:
    merged = {**PROBE.defaults(), **PROBE.parse(argv)}
    PROBE.require(merged)
    return OcclusionProbeArgs(**merged)


def main(argv: Sequence[str] | None = None) -> int:
    def job():
        a = parse_args(argv)
        from .jobs.probe import probe_checkpoint  # torch, timm: only now
        from .training import checkpoint as ckpt
        from .training.distributed import resolve_device

        device = resolve_device(a.device)
        if a.all:
            targets = [p for _, p in ckpt.list_checkpoints(a.checkpoint)]
            if not targets:
                raise FileNotFoundError(f"--checkpoint: no checkpoint_<step>.pt file in {a.checkpoint}")
        else:
            targets = [a.checkpoint]
        cache: dict = {}
        print(f"{'step':>8}  {'CKA(mask1, mask2)':>18}  {'CKA(mask1, none)':>17}  images  checkpoint")
        for t in targets:
            r = probe_checkpoint(t, images=a.images, num_images=a.num_images, pool=a.pool, mask_ratio=a.mask_ratio,
                                 mask_patch_size=a.mask_patch_size, mask_strategy=a.mask_strategy, seed=a.seed,
                                 preset=a.preset, device=device, _image_cache=cache)
            step = "-" if r.step is None else str(r.step)
            print(f"{step:>8}  {r.masked_vs_masked:>18.4f}  {r.masked_vs_unmasked:>17.4f}  {r.images:>6}  {r.checkpoint}",
                  flush=True)

    return run_cli(job, argv, level=logging.WARNING)


__getattr__ = forward("simmim_fast.jobs.probe", __name__)

if __name__ == "__main__":
    sys.exit(main())
