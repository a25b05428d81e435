"""Optimizer state that loads across AdamW implementations (fused, foreach, single, capturable) and devices.

``torch.optim.Optimizer.load_state_dict`` takes every hyper-parameter of the saved groups, the
implementation switches (``fused``, ``foreach``, ``capturable``) and a tensor ``lr`` included, and
places the ``step`` counters by the *saved* switches. So a checkpoint of a fused CUDA run would turn
a CPU run's optimizer fused, and a CUDA-graph run's device-tensor ``lr`` would travel into the next run.
Here:

- :func:`portable_state_dict` is ``optimizer.state_dict()`` with every tensor hyper-parameter
  (``lr``, betas) as a Python float: what checkpoints store;
- :func:`load_portable_state_dict` loads one into an optimizer keeping *its* implementation switches
  (so ``step`` is placed as this optimizer needs it: on the parameter's device for fused/capturable,
  on the CPU otherwise) and its tensor ``lr`` objects (filled in place with the saved value, so a
  captured CUDA graph that reads them stays valid).
"""
from __future__ import annotations

import torch

#: Group keys that say how the update runs, not what it computes: kept from the loading optimizer.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _plain(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().cpu())
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def portable_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with tensor hyper-parameters as floats (host sync: at save steps only)."""
    state = optimizer.state_dict()
    groups = [{k: (v if k == "params" else _plain(v)) for k, v in g.items()} for g in state["param_groups"]]
    return {"state": state["state"], "param_groups": groups}


def load_portable_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``state`` (from :func:`portable_state_dict` or a plain ``state_dict()``) into ``optimizer``,
    keeping its implementation switches and tensor learning rates (see the module doc)."""
    if not isinstance(state, dict) or "param_groups" not in state or "state" not in state:
        raise ValueError("optimizer state: expected a dict with 'state' and 'param_groups' (an optimizer state_dict)")
    saved = state["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"optimizer state: {len(saved)} parameter groups saved, this optimizer has "
                         f"{len(optimizer.param_groups)}")
    tensors = []  # (group index, key, the live tensor) to put back after loading
    groups = []
    for i, (cur, old) in enumerate(zip(optimizer.param_groups, saved)):
        g = {k: _plain(v) if k != "params" else v for k, v in old.items()}
        for k in IMPLEMENTATION_KEYS:
            if k in cur:
                g[k] = cur[k]
        for k, v in cur.items():
            if k != "params" and isinstance(v, torch.Tensor):
                tensors.append((i, k, v))
        groups.append(g)
    optimizer.load_state_dict({"state": state["state"], "param_groups": groups})
    for i, k, live in tensors:
        value = optimizer.param_groups[i][k]
        with torch.no_grad():
            live.fill_(float(value) if not isinstance(value, torch.Tensor) else float(value.detach().cpu()))
        optimizer.param_groups[i][k] = live
