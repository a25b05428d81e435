"""The names the CLIs accept, without importing torch (``--help`` and argument checks run before it loads).

Each tuple restates a constant of the module that uses the name; tests/test_cli_validation.py checks that
they agree, so a preset or backend added there and not here fails a test instead of being refused.
"""
from __future__ import annotations

PRESETS = ("swin_base_192", "swin_base_192_800ep", "swin_large_192", "vit_base_224", "swinv2_base_192",
           "swinv2_large_192", "swinv2_huge_192", "swinv2_giant_192", "swin_tiny_cpu", "vit_tiny_cpu",
           "swinv2_tiny_cpu")  # models.presets.PRESETS
DEFAULT_PRESET = "swin_tiny_cpu"  # models.presets.DEFAULT_PRESET
FINETUNE_PRESETS = ("swin_base_224", "swin_base_192", "swin_base_224_800ep", "swin_large_224", "vit_base_224",
                    "swinv2_base_224", "swin_tiny_cpu", "vit_tiny_cpu",
                    "swinv2_tiny_cpu")  # models.classifier.FINETUNE_PRESETS
DEFAULT_FINETUNE_PRESET = "swin_tiny_cpu"  # models.classifier.DEFAULT_FINETUNE_PRESET

MASK_STRATEGIES = ("random", "square", "block")  # data.masking.STRATEGIES
LOSSES = ("l1", "l2", "smooth_l1")  # ops.masked_l1_loss.LOSSES
REGIONS = ("masked", "all")  # ops.masked_l1_loss.REGIONS
DATA_BACKENDS = ("auto", "torch", "dali")  # data.dali.DATA_BACKENDS
ATTN_BACKENDS = ("auto", "triton", "xformers", "sdpa", "math", "timm")  # models.classifier.ATTN_BACKENDS
OPS_BACKENDS = ("auto", "triton", "reference")  # the ops' backend argument
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # "auto" + jobs.pretrain.PRECISIONS
MIXUP_MODES = ("batch", "pair", "elem")  # timm Mixup modes (data.classification.build_mixup)
POOLS = ("mean", "tokens")  # jobs.probe.POOLS
RECIPES = ("official", "clean")  # models.presets.RECIPES
COMPILE_MODES = ("auto", "off", "blocks", "model")  # training.compile.COMPILE_MODES
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # training.compile.COMPILE_BACKENDS
CUDA_GRAPH_MODES = ("auto", "on", "off")  # training.cuda_graphs.CUDA_GRAPH_MODES
STRATEGIES = ("auto", "ddp", "fsdp")  # training.planner.STRATEGIES
