"""simmim-fast: SimMIM masked image modeling with fused kernels and a PyTorch reference path.

Public API (see shared ARCHITECTURE note):
    MaskGenerator, avg_dist          masking (official semantics + ablation strategies)
    create_model, PRESETS            SimMIM models of the official configs
    ops                              mask_token_fill, pixel_shuffle_head, masked_l1_loss
"""
from . import ops
from .data.masking import MaskGenerator, avg_dist
from .models import PRESETS, create_model
from .models.window_attention import swap_window_attention

__all__ = ["MaskGenerator", "avg_dist", "create_model", "PRESETS", "ops", "swap_window_attention"]
__version__ = "0.1.0"
