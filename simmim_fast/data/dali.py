"""NVIDIA DALI input pipeline for SimMIM pretraining: ``python -m simmim_fast.train --data-backend dali``.

One pipeline per process (rank), per sample::

    readers.file          this rank's files, in the order the torch backend's ResumableSampler uses
    decoders.image_random_crop   device="mixed" (nvJPEG on the GPU) on CUDA, "cpu" in CPU mode;
                          the official RandomResizedCrop: area 0.67-1, aspect ratio 3/4-4/3
    resize                to (S, S), bilinear with antialiasing
    crop_mirror_normalize coin-flip horizontal mirror, ImageNet mean/std, NCHW float32 (or float16)
    simmim_mask           the native operator (kernels/; gpu backend on CUDA, cpu in CPU mode), or,
                          when the plugin is absent, MaskGenerator.generate on the device (logged once)

:class:`DaliLoader` iterates like the torch DataLoader of the trainer: ``(images (B, 3, S, S) float32,
masks (B, S/p, S/p) int64, skipped int)``; on CUDA the tensors are on the GPU (DALI's PyTorch
iterator, no host copy), in CPU mode (``device="cpu"``, DALI ``device_id=None``) on the CPU.

Order, sharding, epochs, resume. Epoch ``e`` reads the global permutation ``ResumableSampler
.epoch_order(e)`` (seeded by ``seed`` and ``e``; a data set smaller than ``min_batches`` batches is
repeated), and shard ``shard_id`` of ``num_shards`` takes positions ``shard_id, shard_id + num_shards,
...``: exactly the samples the torch backend gives that rank at each step, the shards of an epoch
disjoint and together covering it once. The split is done here, not by the reader's own
``shard_id`` (contiguous blocks), because a reader cannot start inside its shard: resuming at batch
``b`` of epoch ``e`` (:meth:`DaliLoader.set_start`) starts the reader at that rank's sample
``b * batch_size`` of epoch ``e``, so a resumed run reads the same images in the same order as the
uninterrupted one. Augmentation and mask random numbers come from the pipeline seed, derived from
``(seed, shard_id, epoch, batch)`` of the pipeline's first batch: reproducible run to run, but a
resumed run draws different crops/flips/masks than the uninterrupted run would have (not bitwise).
Pipelines are rebuilt per chunk of epochs (at most ``CHUNK_SAMPLES`` file entries, at least one epoch).

Unreadable files. DALI stops the whole pipeline on a file it cannot decode (a non-image named
``.jpg``, a truncated JPEG: measured with DALI 2.4), so the file list is screened first
(:func:`scan_image_files`: signature, end-of-image marker for JPEG/PNG, PIL header, full PIL decode
when those are in doubt; cached per tree by size, mtime, ctime, inode and mode, and a file that could
not be opened at all is re-checked at every scan, so one that became readable is used again). Files it
rejects are left out of the data set and counted once (the ``skipped`` of the first batch). A file that
passes the screen but still fails in DALI is caught at run time: the pipeline is rebuilt from the
current batch with that file replaced by the next readable one (as the torch data set does; the
evaluation loader leaves it out instead), counted per replaced sample.

Shared with fine-tuning (:mod:`simmim_fast.data.dali_classification`): the graph pieces
:func:`read_and_decode` and :func:`normalize_chw`, and :class:`DaliBatchLoader` (options, screening,
per-rank order, resume, run-time failure recovery) of which :class:`DaliLoader` is one subclass.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import threading
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from ..training.sampler import ResumableSampler
from . import native
from .folder import IMG_EXTENSIONS, find_images
from .masking import MaskGenerator
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DATA_BACKENDS",
    "MASK_SOURCES",
    "CROP_AREA",
    "CROP_RATIO",
    "CHUNK_SAMPLES",
    "dali_unavailable_reasons",
    "select_data_backend",
    "list_image_files",
    "check_image_file",
    "ScanResult",
    "scan_image_files",
    "read_and_decode",
    "normalize_chw",
    "build_pipeline",
    "DaliBatchLoader",
    "DaliLoader",
]

log = logging.getLogger(__name__)

DATA_BACKENDS = ("auto", "torch", "dali")
MASK_SOURCES = ("auto", "native", "torch")
CROP_AREA = (0.67, 1.0)  # official RandomResizedCrop scale
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CHUNK_SAMPLES = 1 << 16  # file entries per pipeline (a pipeline spans whole epochs, at least one)
MAX_RUNTIME_FAILURES = 64  # DALI decode failures recovered per chunk before giving up

_IMAGE_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT"}
_logged: set[str] = set()
_log_lock = threading.Lock()


def _log_once(key: str, msg: str, *args) -> None:
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.info(msg, *args)


# --------------------------------------------------------------------------- availability


def _dali_version() -> str | None:
    try:
        import nvidia.dali as dali

        return getattr(dali, "__version__", None)
    except Exception:
        return None


def dali_unavailable_reasons(device: str | torch.device | None = None) -> list[str]:
    """Every reason a DALI pipeline cannot run for ``device`` (empty: it can).

    ``device`` ``None`` or CPU: DALI CPU mode (needs only ``nvidia.dali``); CUDA: also a CUDA device.
    """
    reasons = []
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:
        reasons.append(f"nvidia.dali not importable ({type(exc).__name__}: {exc}); pip install 'simmim-fast[dali]'")
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        reasons.append("device is CUDA but torch.cuda.is_available() is False")
    return reasons


def select_data_backend(requested: str = "auto", device: str | torch.device | None = None) -> str:
    """``"torch"`` or ``"dali"`` for ``--data-backend requested`` on ``device``; logs the choice once.

    ``auto``: DALI when ``nvidia.dali`` imports and ``device`` is CUDA (and available), else torch.
    ``dali``: DALI (GPU mode on CUDA, CPU mode otherwise); ``ValueError`` listing every reason if it
    cannot run. ``torch``: the torchvision DataLoader.
    """
    if requested not in DATA_BACKENDS:
        raise ValueError(f"--data-backend: expected one of {', '.join(DATA_BACKENDS)}, got {requested!r}")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "torch":
        _log_once("backend", "data backend: torch DataLoader (requested)")
        return "torch"
    mode = "GPU mode, nvJPEG mixed decode" if dev.type == "cuda" else "CPU mode"
    if requested == "auto" and dev.type != "cuda":
        # torch anyway: find DALI without importing it (~0.6 s)
        reasons = [] if importlib.util.find_spec("nvidia.dali") is not None else ["nvidia.dali not installed"]
        reasons.append(f"device is {dev}: auto uses DALI only on CUDA (--data-backend dali forces DALI CPU mode)")
    else:
        reasons = dali_unavailable_reasons(dev)
    if requested == "dali":
        if reasons:
            raise ValueError("--data-backend dali: cannot run DALI: " + "; ".join(reasons))
        _log_once("backend", "data backend: DALI %s (%s, requested)", _dali_version(), mode)
        return "dali"
    if reasons:
        _log_once("backend", "data backend: torch DataLoader (auto: %s)", "; ".join(reasons))
        return "torch"
    _log_once("backend", "data backend: DALI %s (auto: nvidia.dali imports and %s is CUDA; %s)", _dali_version(), dev, mode)
    return "dali"


# --------------------------------------------------------------------------- file lists and screening


def list_image_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[pathlib.Path], str | None]:
    """Absolute image paths of a data source and its cache key.

    ``data``: a folder (searched recursively, ImageFolder or any tree, as :func:`find_images`); a
    text file listing images, one per line (``path`` or DALI's ``path label``; relative paths are
    relative to the list's folder; blank lines and ``#`` comments skipped); or a sequence of paths
    (no scan cache). Returns ``(files, cache_key)``.
    """
    if isinstance(data, (str, os.PathLike)):
        p = pathlib.Path(data).expanduser()
        if p.is_dir():
            return [f.resolve() for f in find_images(p)], f"dir:{p.resolve()}"
        if p.is_file():
            if p.name.lower().endswith(IMG_EXTENSIONS):
                raise ValueError(f"data: {str(p)!r} is an image, expected a folder or a text file listing images")
            files = []
            for line in p.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(None, 1)
                name = parts[0] if len(parts) == 2 and parts[1].lstrip("-").isdigit() else line
                f = pathlib.Path(name).expanduser()
                files.append((f if f.is_absolute() else p.parent / f).resolve())
            if not files:
                raise ValueError(f"data: the file list {str(p)!r} names no images")
            return files, f"list:{p.resolve()}"
        raise FileNotFoundError(f"data: {str(p)!r} does not exist")
    if isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        files = [pathlib.Path(f).expanduser().resolve() for f in data]
        if not files:
            raise ValueError("data: the sequence of image paths is empty")
        return files, None
    raise TypeError(f"data: expected a folder, a file list or a sequence of paths, got {type(data).__name__}")


def _sniff(head: bytes) -> str | None:
    """Image format from the first bytes (the formats DALI decodes, plus GIF to reject it)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jpeg2000"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n":
        return "pnm"
    if head.startswith(b"GIF8"):
        return "gif"
    return None


_TAIL_BYTES = 4096


def check_image_file(path: str | os.PathLike) -> str | None:
    """Why DALI could not decode ``path`` (a short reason), or ``None`` when it looks decodable.

    Checks, cheapest first: non-empty; a signature of a format DALI decodes; for JPEG an
    end-of-image marker (``FFD9``) and for PNG an ``IEND`` chunk in the last 4 KiB (a truncated file
    has none); PIL parses the header. A full PIL decode settles the cases in doubt (no end marker,
    formats other than JPEG/PNG): a file PIL cannot decode is rejected.
    """
    return _check_image_file(path)[0]


def _reason(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())[:200]
    return f"unreadable ({type(exc).__name__}: {msg})" if msg else f"unreadable ({type(exc).__name__})"


def _check_image_file(path: str | os.PathLike) -> tuple[str | None, bool]:
    """``(reason or None, transient)``: ``transient`` when the file could not be opened or read at all
    (no permission, gone, I/O error): a verdict about access, not content, so the scan cache re-checks it."""
    from PIL import Image

    try:
        size = os.stat(path).st_size
        if size == 0:
            return "empty file", False
        with open(path, "rb") as f:
            head = f.read(32)
            fmt = _sniff(head)
            if fmt is None:
                return f"not an image (unknown file signature {head[:8].hex()})", False
            if fmt == "gif":
                return "GIF is not decodable by DALI", False
            tail_ok = False
            if fmt in ("jpeg", "png"):
                n = min(size, _TAIL_BYTES)
                f.seek(size - n)
                tail = f.read(n)
                tail_ok = (b"\xff\xd9" in tail) if fmt == "jpeg" else (b"IEND" in tail)
    except OSError as exc:  # cannot open or read: permission, missing, I/O
        return _reason(exc), True
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                return f"{fmt} with empty size {w}x{h}", False
            if not tail_ok:
                img.load()  # full decode: truncated or broken data raises
    except Exception as exc:  # any failure means: do not feed it to DALI
        return _reason(exc), False
    return None, False


@dataclass
class ScanResult:
    """Outcome of :func:`scan_image_files`: readable files (input order) and ``(path, reason)`` of the rest."""

    files: list[pathlib.Path]
    skipped: list[tuple[pathlib.Path, str]] = field(default_factory=list)
    cached: int = 0  # verdicts reused from the cache


def _cache_file(cache_key: str, cache_dir: str | os.PathLike | None) -> pathlib.Path:
    if cache_dir is None:
        from .default_data import default_cache_dir

        cache_dir = default_cache_dir()
    digest = hashlib.sha1(cache_key.encode()).hexdigest()[:20]
    return pathlib.Path(cache_dir) / "dali_scan" / f"{digest}.json"


_SCAN_FORMAT = "simmim_fast.dali_scan.v2"


def _file_key(st: os.stat_result) -> list[int]:
    """What a cached verdict is valid for: size, mtime, ctime (changes with permissions and owner too),
    inode (the file replaced by another) and mode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode]


def _read_cache(path: pathlib.Path, cache_key: str) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
        if data.get("format") == _SCAN_FORMAT and data.get("key") == cache_key and isinstance(data.get("entries"), dict):
            return data["entries"]
    except FileNotFoundError:
        pass
    except Exception as exc:  # a broken cache is rebuilt, never fatal
        log.warning("ignoring unreadable scan cache %s (%s)", path, exc)
    return {}


def _write_cache(path: pathlib.Path, cache_key: str, entries: dict[str, list]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"format": _SCAN_FORMAT, "key": cache_key, "entries": entries}, separators=(",", ":")))
        os.replace(tmp, path)  # atomic: concurrent ranks write the same content
    except OSError as exc:
        log.warning("could not write scan cache %s (%s)", path, exc)


def scan_image_files(
    files: Sequence[str | os.PathLike],
    *,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> ScanResult:
    """Screen ``files`` with :func:`check_image_file` (in threads), reusing cached verdicts.

    With a ``cache_key`` (from :func:`list_image_files`) verdicts are stored in
    ``<cache_dir>/dali_scan/`` (default ``$SIMMIM_FAST_CACHE`` or ``~/.cache/simmim_fast``) and
    reused for files whose size, mtime, ctime, inode and mode are unchanged (a ``chmod`` or ``chown``
    changes the ctime). A file that could not be opened or read (permission, I/O) is checked again at
    every scan: that verdict is about access, which can change without any of those (a parent folder's
    permissions, another user), so a file that became readable is used again.

    Cache entries: ``path -> [size, mtime_ns, ctime_ns, inode, mode, reason, transient]``.
    """
    paths = [pathlib.Path(f) for f in files]
    cache_path = _cache_file(cache_key, cache_dir) if cache_key else None
    old = _read_cache(cache_path, cache_key) if cache_path else {}
    entries: dict[str, list] = {}
    verdict: dict[str, str] = {}
    todo: list[pathlib.Path] = []
    cached = 0
    for p in paths:
        key = str(p)
        if key in entries:
            continue
        try:
            st = os.stat(p)
        except OSError as exc:
            verdict[key] = f"cannot stat ({type(exc).__name__}: {exc.strerror or exc})"
            entries[key] = [-1, -1, -1, -1, -1, verdict[key], 1]
            continue
        prev = old.get(key)
        sig = _file_key(st)
        entries[key] = sig + ["", 0]
        if isinstance(prev, list) and len(prev) == 7 and prev[:5] == sig and not prev[6]:
            verdict[key] = prev[5]
            entries[key][5] = prev[5]
            cached += 1
        else:
            todo.append(p)
    if todo:
        n_workers = workers or min(16, 4 * (os.cpu_count() or 1))
        if len(todo) < 32 or n_workers <= 1:
            results = [_check_image_file(p) for p in todo]
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=n_workers) as pool:
                results = list(pool.map(_check_image_file, todo, chunksize=64))
        for p, (reason, transient) in zip(todo, results):
            verdict[str(p)] = reason or ""
            entries[str(p)][5:] = [reason or "", int(transient)]
    if cache_path and (todo or set(old) != set(entries)):
        _write_cache(cache_path, cache_key, entries)
    good = [p for p in paths if not verdict[str(p)]]
    bad = [(p, verdict[str(p)]) for p in paths if verdict[str(p)]]
    return ScanResult(good, bad, cached)


def _record_bad_file(cache_key: str | None, cache_dir, path: pathlib.Path, reason: str) -> None:
    """Remember a file that failed in DALI at run time, so the next scan leaves it out."""
    if not cache_key:
        return
    cache_path = _cache_file(cache_key, cache_dir)
    entries = _read_cache(cache_path, cache_key)
    try:
        entries[str(path)] = _file_key(os.stat(path)) + [reason, 0]
    except OSError:
        entries[str(path)] = [-1, -1, -1, -1, -1, reason, 1]
    _write_cache(cache_path, cache_key, entries)


# --------------------------------------------------------------------------- the pipeline


def read_and_decode(
    files: Sequence[str | os.PathLike],
    labels: Sequence[int],
    *,
    gpu: bool,
    reader_name: str = "Reader",
    random_crop: tuple[Sequence[float], Sequence[float]] | None = None,
):
    """Pipeline-graph piece (call inside a pipeline): read ``files`` in order and decode them to RGB.

    Returns ``(images, labels)`` DataNodes: ``images`` uint8 ``HWC`` (on the GPU with ``gpu``: nvJPEG
    "mixed" decode; else "cpu"), ``labels`` ``(1,)`` int32 (``labels[i]`` of each file). With
    ``random_crop=(area, ratio)`` the decoder crops a random region of that area fraction and aspect
    ratio range (``fn.decoders.image_random_crop``, 10 attempts); without it decodes the whole image.

    Equivalent PyTorch: ``PIL.Image.open(f).convert("RGB")`` (+ ``RandomResizedCrop``'s region choice).
    """
    from nvidia.dali import fn, types

    encoded, label = fn.readers.file(
        files=[str(f) for f in files], labels=[int(x) for x in labels], random_shuffle=False, name=reader_name,
        pad_last_batch=False,
    )
    device = "mixed" if gpu else "cpu"
    if random_crop is None:
        images = fn.decoders.image(encoded, device=device, output_type=types.RGB)
    else:
        area, ratio = random_crop
        images = fn.decoders.image_random_crop(
            encoded, device=device, output_type=types.RGB,
            random_area=[float(x) for x in area], random_aspect_ratio=[float(x) for x in ratio], num_attempts=10,
        )
    return images, label


def normalize_chw(images, *, image_dtype: torch.dtype = torch.float32, mirror=None, crop: Sequence[int] | None = None):
    """Pipeline-graph piece: uint8 ``HWC`` -> ImageNet-normalised ``CHW`` float (``fn.crop_mirror_normalize``).

    ``mirror``: a DataNode of 0/1 per sample (horizontal flip) or ``None``; ``crop``: ``(h, w)`` center
    crop or ``None``. Equivalent PyTorch: ``Normalize(IMAGENET_MEAN, IMAGENET_STD)(ToTensor()(img))``.
    """
    from nvidia.dali import fn, types

    if image_dtype not in _IMAGE_DTYPES:
        raise ValueError(f"image_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {image_dtype}")
    kwargs = {}
    if mirror is not None:
        kwargs["mirror"] = mirror
    if crop is not None:
        kwargs["crop"] = [int(c) for c in crop]
    return fn.crop_mirror_normalize(
        images, dtype=getattr(types, _IMAGE_DTYPES[image_dtype]), output_layout="CHW",
        mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD], **kwargs,
    )


def build_pipeline(
    files: Sequence[str | os.PathLike],
    *,
    batch_size: int,
    img_size: int = 192,
    labels: Sequence[int] | None = None,
    device_id: int | None = None,
    num_threads: int = 2,
    seed: int = 0,
    image_dtype: torch.dtype = torch.float32,
    mask_generator: MaskGenerator | None = None,
    mask_device: str = "cpu",
    prefetch_queue_depth: int = 2,
    reader_name: str = "Reader",
):
    """The DALI pipeline (built, not started) reading ``files`` in order, once per epoch.

    Outputs, per batch of ``batch_size``: ``images`` ``(B, 3, S, S)`` float32/float16 normalised (GPU
    with ``device_id``, CPU with ``device_id=None``); ``indices`` ``(B, 1)`` int32 (``labels[i]`` of
    each file, default its position in ``files``); with a ``mask_generator`` also ``masks``
    ``(B, S/p, S/p)`` uint8 from the native ``simmim_mask`` operator (plugin loaded first), run on
    ``mask_device`` ("cpu" or "gpu"; a cpu mask is moved to the GPU in a GPU pipeline).

    Equivalent PyTorch: ``build_pretrain_transform(img_size)`` on each decoded image (torchvision
    RandomResizedCrop(scale=(0.67, 1), ratio=(3/4, 4/3)), RandomHorizontalFlip, ToTensor, Normalize).
    """
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    batch_size = _check_positive_int("batch_size", batch_size)
    img_size = _check_positive_int("img_size", img_size)
    num_threads = _check_positive_int("num_threads", num_threads)
    files = [str(f) for f in files]
    if not files:
        raise ValueError("files: the pipeline needs at least one file")
    labels = list(range(len(files))) if labels is None else [int(x) for x in labels]
    if len(labels) != len(files):
        raise ValueError(f"labels: expected {len(files)} labels (one per file), got {len(labels)}")
    if image_dtype not in _IMAGE_DTYPES:
        raise ValueError(f"image_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {image_dtype}")
    if mask_device not in ("cpu", "gpu"):
        raise ValueError(f"mask_device: expected 'cpu' or 'gpu', got {mask_device!r}")
    if mask_device == "gpu" and device_id is None:
        raise ValueError("mask_device: 'gpu' needs a GPU pipeline (device_id), this one is CPU-only")
    if mask_generator is not None and mask_generator.input_size != img_size:
        raise ValueError(f"mask_generator: input_size {mask_generator.input_size} differs from img_size {img_size}")
    gpu = device_id is not None
    pipe = Pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=int(seed),
        prefetch_queue_depth=prefetch_queue_depth,
    )
    with pipe:
        images, index = read_and_decode(files, labels, gpu=gpu, reader_name=reader_name,
                                        random_crop=(CROP_AREA, CROP_RATIO))
        images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_LINEAR, antialias=True)
        images = normalize_chw(images, image_dtype=image_dtype, mirror=fn.random.coin_flip(probability=0.5))
        outputs = [images, index]
        if mask_generator is not None:
            if native.loaded_plugin() is None:
                raise RuntimeError("mask_generator: the native DALI plugin is not loaded (simmim_fast.data.native.load_plugin)")
            op = getattr(fn, native.OP_NAME)
            masks = op(
                device=mask_device, input_size=mask_generator.input_size,
                mask_patch_size=mask_generator.mask_patch_size, model_patch_size=mask_generator.model_patch_size,
                mask_ratio=float(mask_generator.mask_ratio), mask_count=mask_generator.mask_count,
                strategy=mask_generator.strategy,
            )
            if gpu and mask_device == "cpu":
                masks = masks.gpu()
            outputs.append(masks)
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


def _derive_seed(*parts: int) -> int:
    """A 31-bit pipeline seed from integers (DALI takes non-negative seeds)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint32)[0]
    return int(state) & 0x7FFFFFFF


def _resolve_device(device, who: str = "DaliLoader") -> tuple[torch.device, int | None]:
    """``(torch device, DALI device_id)`` for ``"cpu"`` (CPU mode, ``None``) or ``"cuda"``/``"cuda:N"``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    reasons = dali_unavailable_reasons(dev)
    if reasons:
        raise RuntimeError(f"{who}: cannot run DALI: " + "; ".join(reasons))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev, (dev.index if dev.type == "cuda" else None)


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


class DaliBatchLoader:
    """What every DALI loader of this package shares: options, file screening, per-rank order, iteration.

    A subclass calls :meth:`_init_common` then :meth:`_screen` in its ``__init__``, sets ``self._sampler``
    (a :class:`ResumableSampler` over ``len(self.files)``) or overrides :meth:`_chunks`, and implements
    :meth:`_start` (pipeline + DALI iterator over data-set indices, each sample's DALI label being its
    index into :attr:`files`) and :meth:`_convert` (one DALI output dict -> the batch tensors).
    Iteration yields ``(*_convert(out, _batch_rng(seed)), skipped)``; a file DALI fails to decode at
    run time is replaced by the next readable one (``ON_FAILURE = "next"``, training) or left out
    (``"drop"``, evaluation: no image is read twice) and counted (see the module docstring).
    """

    #: what takes the place of a file DALI fails to decode at run time: "next" readable file, or "drop"
    ON_FAILURE = "next"

    def _init_common(
        self, *, batch_size, device, shard_id, num_shards, seed, num_threads, prefetch_queue_depth,
    ) -> None:
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.num_shards = _check_positive_int("num_shards", num_shards)
        if isinstance(shard_id, bool) or not isinstance(shard_id, (int, np.integer)) or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id: expected an int in [0, {num_shards}), got {shard_id!r}")
        self.shard_id = int(shard_id)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        self.seed = int(seed)
        self.prefetch_queue_depth = _check_positive_int("prefetch_queue_depth", prefetch_queue_depth)
        self.device, self.device_id = _resolve_device(device, type(self).__name__)
        if num_threads is None:
            num_threads = min(8, os.cpu_count() or 1)
        self.num_threads = _check_positive_int("num_threads", num_threads)

    def _screen(self, files: Sequence[pathlib.Path], cache_key: str | None, scan_cache_dir) -> ScanResult:
        """Screen ``files`` (:func:`scan_image_files`); keep the readable ones in :attr:`files`."""
        self._cache_key = cache_key
        self._scan_cache_dir = scan_cache_dir
        scan = scan_image_files(files, cache_key=cache_key, cache_dir=scan_cache_dir)
        if not scan.files:
            shown = "; ".join(f"{p.name}: {r}" for p, r in scan.skipped[:5])
            raise ValueError(f"data: none of the {len(files)} files is a decodable image ({shown})")
        self.files: list[pathlib.Path] = scan.files
        self.scan_skipped: list[tuple[pathlib.Path, str]] = scan.skipped
        if scan.skipped:
            shown = ", ".join(f"{p.name} ({r})" for p, r in scan.skipped[:3])
            log.info("DALI file screen: %d of %d files skipped as unreadable, e.g. %s", len(scan.skipped), len(files), shown)
        self._bad_indices: set[int] = set()
        self._scan_reported = False
        self.last_indices: torch.Tensor | None = None
        self._active = None  # (pipeline, iterator) being read
        return scan

    # ---- configuration -----------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch and shard (as :class:`ResumableSampler`)."""
        return self._sampler.batches_per_epoch

    def set_start(self, epoch: int, batch: int = 0) -> None:
        """Begin at batch ``batch`` of epoch ``epoch`` (resume); takes effect at the next ``iter``."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"batch: expected an int in [0, {self.batches_per_epoch}), got {batch!r}")
        self._sampler.set_start(int(epoch), int(batch))

    def __len__(self) -> int:
        return len(self._sampler) // self.batch_size

    # ---- hooks ---------------------------------------------------------------------------
    def _start(self, indices: np.ndarray, seed: int):
        """``(pipeline, DALIGenericIterator)`` reading ``self.files[i] for i in indices``."""
        raise NotImplementedError

    def _convert(self, out: dict, rng) -> tuple:
        """One DALI output dict -> the batch tensors (without ``skipped``)."""
        raise NotImplementedError

    def _batch_rng(self, seed: int):
        """Extra random generator handed to :meth:`_convert` for the batches of one pipeline (default none)."""
        return None

    # ---- iteration -----------------------------------------------------------------------
    def _chunks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(first epoch, first batch, this shard's data-set indices) per pipeline, in order."""
        s = self._sampler
        per_epoch = s.batches_per_epoch * self.batch_size
        limit = max(per_epoch, CHUNK_SAMPLES)
        parts: list[np.ndarray] = []
        size, first = 0, None
        for epoch in range(s.start_epoch, s.epochs):
            order = np.asarray(s.epoch_order(epoch), dtype=np.int64)
            mine = order[s.rank::s.world_size]
            batch0 = s.start_batch if epoch == s.start_epoch else 0
            mine = mine[batch0 * self.batch_size:]
            if parts and size + len(mine) > limit:
                yield first[0], first[1], np.concatenate(parts)
                parts, size, first = [], 0, None
            if first is None:
                first = (epoch, batch0)
            parts.append(mine)
            size += len(mine)
        if parts:
            yield first[0], first[1], np.concatenate(parts)

    def _bad_file_in(self, message: str, window: np.ndarray) -> int | None:
        """Data-set index of the file of ``window`` that ``message`` (a DALI error) names, if any."""
        best, best_len = None, -1
        for i in np.unique(window).tolist():
            name = str(self.files[i])
            if name in message and len(name) > best_len:
                best, best_len = i, len(name)
        return best

    def _substitute(self, bad: int) -> int:
        n = len(self.files)
        for k in range(1, n):
            j = (bad + k) % n
            if j not in self._bad_indices:
                return j
        raise RuntimeError(f"data: every file failed to decode in DALI (last: {self.files[bad]})")

    def close(self) -> None:
        """Release the pipeline being read (also done when iteration ends)."""
        self._active = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        try:
            yield from self._batches()
        finally:  # also when the consumer stops early: release the pipeline
            self._active = None

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        B = self.batch_size
        pending_skips = 0 if self._scan_reported else len(self.scan_skipped)
        self._scan_reported = True
        for epoch0, batch0, indices in self._chunks():
            indices = indices.copy()
            replaced = np.zeros(len(indices), dtype=bool)
            pos, failures = 0, 0  # batches of this chunk yielded; runtime decode failures recovered
            while pos * B < len(indices):
                seed = _derive_seed(self.seed, self.shard_id, epoch0, batch0, pos, failures)
                batch_rng = self._batch_rng(seed)
                try:
                    self._active = self._start(indices[pos * B:], seed)
                except Exception as exc:  # decode errors can surface while the first batch is prepared
                    failures, indices, replaced, dropped = self._recover(exc, indices, replaced, pos, failures)
                    pending_skips += dropped
                    continue
                it = self._active[1]
                while True:
                    try:
                        out = next(it)[0]
                    except StopIteration:
                        break
                    except Exception as exc:
                        failures, indices, replaced, dropped = self._recover(exc, indices, replaced, pos, failures)
                        pending_skips += dropped
                        break
                    sl = slice(pos * B, (pos + 1) * B)
                    skipped = int(replaced[sl].sum()) + pending_skips
                    pending_skips = 0
                    pos += 1
                    yield self._convert(out, batch_rng) + (skipped,)
                self._active = None

    def _recover(self, exc: Exception, indices: np.ndarray, replaced: np.ndarray, pos: int, failures: int
                 ) -> tuple[int, np.ndarray, np.ndarray, int]:
        """Replace (or, ``ON_FAILURE == "drop"``, remove) the file a DALI failure names, from batch ``pos``
        on; re-raise when none is named. Returns ``(failures, indices, replaced, samples dropped)``."""
        self._active = None
        B = self.batch_size
        window = indices[pos * B:(pos + self.prefetch_queue_depth + 2) * B]
        bad = self._bad_file_in(str(exc), window)
        if bad is None or failures >= MAX_RUNTIME_FAILURES:
            why = "no file of the current batches is named in it" if bad is None else f"{failures} failures in this chunk"
            raise RuntimeError(f"DALI pipeline failed ({why}): {exc}") from exc
        self._bad_indices.add(bad)
        rest = indices[pos * B:]
        hit = rest == bad
        dropped = 0
        if self.ON_FAILURE == "drop":
            keep = np.ones(len(indices), dtype=bool)
            keep[pos * B:] = ~hit
            indices, replaced = indices[keep], replaced[keep]
            dropped = int(hit.sum())
            instead = "left out"
        else:
            sub = self._substitute(bad)
            rest[hit] = sub
            replaced[pos * B:][hit] = True
            instead = f"replaced by {self.files[sub].name}"
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        named = [ln for ln in lines if str(self.files[bad]) in ln]
        first_line = (named or lines or [type(exc).__name__])[0]
        log.info("DALI could not decode %s (%s); %s and skipped from now on", self.files[bad], first_line[:200], instead)
        _record_bad_file(self._cache_key, self._scan_cache_dir, self.files[bad], f"DALI decode failed: {first_line[:200]}")
        return failures + 1, indices, replaced, dropped


class DaliLoader(DaliBatchLoader):
    """DALI replacement of the trainer's DataLoader: yields ``(images, masks, skipped)`` batches.

    Args:
        data: image folder, text file list or sequence of image paths (:func:`list_image_files`).
        batch_size: images per batch (per process).
        mask_generator: a :class:`MaskGenerator` whose ``input_size`` is the crop size ``S``.
        device: ``"cuda"``/``"cuda:N"`` (GPU pipeline, nvJPEG mixed decode, tensors on that GPU) or
            ``"cpu"`` (DALI CPU mode, ``device_id=None``).
        epochs: epochs to iterate in total (one iterator spans all of them, like ResumableSampler).
        shard_id, num_shards: this process's shard (torchrun rank / world size).
        seed: order seed (same permutation as the torch backend) and base of the pipeline seeds.
        min_batches: at least this many batches per epoch (a small data set is repeated).
        num_threads: DALI CPU threads (default ``min(8, cpus)``).
        image_dtype: ``torch.float32`` (default), ``torch.float16`` (made by DALI) or
            ``torch.bfloat16`` (DALI float32 cast on the device).
        mask_source: ``"auto"`` (native operator if the plugin loads, else torch), ``"native"``
            (error if it cannot load), ``"torch"`` (``MaskGenerator.generate`` on the device).
        scan_cache_dir: folder of the file-screen cache (default the simmim_fast cache folder).

    Shapes: images ``(B, 3, S, S)``, masks ``(B, S/p, S/p)`` int64 (0/1, p = model patch size),
    skipped a Python int. ``len(loader)`` is the number of batches left; :attr:`last_indices` holds
    the data-set indices (into :attr:`files`) of the last batch.

    Equivalent PyTorch: ``DataLoader(SimMIMImageDataset(data, transform=build_pretrain_transform(S),
    mask_generator=mask_generator), sampler=ResumableSampler(...), collate_fn=simmim_collate)``.
    """

    def __init__(
        self,
        data,
        *,
        batch_size: int,
        mask_generator: MaskGenerator,
        device: str | torch.device = "cpu",
        epochs: int = 1,
        shard_id: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        min_batches: int = 1,
        num_threads: int | None = None,
        image_dtype: torch.dtype = torch.float32,
        mask_source: str = "auto",
        prefetch_queue_depth: int = 2,
        scan_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.epochs = _check_positive_int("epochs", epochs)
        min_batches = _check_positive_int("min_batches", min_batches)
        if not isinstance(mask_generator, MaskGenerator):
            raise TypeError(f"mask_generator: expected a simmim_fast.MaskGenerator, got {type(mask_generator).__name__}")
        self.mask_generator = mask_generator
        self.img_size = mask_generator.input_size
        if image_dtype not in _IMAGE_DTYPES:
            raise ValueError(f"image_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {image_dtype!r}")
        self.image_dtype = image_dtype
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source: expected one of {', '.join(MASK_SOURCES)}, got {mask_source!r}")
        self._init_common(batch_size=batch_size, device=device, shard_id=shard_id, num_shards=num_shards, seed=seed,
                          num_threads=num_threads, prefetch_queue_depth=prefetch_queue_depth)
        files, cache_key = list_image_files(data)
        self._screen(files, cache_key, scan_cache_dir)
        self._sampler = ResumableSampler(
            len(self.files), batch_size=self.batch_size, epochs=self.epochs, rank=self.shard_id,
            world_size=self.num_shards, seed=self.seed, min_batches=min_batches,
        )
        self.mask_mode = self._pick_mask_mode(mask_source)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(files={len(self.files)}, skipped={len(self.scan_skipped)}, batch_size={self.batch_size}, "
                f"img_size={self.img_size}, device={self.device}, shard={self.shard_id}/{self.num_shards}, "
                f"masks={self.mask_mode})")

    def _pick_mask_mode(self, mask_source: str) -> str:
        where = f"MaskGenerator.generate on {self.device}"
        if mask_source == "torch":
            _log_once("masks", "DALI masks: %s (mask_source='torch')", where)
            return "torch"
        if mask_source == "native":
            native.load_plugin()  # raises with every reason when absent
        elif native.try_load_plugin(quiet=True) is None:
            _log_once("masks", "DALI masks: native operator unavailable (%s); using %s (same statistics)",
                      "; ".join(native.plugin_unavailable_reasons()) or "failed to load", where)
            return "torch"
        if self.device.type == "cuda":
            if "gpu" in native.plugin_backends():
                _log_once("masks", "DALI masks: native operator %s, GPU backend", native.loaded_plugin())
                return "native-gpu"
            _log_once("masks", "DALI masks: native operator %s built without CUDA: CPU backend, copied to the GPU "
                      "(rebuild with nvcc for the GPU backend)", native.loaded_plugin())
            return "native-cpu"
        _log_once("masks", "DALI masks: native operator %s, CPU backend", native.loaded_plugin())
        return "native-cpu"

    # ---- iteration -----------------------------------------------------------------------
    def _start(self, indices: np.ndarray, seed: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = build_pipeline(
            [self.files[i] for i in indices], labels=indices.tolist(), batch_size=self.batch_size,
            img_size=self.img_size, device_id=self.device_id, num_threads=self.num_threads, seed=seed,
            image_dtype=self.image_dtype,
            mask_generator=self.mask_generator if self.mask_mode.startswith("native") else None,
            mask_device="gpu" if self.mask_mode == "native-gpu" else "cpu",
            prefetch_queue_depth=self.prefetch_queue_depth,
        )
        names = ["images", "indices"] + (["masks"] if self.mask_mode.startswith("native") else [])
        it = DALIGenericIterator([pipe], names, reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP,
                                 auto_reset=False)
        return pipe, it

    def _batch_rng(self, seed: int) -> torch.Generator | None:
        if self.mask_mode != "torch":
            return None
        return torch.Generator(device=self.device).manual_seed(_derive_seed(seed, 1))

    def _convert(self, out: dict, mask_rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        images = out["images"]
        if self.image_dtype == torch.bfloat16:
            images = images.to(torch.bfloat16)
        self.last_indices = out["indices"].reshape(-1).to(torch.int64).cpu()
        if "masks" in out:
            masks = out["masks"].to(device=images.device, dtype=torch.int64)
        else:
            masks = self.mask_generator.generate(images.shape[0], device=images.device, generator=mask_rng)
            masks = masks.to(torch.int64)
        return images, masks
