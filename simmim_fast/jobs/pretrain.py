"""The pretraining job behind ``python -m simmim_fast.train``: plan, model, data, loop, checkpoints.

Imported by the CLI (``simmim_fast.train``) only after its arguments are checked (torch, timm, DALI load
here). ``train(TrainArgs)`` runs a job; ``make_plan`` resolves the preset's recipe under the arguments and
checks the result with the CLI's rules (``cli.commands.TRAIN``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cli.commands import TRAIN
from ..cli.paths import path_problem
from ..data.dali import DaliLoader, select_data_backend
from ..data.default_data import default_data_dir
from ..data.folder import SimMIMImageDataset, simmim_collate
from ..data.masking import MaskGenerator
from ..data.transforms import build_pretrain_transform
from ..models import create_model, get_preset
from ..training import checkpoint as ckpt
from ..training import fsdp
from ..training import sharded_checkpoint as sharded
from ..training.cli import TrainingDiverged, quiet_other_ranks
from ..training.compile import compile_model, compile_stats
from ..training.cuda_graphs import DeviceLr, GraphedStepper, cuda_graph_reasons, make_capturable, resolve_cuda_graphs
from ..training.distributed import DistInfo, all_gather_objects, barrier, cleanup, init_distributed
from ..training.memory import check_step_memory
from ..training.metrics import MetricsLog
from ..training.optim import WarmupScheduler, build_optimizer
from ..training.optim_state import load_portable_state_dict, portable_state_dict
from ..training.planner import choose_strategy, min_free_memory
from ..training.plot import write_loss_plot
from ..training.sampler import ResumableSampler
from ..training.stepper import Stepper
from ..training.threads import set_threads
from ..viz import save_reconstruction_grid

if TYPE_CHECKING:
    from ..train import TrainArgs

log = logging.getLogger("simmim_fast.train")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Plan:
    """Everything derived from the arguments and the preset's recipe, checked."""

    img_size: int
    batch_size: int
    epochs: int
    mask_patch_size: int
    mask_ratio: float
    lr: float
    warmup_lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    clip_grad: float
    precision: str
    num_workers: int
    recipe: str  # "official" | "clean" (models.presets.RECIPES)


def make_plan(a: TrainArgs, info: DistInfo) -> Plan:
    """The preset's recipe under the arguments, checked by the CLI's rules (ranges, sizes that divide)."""
    r = get_preset(a.preset).recipe
    recipe = {"img_size": r.img_size, "batch_size": r.batch_size, "epochs": r.epochs,
              "mask_patch_size": r.mask_patch_size, "mask_ratio": r.mask_ratio, "base_lr": r.base_lr,
              "warmup_lr": r.warmup_lr, "min_lr": r.min_lr, "warmup_epochs": r.warmup_epochs,
              "weight_decay": r.weight_decay, "clip_grad": r.clip_grad}
    v = {k: (default if getattr(a, k) is None else getattr(a, k)) for k, default in recipe.items()}
    TRAIN.check({**asdict(a), **v})  # recipe values and flags together (e.g. the recipe's mask cells, --img-size)
    precision = a.precision
    if precision == "auto":
        precision = "bf16" if info.device.type == "cuda" else "fp32"
    scale = v["batch_size"] * info.world_size * a.accum_steps / 512.0  # official linear scaling (accumulation included)
    cpus = os.cpu_count() or 1
    workers = a.num_workers if a.num_workers is not None else (min(8, cpus) if info.device.type == "cuda" else max(1, cpus // 2))
    return Plan(
        img_size=v["img_size"], batch_size=v["batch_size"], epochs=v["epochs"], mask_patch_size=v["mask_patch_size"],
        mask_ratio=v["mask_ratio"], lr=v["base_lr"] * scale, warmup_lr=v["warmup_lr"] * scale,
        min_lr=v["min_lr"] * scale, warmup_epochs=v["warmup_epochs"], weight_decay=v["weight_decay"],
        clip_grad=v["clip_grad"], precision=precision, num_workers=workers,
        recipe=a.recipe or get_preset(a.preset).default_recipe,
    )


def norm_target_override(value: int | None) -> dict:
    """``create_model`` keywords for ``--norm-target``: None keeps the preset's (47 for the SwinV2 presets), 0 = off."""
    if value is None:
        return {}
    return {"norm_target": value or None}


def default_run_dir(preset: str, *, resume: bool, root: str | os.PathLike = "runs") -> Path:
    """The run folder when ``--output`` is not given: ``runs/<preset>``, or the first of ``runs/<preset>-2``,
    ``-3``, ... without checkpoints when it already holds a run (so the README command can be run again);
    with ``--resume``, the most recent of them that holds checkpoints."""
    root = Path(root)
    if resume:
        candidates = [root / preset] + [p for p in root.glob(f"{preset}-*") if p.name[len(preset) + 1:].isdigit()]
        used = [p for p in candidates if ckpt.list_checkpoints(p)]
        return max(used, key=lambda p: ckpt.latest_checkpoint(p).stat().st_mtime) if used else root / preset
    def taken(p: Path) -> bool:  # holds a run, or a live run is starting in it
        return bool(ckpt.list_checkpoints(p)) or ckpt.lock_owner(p) is not None

    if not taken(root / preset):
        return root / preset
    n = 2
    while taken(root / f"{preset}-{n}"):
        n += 1
    return root / f"{preset}-{n}"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


def _save(path: Path, *, model, optimizer, scheduler, scaler, step, epoch, args, plan, rng_states, world_size):
    state = {
        "format": "simmim_fast.pretrain.v1",
        "model": _unwrap(model).state_dict(),
        "optimizer": portable_state_dict(optimizer),  # tensor lr as a float: loads into any AdamW
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "epoch": epoch,
        "args": asdict(args),
        "plan": asdict(plan),
        "rng": rng_states,
        "world_size": world_size,
    }
    return ckpt.atomic_save(state, path)


def train(a: TrainArgs) -> dict:
    """Run pretraining; returns a summary dict (steps, last checkpoint, img/s, resumed_from)."""
    info = init_distributed(a.device)
    quiet_other_ranks(info.rank, a.log_all_ranks)
    try:
        with contextlib.ExitStack() as run_scope:  # holds the output folder's lock while the run lasts
            return _train(a, info, run_scope)
    finally:
        cleanup(info)


def _train(a: TrainArgs, info: DistInfo, run_scope: contextlib.ExitStack) -> dict:
    get_preset(a.preset)  # clear error for an unknown preset before anything else
    plan = make_plan(a, info)
    output = Path(a.output) if a.output else default_run_dir(a.preset, resume=a.resume is not None)
    bad = path_problem("out_dir", str(output), expect="a run folder")
    if bad:
        raise ValueError(f"--output: {bad}")
    device = info.device
    set_threads(device=device, requested=a.threads, num_workers=plan.num_workers, log_it=info.is_main)

    # ---- resume point (an older checkpoint starts a branch folder, see training.checkpoint) --------
    if info.is_main:
        run_scope.enter_context(ckpt.run_lock(output))
    rp = ckpt.plan_resume(a.resume, output, force=a.force, is_main=info.is_main)
    if info.distributed:  # every rank writes where rank 0 decided
        rp = dataclasses.replace(rp, write_dir=Path(all_gather_objects(str(rp.write_dir), info)[0]))
    resume_path, state = rp.path, rp.state
    if rp.write_dir != output:
        output = rp.write_dir
        if info.is_main:
            run_scope.enter_context(ckpt.run_lock(output))
    if state is not None and state.get("args", {}).get("preset") != a.preset:
        raise ValueError(f"--resume: {resume_path} was trained with preset {state['args'].get('preset')!r}, not {a.preset!r}")
    if state is not None:  # checkpoints written before --recipe existed ran the clean rules
        was = state.get("args", {}).get("recipe") or "clean"
        if was != plan.recipe:
            raise ValueError(f"--recipe: {resume_path} was trained with --recipe {was}, not {plan.recipe} "
                             f"(the optimizer's parameter groups differ); pass --recipe {was}")

    torch.manual_seed(a.seed + info.rank)
    # ---- model ---------------------------------------------------------------------------
    overrides = {"img_size": plan.img_size, "loss": a.loss, "predict": a.predict, **norm_target_override(a.norm_target),
                 "init": plan.recipe}
    if a.drop_path is not None:
        overrides["drop_path_rate"] = a.drop_path
    if get_preset(a.preset).arch in ("swin", "swinv2"):
        overrides["attn_backend"] = a.attn_backend
    elif a.attn_backend != "auto":
        raise ValueError(f"--attn-backend: only Swin presets have window attention; {a.preset} is a ViT")
    model = create_model(a.preset, ops_backend=a.ops_backend, **overrides)
    if a.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if plan.mask_patch_size % model.patch_size:
        raise ValueError(f"--mask-patch-size: {plan.mask_patch_size} must be a multiple of the model patch size {model.patch_size}")
    share = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    memory_kw = dict(mask_patch_size=plan.mask_patch_size, mask_ratio=plan.mask_ratio, clip_grad=plan.clip_grad)
    # --strategy (training.planner): DDP or FSDP, decided and memory-checked before the model is on the device
    choice = choose_strategy(a.strategy, model, device=device, world_size=info.world_size, batch_size=plan.batch_size,
                             precision=plan.precision, accum_steps=a.accum_steps, share=share,
                             free=min_free_memory(device, info) if info.distributed else None, **memory_kw)
    strategy = choice.strategy  # "single" | "ddp" | "fsdp"
    if info.is_main and (info.distributed or a.strategy != "auto"):
        log.info("strategy: %s", choice.why)
    if strategy != "fsdp":
        model.to(device)
    if strategy == "single":
        # fail fast on a batch that cannot fit (a simulated step on fake tensors; skipped with a warning if it cannot run)
        check_step_memory(model, device=device, batch_size=plan.batch_size, precision=plan.precision,
                          accum_steps=a.accum_steps, world_size=info.world_size, share=share, **memory_kw)
    # regional compilation by default on CUDA, off on CPU (training.compile); lazy: the first step compiles
    compiled = compile_model(model, a.compile, backend=a.compile_backend, device=device)
    if info.is_main:
        for line in compiled.lines():
            log.info("%s", line)
    if strategy == "fsdp":  # FSDP2 per block, then the root; each unit moves to the device as it is sharded
        fsdp.shard_model(model, device=device, precision=plan.precision, grad_checkpointing=a.grad_checkpointing)

    # ---- data ----------------------------------------------------------------------------
    data_root = a.data
    if data_root is None:
        if info.is_main:
            default_data_dir()  # rank 0 writes the embedded photographs once
        barrier(info)
        data_root = default_data_dir()
    mask_gen = MaskGenerator(
        input_size=plan.img_size,
        mask_patch_size=plan.mask_patch_size,
        model_patch_size=model.patch_size,
        mask_ratio=plan.mask_ratio,
        strategy=a.mask_strategy,
    )
    # the masked-only head's token count when it is static (the official generator): no device sync, and
    # the gather keeps a static shape under --compile model and in CUDA graphs
    head_count, head_why = model.static_head_count(plan.batch_size, mask_gen)
    data_backend = select_data_backend(a.data_backend, device)  # logs its choice once
    if data_backend == "dali":
        # DALI: same order/sharding as ResumableSampler; on CUDA the batches arrive on the GPU
        sampler = dataset = DaliLoader(
            data_root, batch_size=plan.batch_size, mask_generator=mask_gen, device=device, epochs=plan.epochs,
            shard_id=info.rank, num_shards=info.world_size, seed=a.seed, min_batches=a.accum_steps,
            num_threads=plan.num_workers,
        )
        n_images = len(dataset.files)
    else:
        dataset = SimMIMImageDataset(data_root, transform=build_pretrain_transform(plan.img_size), mask_generator=mask_gen, seed=a.seed)
        sampler = ResumableSampler(
            len(dataset), batch_size=plan.batch_size, epochs=plan.epochs, rank=info.rank,
            world_size=info.world_size, seed=a.seed, min_batches=a.accum_steps,
        )
        n_images = len(dataset)
    steps_per_epoch = sampler.batches_per_epoch // a.accum_steps
    total_steps = plan.epochs * steps_per_epoch
    last_step = min(total_steps, a.max_steps) if a.max_steps else total_steps

    recipe = get_preset(a.preset).recipe
    optimizer = build_optimizer(model, lr=plan.lr, weight_decay=plan.weight_decay, betas=recipe.betas, eps=recipe.eps,
                                recipe=plan.recipe)
    scheduler = WarmupScheduler(
        optimizer, base_lr=plan.lr, warmup_lr=plan.warmup_lr, min_lr=plan.min_lr, total_steps=total_steps,
        warmup_steps=int(plan.warmup_epochs * steps_per_epoch), kind=recipe.scheduler,
        milestones=tuple(m * steps_per_epoch for m in recipe.milestones), gamma=recipe.gamma,
        recipe=plan.recipe, accum_steps=a.accum_steps,
    )
    amp_dtype = PRECISIONS[plan.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")
    graph_reasons = cuda_graph_reasons(device=device, precision=plan.precision, distributed=info.distributed,
                                       accum_steps=a.accum_steps, grad_checkpointing=a.grad_checkpointing)
    use_graphs, graph_reasons = resolve_cuda_graphs(a.cuda_graphs, graph_reasons)
    if info.is_main and graph_reasons:
        (log.warning if a.cuda_graphs == "on" else log.info)("CUDA graphs: off: %s", "; ".join(graph_reasons))
    if use_graphs:  # AdamW capturable, its lr a device tensor the schedule writes (no re-capture)
        scheduler = DeviceLr(scheduler, make_capturable(optimizer))

    step = 0
    if state is not None:
        if not state.get("sharded") and "optimizer" not in state:
            raise ValueError(f"--resume: {resume_path} holds no optimizer state (a consolidated or converted "
                             f"checkpoint); resume from the training checkpoint it was made from")
        if state.get("sharded"):  # a .dcp folder: DCP reshards to this run's processes (or an unsharded model)
            sharded.load_sharded(resume_path, model=model, optimizer=optimizer)
        elif strategy == "fsdp":  # a single file into FSDP: every rank keeps its shards
            sharded.load_full_state(state, model=model, optimizer=optimizer)
        else:
            _unwrap(model).load_state_dict(state["model"])
            load_portable_state_dict(optimizer, state["optimizer"])  # fused/foreach/capturable: this run's choice
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        if info.is_main:
            log.info("resumed from %s at step %d", resume_path, step)
            print(f"resumed from {resume_path} at step {step}", flush=True)
    if strategy == "ddp":
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # Resume: both backends restart at this rank's sample of the interrupted epoch (same images, same
    # order). torch also replays the same crops/flips/masks (per-item seeds); DALI draws new ones
    # (pipeline seed derived from the restart position).
    sampler.set_start(step // steps_per_epoch, (step % steps_per_epoch) * a.accum_steps)
    if data_backend == "dali":
        loader = dataset
    else:
        loader = DataLoader(
            dataset, batch_size=plan.batch_size, sampler=sampler, num_workers=plan.num_workers,
            collate_fn=simmim_collate, pin_memory=device.type == "cuda", drop_last=True,
            generator=torch.Generator().manual_seed(a.seed),  # keeps the global RNG untouched (resume)
            persistent_workers=False, prefetch_factor=4 if plan.num_workers > 0 else None,
        )

    output.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(output, resume_step=step) if info.is_main else None
    if info.is_main:
        log.info(
            "preset %s (recipe %s) on %s x%d, %s | %d image files from %s (%s; unreadable ones are skipped and named) | batch %d x %d ranks x %d accum = %d | lr %.3g | "
            "%d steps/epoch, %d epochs, running steps %d..%d | output %s",
            a.preset, plan.recipe, device, info.world_size, plan.precision, n_images, data_root, data_backend, plan.batch_size,
            info.world_size, a.accum_steps, plan.batch_size * info.world_size * a.accum_steps, plan.lr,
            steps_per_epoch, plan.epochs, step + 1, last_step, output,
        )

    model.train()
    if use_graphs:
        stepper = GraphedStepper(model, optimizer, scheduler, info=info, clip_grad=plan.clip_grad, head_count=head_count,
                                 amp_dtype=amp_dtype if plan.precision != "fp32" else None)
    else:
        stepper = Stepper(model, optimizer, scheduler, scaler, info=info, accum_steps=a.accum_steps,
                          clip_grad=plan.clip_grad)
    if info.is_main:
        if use_graphs:
            log.info("CUDA graphs: on (warm-up steps, then the whole step captured once and replayed)")
        if head_count is not None:
            log.info("masked-only head: %d tokens per step (a static count: no device sync)", head_count)
        elif compiled.mode == "model" or use_graphs:
            log.info("masked-only head: off under --compile model / CUDA graphs (%s): the full head runs", head_why)
    t_first = time.perf_counter()
    skipped_total = skipped_logged = 0
    images_since = 0
    t_log = t_start = time.perf_counter()
    rates: list[float] = []
    last_saved = step if state is not None else None
    last_ckpt = resume_path
    first_step, checked_step = step, step
    vis_batch = None
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=plan.precision != "fp32")
    pbar = tqdm(total=last_step, initial=step, desc="pretrain", unit="step", disable=not info.is_main,
                dynamic_ncols=True, mininterval=1.0)

    def check_finite() -> None:
        nonlocal checked_step
        if stepper.diverged():  # every rank stops together; host sync, only at log/save steps
            msg = (
                f"loss became NaN/inf between step {checked_step + 1} and step {step}; stopping. "
                f"Nothing was saved after it: last good checkpoint: {last_ckpt or 'none'}"
            )
            if head_count is not None and data_backend == "dali" and device.type == "cuda":
                msg += (f" (or a batch's mask held more than the {head_count} masked head tokens the static count "
                        f"allows: the masked-only head then returns NaN)")
            raise TrainingDiverged(msg)
        checked_step = step

    def save_now() -> Path:
        nonlocal last_saved, last_ckpt
        check_finite()
        if strategy == "fsdp":  # each rank checks its shards; all stop together
            fsdp.check_sharded_state_finite(model, optimizer, step=step, last_good=last_ckpt)
        else:
            ckpt.check_state_finite(_unwrap(model).state_dict(), optimizer, step=step, last_good=last_ckpt)
        rng_states = all_gather_objects(ckpt.rng_state(), info)
        path = None
        if strategy == "fsdp":  # every rank writes its shards into checkpoint_<step>.dcp (training.sharded_checkpoint)
            path = sharded.save_sharded(
                ckpt.sharded_path(output, step), model=model, optimizer=optimizer, info=info,
                meta={"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                      "epoch": step // steps_per_epoch, "args": asdict(a), "plan": asdict(plan), "rng": rng_states,
                      "world_size": info.world_size})
            if info.is_main:
                ckpt.prune_checkpoints(output, a.keep_checkpoints)
        elif info.is_main:
            path = _save(ckpt.checkpoint_path(output, step), model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=scaler, step=step, epoch=step // steps_per_epoch, args=a, plan=plan,
                         rng_states=rng_states, world_size=info.world_size)
            ckpt.prune_checkpoints(output, a.keep_checkpoints)
        barrier(info)
        last_saved, last_ckpt = step, path or ckpt.checkpoint_path(output, step)
        return last_ckpt

    t_plot = time.perf_counter()

    def plot_losses() -> None:
        if metrics is None:
            return
        try:
            write_loss_plot(metrics.path, output / "loss.png", title=f"{a.preset}: {output}")
        except Exception as e:  # a plot must never stop training
            log.warning("loss.png not written: %s", e)

    def save_pictures() -> None:
        if vis_batch is None or not (info.is_main or strategy == "fsdp"):  # FSDP: every rank's predict gathers
            return
        images, masks = vis_batch
        net = _unwrap(model)
        net.eval()
        with autocast:
            pred = net.predict(images, masks)
        net.train()
        # with normalised targets the prediction lives in target space: picture it against the targets
        shown = net.targets(images) if net.norm_target else images
        if info.is_main:
            save_reconstruction_grid(output / f"reconstruction_{step:08d}.png", shown, masks, pred)

    try:
        if step < last_step:
            for images, masks, skipped in loader:
                head = {}
                if head_count is not None:
                    head = {"head_count": head_count}
                    if masks.device.type == "cpu" and device.type != "cpu":  # the loader's CPU copy: no sync
                        _unwrap(model).check_head_count(masks, head_count)
                elif device.type == "cuda" and masks.device.type == "cpu" and compiled.mode != "model":
                    # the masked-only head's token index from the CPU mask: no device sync in forward
                    idx = _unwrap(model).masked_head_tokens(images, masks)
                    if idx is not None:
                        head = {"head_tokens": idx.pin_memory().to(device, non_blocking=True)}
                skipped_total += skipped
                images_since += images.shape[0] * info.world_size
                if isinstance(stepper, GraphedStepper):  # the batch goes into the graph's static buffers
                    if vis_batch is None:
                        vis_batch = (images[: a.vis_images].to(device), masks[: a.vis_images].to(device, torch.bool))
                    stepper.train_step(step, images, masks)
                else:
                    images = images.to(device, non_blocking=True)
                    masks = masks.to(device, torch.bool, non_blocking=True)  # bool: no value check in the model
                    if vis_batch is None:
                        vis_batch = (images[: a.vis_images].clone(), masks[: a.vis_images].clone())

                    def compute_loss() -> torch.Tensor:
                        with autocast:
                            return model(images, masks, **head)

                    if not stepper.micro_step(step, compute_loss):
                        continue
                step += 1
                pbar.update(1)
                if step == first_step + 1 and compiled.mode != "off" and info.is_main:
                    cs = compile_stats()
                    log.info("torch.compile: first step %.1f s (host time, compilation included): %d graphs, %d graph "
                             "breaks%s", time.perf_counter() - t_first, cs["graphs"], cs["graph_breaks"],
                             f" ({'; '.join(cs['break_reasons'])})" if cs["graph_breaks"] else "")

                if step % a.log_every == 0 or step == last_step:
                    check_finite()
                    now = time.perf_counter()
                    rate = images_since / max(now - t_log, 1e-9)
                    rates.append(rate)
                    mean_loss = stepper.pop_mean_loss()  # over all ranks
                    row = {
                        "step": step, "epoch": step // steps_per_epoch, "loss": mean_loss,
                        "lr": float(optimizer.param_groups[0]["lr"]), "grad_norm": float(stepper.grad_norm),
                        "img_per_s": round(rate, 3), "skipped_images": skipped_total,
                        "elapsed_s": round(now - t_start, 3),
                    }
                    if metrics is not None:
                        metrics.write(row)
                        if now - t_plot >= 60.0:  # loss.png at log steps, at most once a minute
                            plot_losses()
                            t_plot = now
                    pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.1f}", lr=f"{row['lr']:.2e}")
                    if skipped_total > skipped_logged and info.is_main:  # only when it grew
                        log.info("skipped %d reads of unreadable image files so far (the first files are named "
                                 "in the warnings above)", skipped_total)
                        skipped_logged = skipped_total
                    images_since, t_log = 0, now
                if step % a.save_every == 0 and step != last_step:
                    save_now()
                if a.vis_every and step % a.vis_every == 0 and step != last_step:
                    save_pictures()
                if step >= last_step:
                    break
        if last_saved != step:
            save_now()
        save_pictures()
        plot_losses()
    finally:
        pbar.close()
        if metrics is not None:
            metrics.close()

    summary = {
        "steps": step,
        "steps_this_run": step - first_step,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "img_per_s": (sum(rates[1:]) / len(rates[1:])) if len(rates) > 1 else (rates[0] if rates else float("nan")),
        "resumed_from": str(resume_path) if resume_path else None,
        "skipped_images": skipped_total,
        "output": str(output),
        "compile": compiled.mode,
        "cuda_graphs": stepper.status if isinstance(stepper, GraphedStepper) else "off",
        "strategy": strategy,
    }
    if info.is_main and summary["steps_this_run"] == 0:
        print(f"already complete: step {step}/{total_steps}, nothing to do (raise --max-steps or --epochs to "
              f"continue), checkpoint {summary['checkpoint']}", flush=True)
    elif info.is_main:
        print(
            f"done: step {step}/{total_steps}, {summary['steps_this_run']} steps this run, "
            f"{summary['img_per_s']:.1f} img/s, checkpoint {summary['checkpoint']}",
            flush=True,
        )
    return summary
