"""Tests for simmim_fast.data.masking and the simmim_fast.avgdist CLI (CPU, fast)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from simmim_fast.avgdist import main as avgdist_main
from simmim_fast.data.masking import STRATEGIES, MaskGenerator, avg_dist


class OfficialMaskGenerator:
    """Transcription of MaskGenerator from microsoft/SimMIM data/data_simmim.py."""

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        assert self.input_size % self.mask_patch_size == 0
        assert self.mask_patch_size % self.model_patch_size == 0
        self.rand_size = self.input_size // self.mask_patch_size
        self.scale = self.mask_patch_size // self.model_patch_size
        self.token_count = self.rand_size ** 2
        self.mask_count = int(np.ceil(self.token_count * self.mask_ratio))

    def __call__(self):
        mask_idx = np.random.permutation(self.token_count)[:self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        mask = mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return mask


SIZES = [(192, 32, 4), (224, 32, 4), (224, 16, 16), (96, 32, 8), (64, 64, 4)]
RATIOS = [0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.75, 0.9, 1.0]


def _blocks_constant(mask, scale):
    g = mask.shape[-1] // scale
    m = np.asarray(mask).reshape(*mask.shape[:-2], g, scale, g, scale)
    return bool((m == m[..., :1, :, :1]).all())


# ------------------------------------------------------------------ attributes / counts
def test_attributes_default():
    g = MaskGenerator()
    assert (g.rand_size, g.scale, g.token_count, g.mask_count, g.grid_size) == (6, 8, 36, 22, 48)
    g = MaskGenerator(input_size=224)
    assert (g.rand_size, g.token_count, g.mask_count, g.grid_size) == (7, 49, 30, 56)


@pytest.mark.parametrize("ratio", RATIOS + [0.3 + 1e-12, 1 / 3, 0.55])
@pytest.mark.parametrize("size", SIZES)
def test_mask_count_formula(size, ratio):
    g = MaskGenerator(*size, mask_ratio=ratio)
    o = OfficialMaskGenerator(*size, mask_ratio=ratio)
    assert g.mask_count == o.mask_count == int(np.ceil(g.token_count * ratio))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("size", SIZES)
def test_exact_count_alignment_call(strategy, size):
    np.random.seed(1)
    for ratio in RATIOS:
        g = MaskGenerator(*size, mask_ratio=ratio, strategy=strategy)
        for _ in range(3 if strategy == "block" else 1):
            m = g()
            assert isinstance(m, np.ndarray) and m.dtype == np.zeros(1, dtype=int).dtype
            assert m.shape == (g.grid_size, g.grid_size)
            assert set(np.unique(m)) <= {0, 1}
            assert _blocks_constant(m, g.scale)
            assert m[::g.scale, ::g.scale].sum() == g.mask_count
            assert m.sum() == g.mask_count * g.scale ** 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exact_count_alignment_generate(strategy):
    gen = torch.Generator().manual_seed(0)
    for size in [(192, 32, 4), (224, 32, 4), (224, 16, 16)]:
        for ratio in [0.0, 0.1, 0.6, 0.9, 1.0]:
            g = MaskGenerator(*size, mask_ratio=ratio, strategy=strategy)
            m = g.generate(4, generator=gen)
            assert m.dtype == torch.bool and m.shape == (4, g.grid_size, g.grid_size)
            assert m.device.type == "cpu"
            assert _blocks_constant(m.numpy(), g.scale)
            assert (m[:, ::g.scale, ::g.scale].sum(dim=(1, 2)) == g.mask_count).all()


# ------------------------------------------------------------------ official equivalence
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("ratio", [0.1, 0.6, 0.75])
def test_bit_identical_to_official(size, ratio):
    ours, off = MaskGenerator(*size, mask_ratio=ratio), OfficialMaskGenerator(*size, mask_ratio=ratio)
    for seed in (0, 7):
        np.random.seed(seed)
        a = [ours() for _ in range(4)]
        np.random.seed(seed)
        b = [off() for _ in range(4)]
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
    # interleaving with other global-RNG users stays in lockstep
    np.random.seed(3)
    ours(); x1 = np.random.rand(); ours_m = ours()
    np.random.seed(3)
    off(); y1 = np.random.rand(); off_m = off()
    assert x1 == y1
    np.testing.assert_array_equal(ours_m, off_m)


def test_local_rng_does_not_touch_global():
    g = MaskGenerator()
    np.random.seed(5)
    state = np.random.get_state()[1].copy()
    a = g(rng=np.random.default_rng(11))
    b = g(rng=np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    for s in ("square", "block"):
        gs = MaskGenerator(strategy=s)
        np.testing.assert_array_equal(gs(rng=np.random.default_rng(2)), gs(rng=np.random.default_rng(2)))
        np.testing.assert_array_equal(np.random.get_state()[1], state)


# ------------------------------------------------------------------ generate / coarse
@pytest.mark.parametrize("strategy", ["random", "block"])
def test_generate_determinism(strategy):
    g = MaskGenerator(input_size=224, mask_patch_size=16, mask_ratio=0.6, strategy=strategy)
    a = g.generate(8, generator=torch.Generator().manual_seed(123))
    b = g.generate(8, generator=torch.Generator().manual_seed(123))
    c = g.generate(8, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r.flatten().tolist()) for r in a}) > 1  # rows differ


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_coarse_consistent(strategy):
    g = MaskGenerator(strategy=strategy, mask_ratio=0.5)
    c = g.generate_coarse(5, generator=torch.Generator().manual_seed(9))
    f = g.generate(5, generator=torch.Generator().manual_seed(9))
    assert c.dtype == torch.bool and c.shape == (5, g.rand_size, g.rand_size)
    up = c.repeat_interleave(g.scale, 1).repeat_interleave(g.scale, 2)
    assert torch.equal(up, f)


def test_generate_device_and_default_rng():
    g = MaskGenerator()
    m = g.generate(3, device="cpu")
    assert m.device.type == "cpu" and m.shape == (3, 48, 48)
    torch.manual_seed(0)
    a = g.generate(3)
    torch.manual_seed(0)
    assert torch.equal(a, g.generate(3))


def test_generate_random_is_roughly_uniform():
    g = MaskGenerator(mask_ratio=0.6)
    c = g.generate_coarse(4000, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert torch.allclose(c, torch.full_like(c, 22 / 36), atol=0.04)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_batch_size_validation(bad):
    with pytest.raises(ValueError, match="batch_size"):
        MaskGenerator().generate(bad)


# ------------------------------------------------------------------ strategies
@pytest.mark.parametrize("size", [(192, 32, 4), (224, 32, 4), (224, 16, 4), (192, 16, 16)])
def test_square_centered(size):
    for ratio in RATIOS:
        g = MaskGenerator(*size, mask_ratio=ratio, strategy="square")
        c = g()[::g.scale, ::g.scale]
        assert c.sum() == g.mask_count
        side = math.isqrt(g.mask_count)
        o = (g.rand_size - side) // 2
        assert c[o:o + side, o:o + side].all()
        if g.mask_count:
            rows, cols = np.nonzero(c)
            # bounding box is side or side+1 wide, centred within one cell
            for lo, hi in ((rows.min(), rows.max()), (cols.min(), cols.max())):
                assert hi - lo + 1 in (side, side + 1)
                assert abs((lo + hi) / 2 - (g.rand_size - 1) / 2) <= 1.0
        # deterministic
        np.testing.assert_array_equal(g(), g())
        assert torch.equal(g.generate_coarse(2)[0], torch.from_numpy(c.astype(bool)))


def test_square_ring_order():
    g = MaskGenerator(192, 32, 4, mask_ratio=20 / 36 - 1e-9, strategy="square")  # 20 = 16 + 4
    assert g.mask_count == 20
    c = g()[::8, ::8]
    exp = np.zeros((6, 6), dtype=int)
    exp[1:5, 1:5] = 1
    exp[1:5, 5] = 1
    np.testing.assert_array_equal(c, exp)


def test_block_is_blocky():
    """Block masks are more clustered than random ones (higher AvgDist)."""
    rb = MaskGenerator(224, 16, 16, mask_ratio=0.4, strategy="block")
    rr = MaskGenerator(224, 16, 16, mask_ratio=0.4, strategy="random")
    rng = np.random.default_rng(0)
    db = np.mean([avg_dist(rb(rng=rng)) for _ in range(10)])
    dr = np.mean([avg_dist(rr(rng=rng)) for _ in range(10)])
    assert db > dr


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs,name", [
    (dict(input_size=200), "mask_patch_size"),
    (dict(input_size=180, mask_patch_size=30), "model_patch_size"),
    (dict(input_size=0), "input_size"),
    (dict(input_size=(192, 192)), "input_size"),
    (dict(input_size=192.0), "input_size"),
    (dict(mask_patch_size=-32), "mask_patch_size"),
    (dict(model_patch_size=0), "model_patch_size"),
    (dict(mask_ratio=1.5), "mask_ratio"),
    (dict(mask_ratio=-0.1), "mask_ratio"),
    (dict(mask_ratio=float("nan")), "mask_ratio"),
    (dict(strategy="checker"), "strategy"),
])
def test_validation_errors(kwargs, name):
    with pytest.raises(ValueError, match=name) as ei:
        MaskGenerator(**kwargs)
    if name == "strategy":
        assert "random" in str(ei.value) and "block" in str(ei.value)


# ------------------------------------------------------------------ avg_dist
def _brute_avg_dist(mask):
    mask = np.asarray(mask) != 0
    m = np.argwhere(mask)
    v = np.argwhere(~mask)
    if len(m) == 0:
        return 0.0
    d = np.sqrt(((m[:, None, :] - v[None, :, :]) ** 2).sum(-1)).min(1)
    return float(d.mean())


def test_avg_dist_known_values():
    x = np.zeros((7, 7), dtype=bool)
    x[3, 3] = True
    assert avg_dist(x) == 1.0
    x = np.zeros((9, 9), dtype=int)
    x[3:6, 3:6] = 1
    assert avg_dist(x) == pytest.approx((8 * 1 + 1 * 2) / 9)
    assert avg_dist(np.zeros((5, 6))) == 0.0
    # one visible corner pixel of a 4x4 all-masked grid
    x = np.ones((4, 4))
    x[0, 0] = 0
    exp = np.mean([math.hypot(i, j) for i in range(4) for j in range(4) if (i, j) != (0, 0)])
    assert avg_dist(x) == pytest.approx(exp)


def test_avg_dist_brute_force_random():
    rng = np.random.default_rng(0)
    for t in range(40):
        h, w = rng.integers(1, 14, size=2)
        p = rng.choice([0.2, 0.6, 0.95])
        x = rng.random((h, w)) < p
        if x.all():
            x[rng.integers(h), rng.integers(w)] = False
        kind = t % 3
        arg = x if kind == 0 else (x.astype(np.float32) if kind == 1 else torch.from_numpy(x.astype(np.int64)))
        assert avg_dist(arg) == pytest.approx(_brute_avg_dist(x), rel=1e-12, abs=1e-12)


def test_avg_dist_scipy_oracle():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    g = MaskGenerator(192, 16, 4, 0.6)
    for x in [rng.random((192, 192)) < 0.7, g(rng=rng).repeat(4, 0).repeat(4, 1) != 0,
              rng.random((37, 80)) < 0.9]:
        exp = ndimage.distance_transform_edt(x)[x].mean()
        assert avg_dist(x) == pytest.approx(exp, rel=1e-12)


def test_avg_dist_errors():
    with pytest.raises(ValueError, match="mask"):
        avg_dist(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="mask"):
        avg_dist(np.zeros(5))
    with pytest.raises(ValueError, match="visible"):
        avg_dist(np.ones((4, 4), dtype=bool))


def test_avg_dist_grows_with_mask_patch_size():
    """Paper trend: at ratio 0.6, larger mask patches -> larger AvgDist."""
    rng = np.random.default_rng(0)
    means = []
    for p in (8, 16, 32):
        g = MaskGenerator(192, p, p, 0.6)
        means.append(np.mean([avg_dist(g(rng=rng).repeat(p, 0).repeat(p, 1)) for _ in range(6)]))
    assert means[0] < means[1] < means[2]
    assert means[1] > 1.5 * means[0] and means[2] > 1.5 * means[1]


# ------------------------------------------------------------------ CLI
def _number_after(out, key):
    line = next(ln for ln in out.splitlines() if ln.startswith(key))
    return float(line.split(":")[1].split()[0])


def test_cli_main(capsys):
    assert avgdist_main(["--strategy", "random", "--mask-ratio", "0.6", "--mask-patch-size", "32",
                         "--input-size", "192", "--samples", "4", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    d = _number_after(out, "AvgDist")
    assert 5 < d < 40
    assert _number_after(out, "masked fraction") == pytest.approx(22 / 36, abs=1e-4)


def test_cli_all(capsys):
    assert avgdist_main(["--all", "--samples", "1", "--input-size", "192"]) == 0
    out = capsys.readouterr().out
    for s in STRATEGIES:
        row = next(ln for ln in out.splitlines() if ln.startswith(s)).split()
        assert len(row) == 7 and all(float(v) > 0 for v in row[1:])


@pytest.mark.parametrize("argv,msg", [
    (["--strategy", "foo"], "strategy"),
    (["--mask-patch-size", "50"], "mask_patch_size"),
    (["--mask-ratio", "2"], "mask_ratio"),
    (["--samples", "0"], "samples"),
])
def test_cli_bad_args(argv, msg, capsys):
    with pytest.raises(SystemExit) as ei:
        avgdist_main(argv)
    assert ei.value.code == 2
    assert msg in capsys.readouterr().err


def test_cli_subprocess():
    r = subprocess.run([sys.executable, "-m", "simmim_fast.avgdist", "--samples", "5"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert _number_after(r.stdout, "AvgDist") > 0
