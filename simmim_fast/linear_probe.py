"""Frozen-encoder linear evaluation: ``python -m simmim_fast.linear_probe``.

    python -m simmim_fast.linear_probe --pretrained runs/swin_tiny_cpu --precompute      # CPU demo, embedded photos
    python -m simmim_fast.linear_probe --pretrained simmim_pretrain__vit_base.pth --data /imagenet --output runs/lp

The encoder of a pretraining checkpoint (ours or official) is frozen (eval mode, no gradient); its
final features are average-pooled (Swin: over the last stage; ViT: over the patch tokens, cls token
dropped), passed through a BatchNorm without affine parameters and a linear head, the protocol of
MAE's linear probing (He et al. 2022), with SGD (momentum 0.9, no weight decay; MAE uses LARS at batch
16384), lr = base_lr x batch / 256, linear warmup then cosine, RandomResizedCrop + flip. The official
SimMIM code ships no linear-probe script, so the paper's 56.7 % (ViT-B) is not guaranteed by this
recipe. ``--precompute`` extracts the features once (center crops, no augmentation) and trains the
head on them: much faster, slightly different from the augmented protocol.

Writes ``checkpoint_<epoch>.pt`` (head + optimizer, resumable), ``best.pt``, ``eval.csv``; prints top-1/top-5.
Exit code 2 for bad input.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data.classification import ClassificationFolder, ShardSampler, build_eval_transform, classification_collate
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, ConvertRGB
from .finetune import EvalLog, PRECISIONS, seed_everything, default_workers, evaluate, resolve_data, resolve_precision
from .training.config import load_yaml
from .training.cli import TrainingDiverged, run_cli
from .models.interchange import load_pretraining_model, read_checkpoint
from .training import checkpoint as ckpt
from .training.distributed import DistInfo, barrier, cleanup, init_distributed
from .training.optim import WarmupScheduler
from .training.sampler import ResumableSampler

log = logging.getLogger("simmim_fast.linear_probe")

PROBE_FORMAT = "simmim_fast.linear_probe.v1"


@dataclass
class ProbeArgs:
    pretrained: str | None = None
    preset: str | None = None  # pretraining preset, only for official checkpoints whose shapes match none
    data: str | None = None
    output: str | None = None
    resume: str | None = None
    epochs: int = 90
    warmup_epochs: float = 10
    batch_size: int = 256
    base_lr: float = 0.1
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    img_size: int | None = None
    precompute: bool = False
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    num_workers: int | None = None
    log_every: int = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m simmim_fast.linear_probe",
                                description="Linear evaluation of a frozen SimMIM encoder.")
    d = ProbeArgs()
    p.add_argument("--config", default=None, help="YAML file whose keys mirror these flags")
    p.add_argument("--pretrained", default=None, help="pretraining run folder / checkpoint (ours or official)")
    p.add_argument("--preset", default=None, help="pretraining preset (default: from the checkpoint)")
    p.add_argument("--data", default=None, help="folder with train/<class>/ and val/<class>/ (default: embedded photos)")
    p.add_argument("--output", default=None, help="run folder (default runs/linear_probe)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, help="continue from the newest checkpoint")
    p.add_argument("--epochs", type=int, default=None, help=f"(default {d.epochs})")
    p.add_argument("--warmup-epochs", type=float, default=None, help=f"(default {d.warmup_epochs})")
    p.add_argument("--batch-size", type=int, default=None, help=f"per process (default {d.batch_size})")
    p.add_argument("--base-lr", type=float, default=None, help=f"lr per 256 images (default {d.base_lr})")
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the pretraining size)")
    p.add_argument("--precompute", action="store_true", default=None, help="extract features once (no augmentation)")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    return p


def parse_args(argv: list[str] | None = None) -> ProbeArgs:
    ns = vars(build_parser().parse_args(argv))
    merged = asdict(ProbeArgs())
    config = ns.pop("config")
    if config:
        merged.update(load_yaml(config, {f.name for f in fields(ProbeArgs)}))
    merged.update({k: v for k, v in ns.items() if v is not None})
    return ProbeArgs(**merged)


def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, C)``: mean of the final features (ViT: of the patch tokens, cls dropped)."""
    z = encoder.forward_features(images)
    if z.dim() == 4:  # Swin NHWC
        return z.mean(dim=(1, 2))
    return z[:, getattr(encoder, "num_prefix_tokens", 1):].mean(dim=1)


class LinearProbe(nn.Module):
    """Frozen encoder -> mean pooling -> BatchNorm1d(affine=False) -> Linear. ``(B, 3, S, S)`` -> ``(B, classes)``.

    Only ``head`` has trainable parameters; the encoder stays in eval mode even in ``train()``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        dim = encoder.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pooled_features(self.encoder, images).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _train_transform(img_size: int) -> T.Compose:
    return T.Compose([ConvertRGB(), T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@torch.no_grad()
def _extract(probe: LinearProbe, loader, device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for images, y, _ in loader:
        with autocast:
            feats.append(probe.features(images.to(device)))
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def linear_probe(a: ProbeArgs) -> dict:
    info = init_distributed(a.device)
    try:
        return _run(a, info)
    finally:
        cleanup(info)


def _check(a: ProbeArgs) -> None:
    for name in ("epochs", "batch_size", "log_every"):
        v = getattr(a, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {v!r}")
    for name in ("base_lr", "min_lr", "weight_decay", "warmup_epochs"):
        v = getattr(a, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a number >= 0, got {v!r}")
    if not 0 <= a.momentum < 1:
        raise ValueError(f"--momentum: expected a number in [0, 1), got {a.momentum!r}")
    if a.pretrained is None:
        raise ValueError("--pretrained: give the pretraining run folder or checkpoint whose encoder is evaluated")


def _run(a: ProbeArgs, info: DistInfo) -> dict:
    _check(a)
    device = info.device
    output = Path(a.output or os.path.join("runs", "linear_probe"))
    resume_path = None
    if a.resume is not None:
        resume_path = ckpt.latest_checkpoint(output) if a.resume == "auto" else Path(a.resume)
    elif ckpt.list_checkpoints(output):
        raise ValueError(f"--output: {output} already holds checkpoints; pass --resume or choose another --output")
    state = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None and state.get("format") != PROBE_FORMAT:
        raise ValueError(f"--resume: {resume_path} is not a linear-probe checkpoint")

    model, minfo = load_pretraining_model(read_checkpoint(a.pretrained), preset=a.preset)
    img_size = a.img_size or minfo["img_size"]
    if img_size != minfo["img_size"]:
        raise ValueError(f"--img-size: the probe runs the encoder at its pretraining size {minfo['img_size']}, got {img_size}")
    train_dir, val_dir, classes = resolve_data(a.data, info)
    if state is not None and list(state["classes"]) != classes:
        raise ValueError(f"--data: its classes differ from those of the run being resumed ({resume_path})")
    seed_everything(a.seed + info.rank)
    probe = LinearProbe(model.encoder, len(classes)).to(device)
    precision = resolve_precision(a.precision, device)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
    workers = default_workers(a.num_workers, device)
    eval_tf = build_eval_transform(img_size)
    val_ds = ClassificationFolder(val_dir, transform=eval_tf, classes=classes)
    val_dl = DataLoader(val_ds, batch_size=a.batch_size, sampler=ShardSampler(len(val_ds), rank=info.rank, world_size=info.world_size),
                        num_workers=workers, collate_fn=classification_collate, generator=torch.Generator())
    train_ds = ClassificationFolder(train_dir, transform=eval_tf if a.precompute else _train_transform(img_size), classes=classes)
    per_rank = len(train_ds) // info.world_size
    if per_rank < a.batch_size:
        raise ValueError(f"--batch-size: {a.batch_size} per process is more than the {per_rank} training images per process")
    steps_per_epoch = per_rank // a.batch_size
    total = a.epochs * steps_per_epoch
    lr = a.base_lr * a.batch_size * info.world_size / 256.0
    optimizer = torch.optim.SGD(probe.head.parameters(), lr=lr, momentum=a.momentum, weight_decay=a.weight_decay)
    scheduler = WarmupScheduler(optimizer, base_lr=lr, warmup_lr=0.0, min_lr=a.min_lr * a.batch_size * info.world_size / 256.0,
                                total_steps=total, warmup_steps=int(a.warmup_epochs * steps_per_epoch))
    head = DDP(probe.head) if info.distributed else probe.head
    start_epoch, best = 0, {"acc1": -1.0, "epoch": None}
    if state is not None:
        probe.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = int(state["epoch"]), dict(state["best"])
        if info.is_main:
            print(f"resumed from {resume_path} at epoch {start_epoch}", flush=True)

    cached = None
    if a.precompute:
        t0 = time.perf_counter()
        shard = DataLoader(train_ds, batch_size=a.batch_size, sampler=ShardSampler(len(train_ds), rank=info.rank, world_size=info.world_size),
                           num_workers=workers, collate_fn=classification_collate, generator=torch.Generator())
        cached = (_extract(probe, shard, device, autocast), _extract(probe, val_dl, device, autocast))
        if info.is_main:
            log.info("extracted features of %d train / %d val images in %.1f s", len(train_ds), len(val_ds), time.perf_counter() - t0)

    output.mkdir(parents=True, exist_ok=True)
    evals = EvalLog(output, resume_step=start_epoch * steps_per_epoch) if info.is_main else None
    if info.is_main:
        log.info("linear probe of %s (%s, %d px) | %d train / %d val images, %d classes | batch %d x %d | lr %.3g | %d epochs%s",
                 a.pretrained, minfo["preset"], img_size, len(train_ds), len(val_ds), len(classes), a.batch_size,
                 info.world_size, lr, a.epochs, " (precomputed features)" if a.precompute else "")
    criterion = nn.CrossEntropyLoss()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # checked at log steps and epoch ends only

    def check_finite(step: int) -> None:
        if bool(nonfinite):  # host sync
            raise TrainingDiverged(f"the loss became NaN/inf at or before step {step}; lower --base-lr")

    last: dict = {}
    pbar = tqdm(total=total, initial=start_epoch * steps_per_epoch, desc="linear probe", unit="step",
                disable=not info.is_main, dynamic_ncols=True, mininterval=1.0)
    for epoch in range(start_epoch, a.epochs):
        probe.train()
        if cached is not None:
            (xf, yf), _ = cached
            g = torch.Generator().manual_seed(a.seed * 100_003 + epoch)
            order = torch.randperm(xf.shape[0], generator=g).to(xf.device)
            batches = ((xf[order[i * a.batch_size:(i + 1) * a.batch_size]], yf[order[i * a.batch_size:(i + 1) * a.batch_size]])
                       for i in range(steps_per_epoch))
        else:
            sampler = ResumableSampler(len(train_ds), batch_size=a.batch_size, epochs=epoch + 1, rank=info.rank,
                                       world_size=info.world_size, seed=a.seed)
            sampler.set_start(epoch)
            dl = DataLoader(train_ds, batch_size=a.batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=classification_collate, drop_last=True, generator=torch.Generator().manual_seed(a.seed))
            batches = ((probe.features(x.to(device)), y.to(device)) for x, y, _ in dl)
        for i, (feats, labels) in enumerate(batches):
            step = epoch * steps_per_epoch + i
            scheduler.step_update(step)
            loss = criterion(head(feats), labels)
            nonfinite |= ~torch.isfinite(loss.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            pbar.update(1)
            if (step + 1) % a.log_every == 0:
                check_finite(step)
                pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        check_finite((epoch + 1) * steps_per_epoch - 1)  # never save weights after a NaN
        # ---- evaluate ------------------------------------------------------------------------
        if cached is not None:
            res = _eval_cached(probe.head, cached[1], device, info, len(classes))
        else:
            res = evaluate(probe, val_dl, device=device, autocast=autocast, info=info, num_classes=len(classes))
        improved = res["acc1"] > best["acc1"]
        if improved:
            best = {"acc1": res["acc1"], "epoch": epoch + 1}
        last = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "acc1": round(res["acc1"], 4),
                "acc5": round(res["acc5"], 4), "loss": round(res["loss"], 6), "best_acc1": round(best["acc1"], 4),
                "images": res["images"]}
        if info.is_main:
            evals.write(last)
            payload = {"format": PROBE_FORMAT, "head": probe.head.state_dict(), "epoch": epoch + 1, "best": best,
                       "classes": classes, "pretrained": str(a.pretrained), "preset": minfo["preset"],
                       "img_size": img_size, "metrics": last, "args": asdict(a)}
            ckpt.atomic_save({**payload, "optimizer": optimizer.state_dict()}, ckpt.checkpoint_path(output, epoch + 1))
            ckpt.prune_checkpoints(output, 2)
            if improved:
                ckpt.atomic_save(payload, output / "best.pt")
            tqdm.write(f"epoch {epoch + 1}: top-1 {res['acc1']:.2f}% top-{res['topk']} {res['acc5']:.2f}% (best {best['acc1']:.2f}%)")
        barrier(info)
    pbar.close()
    if info.is_main:
        print(f"done: linear probe top-1 {last.get('acc1', float('nan')):.2f}% (best {best['acc1']:.2f}% at epoch {best['epoch']})", flush=True)
    return {"last": last, "best": best, "output": str(output), "classes": classes, "preset": minfo["preset"]}


@torch.no_grad()
def _eval_cached(head: nn.Module, val: tuple[torch.Tensor, torch.Tensor], device, info: DistInfo, num_classes: int) -> dict:
    head.eval()
    x, y = val
    logits = head(x).float()
    k = min(5, num_classes)
    hit = logits.topk(k, dim=1).indices.eq(y[:, None])
    sums = torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(),
                         nn.functional.cross_entropy(logits, y, reduction="sum").item(), y.numel()],
                        dtype=torch.float64, device=device)
    if info.distributed:
        torch.distributed.all_reduce(sums)
    head.train()
    n = max(float(sums[3]), 1.0)
    return {"acc1": 100 * float(sums[0]) / n, "acc5": 100 * float(sums[1]) / n, "loss": float(sums[2]) / n,
            "images": int(sums[3]), "topk": k}


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: linear_probe(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
