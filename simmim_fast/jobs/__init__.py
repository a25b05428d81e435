"""The work behind each CLI (torch, timm, DALI), imported only after the CLI's arguments are checked.

``pretrain`` (``python -m simmim_fast.train``), ``finetune``, ``linear_probe``, ``visualize``, ``probe``.
The CLI modules (``simmim_fast.train`` etc.) re-export these modules' names.
"""
