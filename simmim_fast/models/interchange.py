"""Checkpoint interchange: official microsoft/SimMIM checkpoints in, timm / safetensors out.

Reading
    ``read_checkpoint(path)`` opens any checkpoint a user may hold and says what it is:
    ``"pretrain"`` (ours, ``simmim_fast.pretrain.v1``), ``"finetune"`` (ours), ``"official"`` (a
    ``{"model": state_dict, ...}`` file written by the official code, pretraining or fine-tuning), or
    ``"state_dict"`` (a bare state dict, e.g. our timm export or a ``.safetensors`` file).

Official -> ours (``official_to_ours``)
    The official Swin puts the patch merging at the END of stage ``i`` (``layers.i.downsample``),
    timm (and so our encoder) at the START of stage ``i+1``; its ``relative_position_index`` and
    ``attn_mask`` are persistent buffers (ours are recomputed, non-persistent) and a fine-tuned
    official Swin's classifier is ``head`` (timm: ``head.fc``). The official ViT is BEiT-style with the
    same parameter names as timm's ``Beit`` (``q_bias``/``v_bias``, ``gamma_1/2``, ``rel_pos_bias``);
    only its ``relative_position_index`` buffers go. The patch-merging channel order
    ``[x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)]`` is the same in both, so weights
    are copied unchanged (checked by ``tests/test_interchange.py`` against an independent forward).

    SwinV2 (microsoft/Swin-Transformer ``SwinTransformerV2ForSimMIM``): the same stage-end patch merging
    (which there reduces, then normalises ``2C`` channels: same keys, same order of the concatenation),
    ``q_bias``/``v_bias``, ``logit_scale`` ``(nH, 1, 1)`` and the CPB-MLP ``cpb_mlp.{0,2}`` under the same
    names as timm's; its persistent ``relative_coords_table`` / ``relative_position_index`` / ``attn_mask``
    buffers are dropped (timm rebuilds them, non-persistent, for the model's window) and an early
    ``rpe_mlp`` is renamed ``cpb_mlp`` (checked by ``tests/test_swinv2.py`` against an independent
    transcription of the official forward). A SwinV2 state dict does not tell its window (no table):
    ``infer_pretrain_preset`` reads it from the official buffers when present.

Resizing (``adapt_encoder_state_dict``), as the official ``utils.load_pretrained`` does it
    relative-position tables whose window changed (Swin 192 px window 6 -> 224 px window 7, ViT
    grid 14 -> other sizes) are resampled with the official geometric-progression positions and a
    bicubic spline (``resize_rel_pos_table``); the ViT's shared table is copied into every block
    when the target has one table per block (the fine-tuning layout); absolute position embeddings
    (not used by the official configs) are resampled bicubically by timm's ``resample_abs_pos_embed``.

Writing
    ``timm_export(checkpoint)`` gives the state dict, the timm model name and keyword arguments
    with which ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...),
    **kwargs)`` loads it with no missing key; ``save_state_dict`` writes ``.safetensors`` (or
    ``.pt``).

    ``official_export(checkpoint)`` gives what the official code reads: ``{"model": state_dict}`` in
    the official key layout (``ours_to_official``, the inverse of ``official_to_ours``: Swin patch
    merging back to the end of stage ``i``, a Swin classifier's ``head.fc`` -> ``head``, and the
    official persistent buffers ``relative_position_index`` / ``attn_mask`` recomputed by the official
    rules; SwinV2 blocks also get ``relative_coords_table`` for their window and pretrained window),
    plus a small plain-dict ``config`` (``MODEL.TYPE``, ``DATA.IMG_SIZE``) and our provenance
    under ``simmim_fast``. A pretraining checkpoint gives the whole SimMIM model (``encoder.*``,
    ``decoder.*``, as official pretraining checkpoints hold it): the official ``main_finetune.py``
    (``utils.load_pretrained``) takes it as ``PRETRAINED``; a fine-tuned classifier gives the official
    classifier's keys. Official -> ours -> official gives back identical tensors. CLI::

        python -m simmim_fast.models.interchange export --checkpoint runs/swin_tiny_cpu --output enc.safetensors
        python -m simmim_fast.models.interchange export --format official --checkpoint runs/swin_base_192 --output simmim_swin.pth
        python -m simmim_fast.models.interchange convert --checkpoint simmim_official.pth --output ours.pt
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from .. import serialization

log = logging.getLogger("simmim_fast.interchange")

__all__ = [
    "Checkpoint", "read_checkpoint", "official_to_ours", "is_official_layout", "strip_prefix",
    "resize_rel_pos_table", "geometric_positions", "adapt_encoder_state_dict", "LoadReport",
    "infer_pretrain_preset", "load_simmim_weights", "load_pretraining_model", "encoder_config", "timm_export", "save_state_dict",
    "create_timm_model", "official_relative_position_index", "official_shift_mask", "official_relative_coords_table",
    "ours_to_official",
    "official_export", "write_official_export", "main",
]

PRETRAIN_FORMAT = "simmim_fast.pretrain.v1"
FINETUNE_FORMAT = "simmim_fast.finetune.v1"
VIT_EXTRA_TOKENS = 3  # cls->token, token->cls, cls->cls entries at the end of a BEiT table


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What ``read_checkpoint`` found: ``kind`` in pretrain | finetune | official | state_dict."""

    kind: str
    state_dict: dict[str, torch.Tensor]
    path: Path | None = None
    meta: dict = field(default_factory=dict)  # ours: the checkpoint minus tensors; official: its other keys


def _torch_load(path: Path):
    """Read as data: tensors, containers, and official configs as plain dicts (``serialization.load``)."""
    return serialization.load(path)


def _tensors_only(d: Mapping) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in d.items() if isinstance(v, torch.Tensor)}


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a run folder (its newest checkpoint), a ``.pt``/``.pth`` file or a ``.safetensors`` file.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a file that holds no state dict.
    """
    from ..training.checkpoint import is_sharded, latest_checkpoint, load_checkpoint

    p = Path(path).expanduser()
    if p.is_dir() and not is_sharded(p):
        found = latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(f"checkpoint: no checkpoint_<step>.pt file in the run folder {p}")
        p = found
    if is_sharded(p):  # an FSDP run's checkpoint_<step>.dcp folder: its model consolidated (training.sharded_checkpoint)
        state = load_checkpoint(p)
        return Checkpoint("pretrain", _tensors_only(state["model"]), p, {k: v for k, v in state.items() if k != "model"})
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint: {p} does not exist (expected a checkpoint file or a run folder)")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta["simmim_fast"]) if "simmim_fast" in meta else {}
        if info.get("checkpoint_kind") == "official":  # written by ``python -m simmim_fast.convert``
            return Checkpoint("official", sd, p, dict(info.get("meta", {})))
        return Checkpoint("state_dict", sd, p, info)
    obj = _torch_load(p)
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint: {p} holds a {type(obj).__name__}, not a checkpoint dictionary")
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("simmim_fast.pretrain"):
        return Checkpoint("pretrain", _tensors_only(obj["model"]), p, {k: v for k, v in obj.items() if k != "model"})
    if isinstance(fmt, str) and fmt.startswith("simmim_fast.finetune"):
        return Checkpoint("finetune", _tensors_only(obj["model"]), p, {k: v for k, v in obj.items() if k != "model"})
    for key in ("model", "state_dict", "module"):
        if key in obj and isinstance(obj[key], Mapping):
            sd = _tensors_only(obj[key])
            if sd:
                return Checkpoint("official", sd, p, {k: v for k, v in obj.items() if k != key})
    sd = _tensors_only(obj)
    if not sd:
        raise ValueError(f"checkpoint: {p} holds no tensors (keys: {', '.join(map(str, list(obj)[:10]))})")
    return Checkpoint("state_dict", sd, p, {})


# ---------------------------------------------------------------------------------------------
# key layout
# ---------------------------------------------------------------------------------------------
_OFFICIAL_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The keys under ``prefix`` with it removed, if any key has it (else the dict unchanged)."""
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def is_official_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for state dicts written by the official code (persistent index/mask buffers, stage-0 downsample)."""
    return any(any(b in k for b in _OFFICIAL_BUFFERS) for k in state_dict) or any(
        re.search(r"(^|\.)layers\.0\.downsample\.", k) for k in state_dict
    )


def official_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map official key names (with or without the ``encoder.``/``decoder.`` prefixes) to ours.

    Drops ``relative_position_index`` / ``attn_mask`` / ``relative_coords_table`` buffers; moves Swin's
    (V1 and V2) ``layers.i.downsample`` to ``layers.{i+1}.downsample``; renames a Swin classifier
    ``head.*`` to ``head.fc.*`` and SwinV2's early ``rpe_mlp`` to ``cpb_mlp`` (as the official
    ``load_checkpoint`` / ``load_pretrained`` do). SwinV2's parameters (``logit_scale``, ``cpb_mlp``,
    ``q_bias``/``v_bias``) keep their names. A state dict already in our layout passes through unchanged
    (buffers aside).
    """
    old_swin = any(re.search(r"(^|\.)layers\.0\.downsample\.", k) for k in state_dict)
    is_swin = any(re.search(r"(^|\.)layers\.\d+\.blocks\.", k) for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if any(b in k for b in _OFFICIAL_BUFFERS):
            continue
        if is_swin and ".rpe_mlp." in k:  # early SwinV2 releases; the official loaders rename it too
            k = k.replace(".rpe_mlp.", ".cpb_mlp.")
        if old_swin:
            k = re.sub(r"(^|\.)layers\.(\d+)\.downsample\.", lambda m: f"{m.group(1)}layers.{int(m.group(2)) + 1}.downsample.", k)
        if is_swin and re.match(r"^head\.(weight|bias)$", k):
            k = "head.fc." + k.split(".", 1)[1]
        out[k] = v
    return out


def official_relative_position_index(window: tuple[int, int], *, cls_token: bool = False) -> torch.Tensor:
    """The official ``relative_position_index`` buffer of a ``window = (Wh, Ww)`` (int64).

    ``(Wh*Ww, Wh*Ww)``: ``(dy + Wh - 1) * (2*Ww - 1) + (dx + Ww - 1)`` for each query/key pair (Swin
    ``WindowAttention``). ``cls_token=True``: the BEiT-style ViT's ``(Wh*Ww + 1,)*2`` index whose first
    row, first column and corner point at the table's three extra rows, as the official
    ``RelativePositionBias``: cls->token ``n - 3``, token->cls ``n - 2``, cls->cls ``n - 1``.
    """
    wh, ww = int(window[0]), int(window[1])
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()  # (N, N, 2)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    index = rel.sum(-1)
    if not cls_token:
        return index
    n = (2 * wh - 1) * (2 * ww - 1) + VIT_EXTRA_TOKENS
    out = torch.zeros((wh * ww + 1,) * 2, dtype=index.dtype)
    out[1:, 1:] = index
    out[0, 0:] = n - 3
    out[0:, 0] = n - 2
    out[0, 0] = n - 1
    return out


def official_shift_mask(resolution: tuple[int, int], window: int, shift: int) -> torch.Tensor:
    """The official Swin ``attn_mask`` buffer of a shifted block: ``(nW, w*w, w*w)`` float32, 0 / -100.

    The ``(H, W)`` feature map is cut into 3 x 3 regions (``[0, -w)``, ``[-w, -shift)``, ``[-shift, H)``
    per axis); a query and a key of the same window that lie in different regions get -100.
    """
    H, W = int(resolution[0]), int(resolution[1])
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = img.view(1, H // window, window, W // window, window, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


_DOWNSAMPLE = re.compile(r"^(?P<pre>(?:encoder\.)?)layers\.(?P<stage>\d+)\.downsample\.")
_SWIN_TABLE = re.compile(
    r"^(?P<pre>(?:encoder\.)?)layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.attn\.relative_position_bias_table$")
_VIT_TABLE = re.compile(r"^(?P<pre>(?:encoder\.)?)(?P<mod>rel_pos_bias|blocks\.\d+\.attn)\.relative_position_bias_table$")


def official_relative_coords_table(
    window: tuple[int, int], pretrained_window: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """The official SwinV2 ``relative_coords_table`` buffer ``(1, 2*Wh-1, 2*Ww-1, 2)`` float32.

    Offsets ``(dy, dx)`` divided by ``pretrained_window - 1`` (or ``window - 1`` when the pretrained window
    is 0, as in pretraining), times 8, then ``sign(t) * log2(1 + |t|) / log2(8)``: the log-spaced
    coordinates the CPB-MLP reads. (A window of 1 divides by ``max(w - 1, 1)``, as timm does; the official
    code divides by 0 there.)
    """
    wh, ww = int(window[0]), int(window[1])
    ph, pw = int(pretrained_window[0]), int(pretrained_window[1])
    dy = torch.arange(-(wh - 1), wh, dtype=torch.float32)
    dx = torch.arange(-(ww - 1), ww, dtype=torch.float32)
    t = torch.stack(torch.meshgrid(dy, dx, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    dh, dw = (ph, pw) if ph > 0 else (wh, ww)
    t[..., 0] /= max(dh - 1, 1)
    t[..., 1] /= max(dw - 1, 1)
    t *= 8
    return torch.sign(t) * torch.log2(torch.abs(t) + 1.0) / math.log2(8)


_SWINV2_CPB = re.compile(
    r"^(?P<pre>(?:encoder\.)?)layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.attn\.cpb_mlp\.0\.weight$")


def _stage_resolution(grid: tuple[int, int], stage: int) -> tuple[int, int]:
    return grid[0] // 2**stage, grid[1] // 2**stage


def ours_to_official(
    state_dict: Mapping[str, torch.Tensor],
    *,
    grid: tuple[int, int],
    window_sizes: tuple[int, ...] | None = None,
    pretrained_window_sizes: tuple[int, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Our (timm) key layout -> the official one: the inverse of ``official_to_ours``.

    ``state_dict``: a SimMIM model's (``encoder.*`` + ``decoder.*``), a bare encoder's or a classifier's,
    Swin (V1 or V2) or BEiT-style ViT; ``grid``: the encoder's patch grid ``(H/p, W/p)``. Swin: ``layers.i.downsample``
    goes back to ``layers.{i-1}.downsample`` (after that stage's blocks), a classifier ``head.fc.*`` to
    ``head.*``, and every block gets the official ``attn.relative_position_index`` and, when shifted,
    ``attn_mask`` (the official rule: odd blocks of a stage whose resolution exceeds its window; the
    window is the one of the block's table). SwinV2 blocks have no table: ``window_sizes`` (required
    then) gives each stage's window in use (``SwinV2EncoderForSimMIM.window_sizes``) and
    ``pretrained_window_sizes`` (default 0s, the pretraining model's) the official
    ``relative_coords_table`` each block also gets (``official_relative_coords_table``). ViT: each
    relative-position table gets its ``relative_position_index``. Tensors are the same objects (no copy).
    Raises ``ValueError`` for a state dict already in the official layout, or one the official code cannot
    hold (a stage that is not a whole number of windows).
    """
    if is_official_layout(state_dict):
        raise ValueError("state_dict: already in the official layout (it has official buffers or a stage-0 downsample)")
    gh, gw = int(grid[0]), int(grid[1])
    windows = {}  # Swin block prefix -> (stage resolution, window of its table)
    v2_blocks = {}  # SwinV2 block prefix -> (window, pretrained window)
    for k, v in state_dict.items():
        m = _SWIN_TABLE.match(k)
        if m:
            stage = int(m.group("stage"))
            prefix = f"{m.group('pre')}layers.{stage}.blocks.{m.group('block')}."
            windows[prefix] = (_stage_resolution((gh, gw), stage), (_table_side(v.shape[0], 0) + 1) // 2)
    v2_stages = sorted({int(m.group("stage")) for k in state_dict if (m := _SWINV2_CPB.match(k))})
    if v2_stages:
        if windows:
            raise ValueError("state_dict: holds both Swin V1 tables and SwinV2 CPB-MLPs")
        n = v2_stages[-1] + 1
        if window_sizes is None or len(window_sizes) != n:
            raise ValueError(f"window_sizes: a SwinV2 state dict needs the window of each of its {n} stages "
                             f"(the encoder's window_sizes), got {window_sizes!r}")
        pws = tuple(pretrained_window_sizes) if pretrained_window_sizes is not None else (0,) * n
        if len(pws) != n:
            raise ValueError(f"pretrained_window_sizes: expected {n} values (one per stage), "
                             f"got {pretrained_window_sizes!r}")
        for k in state_dict:
            m = _SWINV2_CPB.match(k)
            if m:
                stage = int(m.group("stage"))
                prefix = f"{m.group('pre')}layers.{stage}.blocks.{m.group('block')}."
                windows[prefix] = (_stage_resolution((gh, gw), stage), int(window_sizes[stage]))
                v2_blocks[prefix] = (int(window_sizes[stage]), int(pws[stage]))
    odd = [f"{k}: stage {r[0]}x{r[1]}, window {w}" for k, (r, w) in windows.items() if r[0] % w or r[1] % w]
    if odd:
        raise ValueError("state_dict: the official Swin partitions each stage into whole windows; these blocks' "
                         f"resolution is not a multiple of their window (another --img-size?): {'; '.join(odd[:4])}")
    is_swin = bool(windows)
    items: list[tuple[str, torch.Tensor]] = []
    for k, v in state_dict.items():
        if is_swin:
            m = _DOWNSAMPLE.match(k)
            if m:
                stage = int(m.group("stage"))
                if stage == 0:
                    raise ValueError(f"state_dict: {k}: a stage-0 downsample has no place in either layout")
                k = f"{m.group('pre')}layers.{stage - 1}.downsample.{k[m.end():]}"
            elif re.match(r"^head\.fc\.(weight|bias)$", k):
                k = "head." + k.rsplit(".", 1)[1]
            m = re.match(r"^(?:encoder\.)?layers\.\d+\.blocks\.(\d+)\.", k)
            if m and m.group(0) in windows:
                res, window = windows.pop(m.group(0))  # first key of the block: its own buffer goes first
                if int(m.group(1)) % 2 == 1 and min(res) > window:
                    items.append((m.group(0) + "attn_mask", official_shift_mask(res, window, window // 2)))
            if _SWIN_TABLE.match(k):
                window = (_table_side(v.shape[0], 0) + 1) // 2
                items.append((k, v))
                items.append((k[: -len("relative_position_bias_table")] + "relative_position_index",
                              official_relative_position_index((window, window))))
                continue
            m = _SWINV2_CPB.match(k)
            if m:  # SwinV2: the attention's two persistent buffers, before its CPB-MLP as the official order
                prefix = k[: -len("attn.cpb_mlp.0.weight")]
                window, pretrained = v2_blocks[prefix]
                items.append((prefix + "attn.relative_coords_table",
                              official_relative_coords_table((window, window), (pretrained, pretrained))))
                items.append((prefix + "attn.relative_position_index",
                              official_relative_position_index((window, window))))
        else:
            m = _VIT_TABLE.match(k)
            if m:
                items.append((k, v))
                index = official_relative_position_index((gh, gw), cls_token=True)
                if v.shape[0] != int(index.max()) + 1:
                    raise ValueError(f"state_dict: {k} has {v.shape[0]} rows, a {gh}x{gw} patch grid needs "
                                     f"{int(index.max()) + 1}")
                items.append((f"{m.group('pre')}{m.group('mod')}.relative_position_index", index))
                continue
        items.append((k, v))
    if is_swin:  # official module order: a stage's patch merging after its blocks
        merging: dict[str, list] = {}
        rest = []
        for k, v in items:
            m = _DOWNSAMPLE.match(k)
            if m:
                merging.setdefault(f"{m.group('pre')}layers.{m.group('stage')}.", []).append((k, v))
            else:
                rest.append((k, v))
        items = []
        for i, (k, v) in enumerate(rest):
            items.append((k, v))
            m = re.match(r"^((?:encoder\.)?layers\.\d+\.)", k)
            if m and not (i + 1 < len(rest) and rest[i + 1][0].startswith(m.group(1))):
                items.extend(merging.pop(m.group(1), []))
        for left in merging.values():
            items.extend(left)
    return dict(items)


# ---------------------------------------------------------------------------------------------
# relative-position tables
# ---------------------------------------------------------------------------------------------
def geometric_positions(src: int, dst: int) -> list[float]:
    """Positions of a ``src``-long axis of offsets stretched to reach ``dst // 2`` (official rule).

    Offsets ``0, +-1`` stay where they are; the further ones are spaced by a geometric progression
    ``1, q, q^2, ...`` whose ratio ``q`` (bisection in ``[1.01, 1.5]``) makes the outermost one land
    near ``dst // 2``. Returns ``src`` increasing positions, symmetric around 0.
    """
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def _table_side(rows: int, extra: int) -> int:
    side = math.isqrt(rows - extra)
    if side * side != rows - extra or side % 2 == 0:
        raise ValueError(
            f"relative-position table: {rows} rows is not (2w-1)^2{' + ' + str(extra) if extra else ''} for a square window"
        )
    return side


def resize_rel_pos_table(
    table: torch.Tensor, dst_rows: int, *, num_extra_tokens: int = 0
) -> torch.Tensor:
    """Resample a relative-position bias table to another window, as the official code does.

    table ``(S*S + E, nH)`` with ``S = 2*w_src - 1`` (row-major ``(dy, dx)`` offsets) and ``E`` extra
    rows kept as they are (BEiT's 3 cls entries); returns ``(D*D + E, nH)``, ``D = 2*w_dst - 1``,
    in the table's dtype. Each head's ``S x S`` grid is placed at ``geometric_positions(S, D)`` and a
    bicubic interpolating spline (scipy ``RectBivariateSpline``, ``s=0``, the exact replacement of the
    official ``interp2d(kind="cubic")``) is read at the integer offsets ``-(D//2) .. D//2``. Equal sizes
    return a copy. A grid of fewer than 4 points per axis uses the highest spline degree it allows.

    Equivalent PyTorch: none (``F.interpolate(..., "bicubic")`` on the grid is the timm/BEiT-v2 variant,
    not the official one).
    """
    from scipy.interpolate import RectBivariateSpline

    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"table: expected a (rows, heads) tensor, got {getattr(table, 'shape', type(table).__name__)}")
    src = _table_side(table.shape[0], num_extra_tokens)
    dst = _table_side(dst_rows, num_extra_tokens)
    if src == dst:
        return table.clone()
    extra = table[table.shape[0] - num_extra_tokens:] if num_extra_tokens else table[:0]
    grid = table[: src * src].detach().float().cpu().numpy()
    pos = np.asarray(geometric_positions(src, dst))
    t = dst // 2
    target = np.arange(-t, t + 0.1, 1.0)
    k = min(3, src - 1)
    heads = []
    for h in range(table.shape[1]):
        z = grid[:, h].reshape(src, src)  # rows: dy, columns: dx
        spline = RectBivariateSpline(pos, pos, z, kx=k, ky=k, s=0)
        heads.append(torch.from_numpy(np.ascontiguousarray(spline(target, target))).reshape(-1, 1))
    out = torch.cat(heads, dim=1).to(dtype=table.dtype, device=table.device)
    return torch.cat([out, extra.detach().to(out.dtype)], dim=0)


# ---------------------------------------------------------------------------------------------
# adapting an encoder state dict to a target model
# ---------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What ``adapt_encoder_state_dict`` did: resized / dropped checkpoint keys, target keys left at init."""

    resized: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def short(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "") if keys else "none"

        return (f"resized {short(self.resized)}; newly initialised {short(self.missing)}; "
                f"ignored from checkpoint {short(self.dropped)}")


# keys a checkpoint may hold that the target may lack (and vice versa) without being a mismatch
_DROPPABLE = (r"^mask_token$", r"^decoder\.", r"^head\.", r"^norm\.", r"^fc_norm\.")
_MAY_BE_NEW = (r"^head\.", r"^fc_norm\.", r"^norm\.")


def adapt_encoder_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, *, allow_new: tuple[str, ...] = _MAY_BE_NEW
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Turn an encoder state dict (ours, official, or a fine-tuned one) into ``model``'s keys and shapes.

    ``state_dict`` may carry the SimMIM ``encoder.``/``decoder.`` prefixes. Resizes relative-position
    tables and position embeddings, copies a shared ViT table into per-block tables, drops what the
    target has no use for (mask token, decoder, a head of another size, the pre-pooling norm of a
    mean-pooling ViT). Raises ``ValueError`` listing every key the target needs and the checkpoint
    lacks (other than ``allow_new`` patterns: the head and the fc-norm), and every shape that differs:
    that is a checkpoint of another architecture (check the preset).
    """
    sd = official_to_ours(strip_prefix(state_dict, "encoder."))
    target = model.state_dict()
    report = LoadReport()

    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in sd and shared not in target and "blocks.0.attn.relative_position_bias_table" in target:
        table = sd.pop(shared)
        for k in target:
            if k.endswith("attn.relative_position_bias_table"):
                sd[k] = table.clone()
                report.copied.append(k)

    out: dict[str, torch.Tensor] = {}
    mismatched = []
    for k, v in sd.items():
        if k not in target:
            if any(re.search(p, k) for p in _DROPPABLE):
                report.dropped.append(k)
                continue
            mismatched.append(f"{k} (in the checkpoint, not in the model)")
            continue
        want = target[k].shape
        if v.shape != want:
            if k.endswith("relative_position_bias_table") and v.dim() == 2 and v.shape[1] == want[1]:
                extra = 0 if k.startswith("layers.") else VIT_EXTRA_TOKENS  # Swin tables vs BEiT tables
                v = resize_rel_pos_table(v, want[0], num_extra_tokens=extra)
                report.resized.append(k)
            elif k in ("pos_embed", "absolute_pos_embed") and v.dim() == 3 and v.shape[-1] == want[-1]:
                from timm.layers import resample_abs_pos_embed

                prefix = 1 if k == "pos_embed" else 0
                new = int(math.isqrt(want[1] - prefix))
                v = resample_abs_pos_embed(v, new_size=(new, new), num_prefix_tokens=prefix, verbose=False)
                report.resized.append(k)
            elif re.match(r"^head\.", k):
                report.dropped.append(k)
                continue
            else:
                mismatched.append(f"{k} (checkpoint {tuple(v.shape)}, model {tuple(want)})")
                continue
        out[k] = v.to(target[k].dtype)
    missing = [k for k in target if k not in out]
    not_allowed = [k for k in missing if not any(re.search(p, k) for p in allow_new)]
    if mismatched or not_allowed:
        lines = mismatched + [f"{k} (needed by the model, not in the checkpoint)" for k in not_allowed]
        shown = "; ".join(lines[:12]) + (f"; ... {len(lines) - 12} more" if len(lines) > 12 else "")
        raise ValueError(f"checkpoint does not match the model (another architecture or preset?): {shown}")
    report.missing = missing
    return out, report


def load_encoder_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], **kwargs) -> LoadReport:
    """``adapt_encoder_state_dict`` then ``model.load_state_dict(..., strict=False)``; returns the report."""
    sd, report = adapt_encoder_state_dict(state_dict, model, **kwargs)
    model.load_state_dict(sd, strict=False)
    return report


# ---------------------------------------------------------------------------------------------
# pretraining models from any pretraining checkpoint
# ---------------------------------------------------------------------------------------------
def _swin_shape_config(sd: Mapping[str, torch.Tensor]) -> dict:
    w = sd["patch_embed.proj.weight"]
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.blocks\.", k))})
    depths = tuple(len({int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{s}\.blocks\.(\d+)\.", k))}) for s in stages)
    heads = tuple(int(sd[f"layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[1]) for s in stages)
    side = _table_side(sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0], 0)
    return dict(patch_size=int(w.shape[-1]), embed_dim=int(w.shape[0]), depths=depths, num_heads=heads,
                window_size=(side + 1) // 2)


def _swinv2_shape_config(sd: Mapping[str, torch.Tensor], raw: Mapping[str, torch.Tensor]) -> dict:
    """SwinV2 sizes from our-layout keys ``sd``; the window from the official buffers of ``raw`` when it has them
    (a SwinV2 state dict has no table whose shape tells it: the CPB-MLP is window-free)."""
    w = sd["patch_embed.proj.weight"]
    stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.blocks\.", k))})
    depths = tuple(len({int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{s}\.blocks\.(\d+)\.", k))}) for s in stages)
    heads = tuple(int(sd[f"layers.{s}.blocks.0.attn.logit_scale"].shape[0]) for s in stages)
    found = dict(patch_size=int(w.shape[-1]), embed_dim=int(w.shape[0]), depths=depths, num_heads=heads)
    for pre in ("encoder.", ""):
        table = raw.get(f"{pre}layers.0.blocks.0.attn.relative_coords_table")
        if table is not None and table.dim() == 4:
            found["window_size"] = (int(table.shape[1]) + 1) // 2
            break
        index = raw.get(f"{pre}layers.0.blocks.0.attn.relative_position_index")
        if index is not None and index.dim() == 2 and math.isqrt(index.shape[0]) ** 2 == index.shape[0]:
            found["window_size"] = math.isqrt(index.shape[0])
            break
    return found


def _vit_shape_config(sd: Mapping[str, torch.Tensor]) -> dict:
    w = sd["patch_embed.proj.weight"]
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    table = sd.get("rel_pos_bias.relative_position_bias_table")
    if table is None:
        table = sd["blocks.0.attn.relative_position_bias_table"]
    grid = (_table_side(table.shape[0], VIT_EXTRA_TOKENS) + 1) // 2
    return dict(patch_size=int(w.shape[-1]), embed_dim=int(w.shape[0]), depth=depth, num_heads=int(table.shape[1]),
                img_size=grid * int(w.shape[-1]))


def infer_pretrain_preset(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The pretraining preset whose encoder has this (official or our) state dict's shapes.

    Swin V1 (relative-position tables), SwinV2 (``logit_scale`` / ``cpb_mlp``: sizes from the patch
    embedding, the blocks and the ``logit_scale`` of each stage; the window from the official
    ``relative_coords_table`` / ``relative_position_index`` buffers when present, else not compared),
    BEiT-style ViT. Raises ``ValueError`` naming the shapes found when no preset matches (pass ``--preset``).
    """
    from .presets import PRESETS

    sd = official_to_ours(strip_prefix(state_dict, "encoder."))
    if "layers.0.blocks.0.attn.relative_position_bias_table" in sd:
        found, arch = _swin_shape_config(sd), "swin"
    elif "layers.0.blocks.0.attn.logit_scale" in sd:
        found, arch = _swinv2_shape_config(sd, state_dict), "swinv2"
    elif "patch_embed.proj.weight" in sd and any(k.startswith("blocks.") for k in sd):
        found, arch = _vit_shape_config(sd), "vit"
    else:
        raise ValueError("checkpoint: neither a Swin (V1/V2) nor a ViT encoder state dict (no layers.*.blocks / blocks.* keys)")
    for name, p in PRESETS.items():
        if p.arch != arch:
            continue
        enc = dict(p.encoder)
        if all(tuple(enc.get(k)) == tuple(v) if isinstance(v, tuple) else enc.get(k) == v for k, v in found.items()):
            return name
    raise ValueError(f"checkpoint: no preset has this {arch} encoder ({found}); pass --preset explicitly")


def load_simmim_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Load a SimMIM state dict (``encoder.*`` + ``decoder.0.*``, ours or official) into our SimMIM ``model``.

    Strict: every key of the model must be filled and every checkpoint key used (the official
    index/mask buffers aside); relative-position tables of another window are resized. Raises
    ``ValueError`` listing the mismatches.
    """
    sd = official_to_ours(state_dict)
    if not any(k.startswith("encoder.") for k in sd):
        raise ValueError("checkpoint: no encoder.* keys: not a SimMIM pretraining state dict")
    enc, report = adapt_encoder_state_dict(sd, model.encoder, allow_new=())
    unused = list(report.dropped)  # strict: e.g. a classifier head or fc-norm has no place in a SimMIM model
    dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    if report.resized:
        log.info("pretraining checkpoint: resized %s to the model's size", ", ".join(report.resized))
    model.encoder.load_state_dict(enc, strict=True)
    try:
        model.decoder.load_state_dict(dec, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint: its decoder does not match the model ({' '.join(str(e).split())})") from e
    if unused:
        raise ValueError(f"checkpoint does not match the model: unused keys {', '.join(unused[:8])}")
    return report


def load_pretraining_model(
    source: str | os.PathLike | Checkpoint, *, preset: str | None = None, ops_backend: str = "auto"
) -> tuple[nn.Module, dict]:
    """A SimMIM model (ours) with the weights of a pretraining checkpoint, ours or official.

    Returns ``(model, info)`` with ``info = {"preset", "img_size", "kind", "path", "step",
    "mask_patch_size", "mask_ratio"}``. For an official checkpoint the preset is found from the
    shapes (``infer_pretrain_preset``) unless given, and the image size from its pickled config when
    readable. Loading is strict: every key of our model must be filled.
    """
    from .presets import get_preset
    from . import create_model

    ck = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    if ck.kind == "finetune":
        raise ValueError(
            f"checkpoint: {ck.path} is a fine-tuning checkpoint (a classifier without mask token or decoder); "
            "pass a pretraining checkpoint"
        )
    args = ck.meta.get("args", {}) if ck.kind == "pretrain" else {}
    plan = ck.meta.get("plan", {}) if ck.kind == "pretrain" else {}
    name = preset or args.get("preset") or infer_pretrain_preset(ck.state_dict)
    p = get_preset(name)
    img_size = plan.get("img_size") or _official_img_size(ck) or p.recipe.img_size
    overrides = {"img_size": int(img_size)}
    for key in ("loss", "predict"):
        if args.get(key):
            overrides[key] = args[key]
    model = create_model(name, ops_backend=ops_backend, **overrides)
    load_simmim_weights(model, ck.state_dict)
    info = {
        "preset": name, "img_size": int(img_size), "kind": ck.kind, "path": str(ck.path) if ck.path else None,
        "step": ck.meta.get("step"), "mask_patch_size": plan.get("mask_patch_size", p.recipe.mask_patch_size),
        "mask_ratio": plan.get("mask_ratio", p.recipe.mask_ratio),
    }
    return model, info


def _official_img_size(ck: Checkpoint) -> int | None:
    cfg = ck.meta.get("config")
    try:
        return int(cfg["DATA"]["IMG_SIZE"])
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# timm export
# ---------------------------------------------------------------------------------------------
_SWIN_KEYS = ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias")
_SWINV2_KEYS = _SWIN_KEYS + ("pretrained_window_sizes",)
_VIT_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "init_values",
             "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias")


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def encoder_config(preset: str, img_size: int | None = None) -> tuple[str, dict]:
    """``(arch, timm keyword arguments)`` of a pretraining preset's encoder (headless)."""
    from .presets import get_preset

    p = get_preset(preset)
    enc = dict(p.encoder)
    if img_size is not None:
        enc["img_size"] = int(img_size)
    keys = {"swin": _SWIN_KEYS, "swinv2": _SWINV2_KEYS}.get(p.arch, _VIT_KEYS)
    kwargs = {k: _jsonable(enc[k]) for k in keys if k in enc}
    if p.arch == "vit":
        # our pretraining encoder: final norm on the tokens, no fc-norm
        kwargs.update(global_pool="avg", use_fc_norm=False)
    kwargs["num_classes"] = 0
    return p.arch, kwargs


def timm_model_name(arch: str, kwargs: Mapping) -> str:
    """A registered timm model name for the architecture (every size argument is passed explicitly anyway)."""
    if arch == "swin":
        return {192: "swin_large_patch4_window7_224", 128: "swin_base_patch4_window7_224",
                96: "swin_tiny_patch4_window7_224"}.get(kwargs.get("embed_dim"), "swin_base_patch4_window7_224")
    if arch == "swinv2":  # timm has no SwinV2-H/G entry (its swinv2_cr_* are another implementation and key layout)
        return {192: "swinv2_large_window12_192", 128: "swinv2_base_window12_192",
                96: "swinv2_tiny_window8_256"}.get(kwargs.get("embed_dim"), "swinv2_base_window12_192")
    return {1024: "beit_large_patch16_224"}.get(kwargs.get("embed_dim"), "beit_base_patch16_224")


def timm_export(source: str | os.PathLike | Checkpoint, *, preset: str | None = None) -> dict:
    """What timm needs to rebuild a checkpoint's network.

    Pretraining checkpoints (ours or official) give the encoder (no mask token, no decoder,
    ``num_classes=0``); fine-tuning checkpoints give the whole classifier with its head. Returns
    ``{"state_dict", "model_name", "kwargs", "pretrained_cfg_overlay", "arch", "source_kind"}``.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    ck = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    if ck.kind == "finetune":
        spec = ck.meta["spec"]
        arch, kwargs = spec["arch"], {k: _jsonable(v) for k, v in spec["kwargs"].items()}
        sd = {k: v for k, v in ck.state_dict.items()}
    else:
        if ck.kind == "state_dict" and ck.meta.get("timm_kwargs"):
            raise ValueError(f"checkpoint: {ck.path} is already a timm export")
        model, info = load_pretraining_model(ck, preset=preset)
        arch, kwargs = encoder_config(info["preset"], info["img_size"])
        sd = {k: v for k, v in model.encoder.state_dict().items() if k != "mask_token"}
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    overlay = {"num_classes": int(kwargs.get("num_classes", 0)), "mean": list(IMAGENET_DEFAULT_MEAN),
               "std": list(IMAGENET_DEFAULT_STD), "input_size": [3, int(kwargs["img_size"]), int(kwargs["img_size"])]}
    return {"state_dict": sd, "model_name": timm_model_name(arch, kwargs), "kwargs": kwargs,
            "pretrained_cfg_overlay": overlay, "arch": arch, "source_kind": ck.kind}


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write ``.safetensors`` (tensors contiguous, unshared; ``metadata`` as JSON) or a ``torch.save`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"simmim_fast": json.dumps(metadata or {})})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # the writer creates 0600; an export is meant to be shared
    else:
        torch.save(tensors, path)
    return path


def write_timm_export(export: dict, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the weights (``.safetensors`` or ``.pt``) and a ``<name>.timm.json`` with the model name and kwargs."""
    path = Path(path)
    meta = {"timm_model_name": export["model_name"], "timm_kwargs": export["kwargs"],
            "pretrained_cfg_overlay": export["pretrained_cfg_overlay"], "arch": export["arch"],
            "source_kind": export["source_kind"]}
    weights = save_state_dict(export["state_dict"], path, metadata=meta)
    sidecar = path.with_name(path.stem + ".timm.json")
    with open(sidecar, "w") as f:
        json.dump(meta, f, indent=2)
    return weights, sidecar


def create_timm_model(path: str | os.PathLike, **overrides) -> nn.Module:
    """``timm.create_model`` of a ``write_timm_export`` file (its sidecar JSON gives name and kwargs)."""
    import timm

    path = Path(path)
    sidecar = path.with_name(path.stem + ".timm.json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"path: {sidecar} (written next to the weights by the export) does not exist")
    meta = json.loads(sidecar.read_text())
    kwargs = dict(meta["timm_kwargs"])
    kwargs.update(overrides)
    overlay = dict(meta["pretrained_cfg_overlay"], file=str(path))
    return timm.create_model(meta["timm_model_name"], pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def timm_snippet(export: dict, path: str | os.PathLike) -> str:
    kw = ", ".join(f"{k}={v!r}" for k, v in export["kwargs"].items())
    overlay = dict(file=str(path), **export["pretrained_cfg_overlay"])
    return f"timm.create_model({export['model_name']!r}, pretrained=True, pretrained_cfg_overlay={overlay!r}, {kw})"


# ---------------------------------------------------------------------------------------------
# official export
# ---------------------------------------------------------------------------------------------
OFFICIAL_EXPORT_FORMAT = "simmim_fast.official_export.v1"


def official_export(source: str | os.PathLike | Checkpoint, *, preset: str | None = None) -> dict:
    """The checkpoint object the official microsoft/SimMIM code reads (``torch.save`` it, ``.pth``).

    ``{"model": state_dict (official layout), "config": {"MODEL": {"TYPE"}, "DATA": {"IMG_SIZE"}},
    "simmim_fast": {"format", "source_kind", "preset", "arch", "img_size"}}``. Pretraining checkpoints
    (ours or official) give the SimMIM model (encoder with mask token, decoder), the input of the
    official ``main_finetune.py --pretrained``; fine-tuning checkpoints give the classifier. Tensors
    are detached CPU copies.
    """
    ck = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    if ck.kind == "state_dict" and ck.meta.get("timm_kwargs"):
        raise ValueError(f"checkpoint: {ck.path} is a timm export (encoder only, no mask token or decoder); "
                         "export the run's checkpoint instead")
    if ck.kind == "finetune":
        from .classifier import build_classifier

        spec = ck.meta["spec"]
        model = build_classifier(spec)
        try:
            model.load_state_dict(ck.state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoint: its weights do not match its spec ({' '.join(str(e).split())})") from e
        encoder, arch, img_size, name = model, spec["arch"], int(spec["kwargs"]["img_size"]), spec.get("preset")
        pretrained_windows = spec["kwargs"].get("pretrained_window_sizes")
    else:
        model, info = load_pretraining_model(ck, preset=preset)
        encoder, img_size, name = model.encoder, info["img_size"], info["preset"]
        from .presets import get_preset

        arch = get_preset(name).arch
        pretrained_windows = None  # the official SwinV2 SimMIM model is built without them (0s)
    sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    v2 = {}
    if arch == "swinv2":
        from .swinv2 import stage_windows

        v2 = dict(window_sizes=stage_windows(encoder), pretrained_window_sizes=pretrained_windows)
    official = ours_to_official(sd, grid=tuple(encoder.patch_embed.grid_size), **v2)
    return {
        "model": official,
        "config": {"MODEL": {"TYPE": arch}, "DATA": {"IMG_SIZE": img_size}},
        "simmim_fast": {"format": OFFICIAL_EXPORT_FORMAT, "source_kind": ck.kind, "preset": name, "arch": arch,
                        "img_size": img_size, "source": str(ck.path) if ck.path else None},
    }


def write_official_export(export: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` the ``official_export`` object to ``path`` (atomically); ``.safetensors`` is refused."""
    from ..training.checkpoint import atomic_save

    return atomic_save(export, _official_output(path))


def _official_output(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ValueError(f"--output: the official code reads torch.save files (torch.load(path)['model']); "
                         f"use a .pth (or .pt) name, got {path}")
    return path


def _check_official_export(export: dict, path: Path) -> tuple[int, float]:
    """Read ``path`` back as an official checkpoint, map it to our layout and compare with the source tensors."""
    ck = read_checkpoint(path)
    if ck.kind != "official":
        raise ValueError(f"--check: {path} does not read back as an official checkpoint (got {ck.kind})")
    back = official_to_ours(ck.state_dict)
    src = official_to_ours(export["model"])
    if set(back) != set(src):
        raise ValueError(f"--check: keys differ after the round trip: {sorted(set(back) ^ set(src))[:8]}")
    worst = 0.0
    for k in src:
        if back[k].shape != src[k].shape:
            raise ValueError(f"--check: {k}: shape {tuple(back[k].shape)} read back, {tuple(src[k].shape)} written")
        if not torch.equal(back[k], src[k]):
            worst = max(worst, float((back[k].double() - src[k].double()).abs().max()))
    return len(back), worst


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simmim_fast.models.interchange",
        description="Export a checkpoint to timm (safetensors) or convert an official SimMIM checkpoint to ours.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="to timm (weights + <name>.timm.json, no missing key) or to the official layout")
    e.add_argument("--checkpoint", required=True, help="run folder, checkpoint file (ours or official) or state dict")
    e.add_argument("--output", required=True, help="output file: .safetensors (recommended) or .pt; --format official: .pth")
    e.add_argument("--preset", default=None, help="pretraining preset (official checkpoints: found from the shapes)")
    e.add_argument("--format", choices=("timm", "official"), default="timm",
                   help="timm: weights + <name>.timm.json for timm.create_model (default); official: a .pth "
                        "{'model': ...} in the microsoft/SimMIM key layout (main_finetune.py --pretrained reads it)")
    e.add_argument("--check", action="store_true",
                   help="timm: reload the file with timm and compare features; official: read it back and compare tensors")
    c = sub.add_parser("convert", help="official microsoft/SimMIM pretraining checkpoint -> simmim-fast checkpoint")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--output", required=True, help="checkpoint file to write (e.g. runs/official/checkpoint_00000000.pt)")
    c.add_argument("--preset", default=None)
    s = sub.add_parser("consolidate", help="sharded FSDP checkpoint (checkpoint_<step>.dcp folder) -> one .pt file")
    s.add_argument("--checkpoint", required=True, help="a checkpoint_<step>.dcp folder, or a run folder (its newest)")
    s.add_argument("--output", required=True, help="checkpoint file to write (.pt): the full model, no optimizer state")
    return p


def _check_export(source: str, export: dict, path: Path, preset: str | None) -> float:
    """Reload ``path`` with timm and return the max |difference| of its features from our network's."""
    ck = read_checkpoint(source)
    if ck.kind == "finetune":
        from .classifier import build_classifier

        ours = build_classifier(ck.meta["spec"])
        ours.load_state_dict(ck.state_dict)
        feats = ours.eval().forward_features
    else:
        encoder = load_pretraining_model(ck, preset=preset)[0].encoder.eval()
        feats = encoder.forward_features  # timm's forward_features: no mask token
    theirs = create_timm_model(path).eval()
    size = int(export["kwargs"]["img_size"])
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((theirs.forward_features(x) - feats(x)).abs().max())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    a = build_parser().parse_args(argv)
    try:
        if a.command == "export" and a.format == "official":
            _official_output(a.output)  # before the work
            export = official_export(a.checkpoint, preset=a.preset)
            out = write_official_export(export, a.output)
            info = export["simmim_fast"]
            print(f"wrote {out} ({len(export['model'])} tensors, official layout, {info['arch']} {info['img_size']} px) "
                  f"from the {info['source_kind']} checkpoint {info['source']}")
            flag = "--resume" if info["source_kind"] == "finetune" else "--pretrained"
            # SwinV2's SimMIM code is microsoft/Swin-Transformer's main_simmim_ft.py, the others microsoft/SimMIM's
            script = "main_simmim_ft.py" if info["arch"] == "swinv2" else "main_finetune.py"
            print(f"the official fine-tuning code reads it with:  python {script} ... {flag} {out}")
            if a.check:
                n, diff = _check_official_export(export, out)
                print(f"official reload check: {n} tensors, max |difference| = {diff:.3g}")
        elif a.command == "export":
            export = timm_export(a.checkpoint, preset=a.preset)
            weights, sidecar = write_timm_export(export, a.output)
            print(f"wrote {weights} ({len(export['state_dict'])} tensors, {export['source_kind']} checkpoint) and {sidecar}")
            print("load it with:\n  import timm\n  model = " + timm_snippet(export, weights))
            if a.check:
                diff = _check_export(a.checkpoint, export, weights, a.preset)
                print(f"timm reload check: max |features difference| = {diff:.3g}")
        elif a.command == "consolidate":
            from ..training.sharded_checkpoint import write_consolidated

            out, src, n = write_consolidated(a.checkpoint, a.output)
            print(f"wrote {out} ({n} tensors, the model of the sharded checkpoint {src}); export, finetune "
                  f"--pretrained, visualize and probe read it")
        else:
            from ..training.checkpoint import atomic_save

            model, info = load_pretraining_model(a.checkpoint, preset=a.preset)
            state = {"format": PRETRAIN_FORMAT, "model": model.state_dict(), "step": 0, "epoch": 0,
                     "args": {"preset": info["preset"]}, "plan": {"img_size": info["img_size"],
                     "mask_patch_size": info["mask_patch_size"], "mask_ratio": info["mask_ratio"]},
                     "converted_from": info["path"]}
            out = atomic_save(state, a.output)
            print(f"wrote {out}: preset {info['preset']}, {info['img_size']} px, from {info['kind']} checkpoint {info['path']}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
