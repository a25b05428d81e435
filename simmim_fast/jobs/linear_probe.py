"""The linear-probe job behind ``python -m simmim_fast.linear_probe`` (its docstring: the protocol).

Imported by the CLI only after its arguments are checked (``cli.commands.LINEAR_PROBE``). Checkpoints
are named by optimizer step, as fine-tuning's: ``checkpoint_<step>.pt`` after each epoch (the newest 2
kept), resumable with ``--resume``; a resumed run continues after the epoch stored in the file, so
folders of older versions (files named by epoch) resume too.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cli.commands import LINEAR_PROBE
from ..cli.paths import path_problem
from ..data.classification import ClassificationFolder, ShardSampler, build_eval_transform, classification_collate
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, ConvertRGB
from ..models.interchange import load_pretraining_model, read_checkpoint
from ..training import checkpoint as ckpt
from ..training.cli import TrainingDiverged
from ..training.distributed import DistInfo, all_gather_objects, barrier, cleanup, init_distributed
from ..training.optim import WarmupScheduler
from ..training.sampler import ResumableSampler
from .finetune import PRECISIONS, EvalLog, default_workers, evaluate, resolve_data, resolve_precision, seed_everything

if TYPE_CHECKING:
    from ..linear_probe import ProbeArgs

log = logging.getLogger("simmim_fast.linear_probe")

PROBE_FORMAT = "simmim_fast.linear_probe.v1"


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
        if y.numel() == 0:  # a batch of unreadable files only (left out)
            continue
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


def _run(a: ProbeArgs, info: DistInfo) -> dict:
    LINEAR_PROBE.require(asdict(a))
    LINEAR_PROBE.check(asdict(a))
    device = info.device
    output = Path(a.output or os.path.join("runs", "linear_probe"))
    bad = path_problem("out_dir", str(output), expect="a run folder")
    if bad:
        raise ValueError(f"--output: {bad}")
    # the newest readable checkpoint (stepping back past a damaged one), a given file, or a fresh run
    rp = ckpt.plan_resume(a.resume, output, force=a.force, is_main=info.is_main)  # older checkpoint: a branch folder
    if info.distributed:  # every rank writes where rank 0 decided
        rp = dataclasses.replace(rp, write_dir=Path(all_gather_objects(str(rp.write_dir), info)[0]))
    resume_path, state, output = rp.path, rp.state, rp.write_dir
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
    val_ds = ClassificationFolder(val_dir, transform=eval_tf, classes=classes, on_unreadable="drop")  # each image once
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
            payload = {"format": PROBE_FORMAT, "head": probe.head.state_dict(), "epoch": epoch + 1,
                       "step": (epoch + 1) * steps_per_epoch, "best": best,
                       "classes": classes, "pretrained": str(a.pretrained), "preset": minfo["preset"],
                       "img_size": img_size, "metrics": last, "args": asdict(a)}
            path = ckpt.checkpoint_path(output, (epoch + 1) * steps_per_epoch)  # by step, as fine-tuning's
            ckpt.atomic_save({**payload, "optimizer": optimizer.state_dict()}, path)
            ckpt.prune_checkpoints(output, 2)
            if improved:
                ckpt.atomic_save(payload, output / "best.pt")
            tqdm.write(f"epoch {epoch + 1}: top-1 {res['acc1']:.2f}% top-{res['topk']} {res['acc5']:.2f}% (best {best['acc1']:.2f}%)")
        barrier(info)
    pbar.close()
    if info.is_main and not last:  # resumed a finished run
        print(f"already complete: epoch {start_epoch}/{a.epochs}, nothing to do (raise --epochs to continue), "
              f"best top-1 {best['acc1']:.2f}% at epoch {best['epoch']}", flush=True)
    elif info.is_main:
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
