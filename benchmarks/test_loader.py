"""Input pipeline speed: DALI vs the torchvision DataLoader, and the train step each one feeds.

    pytest benchmarks/test_loader.py --benchmark-only [--benchmark-json out.json]

Data: ``SIMMIM_BENCH_LOADER_IMAGES`` (default 256) JPEGs of ImageNet-like size (500 x 375 landscape,
one in four 375 x 500 portrait, quality 90) cut from the real photographs scikit-image ships (not
noise), written once per session into a temp folder.

- ``test_loader_throughput[torch|dali]``: images/s of 192 px crops with the SimMIM augmentation and
  masks, delivered on the training device. torch: ``SimMIMImageDataset`` + ``DataLoader`` with
  ``num_workers`` = CPU cores (pinned memory + ``.to(device)`` on CUDA). DALI: ``DaliLoader``, nvJPEG
  ``mixed`` decode on CUDA, CPU mode (``device_id=None``) on a CPU machine, ``num_threads`` = CPU cores;
  masks from the native operator when its plugin is built, else the torch generator (recorded in
  ``extra_info.mask_mode``). One timed round = ``ROUND_BATCHES`` batches from a running iterator
  (steady state: workers/pipelines started in the warm-up round).
- ``test_train_step_fed_by[torch|dali]``: one full pretraining step of ``SIMMIM_BENCH_PRESET``
  (default ``swin_base_192``) including fetching its batch from the loader.

Batch: ``SIMMIM_BENCH_BATCH`` (default 128 on CUDA, 32 / 8 for throughput / train step on CPU). CUDA
timings synchronise inside the timed call.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from simmim_fast import MaskGenerator, create_model
from simmim_fast.data.default_data import DEFAULT_IMAGE_NAMES, load_default_image
from simmim_fast.data.folder import SimMIMImageDataset, simmim_collate
from simmim_fast.data.transforms import build_pretrain_transform
from simmim_fast.training.optim import build_optimizer
from simmim_fast.training.sampler import ResumableSampler

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CORES = os.cpu_count() or 1
N_IMAGES = int(os.environ.get("SIMMIM_BENCH_LOADER_IMAGES", 256))
IMG = 192
ROUND_BATCHES = 4
PRESET = os.environ.get("SIMMIM_BENCH_PRESET", "swin_base_192")


def _batch(default_cpu: int) -> int:
    return int(os.environ.get("SIMMIM_BENCH_BATCH", 128 if CUDA else default_cpu))


def _dali_missing() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:
        return f"nvidia.dali not importable: {exc}"
    return None


@pytest.fixture(scope="session")
def photo_jpegs(tmp_path_factory) -> Path:
    """N JPEGs of 500 x 375 (or 375 x 500) cut from real photographs."""
    root = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    photos = [load_default_image(n) for n in DEFAULT_IMAGE_NAMES]
    for i in range(N_IMAGES):
        src = photos[i % len(photos)]
        w, h = (375, 500) if i % 4 == 3 else (500, 375)
        sw, sh = src.size
        scale = rng.uniform(0.5, 1.0) * min(sw / w, sh / h)  # a crop with the target aspect ratio
        cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
        x, y = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out = root / f"n{i % 10:08d}" / f"img_{i:05d}.JPEG"
        out.parent.mkdir(exist_ok=True)
        img.save(out, quality=90)
    return root


def _torch_batches(root: Path, batch: int, mask_gen: MaskGenerator, epochs: int):
    ds = SimMIMImageDataset(root, transform=build_pretrain_transform(IMG), mask_generator=mask_gen, seed=0)
    sampler = ResumableSampler(len(ds), batch_size=batch, epochs=epochs, seed=0)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=CORES, collate_fn=simmim_collate,
                        pin_memory=CUDA, drop_last=True, persistent_workers=False, prefetch_factor=4)
    for images, masks, _ in loader:
        yield images.to(DEVICE, non_blocking=True), masks.to(DEVICE, non_blocking=True)


def _dali_batches(root: Path, batch: int, mask_gen: MaskGenerator, epochs: int, info: dict):
    from simmim_fast.data.dali import DaliLoader

    loader = DaliLoader(root, batch_size=batch, mask_generator=mask_gen, device=DEVICE, epochs=epochs,
                        num_threads=CORES, seed=0)
    info["mask_mode"] = loader.mask_mode
    for images, masks, _ in loader:
        yield images, masks


def _source(backend: str, root: Path, batch: int, mask_gen: MaskGenerator, rounds: int, info: dict):
    per_epoch = max(1, N_IMAGES // batch)
    epochs = (rounds + 1) * ROUND_BATCHES // per_epoch + 2
    if backend == "torch":
        info["mask_mode"] = "torch (numpy MaskGenerator in the workers)"
        return _torch_batches(root, batch, mask_gen, epochs)
    return _dali_batches(root, batch, mask_gen, epochs, info)


BACKENDS = ["torch", "dali"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_throughput(benchmark, photo_jpegs, backend):
    if backend == "dali" and _dali_missing():
        pytest.skip(_dali_missing())
    batch = _batch(32)
    mask_gen = MaskGenerator(input_size=IMG, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    rounds = 5
    info: dict = {}
    it = iter(_source(backend, photo_jpegs, batch, mask_gen, rounds, info))

    def one_round():
        for _ in range(ROUND_BATCHES):
            images, masks = next(it)
        if CUDA:
            torch.cuda.synchronize()
        return images, masks

    images, masks = one_round()  # warm-up: workers / pipeline start, first decode
    assert images.shape == (batch, 3, IMG, IMG) and images.device.type == DEVICE.type
    assert masks.shape == (batch, IMG // 4, IMG // 4)
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        backend=backend, mode=("mixed (nvJPEG)" if CUDA else "cpu") if backend == "dali" else f"{CORES} workers",
        batch=batch, images=N_IMAGES, img_size=IMG, device=str(DEVICE), cores=CORES,
        img_per_s=batch * ROUND_BATCHES / mean, **info,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_fed_by(benchmark, photo_jpegs, backend):
    if backend == "dali" and _dali_missing():
        pytest.skip(_dali_missing())
    batch = _batch(8)
    torch.manual_seed(0)
    model = create_model(PRESET).to(DEVICE).train()
    size = model.img_size[0]
    if size != IMG:
        pytest.skip(f"preset {PRESET} is {size} px; this benchmark feeds {IMG} px crops")
    mask_gen = MaskGenerator(input_size=IMG, mask_patch_size=32, model_patch_size=model.patch_size, mask_ratio=0.6)
    opt = build_optimizer(model, lr=1e-4)
    dtype = torch.bfloat16 if CUDA else torch.float32
    rounds = 10 if CUDA else 3
    info: dict = {}
    it = iter(_source(backend, photo_jpegs, batch, mask_gen, rounds * 2, info))

    def step():
        images, masks = next(it)
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=CUDA):
            loss = model(images, masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()

    step()  # warm-up
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(backend=backend, preset=PRESET, batch=batch, device=str(DEVICE),
                                precision="bf16" if CUDA else "fp32", img_per_s=batch / mean, **info)
