"""The fine-tuning job behind ``python -m simmim_fast.finetune``: plan, data, model, loop, evaluation.

Imported by the CLI (``simmim_fast.finetune``, whose docstring describes the recipe and what a run
writes) only after its arguments are checked. ``finetune(FinetuneArgs)`` runs a job (or an evaluation);
``make_plan`` resolves the preset's recipe and checks it with the CLI's rules (``cli.commands.FINETUNE``).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cli.commands import FINETUNE
from ..cli.names import DATA_BACKENDS
from ..cli.paths import path_problem
from ..data.classification import (
    ClassificationFolder, ShardSampler, build_eval_transform, build_mixup, build_train_transform,
    classification_collate, embedded_classification_dir, split_dirs,
)
from ..models.classifier import (
    FINETUNE_PRESETS, build_classifier, classifier_spec, get_finetune_preset, load_pretrained,
)
from ..models.interchange import FINETUNE_FORMAT, read_checkpoint
from ..training import checkpoint as ckpt
from ..training.cli import TrainingDiverged, quiet_other_ranks
from ..training.compile import compile_model, compile_stats
from ..training.distributed import DistInfo, all_gather_objects, barrier, cleanup, init_distributed
from ..training.layer_decay import ScaledWarmupScheduler, layer_decay_param_groups
from ..training.metrics import MetricsLog
from ..training.optim import adamw_flags
from ..training.optim_state import load_portable_state_dict, portable_state_dict
from ..training.sampler import ResumableSampler
from ..training.stepper import Stepper
from ..training.threads import set_threads

if TYPE_CHECKING:
    from ..finetune import FinetuneArgs

log = logging.getLogger("simmim_fast.finetune")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Plan:
    img_size: int
    batch_size: int
    epochs: int
    lr: float
    warmup_lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    layer_decay: float
    clip_grad: float
    drop_path: float
    label_smoothing: float
    mixup: float
    cutmix: float
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    auto_augment: str
    color_jitter: float
    reprob: float
    precision: str
    num_workers: int


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def default_workers(num_workers: int | None, device: torch.device) -> int:
    if num_workers is not None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"--num-workers: expected an int >= 0, got {num_workers!r}")
        return num_workers
    cpus = os.cpu_count() or 1
    return min(8, cpus) if device.type == "cuda" else max(1, cpus // 2)


def make_plan(a: FinetuneArgs, info: DistInfo) -> Plan:
    """The preset's recipe under the arguments, checked by the CLI's rules (ranges, mixup's even batch)."""
    r = get_finetune_preset(a.preset).recipe
    names = ("img_size", "batch_size", "epochs", "warmup_epochs", "weight_decay", "layer_decay", "clip_grad",
             "drop_path", "label_smoothing", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode",
             "auto_augment", "color_jitter", "reprob", "base_lr", "warmup_lr", "min_lr")
    v = {k: (getattr(r, k) if getattr(a, k) is None else getattr(a, k)) for k in names}
    FINETUNE.check({**asdict(a), **v})  # recipe values and flags together
    scale = v["batch_size"] * info.world_size * a.accum_steps / 512.0  # official linear scaling (accumulation included)
    lrs = {"lr": v.pop("base_lr") * scale, "warmup_lr": v.pop("warmup_lr") * scale, "min_lr": v.pop("min_lr") * scale}
    return Plan(**v, **lrs, precision=resolve_precision(a.precision, info.device),
                num_workers=default_workers(a.num_workers, info.device))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python ``random`` (what the official code seeds, plus ``random``)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def check_data_backend(backend: str, info: DistInfo, *, img_size: int | None = None) -> str:
    """The input pipeline to use, ``"torch"`` or ``"dali"`` (logged once), as in pretraining.

    ``auto``: DALI when ``nvidia.dali`` imports and the device is CUDA, else torch; ``dali``: DALI (CPU
    mode off CUDA), ``ValueError`` listing every reason it cannot run. With ``img_size``, sizes the
    DALI pipelines do not cover (<= 32 px) are one more reason (``auto`` then falls back to torch).
    """
    if backend not in DATA_BACKENDS:
        raise ValueError(f"--data-backend: expected one of {', '.join(DATA_BACKENDS)}, got {backend!r}")
    from ..data.dali import select_data_backend

    reasons = []
    if img_size is not None and backend != "torch":
        from ..data.dali_classification import dali_finetune_unsupported

        reasons = dali_finetune_unsupported(img_size)
    if reasons and backend == "dali":
        raise ValueError("--data-backend dali: cannot run the fine-tuning DALI pipeline: " + "; ".join(reasons))
    if reasons:  # auto
        if info.is_main:
            log.info("data backend: torch DataLoader (auto: %s)", "; ".join(reasons))
        return "torch"
    return select_data_backend(backend, info.device)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, autocast, info: DistInfo, num_classes: int) -> dict:
    """Top-1, top-k (k = min(5, classes)) accuracy in % and mean cross-entropy over the whole val set (all ranks)."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correctk, loss sum, count
    for images, labels, _ in loader:
        if labels.numel() == 0:  # every file of this batch was unreadable (left out, counted by the loader)
            continue
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=1).sum()
        sums[2] += nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums[3] += labels.numel()
    if info.distributed:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    n = max(float(sums[3]), 1.0)
    return {"acc1": 100.0 * float(sums[0]) / n, "acc5": 100.0 * float(sums[1]) / n, "loss": float(sums[2]) / n,
            "images": int(sums[3]), "topk": k}


class EvalLog:
    """``eval.csv``: one row per evaluation; rows past the resumed step are dropped on resume."""

    FIELDS = ("epoch", "step", "acc1", "acc5", "loss", "ema_acc1", "ema_acc5", "ema_loss", "best_acc1", "images")

    def __init__(self, output: Path, *, resume_step: int = 0):
        self.path = Path(output) / "eval.csv"
        rows = []
        if resume_step > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def resolve_data(data: str | None, info: DistInfo):
    if data is None:
        if info.is_main:
            embedded_classification_dir()
        barrier(info)
        data = str(embedded_classification_dir())
    return split_dirs(data)


def val_data(val_dir, classes, *, backend: str, img_size: int, batch_size: int, workers: int, info: DistInfo,
             interpolation: str = "bicubic", crop: bool = True) -> tuple[int, object]:
    """``(images in the val set, loader)`` for ``backend`` ("torch" or "dali"); the loader yields
    ``(images, labels, skipped)``, this rank's shard of the val set, every image once over the ranks."""
    if backend == "dali":
        from ..data.dali_classification import DaliEvalLoader

        loader = DaliEvalLoader(val_dir, classes=classes, batch_size=batch_size, img_size=img_size, device=info.device,
                                shard_id=info.rank, num_shards=info.world_size, crop=crop, interpolation=interpolation,
                                num_threads=max(1, workers))
        return len(loader.files), loader
    ds, loader = val_loader(val_dir, classes, img_size=img_size, batch_size=batch_size, workers=workers, info=info,
                            interpolation=interpolation, crop=crop)
    return len(ds), loader


def val_loader(val_dir, classes, *, img_size: int, batch_size: int, workers: int, info: DistInfo,
               interpolation: str = "bicubic", crop: bool = True) -> tuple[ClassificationFolder, DataLoader]:
    # unreadable validation files are left out (never replaced by another image): each image counts once
    ds = ClassificationFolder(val_dir, transform=build_eval_transform(img_size, interpolation=interpolation, crop=crop),
                              classes=classes, on_unreadable="drop")
    loader = DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank=info.rank, world_size=info.world_size),
                        num_workers=workers, collate_fn=classification_collate, pin_memory=info.device.type == "cuda",
                        generator=torch.Generator())  # its worker seed must not come from (and advance) the global RNG
    return ds, loader


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def finetune(a: FinetuneArgs) -> dict:
    """Run fine-tuning (or evaluation with ``eval=True``); returns a summary dict."""
    info = init_distributed(a.device)
    quiet_other_ranks(info.rank, a.log_all_ranks)
    try:
        with contextlib.ExitStack() as run_scope:  # holds the output folder's lock while the run lasts
            return _run(a, info, run_scope)
    finally:
        cleanup(info)


def _eval_only(a: FinetuneArgs, info: DistInfo) -> dict:
    source = a.resume or a.pretrained
    if source is None or source == "auto":
        source = ckpt.latest_checkpoint(a.output) if a.output else None
        if source is None:
            raise ValueError("--eval: give the weights to evaluate with --resume CHECKPOINT (or --pretrained)")
    ck = read_checkpoint(source)
    _, val_dir, classes = resolve_data(a.data, info)
    if ck.kind == "finetune":
        spec = ck.meta["spec"]
        if ck.meta.get("classes") and list(ck.meta["classes"]) != list(classes):
            raise ValueError(f"--data: its classes differ from those the checkpoint was trained on "
                             f"({len(ck.meta['classes'])} classes, first {ck.meta['classes'][:3]})")
    else:
        spec = classifier_spec(a.preset, num_classes=len(classes), img_size=a.img_size, window_size=a.window_size)
    model = build_classifier(spec, attn_backend=a.attn_backend)
    report = load_pretrained(model, ck)
    if any(k.startswith("head") for k in report.missing) and info.is_main:
        log.warning("--eval: the checkpoint has no classifier head for these %d classes; accuracy is of a random head", len(classes))
    model.to(info.device)
    precision = resolve_precision(a.precision, info.device)
    autocast = torch.autocast(info.device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
    img_size = int(spec["kwargs"]["img_size"])
    recipe = get_finetune_preset(spec["preset"] if spec.get("preset") in FINETUNE_PRESETS else a.preset).recipe
    backend = check_data_backend(a.data_backend, info, img_size=img_size)
    _, loader = val_data(val_dir, classes, backend=backend, img_size=img_size,
                         batch_size=a.batch_size or recipe.batch_size, workers=default_workers(a.num_workers, info.device),
                         info=info, interpolation=recipe.interpolation, crop=recipe.test_crop)
    res = evaluate(model, loader, device=info.device, autocast=autocast, info=info, num_classes=len(classes))
    if info.is_main:
        print(f"eval {ck.path}: top-1 {res['acc1']:.2f}%  top-{res['topk']} {res['acc5']:.2f}%  loss {res['loss']:.4f}  "
              f"({res['images']} images, {len(classes)} classes)", flush=True)
    return {**res, "checkpoint": str(ck.path)}


def _run(a: FinetuneArgs, info: DistInfo, run_scope: contextlib.ExitStack) -> dict:
    preset = get_finetune_preset(a.preset)
    if a.eval:
        FINETUNE.check(asdict(a))
        return _eval_only(a, info)
    plan = make_plan(a, info)
    backend = check_data_backend(a.data_backend, info, img_size=plan.img_size)
    output = Path(a.output or os.path.join("runs", f"finetune_{a.preset}"))
    bad = path_problem("out_dir", str(output), expect="a run folder")
    if bad:
        raise ValueError(f"--output: {bad}")
    set_threads(device=info.device, requested=a.threads, num_workers=plan.num_workers, log_it=info.is_main)
    device = info.device

    # ---- resume point ------------------------------------------------------------------------
    if info.is_main:
        run_scope.enter_context(ckpt.run_lock(output))
    rp = ckpt.plan_resume(a.resume, output, force=a.force, is_main=info.is_main)  # older checkpoint: a branch folder
    if info.distributed:  # every rank writes where rank 0 decided
        rp = dataclasses.replace(rp, write_dir=Path(all_gather_objects(str(rp.write_dir), info)[0]))
    resume_path, state = rp.path, rp.state
    if rp.write_dir != output:
        output = rp.write_dir
        if info.is_main:
            run_scope.enter_context(ckpt.run_lock(output))
    if state is not None:
        if state.get("format") != FINETUNE_FORMAT:
            raise ValueError(f"--resume: {resume_path} is not a fine-tuning checkpoint of this CLI")
        if state["args"].get("preset") != a.preset:
            raise ValueError(f"--resume: {resume_path} was trained with preset {state['args'].get('preset')!r}, not {a.preset!r}")

    # ---- data --------------------------------------------------------------------------------
    train_dir, val_dir, classes = resolve_data(a.data, info)
    if state is not None and list(state["classes"]) != classes:
        raise ValueError(f"--data: its classes differ from those of the run being resumed ({resume_path})")
    r = preset.recipe
    if backend == "dali":
        from ..data.dali_classification import DaliTrainLoader

        train_ds = None
        dali_train = DaliTrainLoader(
            train_dir, classes=classes, batch_size=plan.batch_size, img_size=plan.img_size, device=device,
            epochs=plan.epochs, shard_id=info.rank, num_shards=info.world_size, seed=a.seed, min_batches=a.accum_steps,
            auto_augment=plan.auto_augment, color_jitter=plan.color_jitter, reprob=plan.reprob, remode=r.remode,
            recount=r.recount, interpolation=r.interpolation, num_threads=max(1, plan.num_workers),
        )
        n_train = len(dali_train.files)
    else:
        train_ds = ClassificationFolder(train_dir, classes=classes, transform=build_train_transform(
            plan.img_size, auto_augment=plan.auto_augment, color_jitter=plan.color_jitter, reprob=plan.reprob,
            remode=r.remode, recount=r.recount, interpolation=r.interpolation))
        n_train = len(train_ds)
    if n_train < plan.batch_size * info.world_size:
        raise ValueError(f"--batch-size: {plan.batch_size} x {info.world_size} processes is more than the "
                         f"{n_train} training images")
    n_val, val_dl = val_data(val_dir, classes, backend=backend, img_size=plan.img_size, batch_size=plan.batch_size,
                             workers=plan.num_workers, info=info, interpolation=r.interpolation, crop=r.test_crop)
    mixup_fn = build_mixup(num_classes=len(classes), mixup=plan.mixup, cutmix=plan.cutmix, prob=plan.mixup_prob,
                           switch_prob=plan.mixup_switch_prob, mode=plan.mixup_mode, label_smoothing=plan.label_smoothing)

    # ---- model -------------------------------------------------------------------------------
    torch.manual_seed(a.seed)
    spec = classifier_spec(preset, num_classes=len(classes), img_size=plan.img_size, window_size=a.window_size,
                           drop_path=plan.drop_path)
    model = build_classifier(spec, attn_backend=a.attn_backend)
    if state is None:
        if a.pretrained is not None:
            load_pretrained(model, a.pretrained)  # logs what was resized / newly initialised
        elif info.is_main:
            log.warning("no --pretrained checkpoint: fine-tuning from a random initialisation")
    if a.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    compiled = compile_model(model, a.compile, backend=a.compile_backend, device=device)  # lazy: the first step
    if info.is_main:
        for line in compiled.lines():
            log.info("%s", line)
    seed_everything(a.seed + info.rank)  # drop-path (torch) and mixup/cutmix (numpy) draw from the global RNGs

    if backend == "dali":
        batches_per_epoch = dali_train.batches_per_epoch  # the same ResumableSampler arithmetic
    else:
        sampler = ResumableSampler(len(train_ds), batch_size=plan.batch_size, epochs=plan.epochs, rank=info.rank,
                                   world_size=info.world_size, seed=a.seed, min_batches=a.accum_steps)
        batches_per_epoch = sampler.batches_per_epoch
    steps_per_epoch = batches_per_epoch // a.accum_steps
    total_steps = plan.epochs * steps_per_epoch
    last_step = min(total_steps, a.max_steps) if a.max_steps else total_steps

    groups = layer_decay_param_groups(model, lr=plan.lr, weight_decay=plan.weight_decay, layer_decay=plan.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=plan.lr, betas=tuple(r.betas), eps=r.eps,
                                  **adamw_flags((p for g in groups for p in g["params"])))  # fused on CUDA
    scheduler = ScaledWarmupScheduler(optimizer, base_lr=plan.lr, warmup_lr=plan.warmup_lr, min_lr=plan.min_lr,
                                      total_steps=total_steps, warmup_steps=int(plan.warmup_epochs * steps_per_epoch),
                                      kind="cosine")
    scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")
    ema = None
    if a.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=a.ema_decay)
    if mixup_fn is not None:
        from timm.loss import SoftTargetCrossEntropy

        criterion: nn.Module = SoftTargetCrossEntropy()  # smoothing is in the mixed targets
    elif plan.label_smoothing > 0:
        from timm.loss import LabelSmoothingCrossEntropy

        criterion = LabelSmoothingCrossEntropy(smoothing=plan.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    step = 0
    best = {"acc1": -1.0, "step": None, "epoch": None}
    best_ema = {"acc1": -1.0, "step": None, "epoch": None}
    if state is not None:
        model.load_state_dict(state["model"])
        load_portable_state_dict(optimizer, state["optimizer"])  # this run's fused/foreach choice
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        step = int(state["step"])
        best, best_ema = dict(state["best"]), dict(state.get("best_ema") or best_ema)
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        if info.is_main:
            print(f"resumed from {resume_path} at step {step}", flush=True)
    if info.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    start_at = (step // steps_per_epoch, (step % steps_per_epoch) * a.accum_steps)
    if backend == "dali":
        loader = dali_train
        if start_at[0] < plan.epochs:
            loader.set_start(*start_at)
    else:
        sampler.set_start(*start_at)
        loader = DataLoader(
            train_ds, batch_size=plan.batch_size, sampler=sampler, num_workers=plan.num_workers,
            collate_fn=classification_collate, pin_memory=device.type == "cuda", drop_last=True,
            generator=torch.Generator().manual_seed(a.seed), persistent_workers=False,
            prefetch_factor=4 if plan.num_workers > 0 else None,
        )
    output.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(output, resume_step=step) if info.is_main else None
    evals = EvalLog(output, resume_step=step) if info.is_main else None
    if info.is_main:
        log.info(
            "fine-tune %s (%s from %s) on %s x%d, %s, %s data | %d train / %d val images, %d classes | batch %d x %d x %d = %d | "
            "lr %.3g, layer decay %.3g | %d steps/epoch, %d epochs, steps %d..%d | output %s",
            a.preset, spec["arch"], a.pretrained or "scratch", device, info.world_size, plan.precision, backend, n_train,
            n_val, len(classes), plan.batch_size, info.world_size, a.accum_steps,
            plan.batch_size * info.world_size * a.accum_steps, plan.lr, plan.layer_decay, steps_per_epoch, plan.epochs,
            step + 1, last_step, output,
        )

    amp_dtype = PRECISIONS[plan.precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=plan.precision != "fp32")
    stepper = Stepper(model, optimizer, scheduler, scaler, info=info, accum_steps=a.accum_steps, clip_grad=plan.clip_grad)
    images_since = skipped_total = 0
    first_step = checked_step = step
    last_ckpt = resume_path
    last_saved = step if state is not None else None
    last_eval: dict = {}
    rates: list[float] = []
    t_log = t_start = time.perf_counter()
    pbar = tqdm(total=last_step, initial=step, desc="finetune", unit="step", disable=not info.is_main,
                dynamic_ncols=True, mininterval=1.0)

    def check_finite() -> None:
        nonlocal checked_step
        if stepper.diverged():
            raise TrainingDiverged(
                f"loss became NaN/inf between step {checked_step + 1} and step {step}; stopping. "
                f"Nothing was saved after it: last good checkpoint: {last_ckpt or 'none'}"
            )
        checked_step = step

    def payload(weights: dict, metrics_row: dict) -> dict:
        return {"format": FINETUNE_FORMAT, "model": weights, "spec": spec, "classes": classes, "step": step,
                "epoch": step / steps_per_epoch, "metrics": metrics_row, "args": asdict(a), "plan": asdict(plan)}

    def evaluate_and_save() -> None:
        nonlocal last_ckpt, last_saved, last_eval
        check_finite()
        net = _unwrap(model)
        ckpt.check_state_finite(net.state_dict(), optimizer, step=step, last_good=last_ckpt)
        res = evaluate(net, val_dl, device=device, autocast=autocast, info=info, num_classes=len(classes))
        row = {"epoch": round(step / steps_per_epoch, 4), "step": step, "acc1": round(res["acc1"], 4),
               "acc5": round(res["acc5"], 4), "loss": round(res["loss"], 6), "images": res["images"]}
        improved = res["acc1"] > best["acc1"]
        if improved:
            best.update(acc1=res["acc1"], step=step, epoch=row["epoch"])
        ema_improved = False
        if ema is not None:
            res_ema = evaluate(ema.module, val_dl, device=device, autocast=autocast, info=info, num_classes=len(classes))
            row.update(ema_acc1=round(res_ema["acc1"], 4), ema_acc5=round(res_ema["acc5"], 4), ema_loss=round(res_ema["loss"], 6))
            ema_improved = res_ema["acc1"] > best_ema["acc1"]
            if ema_improved:
                best_ema.update(acc1=res_ema["acc1"], step=step, epoch=row["epoch"])
        row["best_acc1"] = round(best["acc1"], 4)
        last_eval = row
        rng_states = all_gather_objects(ckpt.rng_state(), info)
        path = ckpt.checkpoint_path(output, step)
        if info.is_main:
            evals.write(row)
            full = payload(net.state_dict(), row)
            full.update(optimizer=portable_state_dict(optimizer), scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict(),
                        ema=ema.module.state_dict() if ema is not None else None, best=dict(best),
                        best_ema=dict(best_ema), rng=rng_states, world_size=info.world_size)
            ckpt.atomic_save(full, path)
            ckpt.prune_checkpoints(output, a.keep_checkpoints)
            if improved:
                ckpt.atomic_save(payload(net.state_dict(), row), output / "best.pt")
            if ema_improved:
                ckpt.atomic_save(payload(ema.module.state_dict(), row), output / "best_ema.pt")
            msg = f"eval step {step} (epoch {row['epoch']:g}): top-1 {res['acc1']:.2f}% top-{res['topk']} {res['acc5']:.2f}%"
            if ema is not None:
                msg += f" | EMA top-1 {row['ema_acc1']:.2f}%"
            tqdm.write(msg + f" | best top-1 {best['acc1']:.2f}%")
        barrier(info)
        last_ckpt, last_saved = path, step

    model.train()
    try:
        if step < last_step:
            for images, labels, skipped in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                skipped_total += skipped
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, labels)
                else:
                    targets = labels
                images_since += images.shape[0] * info.world_size

                def compute_loss() -> torch.Tensor:
                    with autocast:
                        logits = model(images)
                    return criterion(logits.float(), targets)

                if not stepper.micro_step(step, compute_loss):
                    continue
                step += 1
                if step == first_step + 1 and compiled.mode != "off" and info.is_main:
                    cs = compile_stats()
                    log.info("torch.compile: first step %.1f s (host time, compilation included): %d graphs, %d graph "
                             "breaks", time.perf_counter() - t_start, cs["graphs"], cs["graph_breaks"])
                if ema is not None:
                    ema.update(_unwrap(model), step=step)
                pbar.update(1)
                if step % a.log_every == 0 or step == last_step:
                    check_finite()
                    now = time.perf_counter()
                    rate = images_since / max(now - t_log, 1e-9)
                    rates.append(rate)
                    mean_loss = stepper.pop_mean_loss()  # over all ranks
                    lr_top = max(g["lr"] for g in optimizer.param_groups)
                    if metrics is not None:
                        metrics.write({"step": step, "epoch": step // steps_per_epoch, "loss": mean_loss, "lr": lr_top,
                                       "grad_norm": float(stepper.grad_norm), "img_per_s": round(rate, 3),
                                       "skipped_images": skipped_total, "elapsed_s": round(now - t_start, 3)})
                    pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.1f}", lr=f"{lr_top:.2e}")
                    images_since, t_log = 0, now
                if step % steps_per_epoch == 0 or step == last_step:
                    evaluate_and_save()
                if step >= last_step:
                    break
        if last_saved != step:
            evaluate_and_save()
    finally:
        pbar.close()
        if metrics is not None:
            metrics.close()

    summary = {
        "steps": step, "steps_this_run": step - first_step, "checkpoint": str(last_ckpt) if last_ckpt else None,
        "best": str(output / "best.pt") if (output / "best.pt").is_file() else None, "best_acc1": best["acc1"],
        "last": last_eval, "img_per_s": (sum(rates[1:]) / len(rates[1:])) if len(rates) > 1 else (rates[0] if rates else float("nan")),
        "resumed_from": str(resume_path) if resume_path else None, "output": str(output), "classes": classes,
    }
    if info.is_main and not last_eval:  # resumed a finished run: no step, no evaluation
        print(f"already complete: step {step}/{total_steps}, nothing to do (raise --max-steps or --epochs to "
              f"continue; --eval evaluates), best top-1 {best['acc1']:.2f}% at step {best['step']}, "
              f"best checkpoint {summary['best']}", flush=True)
    elif info.is_main:
        print(f"done: step {step}/{total_steps}, top-1 {last_eval.get('acc1', float('nan')):.2f}% "
              f"(best {best['acc1']:.2f}% at step {best['step']}), best checkpoint {summary['best']}", flush=True)
    return summary
