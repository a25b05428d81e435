"""Classification models for fine-tuning a SimMIM encoder, and the official fine-tuning presets.

A classifier is a plain timm network (``SwinTransformer`` or ``Beit``) built from the pretraining
preset's encoder with the fine-tuning changes of the official configs (``configs/*finetune*``):
Swin 192 px window 6 -> 224 px window 7 (Swin-L: window 14), drop-path 0.1 (Swin-L 0.2), average
pooling + linear head; SwinV2 (``simmim_finetune__swinv2_base__img224_window14__800ep``, microsoft/
Swin-Transformer): 192 px window 12 -> 224 px window 14 with ``pretrained_window_sizes`` 12-12-12-6 (see
"SwinV2 window change" below), layer decay 0.75; ViT: one relative-position bias per block (the shared pretraining table is
copied into each, official ``remap_pretrained_keys_vit``), mean pooling of the patch tokens with a
fresh fc-norm (``USE_MEAN_POOLING``), head initialised at 0.001 scale. Being plain timm networks,
fine-tuned checkpoints export to timm unchanged.

Shapes
    images  (B, 3, S, S)  normalised (ImageNet mean/std), S = the preset's (or overridden) img_size
    logits  (B, num_classes)

SwinV2 window change. Nothing is resized: the CPB-MLP that makes the position bias is a function of
the (log-spaced) relative coordinates, so its weights load unchanged into any window; only the
non-persistent ``relative_coords_table`` / ``relative_position_index`` buffers are rebuilt, by timm,
for the fine-tuning window. What the official recipe changes, and ``classifier_spec`` does too, is
``pretrained_window_sizes``: each stage's offsets are divided by ``pretrained window - 1`` instead of
``window - 1`` before the ``log2`` spacing, so an offset of the pretraining window keeps its
pretraining coordinate and larger ones extrapolate beyond +-8. ``classifier_spec`` takes them from the
pretraining preset (each stage's window in use at the pretraining size: 12-12-12-6 for 192 px window
12, the official list) whatever ``--window-size`` is.

``build_classifier(spec)`` rebuilds a network from the JSON-able ``spec`` stored in fine-tuning
checkpoints; ``load_pretrained(model, source)`` fills it from any pretraining checkpoint (ours, the
official code's, a fine-tuned one), resizing position tables (see ``interchange``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch.nn as nn

from .interchange import Checkpoint, LoadReport, load_encoder_weights, read_checkpoint
from .presets import get_preset

log = logging.getLogger("simmim_fast.classifier")

__all__ = ["FinetuneRecipe", "FinetunePreset", "FINETUNE_PRESETS", "DEFAULT_FINETUNE_PRESET", "get_finetune_preset",
           "classifier_spec", "build_classifier", "load_pretrained", "pretraining_windows"]


@dataclass(frozen=True)
class FinetuneRecipe:
    """Official fine-tuning recipe (``config.py`` defaults + ``configs/*finetune*``); lr per 512 images."""

    img_size: int = 224
    epochs: int = 100
    warmup_epochs: float = 20
    base_lr: float = 1.25e-3
    warmup_lr: float = 2.5e-7
    min_lr: float = 2.5e-7
    weight_decay: float = 0.05
    layer_decay: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0
    batch_size: int = 128  # per GPU (official: 128 x 16 GPUs = 2048)
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    color_jitter: float = 0.4
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    interpolation: str = "bicubic"
    test_crop: bool = True  # eval: resize to 256/224 * size, then center crop


@dataclass(frozen=True)
class FinetunePreset:
    name: str
    pretrain_preset: str  # the encoder architecture (a pretraining preset name)
    overrides: dict = field(default_factory=dict)  # timm keyword arguments changed for fine-tuning
    recipe: FinetuneRecipe = field(default_factory=FinetuneRecipe)
    description: str = ""

    @property
    def arch(self) -> str:
        return get_preset(self.pretrain_preset).arch


_VIT_FT = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_abs_pos_emb=False)

FINETUNE_PRESETS: dict[str, FinetunePreset] = {
    p.name: p
    for p in [
        FinetunePreset(
            "swin_base_224", "swin_base_192", dict(window_size=7),
            FinetuneRecipe(img_size=224, layer_decay=0.9, drop_path=0.1),
            "Swin-B 224 px window 7 after 100-ep pretraining (simmim_finetune__swin_base__img224_window7__100ep); paper: 84.0",
        ),
        FinetunePreset(
            "swin_base_192", "swin_base_192", dict(window_size=6),
            FinetuneRecipe(img_size=192, layer_decay=0.9, drop_path=0.1),
            "Swin-B 192 px window 6 (simmim_finetune__swin_base__img192_window6__100ep)",
        ),
        FinetunePreset(
            "swin_base_224_800ep", "swin_base_192_800ep", dict(window_size=7),
            FinetuneRecipe(img_size=224, layer_decay=0.8, drop_path=0.1),
            "Swin-B 224 px window 7 after 800-ep pretraining (simmim_finetune__swin_base__img224_window7__800ep)",
        ),
        FinetunePreset(
            "swin_large_224", "swin_large_192", dict(window_size=14),
            FinetuneRecipe(img_size=224, layer_decay=0.7, drop_path=0.2),
            "Swin-L 224 px window 14 (simmim_finetune__swin_large__img224_window14__800ep)",
        ),
        FinetunePreset(
            "vit_base_224", "vit_base_224", dict(_VIT_FT),
            FinetuneRecipe(img_size=224, layer_decay=0.65, drop_path=0.1),
            "ViT-B/16 224 px, per-block rel-pos bias, mean pooling (simmim_finetune__vit_base__img224__800ep); paper: 83.8",
        ),
        FinetunePreset(
            "swinv2_base_224", "swinv2_base_192", dict(window_size=14),
            # Swin-Transformer configs/simmim/simmim_finetune__swinv2_base__img224_window14__800ep.yaml over its
            # config.py (augmentations, label smoothing 0.1, test crop: the FinetuneRecipe defaults)
            FinetuneRecipe(img_size=224, epochs=100, warmup_epochs=20, base_lr=1.25e-3, warmup_lr=2.5e-7,
                           min_lr=2.5e-7, weight_decay=0.05, layer_decay=0.75, drop_path=0.1),
            "SwinV2-B 224 px window 14 (pretrained windows 12-12-12-6) after 800-ep pretraining "
            "(simmim_finetune__swinv2_base__img224_window14__800ep)",
        ),
        FinetunePreset(
            "swin_tiny_cpu", "swin_tiny_cpu", dict(window_size=7),
            # not an official config: lr gives 1e-3 at batch 16; short schedule, official augmentations
            FinetuneRecipe(img_size=224, epochs=10, warmup_epochs=1, base_lr=3.2e-2, warmup_lr=3.2e-5, min_lr=3.2e-4,
                           layer_decay=0.9, drop_path=0.1, batch_size=16),
            "small Swin from swin_tiny_cpu pretraining, 192/window 6 -> 224/window 7 as the official Swin-B recipe",
        ),
        FinetunePreset(
            "vit_tiny_cpu", "vit_tiny_cpu", dict(_VIT_FT),
            FinetuneRecipe(img_size=224, epochs=10, warmup_epochs=1, base_lr=3.2e-2, warmup_lr=3.2e-5, min_lr=3.2e-4,
                           layer_decay=0.65, drop_path=0.1, batch_size=16),
            "small BEiT-style ViT from vit_tiny_cpu pretraining, official ViT-B fine-tuning layout",
        ),
        FinetunePreset(
            "swinv2_tiny_cpu", "swinv2_tiny_cpu", dict(window_size=14),
            FinetuneRecipe(img_size=224, epochs=10, warmup_epochs=1, base_lr=3.2e-2, warmup_lr=3.2e-5, min_lr=3.2e-4,
                           layer_decay=0.75, drop_path=0.1, batch_size=16),
            "small SwinV2 from swinv2_tiny_cpu pretraining, 192/window 12 -> 224/window 14 as the official SwinV2-B recipe",
        ),
    ]
}

DEFAULT_FINETUNE_PRESET = "swin_tiny_cpu"


def get_finetune_preset(name: str) -> FinetunePreset:
    if name not in FINETUNE_PRESETS:
        raise ValueError(f"preset: unknown fine-tuning preset {name!r}; known presets: {', '.join(sorted(FINETUNE_PRESETS))}")
    return FINETUNE_PRESETS[name]


_SWIN_ARGS = ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias",
              "drop_path_rate")
_SWINV2_ARGS = _SWIN_ARGS + ("pretrained_window_sizes",)
_VIT_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "init_values",
             "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias", "drop_path_rate")


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")


def classifier_spec(
    preset: str | FinetunePreset,
    *,
    num_classes: int,
    img_size: int | None = None,
    window_size: int | None = None,
    drop_path: float | None = None,
) -> dict:
    """The JSON-able description ``{"arch", "kwargs", "preset"}`` of a fine-tuning preset's classifier."""
    p = get_finetune_preset(preset) if isinstance(preset, str) else preset
    _positive_int("num_classes", num_classes)
    enc = dict(get_preset(p.pretrain_preset).encoder)
    enc.update(p.overrides)
    enc["img_size"] = p.recipe.img_size if img_size is None else img_size
    enc["drop_path_rate"] = p.recipe.drop_path if drop_path is None else drop_path
    _positive_int("--img-size", enc["img_size"])
    if window_size is not None:
        if p.arch not in ("swin", "swinv2"):
            raise ValueError(f"--window-size: only Swin presets have a window size, {p.name!r} is a ViT")
        _positive_int("--window-size", window_size)
        enc["window_size"] = window_size
    if p.arch == "swinv2" and "pretrained_window_sizes" not in p.overrides:
        enc["pretrained_window_sizes"] = pretraining_windows(p.pretrain_preset)
    if not isinstance(enc["drop_path_rate"], (int, float)) or not 0.0 <= enc["drop_path_rate"] < 1.0:
        raise ValueError(f"--drop-path: expected a rate in [0, 1), got {enc['drop_path_rate']!r}")
    patch = enc["patch_size"]
    stride = patch * (2 ** (len(enc["depths"]) - 1) if p.arch in ("swin", "swinv2") else 1)
    if enc["img_size"] % stride:
        raise ValueError(f"--img-size: {enc['img_size']} must be a multiple of the encoder stride {stride} of {p.name!r}")
    names = {"swin": _SWIN_ARGS, "swinv2": _SWINV2_ARGS}.get(p.arch, _VIT_ARGS)
    kwargs = {k: (list(enc[k]) if isinstance(enc[k], tuple) else enc[k]) for k in names if k in enc}
    kwargs.update(num_classes=int(num_classes), global_pool="avg")
    return {"arch": p.arch, "kwargs": kwargs, "preset": p.name}


def pretraining_windows(pretrain_preset: str) -> tuple[int, ...]:
    """Each stage's window in use when a SwinV2 pretraining preset runs at its recipe's size.

    The official rule (a stage no larger than its window is one window of the whole stage):
    ``min(window, stage resolution)``; ``swinv2_base_192`` gives ``(12, 12, 12, 6)``, the
    ``PRETRAINED_WINDOW_SIZES`` of the official SwinV2 fine-tuning configs.
    """
    pp = get_preset(pretrain_preset)
    if pp.arch != "swinv2":
        raise ValueError(f"pretrain_preset: {pretrain_preset!r} is not a SwinV2 preset")
    enc = pp.encoder
    grid = pp.recipe.img_size // enc["patch_size"]
    return tuple(min(int(enc["window_size"]), grid // 2**s) for s in range(len(enc["depths"])))


ATTN_BACKENDS = ("auto", "triton", "xformers", "sdpa", "math", "timm")


def build_classifier(spec: dict, *, attn_backend: str = "auto") -> nn.Module:
    """A timm ``SwinTransformer`` / ``SwinTransformerV2`` / ``Beit`` classifier from ``classifier_spec(...)``'s output.

    Swin: ``attn_backend`` other than ``"timm"`` swaps timm's window attention for ours
    (``swap_window_attention``: same parameters and keys; xformers on CUDA when it dispatches). SwinV2:
    ``swap_window_attention_v2`` (SDPA; ``"xformers"`` raises ``NotImplementedError``: cosine attention is
    not supported by that path yet).
    """
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS}, got {attn_backend!r}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec["kwargs"].items()}
    if spec["arch"] == "swin":
        from timm.models.swin_transformer import SwinTransformer

        from .window_attention import swap_window_attention

        model = SwinTransformer(**kwargs)
        return model if attn_backend == "timm" else swap_window_attention(model, backend=attn_backend)
    if spec["arch"] == "swinv2":
        from timm.models.swin_transformer_v2 import SwinTransformerV2

        from .window_attention_v2 import swap_window_attention_v2

        model = SwinTransformerV2(**kwargs)
        return model if attn_backend == "timm" else swap_window_attention_v2(model, backend=attn_backend)
    if spec["arch"] == "vit":
        from timm.models.beit import Beit

        return Beit(**kwargs)  # timm's default norm: LayerNorm eps 1e-6, as the official ViT
    raise ValueError(f"spec: unknown arch {spec['arch']!r} (expected swin, swinv2 or vit)")


def load_pretrained(model: nn.Module, source: str | os.PathLike | Checkpoint) -> LoadReport:
    """Fill ``model`` (a classifier) from a pretraining or fine-tuning checkpoint, ours or official.

    Follows the official ``load_pretrained``: only the encoder is taken (the mask token and decoder
    are ignored), relative-position tables are resized to the model's windows, a ViT's shared table
    is copied into every block; the head (and a ViT's fc-norm) keep their initialisation unless the
    checkpoint has ones of the same shape. Raises ``ValueError`` when the encoder does not match.
    """
    ck = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    report = load_encoder_weights(model, ck.state_dict)
    log.info("loaded %s checkpoint %s: %s", ck.kind, ck.path, report.summary())
    return report


def with_recipe(preset: FinetunePreset, **changes) -> FinetunePreset:
    """A copy of ``preset`` with recipe fields replaced (for tests and quick experiments)."""
    return replace(preset, recipe=replace(preset.recipe, **changes))
