"""Data faults (issue 15, item 6): symlink loops, repeated files, 16-bit images, duplicated validation
files, the DALI scan cache after a file becomes readable, empty class folders, unreadable fine-tuning
files named and counted.

Every case here failed on the code before the fix: loops hung the folder scan (``os.walk`` with
``followlinks=True`` follows a link to a parent until the path is too long: 2 such links make 2^40
paths), one self-link repeated every image 41 times, 16-bit grayscale PNGs came out almost white,
an unreadable validation file was replaced by a copy of the next one (and counted twice), a cached
"permission denied" verdict kept excluding a file after ``chmod``, empty class folders were dropped
silently (shifting the labels of the classes after them).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from simmim_fast.data.classification import (
    ClassificationFolder, ShardSampler, build_eval_transform, classification_collate, find_classes, split_dirs,
)
from simmim_fast.data.decode import to_rgb
from simmim_fast.data.folder import SimMIMImageDataset, find_images
from simmim_fast.data.transforms import ConvertRGB, build_pretrain_transform


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the test session) when the block runs longer than ``seconds``."""

    def boom(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (a symlink loop followed without end?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(path)
    return path


class _Mask:
    def __call__(self, *, rng):
        return np.zeros((4, 4), np.int64)


# --------------------------------------------------------------------------- symlinks


@pytest.fixture()
def looped(tmp_path) -> Path:
    """root/{a,b}/img.png, a/up -> .. and b/up -> .. (two loops), self -> . (a self-link), a file link."""
    root = tmp_path / "data"
    _png(root / "a" / "img.png", 10)
    _png(root / "b" / "img.png", 20)
    _png(root / "top.png", 30)
    os.symlink("..", root / "a" / "up")
    os.symlink("..", root / "b" / "up")
    os.symlink(".", root / "self")
    os.symlink("../top.png", root / "b" / "top_link.png")  # a second path to top.png
    os.link(root / "a" / "img.png", root / "a" / "hard.png")  # a hard link: the same file again
    return root


def test_symlink_loops_are_followed_once_per_real_folder(looped):
    with deadline(20):
        files = find_images(looped)
    # of several paths to one file the first in sorted order is kept (a/hard.png = a/img.png, b/top_link.png = top.png)
    assert [p.relative_to(looped).as_posix() for p in files] == ["a/hard.png", "b/img.png", "b/top_link.png"]
    assert len({os.path.realpath(p) for p in files}) == 3 and len({p.stat().st_ino for p in files}) == 3
    # the pretraining data set (torch backend) and the DALI file list see the same three files
    with deadline(20):
        ds = SimMIMImageDataset(looped, transform=build_pretrain_transform(16), mask_generator=_Mask())
    assert len(ds) == 3


def test_dali_file_list_has_each_real_file_once(looped):
    pytest.importorskip("nvidia.dali")
    from simmim_fast.data.dali import list_image_files

    with deadline(20):
        files, _ = list_image_files(looped)
    assert len(files) == len(set(files)) == 3


def test_a_self_symlinked_folder_repeats_no_image(tmp_path):
    root = tmp_path / "d"
    for i in range(3):
        _png(root / f"{i}.png", i)
    os.symlink(str(root), root / "again")  # absolute link to itself
    with deadline(20):
        assert len(find_images(root)) == 3


def test_class_folders_with_loops_and_shared_files(tmp_path):
    root = tmp_path / "cls"
    _png(root / "cat" / "1.png")
    _png(root / "dog" / "1.png")
    os.symlink("..", root / "cat" / "loop")  # cat/loop/dog/1.png is dog's image: it stays dog's
    with deadline(20):
        ds = ClassificationFolder(root, transform=None)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 1]
    assert [p.relative_to(root).as_posix() for p, _ in ds.samples] == ["cat/1.png", "dog/1.png"]


# --------------------------------------------------------------------------- 16-bit images

GRAY16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
EXPECTED8 = ((GRAY16.astype(np.int64) + 128) // 257).astype(np.uint8)


def _gray16_files(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    png, tif32 = root / "g16.png", root / "g32.tif"
    Image.fromarray(GRAY16).save(png)  # 16-bit grayscale PNG: PIL mode I;16
    Image.fromarray(GRAY16.astype(np.int32)).save(tif32)  # 32-bit integer TIFF: PIL mode I
    return [png, tif32]


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path):
    for path in _gray16_files(tmp_path):
        with Image.open(path) as img:
            assert img.mode in ("I;16", "I")
            rgb = np.asarray(to_rgb(img))
        assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
        np.testing.assert_array_equal(rgb[..., 0], EXPECTED8)
        np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])
        with Image.open(path) as img:
            np.testing.assert_array_equal(np.asarray(ConvertRGB()(img))[..., 0], EXPECTED8)  # eval transforms
    # a mid-grey 16-bit image is mid-grey, not white, through every loader
    mid = tmp_path / "mid" / "c0" / "mid.png"
    mid.parent.mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(mid)
    ds = SimMIMImageDataset(mid.parent, transform=lambda im: torch.from_numpy(np.asarray(im).copy()),
                            mask_generator=_Mask())
    assert ds[0][0].unique().tolist() == [128]
    _png(tmp_path / "mid" / "c1" / "x.png")
    cls = ClassificationFolder(tmp_path / "mid", transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert cls[0][0].unique().tolist() == [128]


def test_16_bit_png_matches_dalis_decoder(tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    png = _gray16_files(tmp_path)[0]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        encoded, _ = fn.readers.file(files=[str(png)])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    with Image.open(png) as img:
        np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(to_rgb(img)))


# --------------------------------------------------------------------------- validation files


@pytest.fixture()
def val_dir(tmp_path) -> Path:
    """2 classes x 3 images, values 0..5 (one grey level per file), class b's middle file unreadable."""
    root = tmp_path / "val"
    for k in range(6):
        _png(root / ("a" if k < 3 else "b") / f"{k}.png", value=10 * k)
    (root / "b" / "4.png").write_text("not an image\n")
    return root


def _level(image: torch.Tensor) -> int:
    return int(image.flatten()[0].item())


def test_unreadable_validation_files_are_dropped_not_duplicated(val_dir, caplog):
    to_level = lambda im: torch.tensor([np.asarray(im)[0, 0, 0]])  # noqa: E731  (the file's grey level)
    ds = ClassificationFolder(val_dir, transform=to_level, on_unreadable="drop")
    dl = DataLoader(ds, batch_size=2, sampler=ShardSampler(len(ds)), collate_fn=classification_collate)
    with caplog.at_level(logging.WARNING):
        batches = list(dl)
    levels = [_level(im) for images, _, _ in batches for im in images]
    labels = [int(x) for _, lab, _ in batches for x in lab]
    assert sorted(levels) == [0, 10, 20, 30, 50]  # every readable file once, 40 (unreadable) nowhere
    assert labels == [0, 0, 0, 1, 1] and sum(s for _, _, s in batches) == 1
    assert any("4.png" in r.getMessage() for r in caplog.records)
    # a batch made only of unreadable files is empty, not a copy of a readable one
    images, labels, skipped = classification_collate([ds[4], ds[4]])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 2
    # training keeps the pretraining rule: the next readable file, counted
    train = ClassificationFolder(val_dir, transform=to_level)
    image, label, skipped = train[4]
    assert (_level(image), label, skipped) == (50, 1, 1)
    with pytest.raises(ValueError, match="on_unreadable"):
        ClassificationFolder(val_dir, transform=to_level, on_unreadable="skip")


def test_finetune_evaluation_counts_only_readable_images(val_dir):
    from simmim_fast import finetune
    from simmim_fast.training.distributed import DistInfo

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    _, loader = finetune.val_loader(val_dir, ["a", "b"], img_size=48, batch_size=1, workers=0, info=info)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 48 * 48, 2))
    res = finetune.evaluate(model, loader, device=info.device, autocast=contextlib.nullcontext(), info=info,
                            num_classes=2)
    assert res["images"] == 5


def test_dali_eval_drops_a_file_that_fails_inside_dali(tmp_path):
    """A PNG with a valid header and end chunk but broken data passes the screen and fails in DALI: the
    evaluation loader leaves it out (training replaces it), each other image read exactly once."""
    pytest.importorskip("nvidia.dali")
    from simmim_fast.data.dali_classification import DaliEvalLoader

    root = tmp_path / "val"
    for c in ("a", "b"):
        for k in range(3):
            _png(root / c / f"{k}.png", value=40 * k)
    broken = root / "b" / "1.png"
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(broken)
    data = bytearray(broken.read_bytes())
    start = data.find(b"IDAT") + 40
    data[start:start + 300] = bytes(300)
    broken.write_bytes(bytes(data))
    ld = DaliEvalLoader(root, classes=["a", "b"], batch_size=2, img_size=40, device="cpu", num_threads=1,
                        scan_cache_dir=tmp_path / "cache")
    assert len(ld.files) == 6  # passed the screen
    seen, skipped, labels = [], 0, []
    for images, lab, sk in ld:
        seen += ld.last_indices.tolist()
        labels += lab.tolist()
        skipped += sk
    bad = ld.files.index(broken)
    assert sorted(seen) == [i for i in range(6) if i != bad] and skipped == 1
    assert labels == [0, 0, 0, 1, 1] and ld.num_images == 5
    # a second pass leaves it out from the start
    assert sorted(i for _ in ld for i in ld.last_indices.tolist()) == sorted(seen)


# --------------------------------------------------------------------------- DALI scan cache


def test_dali_scan_cache_uses_a_file_again_once_it_is_readable(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from simmim_fast.data import dali

    files = [_png(tmp_path / "imgs" / f"{i}.png", 50 * i) for i in range(3)]
    locked = files[1]
    real_open = open

    def open_as_user(path, *args, **kwargs):  # root reads any file: make permission bits count as for a user
        if Path(path) == locked and not os.stat(path).st_mode & 0o444:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(dali, "open", open_as_user, raising=False)
    cache = tmp_path / "cache"
    scan = lambda: dali.scan_image_files(files, cache_key="dir:test", cache_dir=cache)  # noqa: E731
    os.chmod(locked, 0)
    try:
        first = scan()
        assert first.files == [files[0], files[2]] and "Permission" in first.skipped[0][1]
    finally:
        os.chmod(locked, 0o644)
    again = scan()  # chmod changed the ctime: the cached verdict no longer applies
    assert again.files == files and again.cached == 2

    # a file that could not be opened is checked again even when nothing about it changed
    # (a parent folder's permissions, another user), while content verdicts stay cached
    (tmp_path / "imgs" / "text.png").write_text("not a png\n")
    files.append(tmp_path / "imgs" / "text.png")
    state = {"deny": True}

    def flaky(path, *args, **kwargs):
        if Path(path) == files[0] and state["deny"]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(dali, "open", flaky, raising=False)
    cache2 = tmp_path / "cache2"
    first = dali.scan_image_files(files, cache_key="dir:test2", cache_dir=cache2)
    assert [p.name for p, _ in first.skipped] == ["0.png", "text.png"]
    state["deny"] = False
    second = dali.scan_image_files(files, cache_key="dir:test2", cache_dir=cache2)
    assert second.files == files[:3] and [p.name for p, _ in second.skipped] == ["text.png"]
    assert second.cached == 3  # 1.png, 2.png and the text file's verdict were reused


# --------------------------------------------------------------------------- class folders


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        _png(root / split / "ant" / "0.png")
        _png(root / split / "cow" / "0.png")
        (root / split / "bee").mkdir()  # empty in both: the labels of cow would shift silently
        (root / split / "bee" / "readme.txt").write_text("no images here\n")
    with pytest.raises(ValueError) as info:
        split_dirs(root)
    msg = str(info.value)
    assert str(root / "train" / "bee") in msg and "label" in msg
    with pytest.raises(ValueError, match="bee"):
        ClassificationFolder(root / "val", transform=None)
    # val alone having the empty folder is named too
    _png(root / "train" / "bee" / "0.png")
    with pytest.raises(ValueError, match=str(root / "val" / "bee")):
        split_dirs(root)
    _png(root / "val" / "bee" / "0.png")
    assert split_dirs(root)[2] == ["ant", "bee", "cow"]
    # hidden folders are not classes
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "val" / ".ipynb_checkpoints").mkdir()
    assert find_classes(root / "train") == ["ant", "bee", "cow"]
    # a class folder that is a link to another class has no images of its own
    os.symlink(root / "train" / "ant", root / "train" / "zebra")
    with pytest.raises(ValueError, match="symlink"):
        find_classes(root / "train")


def test_unreadable_fine_tuning_files_are_skipped_named_and_counted(val_dir, caplog):
    tf = build_eval_transform(16)
    ds = ClassificationFolder(val_dir, transform=tf)
    with caplog.at_level(logging.WARNING):
        samples = [ds[i] for i in range(len(ds))]
    assert sum(s for _, _, s in samples) == 1
    named = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(named) == 1 and str(val_dir / "b" / "4.png") in named[0]
    (val_dir / "a" / "0.png").write_text("x")
    (val_dir / "a" / "1.png").write_text("x")
    (val_dir / "a" / "2.png").write_text("x")
    with pytest.raises(RuntimeError, match="max_skip=2"):
        ClassificationFolder(val_dir, transform=tf, max_skip=2)[0]
