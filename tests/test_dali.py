"""The DALI input pipeline in CPU mode (``device_id=None``) end to end on small generated JPEG trees:
shapes, dtypes, normalisation, crop/flip statistics, sharding, epochs and resume, corrupt files,
mask sources, the torch backend's batch contract, and a short training run with --data-backend dali.
GPU checks (mixed decode, GPU masks) skip without CUDA.

Images are 128 x 128 gradients (red = column, green = row), so the crop window and the mirror of
every output can be read back from its pixels.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from simmim_fast import MaskGenerator, train  # noqa: E402
from simmim_fast.data import dali, native  # noqa: E402
from simmim_fast.data.folder import SimMIMImageDataset, simmim_collate  # noqa: E402
from simmim_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_pretrain_transform  # noqa: E402
from simmim_fast.training.sampler import ResumableSampler  # noqa: E402

from test_native_op import fresh_plugin  # noqa: E402  (one plugin copy per process)

CUDA = torch.cuda.is_available()
W = H = 128
S = 96  # crop size: 3 x 3 mask cells of 32 px, 24 x 24 model grid (patch 4)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def gradient_image(shift: int = 0) -> Image.Image:
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    b = np.full((H, W), 64 + 8 * shift, dtype=np.float64)
    return Image.fromarray(np.stack([x, y, b], -1).round().astype(np.uint8))


def make_tree(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = root / f"class{i % 2}" / f"img{i:02d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        gradient_image(i).save(p, quality=95, subsampling=0)
        paths.append(p)
    return paths


def corrupt_files(root: Path) -> dict[str, Path]:
    """A truncated JPEG and a text file named .jpg (screened out), and a PNG with a valid header and
    end chunk but broken image data (passes the screen, fails inside DALI at run time)."""
    good = (root / "class0" / "img00.jpg").read_bytes()
    trunc = root / "class0" / "truncated.jpg"
    trunc.write_bytes(good[: len(good) // 2])
    text = root / "class1" / "notes.jpg"
    text.write_text("this is not an image\n")
    png = root / "class1" / "zz_broken.png"
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)  # incompressible: IEND stays
    Image.fromarray(noise).save(png)
    data = bytearray(png.read_bytes())
    start = data.find(b"IDAT") + 40
    data[start:start + 300] = bytes(300)
    png.write_bytes(bytes(data))
    return {"truncated": trunc, "text": text, "png": png}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dali_tree")
    make_tree(root, 8)
    return root


@pytest.fixture()
def cache(tmp_path) -> Path:
    return tmp_path / "scan_cache"


def loader(data, cache_dir, **kw) -> dali.DaliLoader:
    kw.setdefault("batch_size", 4)
    kw.setdefault("mask_generator", MaskGenerator(S, 32, 4, 0.6))
    kw.setdefault("num_threads", 2)
    kw.setdefault("mask_source", "torch")
    return dali.DaliLoader(data, device="cpu", scan_cache_dir=cache_dir, **kw)


def collect(ld) -> list[tuple[torch.Tensor, torch.Tensor, int, list[int]]]:
    return [(im.clone(), m.clone(), sk, ld.last_indices.tolist()) for im, m, sk in ld]


def crop_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: crop area fraction, crop aspect ratio (w/h, source pixels), mirrored? from the gradients."""
    pix = (images.float() * STD + MEAN) * 255.0  # back to 0..255
    red, green = pix[:, 0], pix[:, 1]
    dx = (red[:, :, -1] - red[:, :, 0]).mean(1)  # along x: + unless mirrored
    dy = (green[:, -1, :] - green[:, 0, :]).mean(1)
    cw = dx.abs() * (W - 1) / 255.0 * S / (S - 1)
    ch = dy.abs() * (H - 1) / 255.0 * S / (S - 1)
    return (cw * ch / (W * H)).numpy(), (cw / ch).numpy(), (dx < 0).numpy()


# --------------------------------------------------------------------------- batches


def test_shapes_dtypes_normalisation(tree, cache):
    ld = loader(tree, cache, epochs=2)
    assert len(ld) == 4 and ld.batches_per_epoch == 2 and ld.mask_mode == "torch"
    g = ld.mask_generator
    batches = collect(ld)
    assert len(batches) == 4
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for images, masks, skipped, _ in batches:
        assert images.shape == (4, 3, S, S) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert masks.shape == (4, 24, 24) and masks.dtype == torch.int64
        assert skipped == 0
        assert (images >= lo - 1e-4).all() and (images <= hi + 1e-4).all()
        assert set(masks.unique().tolist()) <= {0, 1}
        assert (masks.view(4, -1).sum(1) == g.mask_count * g.scale**2).all()
    images = torch.cat([b[0] for b in batches])
    pix = (images * STD + MEAN) * 255.0
    # blue is constant per image (64 + 8 * i for img<i>.jpg): checks mean/std and the channel order
    shift = torch.tensor([float(ld.files[i].stem[3:]) for b in batches for i in b[3]])
    blue = pix[:, 2].mean((1, 2))
    torch.testing.assert_close(blue, 64.0 + 8.0 * shift, atol=2.0, rtol=0)
    assert abs(pix[:, 0].mean().item() - 127.5) < 20 and abs(pix[:, 1].mean().item() - 127.5) < 20


def test_crop_and_flip_statistics(tree, cache):
    """RandomResizedCrop area 0.67-1, aspect 3/4-4/3, p=0.5 mirror, read back from the gradient pixels."""
    ld = loader(tree, cache, epochs=8, batch_size=8, seed=1)
    images = torch.cat([b[0] for b in collect(ld)])
    area, ratio, mirrored = crop_stats(images)
    assert len(area) == 64
    assert area.min() > 0.67 - 0.05 and area.max() < 1.0 + 0.03, (area.min(), area.max())
    assert 0.76 < area.mean() < 0.92, area.mean()  # uniform on [0.67, 1]: mean 0.835
    assert ratio.min() > 0.75 - 0.05 and ratio.max() < 4 / 3 + 0.05, (ratio.min(), ratio.max())
    assert ratio.std() > 0.05  # the aspect ratio varies
    assert 0.3 < mirrored.mean() < 0.7, mirrored.mean()
    # the torch backend's transform gives the same statistics (same recipe)
    tf = build_pretrain_transform(S)
    torch.manual_seed(0)
    ref = torch.stack([tf(gradient_image()) for _ in range(64)])
    area_t, ratio_t, mirrored_t = crop_stats(ref)
    assert abs(area.mean() - area_t.mean()) < 0.05
    assert abs(mirrored.mean() - mirrored_t.mean()) < 0.3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images(tree, cache, dtype):
    ld = loader(tree, cache, image_dtype=dtype)
    images, masks, _ = next(iter(ld))
    ref, _, _ = next(iter(loader(tree, cache)))
    assert images.dtype == dtype and images.shape == (4, 3, S, S)
    torch.testing.assert_close(images.float(), ref, atol=0.02, rtol=0.01)  # same seed: same crops


def test_same_batch_contract_as_torch_backend(tree, cache):
    """Shapes, dtypes, value ranges and mask statistics of a torch-DataLoader batch and a DALI batch."""
    g = MaskGenerator(S, 32, 4, 0.6)
    ds = SimMIMImageDataset(tree, transform=build_pretrain_transform(S), mask_generator=g, seed=0)
    sampler = ResumableSampler(len(ds), batch_size=8, epochs=1)
    t_images, t_masks, t_skipped = next(iter(DataLoader(ds, batch_size=8, sampler=sampler, collate_fn=simmim_collate)))
    d_images, d_masks, d_skipped = next(iter(loader(tree, cache, batch_size=8, mask_generator=g)))
    assert t_images.shape == d_images.shape and t_images.dtype == d_images.dtype
    assert t_masks.shape == d_masks.shape and t_masks.dtype == d_masks.dtype
    assert t_skipped == d_skipped == 0
    for c in range(3):  # per-channel value ranges agree (same images, same normalisation)
        assert abs(t_images[:, c].min() - d_images[:, c].min()) < 0.15
        assert abs(t_images[:, c].max() - d_images[:, c].max()) < 0.15
        assert abs(t_images[:, c].mean() - d_images[:, c].mean()) < 0.25
    np.testing.assert_array_equal(t_masks.view(8, -1).sum(1).numpy(), d_masks.view(8, -1).sum(1).numpy())
    assert t_masks.float().mean() == d_masks.float().mean()


# --------------------------------------------------------------------------- order, shards, epochs, resume


def test_two_shards_cover_the_set_once_per_epoch(tree, cache):
    shards = [loader(tree, cache, batch_size=2, epochs=2, shard_id=r, num_shards=2, seed=4) for r in range(2)]
    seen = [[idx for b in collect(ld) for idx in b[3]] for ld in shards]
    per_epoch = 4  # 8 files / (2 shards x batch 2) = 2 batches of 2 per shard and epoch
    for epoch in range(2):
        a = seen[0][epoch * per_epoch:(epoch + 1) * per_epoch]
        b = seen[1][epoch * per_epoch:(epoch + 1) * per_epoch]
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(8))
    assert seen[0][:per_epoch] != seen[0][per_epoch:]  # reshuffled per epoch
    # the same samples per rank and step as the torch backend's ResumableSampler
    for r in range(2):
        s = ResumableSampler(8, batch_size=2, epochs=2, rank=r, world_size=2, seed=4)
        assert seen[r] == [i for i, _ in s]


def test_resume_starts_at_the_right_sample(tree, cache):
    full = [b[3] for b in collect(loader(tree, cache, batch_size=2, epochs=2, seed=2))]
    ld = loader(tree, cache, batch_size=2, epochs=2, seed=2)
    ld.set_start(1, 1)  # epoch 1, batch 1
    resumed = [b[3] for b in collect(ld)]
    assert len(ld) == len(resumed) == 3
    assert resumed == full[4 + 1:]
    with pytest.raises(ValueError, match="batch"):
        ld.set_start(0, 4)


def test_seeded_runs_are_reproducible(tree, cache):
    a = collect(loader(tree, cache, seed=5))
    b = collect(loader(tree, cache, seed=5))
    c = collect(loader(tree, cache, seed=6))
    for x, y in zip(a, b):
        torch.testing.assert_close(x[0], y[0], atol=0, rtol=0)
        torch.testing.assert_close(x[1], y[1], atol=0, rtol=0)
    assert not torch.equal(a[0][0], c[0][0])


def test_file_list_source(tree, tmp_path, cache):
    files = sorted(tree.rglob("*.jpg"))[:4]
    lst = tmp_path / "train.txt"
    lst.write_text("# name label\n" + "".join(f"{os.path.relpath(f, tmp_path)} {i}\n" for i, f in enumerate(files)) + "\n")
    ld = loader(lst, cache, batch_size=2)
    assert ld.files == [f.resolve() for f in files]
    assert len(collect(ld)) == 2


# --------------------------------------------------------------------------- corrupt files


def test_corrupt_files_skipped_and_counted(tmp_path, cache, caplog):
    root = tmp_path / "tree"
    make_tree(root, 6)
    bad = corrupt_files(root)
    caplog.set_level(logging.INFO, logger="simmim_fast.data.dali")
    ld = loader(root, cache, batch_size=2, epochs=3, seed=0)
    skipped_names = {p.name for p, _ in ld.scan_skipped}
    assert skipped_names == {"truncated.jpg", "notes.jpg"}  # screened; the PNG passes the screen
    reasons = dict((p.name, r) for p, r in ld.scan_skipped)
    assert "truncated" in reasons["truncated.jpg"] and "not an image" in reasons["notes.jpg"]
    png_index = ld.files.index(bad["png"].resolve())
    batches = collect(ld)  # never fatal: DALI's failure on the PNG is recovered
    assert len(batches) == len(ld) == 3 * (7 // 2)
    assert all(png_index not in b[3] for b in batches)
    total = sum(b[2] for b in batches)
    assert batches[0][2] >= 2  # the screened files are reported with the first batch
    assert total >= 3  # + every sample whose PNG was replaced
    assert "could not decode" in caplog.text and "zz_broken.png" in caplog.text
    # the next scan of this tree leaves the PNG out from the start (cached verdict)
    again = loader(root, cache, batch_size=2)
    assert {p.name for p, _ in again.scan_skipped} == {"truncated.jpg", "notes.jpg", "zz_broken.png"}


def test_check_image_file_reasons(tmp_path):
    ok = tmp_path / "ok.jpg"
    gradient_image().save(ok)
    assert dali.check_image_file(ok) is None
    no_eoi = tmp_path / "no_eoi.jpg"
    no_eoi.write_bytes(ok.read_bytes()[:-2])  # only the end marker missing: PIL's full decode decides,
    try:  # as in the torch backend's data set
        with Image.open(no_eoi) as img:
            img.load()
        pil_ok = True
    except OSError:
        pil_ok = False
    assert (dali.check_image_file(no_eoi) is None) == pil_ok
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert dali.check_image_file(empty) == "empty file"
    gif = tmp_path / "anim.jpg"
    gradient_image().save(gif, format="GIF")
    assert "GIF" in dali.check_image_file(gif)
    assert "FileNotFoundError" in dali.check_image_file(tmp_path / "missing.jpg")


def test_all_files_unreadable(tmp_path, cache):
    (tmp_path / "a.jpg").write_text("nope")
    with pytest.raises(ValueError, match="none of the 1 files"):
        loader(tmp_path, cache)


# --------------------------------------------------------------------------- masks


def test_native_masks_in_pipeline(tree, cache, tmp_path_factory):
    fresh_plugin(tmp_path_factory)
    g = MaskGenerator(S, 32, 4, 0.6, strategy="block")
    ld = loader(tree, cache, mask_source="native", mask_generator=g, epochs=2, seed=3)
    assert ld.mask_mode == "native-cpu"
    batches = collect(ld)
    for _, masks, _, _ in batches:
        assert masks.dtype == torch.int64 and masks.shape == (4, 24, 24)
        c = masks[:, ::8, ::8]
        torch.testing.assert_close(masks, c.repeat_interleave(8, 1).repeat_interleave(8, 2))
        assert (c.reshape(4, -1).sum(1) == g.mask_count).all()
    again = collect(loader(tree, cache, mask_source="native", mask_generator=g, epochs=2, seed=3))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(batches, again))  # seeded by the pipeline seed
    auto = loader(tree, cache, mask_source="auto")
    assert auto.mask_mode == "native-cpu"  # auto finds the loaded plugin


def test_missing_plugin_falls_back_to_torch_masks_logged_once(tree, cache, monkeypatch, caplog):
    monkeypatch.setattr(native, "try_load_plugin", lambda *a, **k: None)
    monkeypatch.setattr(native, "plugin_unavailable_reasons", lambda: ["not built (test)"])
    monkeypatch.setattr(dali, "_logged", set())
    caplog.set_level(logging.INFO, logger="simmim_fast.data.dali")
    lds = [loader(tree, cache, mask_source="auto") for _ in range(2)]
    assert [ld.mask_mode for ld in lds] == ["torch", "torch"]
    assert caplog.text.count("native operator unavailable (not built (test))") == 1
    _, masks, _ = next(iter(lds[0]))
    g = lds[0].mask_generator
    assert (masks.view(4, -1).sum(1) == g.mask_count * g.scale**2).all()


# --------------------------------------------------------------------------- backend choice and bad input


def test_select_data_backend(monkeypatch, caplog):
    monkeypatch.setattr(dali, "_logged", set())
    caplog.set_level(logging.INFO, logger="simmim_fast.data.dali")
    assert dali.select_data_backend("auto", "cpu") == "torch"
    assert "auto uses DALI only on CUDA" in caplog.text
    assert dali.select_data_backend("dali", "cpu") == "dali"
    assert dali.select_data_backend("torch", "cpu") == "torch"
    assert caplog.text.count("data backend:") == 1  # logged once per process
    with pytest.raises(ValueError, match="--data-backend"):
        dali.select_data_backend("nvidia", "cpu")
    monkeypatch.setattr(dali, "dali_unavailable_reasons", lambda device=None: ["nvidia.dali not importable (test)"])
    with pytest.raises(ValueError, match="not importable"):
        dali.select_data_backend("dali", "cpu")
    assert dali.select_data_backend("auto", "cpu") == "torch"


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(shard_id=2, num_shards=2), ValueError, "shard_id"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(image_dtype=torch.int32), ValueError, "image_dtype"),
        (dict(mask_source="numpy"), ValueError, "mask_source"),
        (dict(mask_generator="random"), TypeError, "mask_generator"),
        (dict(num_threads=0), ValueError, "num_threads"),
    ],
)
def test_bad_arguments(tree, cache, kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        loader(tree, cache, **kwargs)


def test_bad_data_and_device(tree, tmp_path, cache):
    with pytest.raises(ValueError, match="device"):
        dali.DaliLoader(tree, batch_size=2, mask_generator=MaskGenerator(S, 32, 4), device="tpu")
    with pytest.raises(FileNotFoundError, match="data"):
        loader(tmp_path / "nowhere", cache)
    with pytest.raises(ValueError, match="is an image"):
        loader(next(tree.rglob("*.jpg")), cache)
    with pytest.raises(TypeError, match="data"):
        loader(42, cache)


# --------------------------------------------------------------------------- training CLI


def test_training_run_with_dali_backend_and_resume(tmp_path, tmp_path_factory, monkeypatch):
    fresh_plugin(tmp_path_factory)  # masks from the native operator
    monkeypatch.setenv("SIMMIM_FAST_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    make_tree(root, 6)
    corrupt_files(root)
    out = tmp_path / "run"
    common = ["--data", str(root), "--data-backend", "dali", "--img-size", str(S), "--batch-size", "2",
              "--num-workers", "1", "--output", str(out), "--log-every", "1"]
    assert train.main([*common, "--max-steps", "2"]) == 0
    assert train.main([*common, "--max-steps", "3", "--resume"]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert int(rows[0]["skipped_images"]) >= 2  # truncated + text file, counted, not fatal
    assert train.parse_args(["--data-backend", "torch"]).data_backend == "torch"


# --------------------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_pipeline_mixed_decode(tree, cache, tmp_path_factory):
    fresh_plugin(tmp_path_factory)
    g = MaskGenerator(S, 32, 4, 0.6)
    ld = dali.DaliLoader(tree, batch_size=4, mask_generator=g, device="cuda", scan_cache_dir=cache, epochs=2)
    assert ld.mask_mode == ("native-gpu" if "gpu" in native.plugin_backends() else "native-cpu")
    for images, masks, _ in ld:
        assert images.is_cuda and masks.is_cuda
        assert images.shape == (4, 3, S, S) and images.dtype == torch.float32
        assert (masks.view(4, -1).sum(1) == g.mask_count * g.scale**2).all()
    # crop/flip statistics match CPU mode's recipe
    cpu = torch.cat([b[0] for b in collect(loader(tree, cache, epochs=8, batch_size=8, seed=1))])
    gpu_ld = dali.DaliLoader(tree, batch_size=8, mask_generator=g, device="cuda", scan_cache_dir=cache, epochs=8,
                             seed=1, mask_source="torch")
    gpu = torch.cat([b[0].cpu() for b in collect(gpu_ld)])
    assert abs(crop_stats(gpu)[0].mean() - crop_stats(cpu)[0].mean()) < 0.05
    assert 0.3 < crop_stats(gpu)[2].mean() < 0.7


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_dali_on_cuda(monkeypatch):
    monkeypatch.setattr(dali, "_logged", set())
    assert dali.select_data_backend("auto", "cuda") == "dali"
