"""NVIDIA DALI input pipelines for fine-tuning: ``python -m simmim_fast.finetune --data-backend dali``.

The DALI twins of :mod:`simmim_fast.data.classification` (the torch backend), per sample:

train (:class:`DaliTrainLoader`, :func:`build_train_pipeline`)
    readers.file              this rank's files (the ResumableSampler order of the torch backend)
    decoders.image_random_crop  "mixed" (nvJPEG) on CUDA, "cpu" in CPU mode; area 0.08-1, ratio 3/4-4/3
    resize                    to (S, S), cubic (the recipe's bicubic; ``interpolation``), antialiased
    flip                      horizontal, probability 0.5
    RandAugment               ``nvidia.dali.auto_aug.rand_augment`` for a timm ``rand-m<M>[-n<N>]...``
                              policy: N ops (default 2) at magnitude M of 10 (``num_magnitude_bins=11``,
                              so bin M is M/10 of each op's range, as timm's M/10); or, with no policy,
                              a colour jitter (``fn.color_twist``, brightness/contrast/saturation)
    crop_mirror_normalize     ImageNet mean/std, NCHW float32
    random erasing            timm ``RandomErasing`` (``reprob``, ``remode``, ``recount``) on the
                              device batch after the pipeline, as timm applies it after Normalize
eval (:class:`DaliEvalLoader`, :func:`build_eval_pipeline`)
    decoders.image -> resize shorter side to ``int(256/224 * S)`` (cubic) -> center crop S ->
    normalise (``crop=False``: resize to (S, S)). Shard ``r`` of ``w`` reads files ``r, r+w, ...``
    in order, the last batch partial: every readable image exactly once over the ranks.

Batches are ``(images (B, 3, S, S) float32, labels (B,) int64, skipped int)`` on ``device``, the
torch backend's contract. Labels come from the same class -> index mapping as
:class:`ClassificationFolder` (its sample list is reused). Unreadable files are screened out first and
counted as skipped (:func:`simmim_fast.data.dali.scan_image_files`), as in pretraining.

Differences from the torch (timm) pipeline, all of augmentation detail, none of the contract:
DALI's RandAugment op suite (shear, translate, rotate, brightness, contrast, color, sharpness,
posterize, solarize, equalize, auto-contrast, identity) is close to timm's ``inc1`` one but not the
same; timm's magnitude noise (``mstd``) and fill colour (ImageNet mean; DALI fills 128) are not
reproduced; the colour jitter applies its three factors in a fixed order. Images of 32 px or less
(timm's small-image RandomCrop recipe) are not supported: use the torch backend.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
import warnings
from typing import Sequence

#: DALI 2.4's own ``auto_aug`` (RandAugment) still calls the deprecated ``fn.experimental.filter/equalize``
#: aliases while the graph is built, and DALI forces its deprecation warnings past the user's filters
#: (``simplefilter("default")`` around the warn): they came with every fine-tuning run. Those two are DALI's,
#: not ours, so the build records them instead of printing them; any other warning is shown as usual.
_DALI_OWN_DEPRECATIONS = re.compile(r".*fn\.experimental\.(filter|equalize)` is now deprecated", re.S)

import numpy as np
import torch

from ..training.sampler import ResumableSampler
from . import dali
from .classification import ClassificationFolder

__all__ = [
    "FINETUNE_CROP_AREA",
    "MIN_DALI_IMG_SIZE",
    "dali_finetune_unsupported",
    "parse_rand_augment",
    "classification_samples",
    "build_train_pipeline",
    "build_eval_pipeline",
    "DaliTrainLoader",
    "DaliEvalLoader",
]

log = logging.getLogger(__name__)

FINETUNE_CROP_AREA = (0.08, 1.0)  # timm RandomResizedCrop default scale
EVAL_CROP_PCT = 224 / 256  # build_eval_transform: resize int(256/224 * S), center crop S
MIN_DALI_IMG_SIZE = 33  # <= 32 px the recipe switches to RandomCrop(padding=4): torch only
MAGNITUDE_BINS = 11  # timm magnitudes are on a 0..10 scale (_LEVEL_DENOM = 10)
_INTERP = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR", "nearest": "INTERP_NN"}


def dali_finetune_unsupported(img_size: int) -> list[str]:
    """Every reason the fine-tuning DALI pipelines cannot reproduce the recipe at ``img_size`` (empty: they can)."""
    if img_size < MIN_DALI_IMG_SIZE:
        return [f"img size {img_size} <= 32 uses the small-image recipe (RandomCrop with padding 4), which only the "
                "torch backend implements"]
    return []


def parse_rand_augment(policy: str | None) -> dict | None:
    """timm RandAugment policy string -> ``rand_augment`` arguments, ``None`` for no policy.

    ``"rand-m9-mstd0.5-inc1"`` -> ``{"n": 2, "m": 9, "monotonic_mag": True}``. Keys: ``m`` magnitude
    (0-10, required), ``n`` ops per image (default 2), ``inc`` 1/0 (DALI ``monotonic_mag``), ``mstd``
    (magnitude noise: accepted, not reproduced by DALI). Other keys (``w``, ``p``, ``mmax``) and other
    policy families (AutoAugment, AugMix) raise ``ValueError``.
    """
    if policy in (None, "", "none"):
        return None
    if not isinstance(policy, str):
        raise ValueError(f"--auto-augment: expected a policy string, got {policy!r}")
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"--auto-augment: the DALI backend supports RandAugment policies 'rand-m<M>[-n<N>][-mstd<S>]"
                         f"[-inc<0|1>]' (or 'none'), got {policy!r}; use --data-backend torch for it")
    out = {"n": 2, "m": None, "monotonic_mag": False}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if match is None:
            raise ValueError(f"--auto-augment: cannot read {part!r} in {policy!r}")
        key, value = match.groups()
        if key == "m":
            out["m"] = float(value)
        elif key == "n":
            out["n"] = int(float(value))
        elif key == "inc":
            out["monotonic_mag"] = bool(int(float(value)))
        elif key == "mstd":
            pass  # timm's per-op magnitude noise: DALI's rand_augment has none
        else:
            raise ValueError(f"--auto-augment: the DALI backend does not support {key!r} in {policy!r}")
    m = out["m"]
    if m is None or m != int(m) or not 0 <= m <= MAGNITUDE_BINS - 1:
        raise ValueError(f"--auto-augment: the DALI backend needs an integer magnitude m in [0, 10], got {policy!r}")
    if out["n"] < 0:
        raise ValueError(f"--auto-augment: n must be >= 0 in {policy!r}")
    out["m"] = int(m)
    return out


def classification_samples(root: str | os.PathLike, classes: Sequence[str]) -> list[tuple[pathlib.Path, int]]:
    """``(path, label)`` of every image under ``root/<class>/`` in :class:`ClassificationFolder`'s order and labels."""
    return [(pathlib.Path(p), int(y)) for p, y in ClassificationFolder(root, transform=None, classes=classes).samples]


def _interp(interpolation: str):
    from nvidia.dali import types

    if interpolation not in _INTERP:
        raise ValueError(f"interpolation: expected one of {', '.join(_INTERP)}, got {interpolation!r}")
    return getattr(types, _INTERP[interpolation])


def _train_graph(files, labels, *, img_size, gpu, interp, rand_aug, color_jitter, reader_name):
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import rand_augment

    images, index = dali.read_and_decode(files, labels, gpu=gpu, reader_name=reader_name,
                                         random_crop=(FINETUNE_CROP_AREA, dali.CROP_RATIO))
    images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=interp, antialias=True)
    images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    if rand_aug is not None:
        images = rand_augment.rand_augment(
            images, n=rand_aug["n"], m=rand_aug["m"], num_magnitude_bins=MAGNITUDE_BINS,
            monotonic_mag=rand_aug["monotonic_mag"], shape=[img_size, img_size], max_translate_rel=0.45, fill_value=128,
        )
    elif color_jitter > 0:
        lo, hi = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter
        images = fn.color_twist(images, brightness=fn.random.uniform(range=[lo, hi]),
                                contrast=fn.random.uniform(range=[lo, hi]), saturation=fn.random.uniform(range=[lo, hi]))
    return dali.normalize_chw(images), index


def _eval_graph(files, labels, *, img_size, gpu, interp, crop, reader_name):
    from nvidia.dali import fn

    images, index = dali.read_and_decode(files, labels, gpu=gpu, reader_name=reader_name)
    if crop:
        images = fn.resize(images, resize_shorter=int((256 / 224) * img_size), interp_type=interp, antialias=True)
        return dali.normalize_chw(images, crop=(img_size, img_size)), index
    images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=interp, antialias=True)
    return dali.normalize_chw(images), index


def _check_files(files, labels) -> tuple[list[str], list[int]]:
    files = [str(f) for f in files]
    if not files:
        raise ValueError("files: the pipeline needs at least one file")
    labels = [int(x) for x in labels]
    if len(labels) != len(files):
        raise ValueError(f"labels: expected {len(files)} labels (one per file), got {len(labels)}")
    return files, labels


def build_train_pipeline(
    files: Sequence[str | os.PathLike],
    labels: Sequence[int],
    *,
    batch_size: int,
    img_size: int,
    device_id: int | None = None,
    num_threads: int = 2,
    seed: int = 0,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    interpolation: str = "bicubic",
    prefetch_queue_depth: int = 2,
    reader_name: str = "Reader",
):
    """The fine-tuning training pipeline (built, not started) reading ``files`` in order.

    Outputs per batch: ``images`` ``(B, 3, S, S)`` float32 normalised (GPU with ``device_id``, CPU with
    ``None``) and ``labels`` ``(B, 1)`` int32 (``labels[i]`` of each file). Random erasing is not in the
    pipeline (:class:`DaliTrainLoader` applies it on the device).

    Equivalent PyTorch: ``build_train_transform(S, auto_augment=..., color_jitter=..., reprob=0)`` on each image.
    """
    from nvidia.dali.pipeline import pipeline_def

    batch_size = dali._check_positive_int("batch_size", batch_size)
    img_size = dali._check_positive_int("img_size", img_size)
    num_threads = dali._check_positive_int("num_threads", num_threads)
    files, labels = _check_files(files, labels)
    reasons = dali_finetune_unsupported(img_size)
    if reasons:
        raise ValueError("img_size: " + "; ".join(reasons))
    rand_aug = parse_rand_augment(auto_augment)
    if isinstance(color_jitter, bool) or not isinstance(color_jitter, (int, float)) or color_jitter < 0:
        raise ValueError(f"color_jitter: expected a number >= 0, got {color_jitter!r}")
    interp = _interp(interpolation)
    # RandAugment picks its ops per sample with `if` on DataNodes: DALI's conditional mode is required
    graph = pipeline_def(_train_graph, enable_conditionals=rand_aug is not None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = graph(
            files, labels, img_size=img_size, gpu=device_id is not None, interp=interp, rand_aug=rand_aug,
            color_jitter=float(color_jitter), reader_name=reader_name,
            batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=int(seed),
            prefetch_queue_depth=prefetch_queue_depth,
        )
        pipe.build()
    for w in caught:  # show everything but DALI's own deprecations
        if not _DALI_OWN_DEPRECATIONS.match(str(w.message)):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return pipe


def build_eval_pipeline(
    files: Sequence[str | os.PathLike],
    labels: Sequence[int],
    *,
    batch_size: int,
    img_size: int,
    device_id: int | None = None,
    num_threads: int = 2,
    crop: bool = True,
    interpolation: str = "bicubic",
    prefetch_queue_depth: int = 2,
    reader_name: str = "Reader",
):
    """The evaluation pipeline (built, not started): no randomness, ``files`` in order.

    Outputs per batch: ``images`` ``(B, 3, S, S)`` float32 normalised and ``labels`` ``(B, 1)`` int32.

    Equivalent PyTorch: ``build_eval_transform(S, interpolation=..., crop=crop)`` on each image.
    """
    from nvidia.dali.pipeline import pipeline_def

    batch_size = dali._check_positive_int("batch_size", batch_size)
    img_size = dali._check_positive_int("img_size", img_size)
    num_threads = dali._check_positive_int("num_threads", num_threads)
    files, labels = _check_files(files, labels)
    reasons = dali_finetune_unsupported(img_size)
    if reasons:
        raise ValueError("img_size: " + "; ".join(reasons))
    graph = pipeline_def(_eval_graph, enable_conditionals=False)
    pipe = graph(
        files, labels, img_size=img_size, gpu=device_id is not None, interp=_interp(interpolation), crop=bool(crop),
        reader_name=reader_name, batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
        prefetch_queue_depth=prefetch_queue_depth,
    )
    pipe.build()
    return pipe


class _ClassificationLoader(dali.DaliBatchLoader):
    """Shared part of the two loaders: labelled file list, screening, label lookup, batch conversion."""

    def _init_data(self, root, classes, *, img_size: int, interpolation: str, scan_cache_dir) -> None:
        self.img_size = dali._check_positive_int("img_size", img_size)
        reasons = dali_finetune_unsupported(self.img_size)
        if reasons:
            raise ValueError("img_size: " + "; ".join(reasons))
        _interp(interpolation)  # validate early
        self.interpolation = interpolation
        self.root = pathlib.Path(root).expanduser()
        self.classes = list(classes)
        samples = classification_samples(self.root, self.classes)
        label_of = {str(p): y for p, y in samples}
        self._screen([p for p, _ in samples], f"cls:{self.root.resolve()}", scan_cache_dir)
        self.targets = [label_of[str(p)] for p in self.files]
        self._targets = torch.tensor(self.targets, dtype=torch.int64, device=self.device)

    def _iterator(self, pipe, policy: str):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        return DALIGenericIterator([pipe], ["images", "indices"], reader_name="Reader",
                                   last_batch_policy=getattr(LastBatchPolicy, policy), auto_reset=False)

    def _convert(self, out: dict, rng) -> tuple[torch.Tensor, torch.Tensor]:
        images = out["images"]
        indices = out["indices"].reshape(-1).to(torch.int64)  # the reader's labels: a CPU output
        self.last_indices = indices
        return images, self._targets[indices.to(self._targets.device, non_blocking=True)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, files={len(self.files)}, skipped={len(self.scan_skipped)}, "
                f"classes={len(self.classes)}, batch_size={self.batch_size}, img_size={self.img_size}, "
                f"device={self.device}, shard={self.shard_id}/{self.num_shards})")


class DaliTrainLoader(_ClassificationLoader):
    """DALI replacement of fine-tuning's training DataLoader: ``(images, labels, skipped)`` batches.

    Args:
        root: ``train`` folder, ``root/<class>/**/<image>``.
        classes: class names in label order (``split_dirs``/``find_classes``).
        batch_size, img_size: images per batch (per process), crop size ``S``.
        device: ``"cuda"``/``"cuda:N"`` (nvJPEG mixed decode, tensors on that GPU) or ``"cpu"`` (DALI CPU mode).
        epochs, shard_id, num_shards, seed, min_batches: as :class:`ResumableSampler` (same order and
            shards as the torch backend); :meth:`set_start` resumes at a batch.
        auto_augment, color_jitter, interpolation: :func:`build_train_pipeline`.
        reprob, remode, recount: timm ``RandomErasing`` on the device batch (``reprob=0``: off); its
            draws come from python ``random`` and torch's generator of ``device``, as timm's.
        num_threads: DALI CPU threads (default ``min(8, cpus)``).
        scan_cache_dir: folder of the file-screen cache.

    Shapes: images ``(B, 3, S, S)`` float32, labels ``(B,)`` int64, skipped a Python int (screened-out
    files in the first batch, run-time replacements in theirs). ``len(loader)``: batches left.

    Equivalent PyTorch: ``DataLoader(ClassificationFolder(root, transform=build_train_transform(S, ...)),
    sampler=ResumableSampler(...), collate_fn=classification_collate, drop_last=True)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        classes: Sequence[str],
        batch_size: int,
        img_size: int,
        device: str | torch.device = "cpu",
        epochs: int = 1,
        shard_id: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        min_batches: int = 1,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        reprob: float = 0.25,
        remode: str = "pixel",
        recount: int = 1,
        interpolation: str = "bicubic",
        num_threads: int | None = None,
        prefetch_queue_depth: int = 2,
        scan_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.epochs = dali._check_positive_int("epochs", epochs)
        min_batches = dali._check_positive_int("min_batches", min_batches)
        self.rand_aug = parse_rand_augment(auto_augment)
        self.auto_augment = auto_augment
        if isinstance(color_jitter, bool) or not isinstance(color_jitter, (int, float)) or color_jitter < 0:
            raise ValueError(f"color_jitter: expected a number >= 0, got {color_jitter!r}")
        self.color_jitter = float(color_jitter)
        if isinstance(reprob, bool) or not isinstance(reprob, (int, float)) or not 0.0 <= reprob <= 1.0:
            raise ValueError(f"reprob: expected a probability in [0, 1], got {reprob!r}")
        if remode not in ("const", "rand", "pixel"):
            raise ValueError(f"remode: expected const, rand or pixel, got {remode!r}")
        self.recount = dali._check_positive_int("recount", recount)
        self.reprob, self.remode = float(reprob), remode
        self._init_common(batch_size=batch_size, device=device, shard_id=shard_id, num_shards=num_shards, seed=seed,
                          num_threads=num_threads, prefetch_queue_depth=prefetch_queue_depth)
        self._init_data(root, classes, img_size=img_size, interpolation=interpolation, scan_cache_dir=scan_cache_dir)
        self._sampler = ResumableSampler(
            len(self.files), batch_size=self.batch_size, epochs=self.epochs, rank=self.shard_id,
            world_size=self.num_shards, seed=self.seed, min_batches=min_batches,
        )
        self._erase = None
        if self.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self._erase = RandomErasing(probability=self.reprob, mode=self.remode, max_count=self.recount,
                                        device=self.device)

    def _start(self, indices: np.ndarray, seed: int):
        pipe = build_train_pipeline(
            [self.files[i] for i in indices], indices.tolist(), batch_size=self.batch_size, img_size=self.img_size,
            device_id=self.device_id, num_threads=self.num_threads, seed=seed, auto_augment=self.auto_augment,
            color_jitter=self.color_jitter, interpolation=self.interpolation,
            prefetch_queue_depth=self.prefetch_queue_depth,
        )
        return pipe, self._iterator(pipe, "DROP")

    def _convert(self, out: dict, rng) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = super()._convert(out, rng)
        if self._erase is not None:
            images = self._erase(images)  # in place, per sample (timm RandomErasing on a batch)
        return images, labels


class DaliEvalLoader(_ClassificationLoader):
    """DALI replacement of fine-tuning's validation DataLoader: ``(images, labels, skipped)`` batches.

    Shard ``shard_id`` of ``num_shards`` reads files ``shard_id, shard_id + num_shards, ...`` in order
    (the torch backend's :class:`ShardSampler`), the last batch partial: over all ranks every readable
    image is evaluated exactly once, no padding. Iterable any number of times (one pass each). A file
    that fails to decode inside DALI is left out (``ON_FAILURE = "drop"``: never replaced by another
    image, which would then count twice), counted as skipped, and left out of later passes too.

    Equivalent PyTorch: ``DataLoader(ClassificationFolder(root, transform=build_eval_transform(S, ...)),
    sampler=ShardSampler(n, rank=shard_id, world_size=num_shards), collate_fn=classification_collate)``.
    """

    ON_FAILURE = "drop"

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        classes: Sequence[str],
        batch_size: int,
        img_size: int,
        device: str | torch.device = "cpu",
        shard_id: int = 0,
        num_shards: int = 1,
        crop: bool = True,
        interpolation: str = "bicubic",
        num_threads: int | None = None,
        prefetch_queue_depth: int = 2,
        scan_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.crop = bool(crop)
        self._init_common(batch_size=batch_size, device=device, shard_id=shard_id, num_shards=num_shards, seed=0,
                          num_threads=num_threads, prefetch_queue_depth=prefetch_queue_depth)
        self._init_data(root, classes, img_size=img_size, interpolation=interpolation, scan_cache_dir=scan_cache_dir)
        self._mine = np.arange(self.shard_id, len(self.files), self.num_shards, dtype=np.int64)

    def _readable_mine(self) -> np.ndarray:
        """This shard's indices without the files DALI failed to decode in an earlier pass."""
        if not self._bad_indices:
            return self._mine
        return self._mine[~np.isin(self._mine, np.fromiter(self._bad_indices, dtype=np.int64))]

    @property
    def num_images(self) -> int:
        """Images this shard evaluates per pass (files that failed in DALI left out)."""
        return len(self._readable_mine())

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_images // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_start(self, epoch: int, batch: int = 0) -> None:
        raise TypeError("DaliEvalLoader: evaluation always reads the whole shard; set_start is for training loaders")

    def _chunks(self):
        mine = self._readable_mine()
        if len(mine):
            yield 0, 0, mine

    def _start(self, indices: np.ndarray, seed: int):
        pipe = build_eval_pipeline(
            [self.files[i] for i in indices], indices.tolist(), batch_size=self.batch_size, img_size=self.img_size,
            device_id=self.device_id, num_threads=self.num_threads, crop=self.crop, interpolation=self.interpolation,
            prefetch_queue_depth=self.prefetch_queue_depth,
        )
        return pipe, self._iterator(pipe, "PARTIAL")
