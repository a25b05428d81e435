"""SimMIM models: timm-based Swin / BEiT-style ViT encoders, the SimMIM wrapper, presets."""
from __future__ import annotations


from .presets import DEFAULT_PRESET, PRESETS, Preset, Recipe, build_encoder, get_preset
from .simmim import SimMIM
from .window_attention import WindowAttention, swap_window_attention
from .window_attention_v2 import WindowAttentionV2, swap_window_attention_v2

__all__ = ["PRESETS", "DEFAULT_PRESET", "Preset", "Recipe", "SimMIM", "create_model", "get_preset",
           "WindowAttention", "swap_window_attention", "WindowAttentionV2", "swap_window_attention_v2"]

_WRAPPER_KEYS = ("loss", "predict", "in_chans", "masked_head", "norm_target", "check_head_tokens")


def create_model(preset: str, *, ops_backend: str = "auto", **overrides) -> SimMIM:
    """The SimMIM model of a preset (see ``PRESETS``), with encoder keyword ``overrides``.

    ``loss`` (``"l1"``, ``"l2"``, ``"smooth_l1"``) and ``predict`` (``"masked"``, ``"all"``) set the
    paper's ablation knobs; ``norm_target=47`` regresses SwinV2 SimMIM's normalised targets (``None``:
    pixels; default: the preset's ``recipe.norm_target``, 47 for the SwinV2 presets as the official config); ``masked_head`` / ``check_head_tokens`` go to :class:`SimMIM` too; other overrides go to
    the encoder (e.g. ``img_size``, ``drop_path_rate``, ``window_size``, ``depths``). An unknown preset raises ``ValueError`` listing the known ones.
    """
    p = get_preset(preset)
    wrapper = {k: overrides.pop(k) for k in _WRAPPER_KEYS if k in overrides}
    wrapper.setdefault("norm_target", p.recipe.norm_target)
    if "in_chans" in wrapper:
        overrides["in_chans"] = wrapper["in_chans"]
    encoder = build_encoder(p, ops_backend=ops_backend, **overrides)
    return SimMIM(encoder, encoder_stride=encoder.encoder_stride, ops_backend=ops_backend, **wrapper)
