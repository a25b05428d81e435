"""Reconstruction pictures from a pretraining checkpoint: the work behind ``python -m simmim_fast.visualize``.

:func:`reconstruct` loads the newest checkpoint of the run folder (or the given checkpoint file), rebuilds the model,
takes the first ``--num-images`` images (files and folders, folders searched recursively; all
candidates in sorted path order) through a deterministic eval transform (shorter side resized to
the checkpoint's image size, bicubic, then a center crop), masks them with the checkpoint's mask
settings (overridable) seeded by ``--seed``, and writes the 4-column grid of
:func:`simmim_fast.viz.save_reconstruction_grid` (original | masked input | prediction | prediction
pasted into the masked pixels). It prints the PNG's path and the model's loss on those images.
"""
from __future__ import annotations

import logging
import os
import pathlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torchvision.transforms as T
from PIL import Image

from ..data.decode import to_rgb
from ..data.folder import find_images
from ..data.masking import STRATEGIES, MaskGenerator
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, ConvertRGB
from ..models import create_model
from .pretrain import norm_target_override
from ..training import checkpoint as ckpt
from ..viz import save_reconstruction_grid

__all__ = ["build_eval_transform", "resolve_checkpoint", "load_model", "collect_images", "Reconstruction",
           "reconstruct", "reconstruct_with_stats"]

log = logging.getLogger("simmim_fast.visualize")

PathLike = str | os.PathLike


def build_eval_transform(img_size: int) -> T.Compose:
    """Deterministic eval transform: PIL image -> normalised ``(3, img_size, img_size)`` float tensor.

    RGB conversion, shorter side resized to ``img_size`` (bicubic), center crop ``img_size``,
    ``ToTensor`` and ImageNet ``Normalize`` (the statistics of the pretraining transform).
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    return T.Compose([
        ConvertRGB(),
        T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def resolve_checkpoint(checkpoint: PathLike) -> pathlib.Path:
    """A checkpoint file as given, or the newest ``checkpoint_<step>.pt`` of a run folder."""
    path = pathlib.Path(checkpoint).expanduser()
    if path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--checkpoint: no checkpoint_<step>.pt file in the run folder {path}")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist (expected a checkpoint file or a run folder)")
    return path


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} requested but CUDA is not available")
    return dev


def load_model(state: dict, path: PathLike = "checkpoint") -> torch.nn.Module:
    """Rebuild the SimMIM model of a loaded pretraining checkpoint dict (on CPU, eval mode)."""
    try:
        args, plan, weights = state["args"], state["plan"], state["model"]
        preset, img_size = args["preset"], plan["img_size"]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"--checkpoint: {path} is not a simmim-fast pretraining checkpoint (missing {e}; "
            "expected keys model, args, plan)"
        ) from None
    overrides = {"img_size": img_size, "loss": args.get("loss", "l1"), "predict": args.get("predict", "masked"),
                 **norm_target_override(args.get("norm_target"))}  # the run's targets (preset default if unset)
    if args.get("drop_path") is not None:
        overrides["drop_path_rate"] = args["drop_path"]
    model = create_model(preset, **overrides)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"--checkpoint: the weights in {path} do not fit preset {preset!r} at {img_size} px: {e}") from None
    return model.eval()


def collect_images(paths: Sequence[PathLike]) -> list[pathlib.Path]:
    """Candidate image files: files as given plus image files found recursively under folders.

    Duplicates are dropped; the result is sorted by path. Raises ``FileNotFoundError`` /
    ``ValueError`` naming ``--images`` when a path does not exist or nothing is found.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("--images: give at least one image file or folder")
    found: dict[str, pathlib.Path] = {}
    for p in paths:
        path = pathlib.Path(p).expanduser()
        if path.is_dir():
            try:
                files = find_images(path)
            except ValueError:  # a folder without image files: contributes nothing
                files = []
        elif path.is_file():
            files = [path]
        else:
            raise FileNotFoundError(f"--images: {path} does not exist")
        for f in files:
            found.setdefault(os.path.realpath(f), f)
    if not found:
        raise ValueError(f"--images: no image files found in {', '.join(str(p) for p in paths)}")
    return sorted(found.values(), key=lambda f: f.parts)


def _load_rgb(path: pathlib.Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # fully decode: truncated files fail here
        return to_rgb(img)  # 16-bit images scaled to 8 bits, as the training data are


@dataclass
class Reconstruction:
    """What :func:`reconstruct_with_stats` did."""

    output: pathlib.Path
    checkpoint: pathlib.Path
    loss: float  # the model's training loss on these images and masks
    loss_name: str  # e.g. "l1 on masked pixels"
    images: list[pathlib.Path] = field(default_factory=list)
    skipped: list[pathlib.Path] = field(default_factory=list)  # unreadable files passed over
    step: int | None = None


def reconstruct_with_stats(
    checkpoint: PathLike,
    images: PathLike | Sequence[PathLike],
    *,
    output: PathLike | None = None,
    num_images: int = 8,
    seed: int = 0,
    mask_ratio: float | None = None,
    mask_patch_size: int | None = None,
    mask_strategy: str | None = None,
    device: str | torch.device = "auto",
) -> Reconstruction:
    """Like :func:`reconstruct`, but returns the loss, the images used and the files skipped."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"--num-images: expected a positive int, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"--seed: expected an int, got {seed!r}")
    dev = _device(device)
    ckpt_path = resolve_checkpoint(checkpoint)
    candidates = collect_images(images)  # cheap checks before the (large) checkpoint is read

    try:
        state = ckpt.load_checkpoint(ckpt_path)
    except (FileNotFoundError, ValueError) as e:
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
        raise kind(f"--{e}") from None  # "checkpoint: ..." -> "--checkpoint: ..."
    if not isinstance(state, dict):
        raise ValueError(f"--checkpoint: {ckpt_path} is not a simmim-fast pretraining checkpoint")
    model = load_model(state, ckpt_path)
    args, plan = state["args"], state["plan"]
    img_size = int(plan["img_size"])

    # ---- masks -------------------------------------------------------------------------------
    mps = plan.get("mask_patch_size", 32) if mask_patch_size is None else mask_patch_size
    ratio = plan.get("mask_ratio", 0.6) if mask_ratio is None else mask_ratio
    strategy = args.get("mask_strategy", "random") if mask_strategy is None else mask_strategy
    if isinstance(mps, bool) or not isinstance(mps, int) or mps <= 0:
        raise ValueError(f"--mask-patch-size: expected a positive int, got {mps!r}")
    if img_size % mps or mps % model.patch_size:
        raise ValueError(
            f"--mask-patch-size: {mps} must divide the image size {img_size} and be a multiple of "
            f"the model patch size {model.patch_size}"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"--mask-ratio: expected a fraction in [0, 1], got {ratio!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"--mask-strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")

    # ---- images ------------------------------------------------------------------------------
    transform = build_eval_transform(img_size)
    tensors, used, skipped = [], [], []
    for path in candidates:
        if len(tensors) == num_images:
            break
        try:
            img = _load_rgb(path)
        except Exception:  # not an image, truncated, unreadable, ...
            skipped.append(path)
            continue
        tensors.append(transform(img))
        used.append(path)
    if not tensors:
        raise ValueError(
            f"--images: none of the {len(candidates)} image file(s) could be read "
            f"(first: {candidates[0]})"
        )
    batch = torch.stack(tensors)
    gen = MaskGenerator(input_size=img_size, mask_patch_size=mps, model_patch_size=model.patch_size,
                        mask_ratio=float(ratio), strategy=strategy)
    mask = gen.generate(batch.shape[0], generator=torch.Generator().manual_seed(seed))

    # ---- model -------------------------------------------------------------------------------
    model.to(dev)
    batch, mask_d = batch.to(dev), mask.to(dev)
    with torch.no_grad():
        loss = float(model(batch, mask_d).item())
        pred = model.predict(batch, mask_d)
        shown = model.targets(batch)  # the images, or their normalised targets (what pred is compared with)

    if output is None:
        output = ckpt_path.parent / f"reconstruction_{ckpt_path.stem}.png"
    out = save_reconstruction_grid(output, shown.cpu(), mask, pred.cpu(), max_images=batch.shape[0])
    region = "masked pixels" if model.predict_region == "masked" else "all pixels"
    return Reconstruction(output=pathlib.Path(out), checkpoint=ckpt_path, loss=loss,
                          loss_name=f"{model.loss_type} on {region}", images=used, skipped=skipped,
                          step=state.get("step"))


def reconstruct(
    checkpoint: PathLike,
    images: PathLike | Sequence[PathLike],
    *,
    output: PathLike | None = None,
    num_images: int = 8,
    seed: int = 0,
    mask_ratio: float | None = None,
    mask_patch_size: int | None = None,
    mask_strategy: str | None = None,
    device: str | torch.device = "auto",
) -> pathlib.Path:
    """Write the reconstruction grid of a checkpoint on some images; returns the PNG's path.

    ``checkpoint``: a checkpoint file or a run folder (its newest checkpoint). ``images``: image
    files and/or folders (searched recursively); the first ``num_images`` readable ones in sorted
    path order are used, unreadable files are skipped (logged as a warning). Masks use the
    checkpoint's mask settings unless overridden, drawn from ``torch.Generator().manual_seed(seed)``.
    ``output`` defaults to ``<checkpoint dir>/reconstruction_<checkpoint stem>.png``.
    Raises ``FileNotFoundError`` / ``ValueError`` whose message starts with the offending option.
    """
    r = reconstruct_with_stats(checkpoint, images, output=output, num_images=num_images, seed=seed,
                               mask_ratio=mask_ratio, mask_patch_size=mask_patch_size,
                               mask_strategy=mask_strategy, device=device)
    if r.skipped:
        log.warning("skipped %d unreadable image file(s), e.g. %s", len(r.skipped), r.skipped[0])
    return r.output
