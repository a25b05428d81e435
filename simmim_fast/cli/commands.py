"""The option table of each CLI: train, finetune, linear_probe, visualize, probe. Imports no torch.

Options shared by several CLIs are declared once below and reused (``replace`` where a CLI words its
help differently). A new flag is one :class:`~simmim_fast.cli.options.Option` added to a table (and, when
shared, declared here once); argparse, YAML typing, ``--help`` and the checks all read it from there.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace

from . import names
from .options import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, RATE, Command, Option, Range, Rule

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_name(value: str) -> str | None:
    """None for a device name the CLIs take (availability is checked when the job starts)."""
    return None if _DEVICE.match(value) else "auto, cpu, cuda or cuda:N"


# ---------------------------------------------------------------------------------------------
# shared declarations (train, finetune, linear_probe)
# ---------------------------------------------------------------------------------------------
RECIPE = "the preset's recipe"
DATA = Option("data", path="dir", expect="a folder of images", help="folder of images, searched recursively",
              default_help="the embedded photographs")
RESUME = Option("resume", const="auto", path="file", expect="a checkpoint file", resumed=False,
                help="continue from the newest checkpoint in --output (the flag alone) or from this checkpoint file")
EPOCHS = Option("epochs", int, range=POSITIVE, help="epochs", default_help=RECIPE)
MAX_STEPS = Option("max_steps", int, range=POSITIVE, resumed=False, default_help="all epochs",
                   help="stop after this many optimizer steps in total")
BATCH_SIZE = Option("batch_size", int, range=POSITIVE, help="images per process and micro-step", default_help=RECIPE)
ACCUM_STEPS = Option("accum_steps", int, 1, range=POSITIVE, help="gradient accumulation micro-steps per optimizer step")
IMG_SIZE = Option("img_size", int, range=POSITIVE, help="input size in pixels", default_help="the preset's")
PRECISION = Option("precision", str, "auto", choices=names.PRECISIONS,
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
DEVICE = Option("device", str, "auto", check=device_name, resumed=False,
                help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
SEED = Option("seed", int, 0, range=NON_NEGATIVE, help="random seed")
GRAD_CHECKPOINTING = Option("grad_checkpointing", bool, False, help="activation checkpointing (less memory, more compute)")
NUM_WORKERS = Option("num_workers", int, range=NON_NEGATIVE, resumed=False,
                     help="data loader worker processes (DALI: CPU threads)",
                     default_help="min(8, cores) on CUDA, half the cores on CPU")
THREADS = Option("threads", int, range=POSITIVE, resumed=False, help="torch CPU threads of each process",
                 default_help="on CPU, the cores per rank minus the loader workers; an OMP_NUM_THREADS in the "
                              "environment wins")
LOG_ALL_RANKS = Option("log_all_ranks", bool, False, resumed=False,
                       help="under torchrun, INFO log lines from every rank (otherwise rank 0 only)")
ATTN_BACKEND = Option("attn_backend", str, "auto", choices=names.ATTN_BACKENDS,
                      help="Swin window attention: auto = on CUDA the fused Triton kernel when it supports the input, else "
                           "xformers when it dispatches, else SDPA (triton needs CUDA, or TRITON_INTERPRET=1 on CPU: slow)")
COMPILE = Option("compile", str, "auto", choices=names.COMPILE_MODES, resumed=False,
                 help="torch.compile of the training step: blocks = each transformer block (one graph per block "
                      "shape, reused by every block of that shape), model = the whole model, off; auto = blocks on "
                      "CUDA, off on CPU")
COMPILE_BACKEND = Option("compile_backend", str, "inductor", choices=names.COMPILE_BACKENDS, resumed=False,
                         help="torch.compile backend: inductor (generated fused kernels); aot_eager / eager trace "
                              "without code generation (debugging)")
BASE_LR = Option("base_lr", float, range=POSITIVE, help="learning rate per 512 images of total batch (linear scaling)",
                 default_help=RECIPE)
WARMUP_LR = Option("warmup_lr", float, range=NON_NEGATIVE, help="learning rate at the start of warmup, per 512 images",
                   default_help=RECIPE)
MIN_LR = Option("min_lr", float, range=NON_NEGATIVE, help="learning rate at the end of the schedule, per 512 images",
                default_help=RECIPE)
WARMUP_EPOCHS = Option("warmup_epochs", float, range=NON_NEGATIVE, help="epochs of linear warmup", default_help=RECIPE)
WEIGHT_DECAY = Option("weight_decay", float, range=NON_NEGATIVE, help="AdamW weight decay", default_help=RECIPE)
CLIP_GRAD = Option("clip_grad", float, range=NON_NEGATIVE, help="gradient-norm clip; 0 disables", default_help=RECIPE)
DROP_PATH = Option("drop_path", float, range=RATE, help="stochastic depth rate", default_help="the preset's")
LOG_EVERY = Option("log_every", int, 10, range=POSITIVE, help="optimizer steps between log lines")
RECIPE_RULES = Option("recipe", str, choices=names.RECIPES,
                      help="official: the microsoft/SimMIM code exactly (its weight-decay sets, the lr one step behind "
                           "the schedule, its ViT init); clean: those deliberate deviations removed (README)",
                      default_help="the preset's: official for the official configs, clean for the *_cpu presets")
FORCE = Option("force", bool, False, resumed=False,
               help="with --resume from a checkpoint older than others in --output: continue in --output and move "
                    "the later steps' files into <output>/abandoned-<n>/ (default: write a new branch-<step>/ folder)")


def odd_patch(value: int) -> str | None:
    """None for a valid normalised-target window (odd, >= 3: the official count correction needs 2+ pixels)
    or 0 (off: raw pixels)."""
    return None if value == 0 or (value >= 3 and value % 2 == 1) else "an odd window size >= 3, or 0 (off)"


KEEP_CHECKPOINTS = Option("keep_checkpoints", int, 2, range=NON_NEGATIVE, help="newest checkpoints kept; 0 keeps all")

# finetune and linear_probe
CLASS_DATA = replace(DATA, expect="a folder with train/<class>/ and val/<class>/",
                     help="folder with train/<class>/ and val/<class>/")

# shared by visualize and probe
CHECKPOINT = Option("checkpoint", path="file_or_dir", expect="a checkpoint file or a run folder", required=True,
                    help="a checkpoint file, or a run folder (its newest checkpoint)")
IMAGES = Option("images", many=True, path="file_or_dir", expect="image files or folders",
                help="image files and/or folders, searched recursively", default_help="the embedded photographs")
MASK_RATIO = Option("mask_ratio", float, range=FRACTION, help="fraction of the mask cells masked",
                    default_help="the checkpoint's")
MASK_PATCH_SIZE = Option("mask_patch_size", int, range=POSITIVE, help="mask cell size in pixels",
                         default_help="the checkpoint's")
MASK_STRATEGY = Option("mask_strategy", str, choices=names.MASK_STRATEGIES, help="mask shape",
                       default_help="the checkpoint's")

# ---------------------------------------------------------------------------------------------
# python -m simmim_fast.train
# ---------------------------------------------------------------------------------------------
TRAIN = Command(
    prog="python -m simmim_fast.train",
    description="SimMIM pretraining. No arguments: the small preset on the embedded photographs.",
    options=(
        Option("preset", str, names.DEFAULT_PRESET, "pretraining preset", choices=names.PRESETS, what="preset"),
        DATA,
        Option("output", path="out_dir", expect="a run folder", resumed=False,
               help="run folder for checkpoints, logs and PNGs",
               default_help="runs/<preset>, or runs/<preset>-2, -3, ... when that one already holds a run; "
                            "with --resume, the newest of them"),
        replace(RESUME, path="file_or_dir", expect="a checkpoint file",  # or a .dcp folder / run folder (help)
                help="continue from the newest checkpoint in --output (the flag alone), or from this checkpoint file, "
                     "sharded checkpoint_<step>.dcp folder (any number of processes) or run folder"),
        EPOCHS, MAX_STEPS, BATCH_SIZE, ACCUM_STEPS, IMG_SIZE, PRECISION, DEVICE, SEED, GRAD_CHECKPOINTING,
        NUM_WORKERS, THREADS, LOG_ALL_RANKS,
        Option("strategy", str, "auto", choices=names.STRATEGIES, resumed=False,
               help="under torchrun: ddp = a full replica per process; fsdp = FSDP2 sharding per transformer block "
                    "(checkpoints become sharded checkpoint_<step>.dcp folders); auto = DDP when its step fits the "
                    "device's memory, else FSDP (python -m simmim_fast.info --plan shows the numbers); one process: "
                    "neither"),
        Option("data_backend", str, "auto", choices=names.DATA_BACKENDS, resumed=False,
               help="input pipeline: torch DataLoader, DALI (nvJPEG on CUDA, CPU mode on CPU), or auto = DALI "
                    "when nvidia.dali imports and the device is CUDA, else torch"),
        replace(MASK_STRATEGY, default="random", default_help=None, help="mask shape: random (official), square, block"),
        replace(MASK_PATCH_SIZE, default_help=RECIPE),
        replace(MASK_RATIO, default_help=RECIPE,
                help="fraction of the mask cells masked, strictly between 0 (nothing to learn) and 1 (nothing visible)"),
        Option("loss", str, "l1", choices=names.LOSSES, help="regression loss; the official one is l1"),
        Option("predict", str, "masked", choices=names.REGIONS,
               help="masked: loss on the masked pixels (official); all: reconstruct every pixel"),
        BASE_LR, WARMUP_LR, MIN_LR, WARMUP_EPOCHS, WEIGHT_DECAY, CLIP_GRAD, DROP_PATH,
        Option("ops_backend", str, "auto", choices=names.OPS_BACKENDS,
               help="fused ops: auto = Triton on CUDA, the PyTorch reference otherwise"),
        ATTN_BACKEND, COMPILE, COMPILE_BACKEND,
        Option("cuda_graphs", str, "auto", choices=names.CUDA_GRAPH_MODES, const="on", resumed=False,
               help="capture the whole step (forward, backward, clip, AdamW) in a CUDA graph and replay it; on = where "
                    "the capture can hold (CUDA, bf16/fp32, one process, no accumulation), else off with the reason "
                    "logged; auto = off until the capture has been verified on a GPU; the flag alone means on"),
        LOG_EVERY,
        Option("save_every", int, 100, range=POSITIVE, help="optimizer steps between checkpoints"),
        KEEP_CHECKPOINTS,
        Option("vis_every", int, 0, range=NON_NEGATIVE,
               help="optimizer steps between reconstruction PNGs; 0: only at the end"),
        Option("vis_images", int, 4, range=POSITIVE, help="images per reconstruction PNG"),
        RECIPE_RULES, FORCE,
        Option("norm_target", int, const="47", check=odd_patch,
               help="regress normalised targets (SwinV2 SimMIM's NORM_TARGET): each target pixel normalised by the "
                    "mean and variance of its PATCH x PATCH neighbourhood; the flag alone means 47 (official); "
                    "0 regresses raw pixels",
               default_help="the preset's: 47 for the SwinV2 presets (their official config), else off"),
    ),
    rules=(Rule(("mask_patch_size", "img_size"), lambda mps, size: size % mps == 0,
                "{mask_patch_size} must divide --img-size {img_size}"),
           Rule(("strategy", "precision"), lambda strategy, precision: strategy != "fsdp" or precision != "fp16",
                "fsdp runs --precision fp32 or bf16, not fp16 (its gradient scaler does not handle sharded "
                "gradients): use --precision bf16"),),
)

# ---------------------------------------------------------------------------------------------
# python -m simmim_fast.finetune
# ---------------------------------------------------------------------------------------------
FINETUNE = Command(
    prog="python -m simmim_fast.finetune",
    description="Fine-tune a SimMIM-pretrained encoder for image classification (official recipe).",
    options=(
        Option("preset", str, names.DEFAULT_FINETUNE_PRESET, "fine-tuning preset", choices=names.FINETUNE_PRESETS,
               what="fine-tuning preset"),
        Option("pretrained", path="file_or_dir", expect="a checkpoint file or a run folder",
               help="pretraining run folder or checkpoint (ours or an official .pth), or a fine-tuned checkpoint",
               default_help="none: a random initialisation"),
        CLASS_DATA,
        Option("output", path="out_dir", expect="a run folder", resumed=False, help="run folder",
               default_help="runs/finetune_<preset>"),
        RESUME,
        Option("eval", bool, False, resumed=False,
               help="only evaluate (the --resume checkpoint, or the --pretrained weights) on val: top-1/top-5"),
        EPOCHS, MAX_STEPS, BATCH_SIZE, ACCUM_STEPS, IMG_SIZE,
        Option("window_size", int, range=POSITIVE, help="Swin window size", default_help="the preset's"),
        PRECISION, DEVICE, SEED, NUM_WORKERS, THREADS, LOG_ALL_RANKS,
        Option("data_backend", str, "auto", choices=names.DATA_BACKENDS, resumed=False,
               help="input pipeline: torch (timm transforms), dali (GPU decode + augmentation; CPU mode without "
                    "CUDA), auto = dali when installed and the device is CUDA, else torch"),
        GRAD_CHECKPOINTING, ATTN_BACKEND, COMPILE, COMPILE_BACKEND, BASE_LR, WARMUP_LR, MIN_LR, WARMUP_EPOCHS,
        WEIGHT_DECAY,
        Option("layer_decay", float, range=Range(0, 1, low_open=True), help="layer-wise lr decay (Swin-B 0.9, ViT-B 0.65)",
               default_help=RECIPE),
        CLIP_GRAD, DROP_PATH,
        Option("label_smoothing", float, range=RATE, help="label smoothing", default_help=RECIPE),
        Option("mixup", float, range=NON_NEGATIVE, help="mixup alpha; 0 disables", default_help=RECIPE),
        Option("cutmix", float, range=NON_NEGATIVE, help="cutmix alpha; 0 disables", default_help=RECIPE),
        Option("mixup_prob", float, range=PROBABILITY, help="probability of mixing a batch", default_help=RECIPE),
        Option("mixup_switch_prob", float, range=PROBABILITY, help="probability of cutmix instead of mixup when both are on",
               default_help=RECIPE),
        Option("mixup_mode", str, choices=names.MIXUP_MODES, help="mix per batch, pair or element", default_help=RECIPE),
        Option("auto_augment", str, help="timm RandAugment policy, or none", default_help=RECIPE),
        Option("color_jitter", float, range=NON_NEGATIVE, help="colour jitter strength", default_help=RECIPE),
        Option("reprob", float, range=PROBABILITY, help="random erasing probability", default_help=RECIPE),
        Option("ema", bool, False, help="keep an EMA of the weights and evaluate it too"),
        Option("ema_decay", float, 0.9999, range=FRACTION, help="EMA decay per step"),
        LOG_EVERY, KEEP_CHECKPOINTS, FORCE,
    ),
    rules=(Rule(("batch_size", "mixup", "cutmix"), lambda b, mixup, cutmix: (mixup == 0 and cutmix == 0) or b % 2 == 0,
                "mixup/cutmix need an even batch size per process, got {batch_size}"),),
)

# ---------------------------------------------------------------------------------------------
# python -m simmim_fast.linear_probe
# ---------------------------------------------------------------------------------------------
LINEAR_PROBE = Command(
    prog="python -m simmim_fast.linear_probe",
    description="Linear evaluation of a frozen SimMIM encoder.",
    options=(
        Option("pretrained", path="file_or_dir", expect="a checkpoint file or a run folder", required=True,
               help="the pretraining run folder or checkpoint (ours or official) whose encoder is evaluated"),
        Option("preset", str, choices=names.PRESETS, what="preset",
               help="pretraining preset, for official checkpoints whose shapes match none",
               default_help="from the checkpoint"),
        CLASS_DATA,
        Option("output", path="out_dir", expect="a run folder", help="run folder", default_help="runs/linear_probe"),
        RESUME,
        replace(EPOCHS, default=90, default_help=None),
        replace(WARMUP_EPOCHS, default=10.0, default_help=None),
        replace(BATCH_SIZE, default=256, default_help=None, help="images per process"),
        replace(BASE_LR, default=0.1, default_help=None, help="learning rate per 256 images (linear scaling)"),
        replace(MIN_LR, default=0.0, default_help=None, help="learning rate at the end of the schedule, per 256 images"),
        replace(WEIGHT_DECAY, default=0.0, default_help=None, help="SGD weight decay"),
        Option("momentum", float, 0.9, range=RATE, help="SGD momentum"),
        replace(IMG_SIZE, default_help="the pretraining size (the only one allowed)"),
        Option("precompute", bool, False, help="extract the features once (center crops, no augmentation): much faster"),
        PRECISION, DEVICE, SEED, NUM_WORKERS, LOG_EVERY, FORCE,
    ),
)

# ---------------------------------------------------------------------------------------------
# python -m simmim_fast.visualize
# ---------------------------------------------------------------------------------------------
VISUALIZE = Command(
    prog="python -m simmim_fast.visualize",
    description="Reconstruction grid (original | masked | prediction | pasted) of a SimMIM checkpoint.",
    options=(
        CHECKPOINT,
        replace(IMAGES, default_help="the embedded photographs, as probe and the trainer use"),
        Option("output", path="out_file", expect="the PNG file to write", help="PNG file to write",
               default_help="<checkpoint dir>/reconstruction_<checkpoint stem>.png"),
        Option("num_images", int, 8, range=POSITIVE, help="use the first N readable images in sorted path order"),
        MASK_RATIO, MASK_PATCH_SIZE, MASK_STRATEGY,
        replace(SEED, help="seed of the masks"),
        DEVICE,
    ),
    config=False,
)

# ---------------------------------------------------------------------------------------------
# python -m simmim_fast.probe
# ---------------------------------------------------------------------------------------------
PROBE = Command(
    prog="python -m simmim_fast.probe",
    description="Occlusion invariance of a SimMIM encoder: CKA of features under two masks.",
    options=(
        replace(CHECKPOINT, help="a pretraining run folder or checkpoint file (ours or official)"),
        Option("all", bool, False, help="probe every checkpoint of the run folder, oldest first"),
        IMAGES,
        Option("num_images", int, 32, check=lambda n: None if n >= 2 else "at least 2 images (CKA compares samples)",
               help="use the first N readable images"),
        Option("pool", str, "mean", choices=names.POOLS, help="mean: one vector per image; tokens: one per position"),
        MASK_RATIO, MASK_PATCH_SIZE, replace(MASK_STRATEGY, default="random", default_help=None),
        Option("preset", str, choices=names.PRESETS, what="preset", help="pretraining preset",
               default_help="found from the weights' shapes (official checkpoints)"),
        replace(SEED, help="seed of the masks"),
        replace(DEVICE, default="cpu"),
    ),
    rules=(Rule(("all", "checkpoint"), lambda all_, ckpt: not all_ or os.path.isdir(ckpt),
                "--checkpoint must be a run folder, got {checkpoint}"),),
    config=False,
)
