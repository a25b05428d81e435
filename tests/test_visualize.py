"""Tests for simmim_fast.visualize (reconstruction PNGs from a pretraining checkpoint).

One real 1-step checkpoint of the ``swin_tiny_cpu`` preset at 96 px is made by the trainer once for
the module (a few seconds on CPU); every test reads it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import train
from simmim_fast.viz import HEADER, PAD, mask_fill
from simmim_fast.visualize import build_eval_transform, main, reconstruct, reconstruct_with_stats

IMG = 96


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("vis")
    out = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMMIM_FAST_CACHE", str(base / "cache"))  # hermetic default photographs
        rc = train.main(["--max-steps", "1", "--batch-size", "2", "--output", str(out),
                         "--num-workers", "0", "--img-size", str(IMG)])
    assert rc == 0
    assert (out / "checkpoint_00000001.pt").is_file()
    return out


def _gradient(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                    np.full_like(x, int(rng.integers(0, 256)))], axis=-1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    _gradient(0, 120, 100).save(d / "a.jpg")
    _gradient(1, 100, 140).save(d / "b.jpg")
    _gradient(2, 96, 96).save(d / "sub" / "c.png")
    return d


def _grid_size(n: int) -> tuple[int, int]:  # (width, height) of a saved, labelled grid PNG
    return 4 * IMG + 3 * PAD, n * IMG + (n - 1) * PAD + 2 * HEADER


def test_eval_transform_is_deterministic_and_centre_crops():
    t = build_eval_transform(IMG)
    img = _gradient(3, 200, 120)
    x = t(img)
    assert x.shape == (3, IMG, IMG) and x.dtype == torch.float32
    assert torch.equal(x, t(img))
    with pytest.raises(ValueError):
        build_eval_transform(0)


def test_cli_default_output_and_loss(run_dir, image_dir, capsys):
    rc = main(["--checkpoint", str(run_dir / "checkpoint_00000001.pt"), "--images", str(image_dir),
               "--device", "cpu"])
    assert rc == 0
    out = run_dir / "reconstruction_checkpoint_00000001.png"
    printed = capsys.readouterr().out
    assert str(out) in printed and "loss" in printed
    with Image.open(out) as im:
        assert im.size == _grid_size(3)  # all three images (num_images 8 > 3)


def test_reconstruct_function_seed_and_overrides(run_dir, image_dir, tmp_path):
    p1 = reconstruct(run_dir, [image_dir], output=tmp_path / "x.png", num_images=2, seed=5, device="cpu")
    p2 = reconstruct(run_dir, [image_dir], output=tmp_path / "y.png", num_images=2, seed=5, device="cpu")
    assert p1 == tmp_path / "x.png"
    a1, a2 = np.asarray(Image.open(p1)), np.asarray(Image.open(p2))
    assert a1.shape == (_grid_size(2)[1], _grid_size(2)[0], 3)
    assert np.array_equal(a1, a2)  # same seed, same picture

    r = reconstruct_with_stats(run_dir, image_dir, output=tmp_path / "z.png", num_images=2, seed=5,
                               mask_patch_size=16, mask_ratio=0.5, mask_strategy="square", device="cpu")
    assert [p.name for p in r.images] == ["a.jpg", "b.jpg"]  # sorted order, first two
    assert np.isfinite(r.loss) and r.loss > 0 and r.loss_name == "l1 on masked pixels"
    # the square strategy masks the centre; the masked-input column shows it hatched
    arr = np.asarray(Image.open(r.output)).astype(int)
    centre = arr[HEADER + IMG // 2, IMG + PAD + IMG // 2]
    hatch = (mask_fill(IMG, IMG)[:, IMG // 2, IMG // 2] * 255).round().int().tolist()
    assert np.abs(centre - np.array(hatch)).max() <= 1


def test_run_dir_picks_newest_checkpoint(run_dir, image_dir, tmp_path, capsys):
    d = tmp_path / "run2"
    d.mkdir()
    (d / "checkpoint_00000001.pt").write_bytes(b"not a checkpoint")  # older; must not be read
    shutil.copy(run_dir / "checkpoint_00000001.pt", d / "checkpoint_00000003.pt")
    assert main(["--checkpoint", str(d), "--images", str(image_dir / "a.jpg"), "--device", "cpu"]) == 0
    out = d / "reconstruction_checkpoint_00000003.png"
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size == _grid_size(1)


def test_corrupted_image_is_skipped(run_dir, image_dir, tmp_path, capsys):
    (image_dir / "a0_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")  # sorts first
    good = image_dir / "b.jpg"
    data = good.read_bytes()
    (image_dir / "b0_truncated.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.png"
    rc = main(["--checkpoint", str(run_dir), "--images", str(image_dir), "--num-images", "3",
               "--output", str(out), "--device", "cpu"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "skipped 2" in cap.err
    with Image.open(out) as im:
        assert im.size == _grid_size(3)


def test_errors_exit_2_with_option_named(run_dir, image_dir, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--images", str(image_dir)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "Traceback" not in err

    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert main(["--checkpoint", str(empty_run), "--images", str(image_dir)]) == 2
    assert "--checkpoint" in capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    (bad / "y.png").write_bytes(b"")
    assert main(["--checkpoint", str(run_dir), "--images", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--images" in err and "Traceback" not in err

    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("hi")
    assert main(["--checkpoint", str(run_dir), "--images", str(no_images)]) == 2
    assert "--images" in capsys.readouterr().err

    assert main(["--checkpoint", str(run_dir), "--images", str(image_dir), "--mask-patch-size", "7",
                 "--device", "cpu"]) == 2
    assert "--mask-patch-size" in capsys.readouterr().err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(garbage), "--images", str(image_dir)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_module_help():
    r = subprocess.run([sys.executable, "-m", "simmim_fast.visualize", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert "--checkpoint" in r.stdout and "--images" in r.stdout


def test_images_default_to_the_embedded_photographs(run_dir, tmp_path, capsys):
    """visualize used to require --images while probe and train default to the embedded photographs."""
    out = tmp_path / "default.png"
    assert main(["--checkpoint", str(run_dir), "--output", str(out), "--num-images", "2", "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.size == _grid_size(2)
