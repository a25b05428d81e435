"""Occlusion-invariance probe: linear CKA and the CLI on a small pretraining checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import probe
from simmim_fast.data.masking import MaskGenerator
from simmim_fast.models import create_model
from simmim_fast.models.interchange import PRETRAIN_FORMAT
from simmim_fast.probe import linear_cka, occlusion_invariance


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Independent form (Kornblith et al. 2019, eq. 3-4): HSIC with the centering matrix H on linear kernels."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


@pytest.mark.parametrize("n,d1,d2", [(10, 32, 48), (200, 8, 5)])  # Gram path (n <= d) and feature path (n > d)
def test_cka_matches_the_hsic_definition(n, d1, d2):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d1, generator=g)
    y = x[:, : min(d1, d2)] @ torch.randn(min(d1, d2), d2, generator=g) + 0.5 * torch.randn(n, d2, generator=g)
    got = float(linear_cka(x, y))
    assert got == pytest.approx(hsic_cka(x, y), rel=1e-10, abs=1e-12)
    assert 0.0 < got < 1.0


def test_cka_identity_symmetry_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g)
    y = torch.randn(50, 24, generator=g)
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert float(linear_cka(x, y)) == pytest.approx(float(linear_cka(y, x)), abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    rotated = (x.double() @ q) * 3.7 + 5.0  # orthogonal transform, isotropic scale, shift
    assert float(linear_cka(rotated, x)) == pytest.approx(1.0, abs=1e-10)
    assert float(linear_cka(rotated, y)) == pytest.approx(float(linear_cka(x, y)), abs=1e-10)
    assert linear_cka(x.half(), x.half()).dtype == torch.float64


def test_cka_bad_input():
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="x: expected a float"):
        linear_cka(torch.ones(4, 3, dtype=torch.long), torch.randn(4, 3))


def test_occlusion_invariance_sees_the_masks():
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", img_size=64, window_size=4).eval()
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    none = MaskGenerator(input_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.0)
    res = occlusion_invariance(model.encoder, x, none)
    assert res == {"masked_vs_masked": pytest.approx(1.0, abs=1e-9), "masked_vs_unmasked": pytest.approx(1.0, abs=1e-9)}
    half = MaskGenerator(input_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    for pool in ("mean", "tokens"):
        res = occlusion_invariance(model.encoder, x, half, pool=pool)
        assert 0.0 < res["masked_vs_masked"] < 1.0 - 1e-6 and 0.0 < res["masked_vs_unmasked"] < 1.0 - 1e-6
    model.encoder.train()  # the probe runs in eval mode and leaves the mode as it found it
    occlusion_invariance(model.encoder, x, half)
    assert model.encoder.training


def test_probe_cli_over_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        torch.manual_seed(step)
        model = create_model("swin_tiny_cpu", img_size=96)
        torch.save({"format": PRETRAIN_FORMAT, "model": model.state_dict(), "step": step,
                    "args": {"preset": "swin_tiny_cpu"}, "plan": {"img_size": 96, "mask_patch_size": 32, "mask_ratio": 0.6}},
                   run / f"checkpoint_{step:08d}.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    assert probe.main(["--checkpoint", str(run), "--all", "--images", str(photos), "--num-images", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "CKA(mask1, mask2)" in lines[0] and len(lines) == 3
    steps = [ln.split()[0] for ln in lines[1:]]
    values = [float(ln.split()[1]) for ln in lines[1:]]
    assert steps == ["1", "2"] and all(0.0 < v <= 1.0 for v in values)
    assert probe.main(["--checkpoint", str(run), "--images", str(photos), "--num-images", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert probe.main(["--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
