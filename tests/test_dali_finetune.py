"""Fine-tuning's DALI backend in CPU mode (``device_id=None``) on a tiny generated class tree:
label mapping equal to the torch backend's, train/eval batch contract, eval coverage (every image once
over the shards, deterministic), normalisation, random erasing, RandAugment policy parsing, and a
1-epoch ``python -m simmim_fast.finetune --data-backend dali`` run. GPU checks skip without CUDA.

Images are smooth colour gradients (each class its own blue level), 64-96 px JPEGs, so that the DALI
eval transform can be compared with the torch one pixel by pixel.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402

from simmim_fast import finetune  # noqa: E402
from simmim_fast.data.classification import ClassificationFolder, build_eval_transform, split_dirs  # noqa: E402
from simmim_fast.data.dali_classification import (  # noqa: E402
    DaliEvalLoader, DaliTrainLoader, build_train_pipeline, parse_rand_augment,
)
from simmim_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from simmim_fast.training.distributed import DistInfo  # noqa: E402
from simmim_fast.training.sampler import ResumableSampler  # noqa: E402

CUDA = torch.cuda.is_available()
S = 64
CLASSES = ["apple", "kiwi", "plum"]
LOW = ((0.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
HIGH = ((1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)


def gradient(w: int, h: int, blue: int) -> Image.Image:
    x = np.linspace(30, 230, w)[None, :].repeat(h, 0)
    y = np.linspace(30, 230, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full((h, w), blue, np.float64)], -1).round().astype(np.uint8))


def make_class_tree(root: Path, per_class: dict[str, int]) -> Path:
    """``root/{train,val}/<class>/*.jpg`` (64-96 px, mixed aspect ratios) plus one corrupt file per split."""
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                w, h = 64 + 16 * ((i + c) % 3), 96 - 16 * (i % 3)
                gradient(w, h, 40 + 80 * c).save(d / f"{i:02d}.jpg", quality=95, subsampling=0)
        (root / split / CLASSES[1] / "zz_corrupt.jpg").write_text("not a jpeg\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_class_tree(tmp_path_factory.mktemp("dali_ft"), {"train": 4, "val": 3})


@pytest.fixture()
def cache(tmp_path) -> Path:
    return tmp_path / "scan_cache"


def train_loader(data: Path, cache: Path, **kw) -> DaliTrainLoader:
    _, _, classes = split_dirs(data)
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_threads", 2)
    return DaliTrainLoader(data / "train", classes=classes, img_size=S, device="cpu", scan_cache_dir=cache, **kw)


def eval_loader(data: Path, cache: Path, **kw) -> DaliEvalLoader:
    _, _, classes = split_dirs(data)
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_threads", 2)
    return DaliEvalLoader(data / "val", classes=classes, img_size=S, device="cpu", scan_cache_dir=cache, **kw)


def run(ld):
    """``[(images, labels, skipped, file indices)]`` of one pass."""
    return [(im.clone(), lab.clone(), sk, ld.last_indices.tolist()) for im, lab, sk in ld]


def test_labels_and_file_order_match_the_torch_backend(data, cache):
    _, _, classes = split_dirs(data)
    assert classes == CLASSES
    torch_ds = ClassificationFolder(data / "train", transform=None, classes=classes)
    ld = train_loader(data, cache)
    readable = [(p, y) for p, y in torch_ds.samples if p.name != "zz_corrupt.jpg"]
    assert len(readable) == len(torch_ds.samples) - 1 == 12
    assert [(Path(p), y) for p, y in zip(ld.files, ld.targets)] == readable
    assert [p.name for p, _ in ld.scan_skipped] == ["zz_corrupt.jpg"]


def test_train_batches_contract_order_and_normalisation(data, cache):
    ld = train_loader(data, cache, epochs=2, seed=5, reprob=0.0)
    assert len(ld) == 6 and ld.batches_per_epoch == 3
    batches = run(ld)
    assert len(batches) == 6
    sampler = ResumableSampler(12, batch_size=4, epochs=2, seed=5)  # the torch backend's order
    assert [i for _, _, _, idx in batches for i in idx] == [i for i, _ in sampler]
    for images, labels, skipped, idx in batches:
        assert images.shape == (4, 3, S, S) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert labels.shape == (4,) and labels.dtype == torch.int64
        assert labels.tolist() == [ld.targets[i] for i in idx]
        assert labels.tolist() == [CLASSES.index(ld.files[i].parent.name) for i in idx]
        # RandAugment changes colours but stays in [0, 255]: the normalised range of uint8 pixels
        assert (images >= LOW - 1e-5).all() and (images <= HIGH + 1e-5).all()
    assert [b[2] for b in batches] == [1, 0, 0, 0, 0, 0]  # the corrupt file, counted once
    assert {y for b in batches for y in b[1].tolist()} == {0, 1, 2}


def test_random_erasing_on_the_device_batch(data, cache, monkeypatch):
    """Same pipeline seed with reprob 0 and 1: identical but for one erased box per image (2-33 % of it)."""
    import random

    plain = run(train_loader(data, cache, seed=1, reprob=0.0, auto_augment="none", color_jitter=0.0))
    random.seed(0)
    torch.manual_seed(0)
    erased = run(train_loader(data, cache, seed=1, reprob=1.0, auto_augment="none", color_jitter=0.0))
    for (a, la, _, ia), (b, lb, _, ib) in zip(plain, erased):
        assert ia == ib and torch.equal(la, lb)
        changed = (a != b).any(dim=1).float().mean(dim=(1, 2))  # fraction of pixels per image
        assert ((changed > 0.01) & (changed < 0.34)).all(), changed


def test_eval_covers_every_image_once_deterministically(data, cache):
    ld = eval_loader(data, cache, batch_size=4)
    assert len(ld.files) == 9 and ld.num_images == 9 and len(ld) == 3
    first, second = run(ld), run(ld)
    assert [b[0].shape[0] for b in first] == [4, 4, 1]  # the last batch partial, no padding
    assert [i for b in first for i in b[3]] == list(range(9))
    for (a, la, _, _), (b, lb, _, _) in zip(first, second):
        assert torch.equal(a, b) and torch.equal(la, lb)
    labels = torch.cat([b[1] for b in first])
    assert labels.dtype == torch.int64 and labels.tolist() == ld.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    images = torch.cat([b[0] for b in first])
    assert (images >= LOW - 1e-5).all() and (images <= HIGH + 1e-5).all()
    # two shards: disjoint, together every image once (ShardSampler's split), a shard of 4 and one of 5
    shards = [run(eval_loader(data, cache, batch_size=2, shard_id=r, num_shards=2)) for r in range(2)]
    seen = [[i for b in sh for i in b[3]] for sh in shards]
    assert seen == [list(range(0, 9, 2)), list(range(1, 9, 2))]


def reference_crops(path: Path, shorter: int, offsets) -> list[torch.Tensor]:
    """torchvision Resize(shorter, bicubic) + an S x S crop at the center moved by each ``(dx, dy)``, normalised."""
    img = T.Resize(shorter, interpolation=T.InterpolationMode.BICUBIC)(Image.open(path).convert("RGB"))
    W, H = img.size
    x0, y0 = int(round((W - S) / 2)), int(round((H - S) / 2))
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return [norm(T.ToTensor()(img.crop((x0 + dx, y0 + dy, x0 + dx + S, y0 + dy + S)))) for dx, dy in offsets]


def test_eval_matches_the_torch_eval_transform(data, cache):
    """Resize shorter side to int(256/224 * S) + center crop S, as build_eval_transform. Where the
    resized image minus S is odd, torchvision rounds the crop start half-to-even and DALI half-up, so
    the crop may sit one pixel right/down: the best of those 4 placements is compared (measured mean
    abs diff ~0.014, 1-2 uint8 levels from the decoder and cubic resize), and a crop of the wrong
    scale (resize to S, no 256/224 margin) must be clearly worse."""
    ld = eval_loader(data, cache, batch_size=9)
    (images, labels, _, idx), = run(ld)
    assert build_eval_transform(S).transforms[1].size == int(256 / 224 * S)  # the torch side's shorter-side size
    offsets = [(0, 0), (1, 0), (0, 1), (1, 1)]
    for k, i in enumerate(idx):
        best = min(float((images[k] - r).abs().mean()) for r in reference_crops(ld.files[i], int(256 / 224 * S), offsets))
        wrong = float((images[k] - reference_crops(ld.files[i], S, [(0, 0)])[0]).abs().mean())
        assert best < 0.02, (ld.files[i], best)
        assert wrong > 2 * best, (ld.files[i], best, wrong)


def test_parse_rand_augment_and_bad_input(data, cache):
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == {"n": 2, "m": 9, "monotonic_mag": True}
    assert parse_rand_augment("rand-n3-m5") == {"n": 3, "m": 5, "monotonic_mag": False}
    assert parse_rand_augment("none") is None and parse_rand_augment(None) is None
    for bad, msg in (("original-mstd0.5", "RandAugment policies"), ("rand-m9-w0", "does not support 'w'"),
                     ("rand-m11", "integer magnitude"), ("rand-mstd0.5", "integer magnitude"), ("rand-m9-x", "cannot read")):
        with pytest.raises(ValueError, match=msg):
            parse_rand_augment(bad)
    with pytest.raises(ValueError, match="img_size: img size 32 <= 32"):
        DaliTrainLoader(data / "train", classes=CLASSES, batch_size=2, img_size=32, device="cpu", scan_cache_dir=cache)
    with pytest.raises(ValueError, match="reprob"):
        train_loader(data, cache, reprob=2.0)
    with pytest.raises(ValueError, match="interpolation"):
        train_loader(data, cache, interpolation="lanczos7")
    with pytest.raises(ValueError, match="labels: expected 2 labels"):
        build_train_pipeline(["a.jpg", "b.jpg"], [0], batch_size=2, img_size=S)
    with pytest.raises(TypeError, match="set_start"):
        eval_loader(data, cache).set_start(0, 0)


def test_backend_choice(monkeypatch):
    from simmim_fast.data import dali

    monkeypatch.setattr(dali, "_logged", set())
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert finetune.check_data_backend("auto", cpu, img_size=S) == "torch"  # auto: DALI on CUDA only
    assert finetune.check_data_backend("dali", cpu, img_size=S) == "dali"  # CPU mode
    assert finetune.check_data_backend("torch", cpu, img_size=S) == "torch"
    with pytest.raises(ValueError, match="<= 32"):
        finetune.check_data_backend("dali", cpu, img_size=32)
    with pytest.raises(ValueError, match="--data-backend"):
        finetune.check_data_backend("nvidia", cpu)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_epoch_finetune_with_dali_backend_and_resume(tmp_path, data, monkeypatch, capsys):
    """Stopped after 2 of 3 steps and resumed (DaliTrainLoader.set_start): checkpoint, eval.csv, metrics."""
    monkeypatch.setenv("SIMMIM_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ft"
    args = ["--data", str(data), "--output", str(out), "--data-backend", "dali", "--epochs", "1", "--img-size", str(S),
            "--window-size", "4", "--batch-size", "4", "--num-workers", "1", "--warmup-epochs", "0", "--log-every", "1"]
    assert finetune.main([*args, "--max-steps", "2"]) == 0
    assert finetune.main([*args, "--resume"]) == 0
    rows = read_csv(out / "eval.csv")
    assert [int(r["step"]) for r in rows] == [2, 3]  # 12 readable train images / batch 4 = 3 steps per epoch
    assert {r["images"] for r in rows} == {"9"}  # 9 readable val images, each once
    metrics = read_csv(out / "metrics.csv")
    assert [int(r["step"]) for r in metrics] == [1, 2, 3]
    assert [int(r["skipped_images"]) for r in metrics] == [1, 1, 1]  # the corrupt file, reported by each process
    assert all(np.isfinite(float(r["loss"])) for r in metrics)
    assert {"checkpoint_00000003.pt", "best.pt"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()
    best = max(rows, key=lambda r: float(r["acc1"]))
    assert finetune.main(["--eval", "--resume", str(out / "best.pt"), "--data", str(data), "--data-backend", "dali",
                          "--num-workers", "1", "--batch-size", "4"]) == 0
    assert f"top-1 {float(best['acc1']):.2f}%" in capsys.readouterr().out


@pytest.mark.skipif(not CUDA, reason="needs CUDA (nvJPEG mixed decode)")
def test_gpu_pipelines_match_the_contract(data, cache):
    _, _, classes = split_dirs(data)
    ld = DaliTrainLoader(data / "train", classes=classes, batch_size=4, img_size=S, device="cuda", scan_cache_dir=cache)
    images, labels, skipped = next(iter(ld))
    assert images.is_cuda and images.shape == (4, 3, S, S) and images.dtype == torch.float32
    assert labels.is_cuda and labels.dtype == torch.int64 and skipped == 1
    ev = DaliEvalLoader(data / "val", classes=classes, batch_size=4, img_size=S, device="cuda", scan_cache_dir=cache)
    cpu = eval_loader(data, cache)
    for (a, la, _), (b, lb, _) in zip(ev, cpu):
        assert torch.equal(la.cpu(), lb)
        assert (a.cpu() - b).abs().mean() < 0.02  # nvJPEG vs CPU decoder, GPU vs CPU resize


def test_dalis_own_auto_aug_deprecation_warnings_are_not_shown(tmp_path):
    """DALI 2.4's RandAugment calls its deprecated fn.experimental aliases and forces those warnings past
    the user's filters: they came with every fine-tuning run. Building the pipeline must not show them."""
    import warnings

    from simmim_fast.data.dali_classification import build_train_pipeline

    files = []
    for i in range(2):
        p = tmp_path / f"{i}.jpg"
        Image.fromarray(np.full((48, 48, 3), 60 * i, np.uint8)).save(p)
        files.append(str(p))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = build_train_pipeline(files, [0, 1], batch_size=2, img_size=40, num_threads=1)
        pipe.run()
    assert not [w for w in caught if "fn.experimental" in str(w.message)], [str(w.message)[:100] for w in caught]
