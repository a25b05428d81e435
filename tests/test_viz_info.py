"""Tests for simmim_fast.viz (reconstruction grids) and simmim_fast.info (environment report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import info as info_mod
from simmim_fast.viz import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD,
    reconstruction_grid,
    save_reconstruction_grid,
)

# --------------------------------------------------------------------------- viz helpers


def _batch(B=3, H=32, W=48, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, H, W, generator=g)
    pred = torch.randn(B, 3, H, W, generator=g)
    mask = (torch.rand(B, h, w, generator=g) < 0.6).to(torch.int64)
    mask[:, 0, 0] = 1  # at least one masked and one visible cell per image
    mask[:, -1, -1] = 0
    return images, mask, pred


def _tile(arr, row, col, H, W):
    y, x = row * (H + PAD), col * (W + PAD)
    return arr[y : y + H, x : x + W]


def _expected_uint8(x):
    """(3, H, W) normalised -> (H, W, 3) uint8, independently of viz."""
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    d = np.clip(x.numpy() * std + mean, 0.0, 1.0)
    return np.round(d * 255.0).astype(np.uint8).transpose(1, 2, 0)


def _pixel_mask(mask_b, H, W):
    m = mask_b.numpy().astype(bool)
    return np.kron(m, np.ones((H // m.shape[0], W // m.shape[1]), dtype=bool)).astype(bool)


# --------------------------------------------------------------------------- viz


def test_imagenet_constants():
    assert IMAGENET_MEAN == pytest.approx((0.485, 0.456, 0.406))
    assert IMAGENET_STD == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("B,max_images,rows", [(3, 8, 3), (5, 2, 2), (1, 8, 1)])
def test_grid_size_exact(B, max_images, rows):
    H, W = 32, 48
    images, mask, pred = _batch(B=B, H=H, W=W)
    img = reconstruction_grid(images, mask, pred, max_images=max_images)
    assert img.mode == "RGB"
    assert img.size == (4 * W + 3 * PAD, rows * H + (rows - 1) * PAD)


def _hatch(H, W):
    """(H, W, 3) uint8 of the masked-pixel hatch: two blues, no grey a prediction could be confused with."""
    from simmim_fast.viz import HATCH_COLOURS, mask_fill

    h = (mask_fill(H, W).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    colours = {tuple(c) for c in h.reshape(-1, 3).tolist()}
    assert colours == set(HATCH_COLOURS)
    return h


def test_saved_png_has_labels_and_legend(tmp_path):
    from simmim_fast.viz import HEADER

    H, W = 32, 48
    images, mask, pred = _batch(B=2, H=H, W=W)
    path = save_reconstruction_grid(tmp_path / "r.png", images, mask, pred)
    arr = np.asarray(Image.open(path))
    grid = np.asarray(reconstruction_grid(images, mask, pred))
    assert arr.shape == (grid.shape[0] + 2 * HEADER, grid.shape[1], 3)
    assert (arr[HEADER:-HEADER] == grid).all()
    for c in range(4):  # dark label text above each column, legend text below
        assert (arr[:HEADER, c * (W + PAD): c * (W + PAD) + W] < 100).any()
    assert (arr[-HEADER:] < 150).any()
    plain = np.asarray(Image.open(save_reconstruction_grid(tmp_path / "p.png", images, mask, pred, labels=False)))
    assert (plain == grid).all()


def test_grid_pixels():
    H, W = 32, 48
    images, mask, pred = _batch(B=3, H=H, W=W)
    arr = np.asarray(reconstruction_grid(images, mask, pred))
    for r in range(3):
        m = _pixel_mask(mask[r], H, W)
        assert m.any() and (~m).any()
        c1, c2, c3, c4 = (_tile(arr, r, c, H, W) for c in range(4))
        orig, rec = _expected_uint8(images[r]), _expected_uint8(pred[r])
        # column 1 is the denormalised original, column 3 the full prediction
        assert np.abs(c1.astype(int) - orig).max() <= 1
        assert np.abs(c3.astype(int) - rec).max() <= 1
        # column 2: masked pixels hatched, visible pixels = original
        assert (c2[m] == _hatch(H, W)[m]).all()
        assert (c2[~m] == c1[~m]).all()
        # column 4: visible from the original, masked from the prediction
        assert (c4[~m] == c1[~m]).all()
        assert (c4[m] == c3[m]).all()
    # white padding between tiles (vertical strip after column 1, horizontal after row 1)
    assert (arr[:, W : W + PAD] == 255).all()
    assert (arr[H : H + PAD, :] == 255).all()


def test_coarse_mask_192px_bool_mask_and_half_dtype():
    H = W = 192
    images, _, pred = _batch(B=2, H=H, W=W, h=6, w=6)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, :3] = True  # top half masked
    img = reconstruction_grid(images.half(), mask, pred.to(torch.bfloat16))
    assert img.size == (4 * W + 3 * PAD, 2 * H + PAD)
    arr = np.asarray(img)
    c2 = _tile(arr, 1, 1, H, W)
    assert (c2[:96] == _hatch(H, W)[:96]).all()
    assert (c2[96:] == _tile(arr, 1, 0, H, W)[96:]).all()
    assert (_tile(arr, 1, 3, H, W)[:96] == _tile(arr, 1, 2, H, W)[:96]).all()


def test_pixel_level_float_mask_and_clamping():
    H, W = 16, 16
    images, _, _ = _batch(B=1, H=H, W=W)
    pred = torch.full((1, 3, H, W), 100.0)  # far out of range -> clamps to white
    pred[..., 0, 0] = float("nan")
    mask = torch.ones(1, H, W, dtype=torch.float32)
    arr = np.asarray(reconstruction_grid(images, mask, pred))
    c3 = _tile(arr, 0, 2, H, W)
    assert (c3[1:] == 255).all()
    assert (_tile(arr, 0, 1, H, W) == _hatch(H, W)).all()


@pytest.mark.parametrize(
    "which,shape",
    [
        ("images", (2, 1, 32, 32)),  # wrong channel count
        ("images", (3, 32, 32)),  # not 4-D
        ("pred", (2, 3, 32, 16)),  # mismatched with images
        ("mask", (3, 4, 4)),  # wrong batch
        ("mask", (2, 5, 4)),  # 5 does not divide 32
        ("mask", (2, 32 * 32)),  # flat mask
    ],
)
def test_shape_errors_name_argument(which, shape):
    args = {"images": torch.zeros(2, 3, 32, 32), "mask": torch.zeros(2, 4, 4), "pred": torch.zeros(2, 3, 32, 32)}
    args[which] = torch.zeros(shape)
    if which == "images":  # keep pred consistent so the images check is the one hit
        args["pred"] = torch.zeros(shape)
    with pytest.raises(ValueError, match=which):
        reconstruction_grid(args["images"], args["mask"], args["pred"])


def test_save_png_atomic(tmp_path):
    images, mask, pred = _batch(B=2)
    target = tmp_path / "sub" / "dir" / "grid.png"
    out = save_reconstruction_grid(target, images, mask, pred, max_images=1, labels=False)
    assert out == target and target.exists()
    assert os.listdir(target.parent) == ["grid.png"]  # no temp file left behind
    with Image.open(target) as im:
        assert im.format == "PNG"
        reread = np.asarray(im.convert("RGB"))
    assert np.array_equal(reread, np.asarray(reconstruction_grid(images, mask, pred, max_images=1)))
    # overwrite in place, still no leftovers
    save_reconstruction_grid(str(target), images, mask, pred)
    assert os.listdir(target.parent) == ["grid.png"]


def test_save_failure_leaves_no_temp(tmp_path):
    images, mask, pred = _batch(B=1)
    with pytest.raises(ValueError, match="pred"):
        save_reconstruction_grid(tmp_path / "bad.png", images, mask, pred[:, :, :8])
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- info

BACKENDS = ("triton", "xformers", "sdpa", "dali", "dali_gpu", "native_dali_plugin", "ops")


@pytest.fixture(scope="module")
def collected():
    mp = pytest.MonkeyPatch()
    mp.delenv("TRITON_INTERPRET", raising=False)
    try:
        yield info_mod.collect_info()
    finally:
        mp.undo()


def test_collect_info_keys(collected):
    for key in ("python", "platform", "packages", "torch", "backends", "ops"):
        assert key in collected
    for name in BACKENDS:
        b = collected["backends"][name]
        assert set(b) >= {"name", "usable", "version", "reasons"}
        assert isinstance(b["usable"], bool) and isinstance(b["reasons"], list)
        if not b["usable"]:
            assert b["reasons"], name
    for op in info_mod.OP_NAMES:
        assert op in collected["ops"]
    assert collected["backends"]["sdpa"]["usable"]
    json.dumps(collected)  # serialisable as is


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectations")
def test_cpu_expectations(collected):
    xf = collected["backends"]["xformers"]
    assert not xf["usable"]
    assert any("CUDA" in r for r in xf["reasons"])
    tr = collected["backends"]["triton"]
    assert not tr["usable"] and any("TRITON_INTERPRET=1" in r for r in tr["reasons"])
    assert collected["torch"]["cuda_available"] is False
    assert not collected["backends"]["dali_gpu"]["usable"]
    native = collected["backends"]["native_dali_plugin"]
    if not native["usable"]:
        assert native["reasons"] == [info_mod.NATIVE_NOT_BUILT]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectations")
def test_triton_interpret_env(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not info_mod.probe_triton().usable
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    st = info_mod.probe_triton()
    assert st.usable and st.reasons == []


def test_probe_exceptions_become_reasons(monkeypatch):
    def boom():
        raise RuntimeError("kaboom")

    st = info_mod._safe("x", boom)
    assert not st.usable and "kaboom" in st.reasons[0]

    import importlib

    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "simmim_fast.ops":
            raise ImportError("no ops yet")
        return real(name, *a, **k)

    monkeypatch.setattr(info_mod.importlib, "import_module", fake_import)
    status, report = info_mod.probe_ops()
    assert not status.usable
    assert all(r[0].startswith("not importable:") and "no ops yet" in r[0] for r in report.values())


def _run_cli(*args):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-m", "simmim_fast.info", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def test_cli_text():
    p = _run_cli()
    assert p.returncode == 0, p.stderr
    for word in ("torch", "triton", "xformers", "sdpa", "dali", "native_dali_plugin", "mask_token_fill"):
        assert word in p.stdout


def test_cli_json():
    p = _run_cli("--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert set(BACKENDS) <= set(data["backends"])
