"""Tests for the data pipeline: transforms, image-folder dataset, default data set."""
from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from simmim_fast.data.default_data import DEFAULT_IMAGE_NAMES, default_data_dir
from simmim_fast.data.folder import IMG_EXTENSIONS, SimMIMImageDataset, find_images, simmim_collate
from simmim_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_pretrain_transform, denormalize

S = 32  # small crop size keeps the tests fast
MASK_HW = (8, 8)


class StubMask:
    """Tiny stand-in for the real mask generator: fixed-size 0/1 mask drawn from ``rng``."""

    def __call__(self, *, rng: np.random.Generator) -> np.ndarray:
        return (rng.random(MASK_HW) < 0.5).astype(np.int64)


def _photo(i: int, size=(120, 90)) -> Image.Image:
    import skimage.data as skdata

    arrays = [skdata.astronaut, skdata.chelsea, skdata.coffee, skdata.rocket, skdata.camera]
    arr = arrays[i % len(arrays)]()
    img = Image.fromarray(arr)
    return img.resize(size, Image.BILINEAR)


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# Sorted order (relative path parts) of the generated tree; corrupt files marked with *:
#   a/bad.jpg*  a/img0.jpg  a/img1.PNG  b/c/img2.JPEG  b/img3.png  b/trunc.jpg*  top.jpg
EXPECTED = ["a/bad.jpg", "a/img0.jpg", "a/img1.PNG", "b/c/img2.JPEG", "b/img3.png", "b/trunc.jpg", "top.jpg"]
CORRUPT = {"a/bad.jpg", "b/trunc.jpg"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("imgs")
    (root / "a").mkdir()
    (root / "b" / "c").mkdir(parents=True)
    _photo(0).save(root / "a" / "img0.jpg", format="JPEG", quality=90)
    _photo(1).save(root / "a" / "img1.PNG", format="PNG")
    _photo(2).save(root / "b" / "c" / "img2.JPEG", format="JPEG", quality=90)
    _photo(4).convert("L").save(root / "b" / "img3.png", format="PNG")  # grayscale -> RGB
    _photo(3).save(root / "top.jpg", format="JPEG", quality=90)
    good = _jpeg_bytes(_photo(0))
    (root / "b" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (root / "a" / "bad.jpg").write_text("this is not an image\n")
    (root / "a" / "notes.txt").write_text("ignored\n")
    (root / "b" / "c" / "data.npy").write_bytes(b"ignored")
    return root


def _dataset(root, **kw) -> SimMIMImageDataset:
    return SimMIMImageDataset(root, transform=build_pretrain_transform(S), mask_generator=StubMask(), **kw)


# ----------------------------------------------------------------------------- find_images

def test_find_images_recursive_sorted_case_insensitive(tree):
    files = find_images(tree)
    assert all(isinstance(p, pathlib.Path) for p in files)
    assert [p.relative_to(tree).as_posix() for p in files] == EXPECTED
    assert find_images(str(tree)) == files  # str accepted, deterministic


def test_find_images_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="data"):
        find_images(tmp_path / "does_not_exist")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as info:
        find_images(tmp_path / "empty")
    assert "empty" in str(info.value) and ".jpg" in str(info.value)
    with pytest.raises(FileNotFoundError):
        _dataset(tmp_path / "nope")


def test_truncated_jpeg_is_unreadable_in_pil(tree):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(OSError, match="truncated"):
        with Image.open(tree / "b" / "trunc.jpg") as img:
            img.load()


# ----------------------------------------------------------------------------- transforms

def test_build_pretrain_transform_validates_img_size():
    for bad in (0, -3, 1.5, "192", True):
        with pytest.raises(ValueError, match="img_size"):
            build_pretrain_transform(bad)
    t = build_pretrain_transform(S)
    out = t(_photo(0).convert("L"))  # grayscale input becomes RGB
    assert out.shape == (3, S, S) and out.dtype == torch.float32


def test_transform_flips_about_half_the_time():
    # Left half black, right half white. The crop always covers > 70 % of the width (scale >= 0.67,
    # ratio <= 4/3 on a square image), so the first column is black iff the image was not flipped.
    arr = np.zeros((96, 96, 3), np.uint8)
    arr[:, 48:] = 255
    img = Image.fromarray(arr)
    t = build_pretrain_transform(S)
    flips = []
    for seed in range(24):
        torch.manual_seed(seed)
        out = t(img)
        left, right = out[:, :, 0].mean().item(), out[:, :, -1].mean().item()
        assert left != pytest.approx(right)
        flips.append(left > right)
    assert 4 <= sum(flips) <= 20, flips


def test_denormalize_inverts_normalize():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 7, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normed = (x - mean) / std
    torch.testing.assert_close(denormalize(normed), x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(denormalize(normed[0]), x[0], atol=1e-6, rtol=1e-6)
    assert denormalize(torch.full((3, 2, 2), 100.0)).max() == 1.0
    assert denormalize(torch.full((3, 2, 2), -100.0)).min() == 0.0
    with pytest.raises(ValueError):
        denormalize(torch.zeros(4, 5, 5))


# ----------------------------------------------------------------------------- dataset

def test_dataset_shapes_normalisation_and_skips(tree):
    ds = _dataset(tree)
    assert len(ds) == len(EXPECTED)
    total_skipped = 0
    lo, hi = [], []
    for i in range(len(ds)):
        image, mask, skipped = ds[(i, 1000 + i)]
        assert image.shape == (3, S, S) and image.dtype == torch.float32
        assert mask.shape == MASK_HW and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1}
        # each corrupt file is followed by a good one -> exactly one skip for its index
        assert skipped == (1 if EXPECTED[i] in CORRUPT else 0)
        total_skipped += skipped
        lo.append(image.amin(dim=(1, 2)))
        hi.append(image.amax(dim=(1, 2)))
    assert total_skipped == len(CORRUPT)
    lo, hi = torch.stack(lo).min(0).values, torch.stack(hi).max(0).values
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.all(lo >= (0 - mean) / std - 1e-4) and torch.all(hi <= (1 - mean) / std + 1e-4)
    assert lo.min() > -2.2 and hi.max() < 2.7
    assert lo.max() < -0.5 and hi.min() > 0.5  # real photos span a good part of the range


def test_dataset_determinism_and_global_rng_untouched(tree):
    ds = _dataset(tree)
    torch.manual_seed(123)
    np.random.seed(7)
    state, np_state = torch.get_rng_state(), np.random.get_state()
    a_img, a_mask, _ = ds[(1, 42)]
    b_img, b_mask, _ = ds[(1, 42)]
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    c_img, c_mask, _ = ds[(1, 43)]
    assert not torch.equal(a_img, c_img)
    assert not torch.equal(a_mask, c_mask)
    # plain int keys: deterministic, derived from (seed, index)
    assert torch.equal(ds[2][0], ds[2][0])
    assert torch.equal(_dataset(tree, seed=5)[2][0], _dataset(tree, seed=5)[2][0])
    assert not torch.equal(_dataset(tree, seed=5)[2][0], ds[2][0])
    assert torch.equal(ds[-1][0], ds[len(ds) - 1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_corrupt_substitute_is_next_image(tree):
    ds = _dataset(tree)
    bad = EXPECTED.index("a/bad.jpg")
    img_bad, mask_bad, skipped = ds[(bad, 9)]
    img_next, mask_next, _ = ds[(bad + 1, 9)]
    assert skipped == 1
    assert torch.equal(img_bad, img_next) and torch.equal(mask_bad, mask_next)


def test_max_skip_raises_with_file_names(tmp_path):
    (tmp_path / "x1.jpg").write_text("nope")
    (tmp_path / "x2.png").write_bytes(b"\x89PNG garbage")
    ds = _dataset(tmp_path, max_skip=64)
    with pytest.raises(RuntimeError) as info:
        ds[0]
    assert "x1.jpg" in str(info.value) and "x2.png" in str(info.value)
    _photo(0).save(tmp_path / "x3.jpg")
    ds = _dataset(tmp_path, max_skip=1)  # x1 -> x2 -> (x3 would be the 3rd try)
    with pytest.raises(RuntimeError, match="x2.png"):
        ds[(0, 1)]
    assert ds[(1, 1)][2] == 1
    assert _dataset(tmp_path, max_skip=2)[(0, 1)][2] == 2


def test_dataloader_workers_match_single_process(tree):
    ds = _dataset(tree)
    keys = [(i % len(ds), 500 + 17 * i) for i in range(10)]
    g = torch.Generator().manual_seed(0)
    keys = [keys[j] for j in torch.randperm(len(keys), generator=g).tolist()]

    def run(workers):
        loader = DataLoader(ds, batch_size=3, sampler=keys, num_workers=workers, collate_fn=simmim_collate)
        return list(loader)

    single, multi = run(0), run(2)
    assert len(single) == len(multi) == 4
    for (i0, m0, s0), (i1, m1, s1) in zip(single, multi):
        assert i0.shape[1:] == (3, S, S) and m0.shape[1:] == MASK_HW
        assert torch.equal(i0, i1) and torch.equal(m0, m1) and s0 == s1
    expected_skips = sum(EXPECTED[k[0]] in CORRUPT for k in keys)
    assert sum(b[2] for b in single) == expected_skips


def test_simmim_collate():
    batch = [(torch.zeros(3, 4, 4), torch.ones(2, 2, dtype=torch.long), k) for k in (0, 2, 1)]
    images, masks, skipped = simmim_collate(batch)
    assert images.shape == (3, 3, 4, 4) and masks.shape == (3, 2, 2) and skipped == 3
    assert isinstance(skipped, int)


# ----------------------------------------------------------------------------- default data

def test_default_data_dir_writes_and_is_idempotent(tmp_path, monkeypatch):
    out = default_data_dir(tmp_path)
    assert out == tmp_path / "default_images"
    files = sorted(out.glob("*.jpg"))
    assert len(files) >= 10
    assert {f.stem for f in files} == set(DEFAULT_IMAGE_NAMES)
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG"
            img.load()
            assert img.mode == "RGB" and min(img.size) >= 128
    assert not [p for p in out.iterdir() if p.suffix not in IMG_EXTENSIONS]  # no temp leftovers
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    assert default_data_dir(tmp_path) == out
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.jpg")} == mtimes
    # environment variable default
    monkeypatch.setenv("SIMMIM_FAST_CACHE", str(tmp_path / "envcache"))
    assert default_data_dir() == tmp_path / "envcache" / "default_images"
    ds = _dataset(out)
    assert len(ds) == len(files) and ds[(0, 0)][0].shape == (3, S, S)


def test_unreadable_files_are_named_once_each(tree, caplog):
    """The skip count alone never said which file; each unreadable file is named in one warning."""
    import logging

    ds = _dataset(tree)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # a second pass over the same files adds no warning
            for i in range(len(ds)):
                ds[(i, 1000 + i)]
    named = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(named) == min(len(CORRUPT), ds.NAMED_SKIPS)
    assert all(any(str(c) in m for m in named) for c in list(CORRUPT)[: ds.NAMED_SKIPS])
