"""Checkpoint interchange: official microsoft/SimMIM checkpoints in, timm / safetensors out.

The official-format checkpoints are built here from the official key layout (``encoder.*`` with
``layers.i.downsample`` at the end of stage i, persistent ``relative_position_index`` / ``attn_mask``
buffers computed by the official recipes, BEiT-style ViT keys, ``decoder.0.*``) with random weights,
and the expected outputs come from a plain functional re-statement of the official forward that reads
those keys (not from our model), so key mapping, patch-merging order, shift masks and position tables
are all checked.
"""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from simmim_fast.models import create_model
from simmim_fast.models.classifier import build_classifier, classifier_spec, load_pretrained
from simmim_fast.models.interchange import (
    Checkpoint, create_timm_model, geometric_positions, infer_pretrain_preset,
    is_official_layout, load_pretraining_model, official_to_ours, read_checkpoint, resize_rel_pos_table,
    timm_export, write_timm_export,
)
from simmim_fast.models import interchange

ATOL = 2e-5  # fp32, a few blocks: measured differences are ~1e-6

SWIN = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
VIT = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2)


# ---------------------------------------------------------------------------------------------
# official layout, built from scratch
# ---------------------------------------------------------------------------------------------
def official_rel_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def official_vit_index(g: int) -> torch.Tensor:
    n_rel = (2 * g - 1) ** 2 + 3
    idx = torch.zeros((g * g + 1,) * 2, dtype=torch.long)
    idx[1:, 1:] = official_rel_index(g)
    idx[0, 0:] = n_rel - 3
    idx[0:, 0] = n_rel - 2
    idx[0, 0] = n_rel - 1
    return idx


def partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    B, H, W, C = x.shape
    return x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def official_attn_mask(res: int, ws: int, shift: int) -> torch.Tensor:
    img = torch.zeros(1, res, res, 1)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = partition(img, ws).squeeze(-1)
    m = win.unsqueeze(1) - win.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def _rand(g, *shape, scale=0.2, offset=0.0):
    return torch.randn(*shape, generator=g) * scale + offset


def official_swin_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    C, p, ws0 = cfg["embed_dim"], cfg["patch_size"], cfg["window_size"]
    sd = {"encoder.mask_token": _rand(g, 1, 1, C, scale=0.5),
          "encoder.patch_embed.proj.weight": _rand(g, C, 3, p, p), "encoder.patch_embed.proj.bias": _rand(g, C),
          "encoder.patch_embed.norm.weight": _rand(g, C, offset=1.0), "encoder.patch_embed.norm.bias": _rand(g, C)}
    res = cfg["img_size"] // p
    n = len(cfg["depths"])
    for i, depth in enumerate(cfg["depths"]):
        dim, heads = C * 2 ** i, cfg["num_heads"][i]
        ws = min(ws0, res)
        for j in range(depth):
            pre = f"encoder.layers.{i}.blocks.{j}."
            sd.update({
                pre + "norm1.weight": _rand(g, dim, offset=1.0), pre + "norm1.bias": _rand(g, dim),
                pre + "attn.relative_position_bias_table": _rand(g, (2 * ws - 1) ** 2, heads, scale=0.5),
                pre + "attn.relative_position_index": official_rel_index(ws),
                pre + "attn.qkv.weight": _rand(g, 3 * dim, dim), pre + "attn.qkv.bias": _rand(g, 3 * dim),
                pre + "attn.proj.weight": _rand(g, dim, dim), pre + "attn.proj.bias": _rand(g, dim),
                pre + "norm2.weight": _rand(g, dim, offset=1.0), pre + "norm2.bias": _rand(g, dim),
                pre + "mlp.fc1.weight": _rand(g, 4 * dim, dim), pre + "mlp.fc1.bias": _rand(g, 4 * dim),
                pre + "mlp.fc2.weight": _rand(g, dim, 4 * dim), pre + "mlp.fc2.bias": _rand(g, dim),
            })
            if j % 2 == 1 and res > ws0:
                sd[pre + "attn_mask"] = official_attn_mask(res, ws, ws // 2)
        if i < n - 1:
            pre = f"encoder.layers.{i}.downsample."
            sd.update({pre + "reduction.weight": _rand(g, 2 * dim, 4 * dim), pre + "norm.weight": _rand(g, 4 * dim, offset=1.0),
                       pre + "norm.bias": _rand(g, 4 * dim)})
            res //= 2
    last = C * 2 ** (n - 1)
    stride = p * 2 ** (n - 1)
    sd.update({"encoder.norm.weight": _rand(g, last, offset=1.0), "encoder.norm.bias": _rand(g, last),
               "decoder.0.weight": _rand(g, stride ** 2 * 3, last, 1, 1), "decoder.0.bias": _rand(g, stride ** 2 * 3)})
    return sd


def official_vit_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    C, p, heads = cfg["embed_dim"], cfg["patch_size"], cfg["num_heads"]
    grid = cfg["img_size"] // p
    sd = {"encoder.cls_token": _rand(g, 1, 1, C, scale=0.5), "encoder.mask_token": _rand(g, 1, 1, C, scale=0.5),
          "encoder.patch_embed.proj.weight": _rand(g, C, 3, p, p, scale=0.05), "encoder.patch_embed.proj.bias": _rand(g, C),
          "encoder.rel_pos_bias.relative_position_bias_table": _rand(g, (2 * grid - 1) ** 2 + 3, heads, scale=0.5),
          "encoder.rel_pos_bias.relative_position_index": official_vit_index(grid)}
    for i in range(cfg["depth"]):
        pre = f"encoder.blocks.{i}."
        sd.update({
            pre + "gamma_1": _rand(g, C, scale=0.1, offset=0.3), pre + "gamma_2": _rand(g, C, scale=0.1, offset=0.3),
            pre + "norm1.weight": _rand(g, C, offset=1.0), pre + "norm1.bias": _rand(g, C),
            pre + "attn.q_bias": _rand(g, C), pre + "attn.v_bias": _rand(g, C), pre + "attn.qkv.weight": _rand(g, 3 * C, C),
            pre + "attn.proj.weight": _rand(g, C, C), pre + "attn.proj.bias": _rand(g, C),
            pre + "norm2.weight": _rand(g, C, offset=1.0), pre + "norm2.bias": _rand(g, C),
            pre + "mlp.fc1.weight": _rand(g, 4 * C, C), pre + "mlp.fc1.bias": _rand(g, 4 * C),
            pre + "mlp.fc2.weight": _rand(g, C, 4 * C), pre + "mlp.fc2.bias": _rand(g, C),
        })
    sd.update({"encoder.norm.weight": _rand(g, C, offset=1.0), "encoder.norm.bias": _rand(g, C),
               "decoder.0.weight": _rand(g, p * p * 3, C, 1, 1), "decoder.0.bias": _rand(g, p * p * 3)})
    return sd


# ---------------------------------------------------------------------------------------------
# the official forward, restated functionally over the official keys
# ---------------------------------------------------------------------------------------------
def ref_swin(sd: dict, x: torch.Tensor, mask: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Official SwinTransformerForSimMIM.forward -> (B, h, w, C) (NHWC instead of NCHW)."""
    e = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    t = F.conv2d(x, e["patch_embed.proj.weight"], e["patch_embed.proj.bias"], stride=cfg["patch_size"])
    B, C, H, W = t.shape
    t = F.layer_norm(t.flatten(2).transpose(1, 2), (C,), e["patch_embed.norm.weight"], e["patch_embed.norm.bias"])
    w = mask.flatten(1).unsqueeze(-1).to(t.dtype)
    t = t * (1 - w) + e["mask_token"] * w
    res, ws0 = H, cfg["window_size"]
    for i, depth in enumerate(cfg["depths"]):
        heads = cfg["num_heads"][i]
        ws = min(ws0, res)
        for j in range(depth):
            pre = f"layers.{i}.blocks.{j}."
            shift = 0 if (j % 2 == 0 or res <= ws0) else ws // 2
            B, L, D = t.shape
            h = F.layer_norm(t, (D,), e[pre + "norm1.weight"], e[pre + "norm1.bias"]).view(B, res, res, D)
            if shift:
                h = torch.roll(h, (-shift, -shift), (1, 2))
            win = partition(h, ws)
            nw = win.shape[0]
            qkv = F.linear(win, e[pre + "attn.qkv.weight"], e[pre + "attn.qkv.bias"])
            q, k, v = qkv.view(nw, ws * ws, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
            attn = (q * (D // heads) ** -0.5) @ k.transpose(-2, -1)
            idx = e[pre + "attn.relative_position_index"].view(-1)
            bias = e[pre + "attn.relative_position_bias_table"][idx].view(ws * ws, ws * ws, heads).permute(2, 0, 1)
            attn = attn + bias[None]
            if shift:
                am = e[pre + "attn_mask"]
                attn = (attn.view(B, am.shape[0], heads, ws * ws, ws * ws) + am[None, :, None]).view(nw, heads, ws * ws, ws * ws)
            o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(nw, ws * ws, D)
            o = F.linear(o, e[pre + "attn.proj.weight"], e[pre + "attn.proj.bias"])
            n = res // ws
            o = o.view(B, n, n, ws, ws, D).permute(0, 1, 3, 2, 4, 5).reshape(B, res, res, D)
            if shift:
                o = torch.roll(o, (shift, shift), (1, 2))
            t = t + o.reshape(B, L, D)
            h = F.layer_norm(t, (D,), e[pre + "norm2.weight"], e[pre + "norm2.bias"])
            h = F.linear(F.gelu(F.linear(h, e[pre + "mlp.fc1.weight"], e[pre + "mlp.fc1.bias"])),
                         e[pre + "mlp.fc2.weight"], e[pre + "mlp.fc2.bias"])
            t = t + h
        pre = f"layers.{i}.downsample."
        if pre + "reduction.weight" in e:
            B, L, D = t.shape
            h = t.view(B, res, res, D)
            h = torch.cat([h[:, 0::2, 0::2], h[:, 1::2, 0::2], h[:, 0::2, 1::2], h[:, 1::2, 1::2]], -1).view(B, -1, 4 * D)
            h = F.layer_norm(h, (4 * D,), e[pre + "norm.weight"], e[pre + "norm.bias"])
            t = F.linear(h, e[pre + "reduction.weight"])
            res //= 2
    t = F.layer_norm(t, (t.shape[-1],), e["norm.weight"], e["norm.bias"])
    return t.view(t.shape[0], res, res, -1)


def ref_vit(sd: dict, x: torch.Tensor, mask: torch.Tensor, cfg: dict, *, per_block: bool = False):
    """Official VisionTransformerForSimMIM.forward -> (features (B, h, w, C), tokens before the final norm)."""
    e = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in sd.items()}
    p, heads = cfg["patch_size"], cfg["num_heads"]
    t = F.conv2d(x, e["patch_embed.proj.weight"], e["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    B, L, C = t.shape
    w = mask.flatten(1).unsqueeze(-1).to(t.dtype)
    t = torch.cat([e["cls_token"].expand(B, -1, -1), t * (1 - w) + e["mask_token"] * w], dim=1)
    N = L + 1
    grid = int(round(L ** 0.5))

    def bias(table):
        return table[official_vit_index(grid).view(-1)].view(N, N, heads).permute(2, 0, 1)

    shared = bias(e["rel_pos_bias.relative_position_bias_table"]) if not per_block else None
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}."
        h = F.layer_norm(t, (C,), e[pre + "norm1.weight"], e[pre + "norm1.bias"], eps=1e-6)
        qkv_b = torch.cat([e[pre + "attn.q_bias"], torch.zeros_like(e[pre + "attn.v_bias"]), e[pre + "attn.v_bias"]])
        q, k, v = F.linear(h, e[pre + "attn.qkv.weight"], qkv_b).view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
        attn = attn + (bias(e[pre + "attn.relative_position_bias_table"]) if per_block else shared)
        o = F.linear((attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C), e[pre + "attn.proj.weight"], e[pre + "attn.proj.bias"])
        t = t + e[pre + "gamma_1"] * o
        h = F.layer_norm(t, (C,), e[pre + "norm2.weight"], e[pre + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, e[pre + "mlp.fc1.weight"], e[pre + "mlp.fc1.bias"])), e[pre + "mlp.fc2.weight"], e[pre + "mlp.fc2.bias"])
        t = t + e[pre + "gamma_2"] * h
    out = F.layer_norm(t, (C,), e["norm.weight"], e["norm.bias"], eps=1e-6) if "norm.weight" in e else t
    return out[:, 1:].reshape(B, grid, grid, C), t


def ref_loss(sd, x, z, mask, patch, stride):
    rec = F.pixel_shuffle(F.conv2d(z.permute(0, 3, 1, 2), sd["decoder.0.weight"], sd["decoder.0.bias"]), stride)
    m = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).to(x.dtype)
    return ((x - rec).abs() * m).sum() / (m.sum() + 1e-5) / 3


def _inputs(cfg, patch, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], generator=g)
    grid = cfg["img_size"] // patch
    mask = (torch.rand(batch, grid, grid, generator=g) < 0.6).long()
    return x, mask


def _swin_model():
    return create_model("swin_tiny_cpu", img_size=SWIN["img_size"], embed_dim=SWIN["embed_dim"], depths=SWIN["depths"],
                        num_heads=SWIN["num_heads"], window_size=SWIN["window_size"]).eval()


def _vit_model():
    return create_model("vit_tiny_cpu", img_size=VIT["img_size"], embed_dim=VIT["embed_dim"], depth=VIT["depth"],
                        num_heads=VIT["num_heads"]).eval()


# ---------------------------------------------------------------------------------------------
# official -> ours
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_official_checkpoint_loads_strict_and_matches_official_forward(arch):
    cfg, official, model = (SWIN, official_swin_state(SWIN), _swin_model()) if arch == "swin" else \
        (VIT, official_vit_state(VIT), _vit_model())
    assert is_official_layout(official)
    mapped = official_to_ours(official)
    assert set(mapped) == set(model.state_dict()), "no missing / unexpected keys after the mapping"
    assert not is_official_layout(mapped)
    interchange.load_simmim_weights(model, official)
    x, mask = _inputs(cfg, cfg["patch_size"])
    if arch == "swin":
        want = ref_swin(official, x, mask, cfg)
    else:
        want = ref_vit(official, x, mask, cfg)[0]
    with torch.no_grad():
        got = model.encoder(x, mask)
        loss = model(x, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    stride = model.encoder_stride
    torch.testing.assert_close(loss, ref_loss(official, x, want, mask, cfg["patch_size"], stride), atol=ATOL, rtol=1e-5)


def test_official_swin_downsample_moves_to_next_stage():
    mapped = official_to_ours(official_swin_state(SWIN))
    assert "encoder.layers.0.downsample.reduction.weight" not in mapped
    assert "encoder.layers.1.downsample.reduction.weight" in mapped
    assert "encoder.layers.3.downsample.reduction.weight" in mapped  # official stage 2's merging
    assert not any("relative_position_index" in k or "attn_mask" in k for k in mapped)
    # a fine-tuned official Swin's classifier: head -> head.fc
    ft = {k[len("encoder."):]: v for k, v in official_swin_state(SWIN).items() if k.startswith("encoder.")}
    ft.update({"head.weight": torch.zeros(5, 128), "head.bias": torch.zeros(5)})
    assert {"head.fc.weight", "head.fc.bias"} <= set(official_to_ours(ft))


def _fake_yacs():
    """A stand-in for yacs (not installed here) whose CfgNode pickles as ``yacs.config.CfgNode``, as the
    official microsoft/SimMIM checkpoints do (a dict subclass with attributes in ``__dict__``)."""
    pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init_dict=None, **kw):
            super().__init__(init_dict or {}, **kw)
            self.__dict__.update({"__immutable__": False, "__deprecated_keys__": set(), "__new_allowed__": False})

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode, pkg.config = CfgNode, mod
    return pkg, mod, CfgNode


def test_official_file_with_unimportable_config_is_read(tmp_path):
    """Official checkpoints pickle a yacs config; reading needs neither yacs nor a full unpickle."""
    pkg, mod, CfgNode = _fake_yacs()
    sys.modules["yacs"], sys.modules["yacs.config"] = pkg, mod
    try:
        cfg = CfgNode(DATA=CfgNode(IMG_SIZE=64))
        path = tmp_path / "official.pth"
        torch.save({"model": official_swin_state(SWIN), "config": cfg, "epoch": 99}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    ck = read_checkpoint(path)
    assert ck.kind == "official" and ck.meta["config"]["DATA"]["IMG_SIZE"] == 64
    assert type(ck.meta["config"]).__module__ == "simmim_fast.serialization"  # an inert stand-in
    assert set(ck.state_dict) == set(official_swin_state(SWIN))


def test_official_checkpoint_of_a_preset_is_recognised(tmp_path):
    """swin_tiny_cpu's geometry in the official layout: the preset and the image size are found."""
    cfg = dict(img_size=192, patch_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=6)
    official = official_swin_state(cfg)
    assert infer_pretrain_preset(official) == "swin_tiny_cpu"
    torch.save({"model": official, "epoch": 3}, tmp_path / "o.pth")
    model, info = load_pretraining_model(tmp_path / "o.pth")
    assert info["preset"] == "swin_tiny_cpu" and info["img_size"] == 192 and info["kind"] == "official"
    x, mask = _inputs(cfg, 4, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encoder(x, mask), ref_swin(official, x, mask, cfg), atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="no preset has this swin encoder"):
        infer_pretrain_preset(official_swin_state(SWIN))


def test_wrong_architecture_is_a_clear_error():
    model = _swin_model()
    bad = official_swin_state(dict(SWIN, embed_dim=24))
    with pytest.raises(ValueError, match="does not match the model"):
        interchange.load_simmim_weights(model, bad)


# ---------------------------------------------------------------------------------------------
# official / ours -> classifier (fine-tuning layout), with resizing
# ---------------------------------------------------------------------------------------------
def test_official_swin_into_classifier_same_size_equals_official_features():
    spec = {"arch": "swin", "kwargs": dict(SWIN, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, num_classes=3), "preset": None}
    clf = build_classifier(spec).eval()
    official = official_swin_state(SWIN)
    report = load_pretrained(clf, Checkpoint("official", official))
    assert report.missing == ["head.fc.weight", "head.fc.bias"] and not report.resized
    x, _ = _inputs(SWIN, 4)
    zero = torch.zeros(2, 16, 16, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(clf.forward_features(x), ref_swin(official, x, zero, SWIN), atol=ATOL, rtol=1e-5)


def test_official_vit_into_classifier_copies_the_shared_table_into_every_block():
    kw = dict(VIT, mlp_ratio=4.0, qkv_bias=True, init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=True,
              use_shared_rel_pos_bias=False, drop_path_rate=0.0, num_classes=3, global_pool="avg")
    clf = build_classifier({"arch": "vit", "kwargs": kw}).eval()
    official = official_vit_state(VIT)
    report = load_pretrained(clf, Checkpoint("official", official))
    assert set(report.missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert {"mask_token", "norm.weight", "norm.bias"} <= set(report.dropped)
    table = official["encoder.rel_pos_bias.relative_position_bias_table"]
    for blk in clf.blocks:
        torch.testing.assert_close(blk.attn.relative_position_bias_table.detach(), table, atol=0, rtol=0)
    x, _ = _inputs(VIT, 16)
    per_block = {f"blocks.{i}.attn.relative_position_bias_table": table for i in range(VIT["depth"])}
    sd = dict(official, **per_block)
    with torch.no_grad():
        _, pre_norm = ref_vit(sd, x, torch.zeros(2, 4, 4), VIT, per_block=True)
        torch.testing.assert_close(clf.forward_features(x), pre_norm, atol=ATOL, rtol=1e-5)


def test_pretraining_to_finetune_size_change_resizes_tables_as_the_resize_function():
    """swin_tiny_cpu 192 px / window 6 -> the fine-tuning preset's 224 px / window 7."""
    pre = create_model("swin_tiny_cpu")
    with torch.no_grad():
        for n, p in pre.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_()
    clf = build_classifier(classifier_spec("swin_tiny_cpu", num_classes=4))
    report = load_pretrained(clf, Checkpoint("pretrain", pre.state_dict()))
    assert len(report.resized) == 5 and report.missing == ["head.fc.weight", "head.fc.bias"]
    src = pre.state_dict()["encoder.layers.0.blocks.0.attn.relative_position_bias_table"]
    got = clf.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert src.shape == (121, 1) and got.shape == (169, 1)
    torch.testing.assert_close(got, resize_rel_pos_table(src, 169), atol=0, rtol=0)
    # same geometry: weights copied bit for bit
    same = build_classifier(classifier_spec("swin_tiny_cpu", num_classes=4, img_size=192, window_size=6))
    load_pretrained(same, Checkpoint("pretrain", pre.state_dict()))
    for k, v in same.state_dict().items():
        if not k.startswith("head"):
            torch.testing.assert_close(v, pre.state_dict()["encoder." + k], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# relative-position table resizing
# ---------------------------------------------------------------------------------------------
def test_geometric_positions_follow_the_official_rule():
    p = np.asarray(geometric_positions(11, 13))
    assert p.shape == (11,) and np.allclose(p, -p[::-1]) and list(p[4:7]) == [-1.0, 0.0, 1.0]
    gaps = np.diff(p[5:])  # 1, q, q^2, ...
    q = gaps[1] / gaps[0]
    assert np.allclose(gaps[1:] / gaps[:-1], q) and 1.01 <= q <= 1.5
    assert abs(p[-1] - 6.0) < 1e-4  # the outermost source offset lands on dst // 2


def _position_table(src, dst, fn, heads=2):
    pos = torch.tensor(geometric_positions(src, dst), dtype=torch.float64)
    return torch.stack([fn(pos[:, None], pos[None, :], h).reshape(-1) for h in range(heads)], dim=1)


def _target_values(dst, fn, heads=2):
    t = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
    return torch.stack([fn(t[:, None], t[None, :], h).reshape(-1) for h in range(heads)], dim=1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolator: non-contiguous searchsorted input
def test_resize_agrees_with_timm_on_tables_linear_in_position():
    """timm carries its own transcription of the official geometric mapping (linear interpolation):
    on a table that is bilinear in the geometric positions both must give the function's exact values."""
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

    def fn(y, x, h):
        return 0.3 + (0.5 + h) * y - 0.2 * x + 0.05 * x * y

    table = _position_table(11, 13, fn).float()
    ours = resize_rel_pos_table(table, 169)
    theirs = resize_rel_pos_bias_table(table, new_window_size=(7, 7), new_bias_shape=(169, 2))
    exact = _target_values(13, fn).float()
    torch.testing.assert_close(ours, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, exact, atol=1e-5, rtol=0)


def test_resize_is_bicubic_and_keeps_orientation_and_extra_tokens():
    """A cubic in the positions (asymmetric in dy / dx) is reproduced exactly by the bicubic spline;
    BEiT's 3 extra rows are carried over unchanged."""
    def fn(y, x, h):
        return 1 + 0.3 * y - 0.2 * x + 0.01 * y ** 3 - 0.02 * x ** 2 * y + h * 0.1 * x ** 3 / 27

    body = _position_table(11, 13, fn).float()
    extra = torch.tensor([[1.5, -2.0], [0.25, 3.0], [-1.0, 0.5]])
    out = resize_rel_pos_table(torch.cat([body, extra]), 169 + 3, num_extra_tokens=3)
    assert out.shape == (172, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out[:169], _target_values(13, fn).float(), atol=2e-5, rtol=0)
    torch.testing.assert_close(out[169:], extra, atol=0, rtol=0)


def test_resize_round_trip():
    """Same size: a copy. 6 -> 7 -> 6 windows: offsets -1..1 (spline knots both ways) come back exactly,
    the rest is an interpolation of an interpolation (not an identity by construction of the official rule)."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(121 + 3, 4, generator=g)
    same = resize_rel_pos_table(table, 124, num_extra_tokens=3)
    assert same is not table and torch.equal(same, table)
    back = resize_rel_pos_table(resize_rel_pos_table(table, 172, num_extra_tokens=3), 124, num_extra_tokens=3)
    center = [(4 + dy) * 11 + (4 + dx) for dy in range(3) for dx in range(3)]  # offsets -1..1 in an 11x11 grid
    torch.testing.assert_close(back[center], table[center], atol=1e-5, rtol=0)
    torch.testing.assert_close(back[121:], table[121:], atol=0, rtol=0)


def test_resize_bad_input():
    with pytest.raises(ValueError, match="table"):
        resize_rel_pos_table(torch.zeros(10), 169)
    with pytest.raises(ValueError, match="not \\(2w-1\\)\\^2"):
        resize_rel_pos_table(torch.zeros(120, 2), 169)


# ---------------------------------------------------------------------------------------------
# ours -> timm (safetensors)
# ---------------------------------------------------------------------------------------------
def _pretrain_checkpoint(tmp_path, preset, img_size):
    torch.manual_seed(0)
    model = create_model(preset, img_size=img_size)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_()
    path = tmp_path / "checkpoint_00000001.pt"
    torch.save({"format": interchange.PRETRAIN_FORMAT, "model": model.state_dict(), "step": 1,
                "args": {"preset": preset}, "plan": {"img_size": img_size, "mask_patch_size": 32, "mask_ratio": 0.6}}, path)
    return model.eval(), path


@pytest.mark.parametrize("preset,img_size", [("swin_tiny_cpu", 64), ("vit_tiny_cpu", 64)])
def test_timm_export_loads_with_no_missing_keys_and_same_features(tmp_path, preset, img_size):
    model, path = _pretrain_checkpoint(tmp_path, preset, img_size)
    export = timm_export(path)
    out = tmp_path / "encoder.safetensors"
    weights, sidecar = write_timm_export(export, out)
    assert "mask_token" not in export["state_dict"] and sidecar.is_file()
    meta = json.loads(sidecar.read_text())
    # exactly the call the README documents
    net = timm.create_model(meta["timm_model_name"], pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(weights), num_classes=0), **meta["timm_kwargs"]).eval()
    fresh = timm.create_model(meta["timm_model_name"], pretrained=False, **meta["timm_kwargs"])
    from safetensors.torch import load_file

    result = fresh.load_state_dict(load_file(str(weights)), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.encoder(x, torch.zeros(2, img_size // model.patch_size, img_size // model.patch_size))
        theirs = net.forward_features(x)
        if theirs.dim() == 3:  # BEiT tokens: drop the cls token
            theirs = theirs[:, 1:].reshape(ours.shape)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=1e-5)
    # the helper reading the sidecar builds the same network
    with torch.no_grad():
        torch.testing.assert_close(create_timm_model(weights).eval().forward_features(x), net.forward_features(x))


def test_timm_export_of_an_official_checkpoint_matches_the_official_forward(tmp_path):
    cfg = dict(img_size=192, patch_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=6)
    official = official_swin_state(cfg, seed=3)
    torch.save({"model": official}, tmp_path / "o.pth")
    export = timm_export(tmp_path / "o.pth")
    weights, _ = write_timm_export(export, tmp_path / "enc.pt")  # torch.save format works too
    net = create_timm_model(weights).eval()
    x, _ = _inputs(cfg, 4, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), ref_swin(official, x, torch.zeros(1, 48, 48), cfg),
                                   atol=ATOL, rtol=1e-5)


def test_finetuned_classifier_export_keeps_the_head(tmp_path):
    spec = classifier_spec("vit_tiny_cpu", num_classes=5, img_size=64)
    clf = build_classifier(spec).eval()
    torch.save({"format": interchange.FINETUNE_FORMAT, "model": clf.state_dict(), "spec": spec, "classes": list("abcde")},
               tmp_path / "best.pt")
    export = timm_export(tmp_path / "best.pt")
    weights, _ = write_timm_export(export, tmp_path / "clf.safetensors")
    net = create_timm_model(weights).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), clf(x), atol=ATOL, rtol=1e-5)


def test_export_cli(tmp_path, capsys):
    _, path = _pretrain_checkpoint(tmp_path, "swin_tiny_cpu", 64)
    out = tmp_path / "e.safetensors"
    assert interchange.main(["export", "--checkpoint", str(tmp_path), "--output", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model(" in printed
    diff = float(printed.split("max |features difference| = ")[1].split()[0])
    assert diff <= ATOL  # our encoder (SDPA window attention) vs timm's own modules: rounding only
    ck = read_checkpoint(out)
    assert ck.kind == "state_dict" and ck.meta["timm_model_name"].startswith("swin")
    assert interchange.main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_cli_writes_a_checkpoint_our_tools_read(tmp_path, capsys):
    cfg = dict(img_size=192, patch_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=6)
    official = official_swin_state(cfg, seed=5)
    torch.save({"model": official}, tmp_path / "o.pth")
    out = tmp_path / "run" / "checkpoint_00000000.pt"
    assert interchange.main(["convert", "--checkpoint", str(tmp_path / "o.pth"), "--output", str(out)]) == 0
    ck = read_checkpoint(tmp_path / "run")
    assert ck.kind == "pretrain" and ck.meta["args"]["preset"] == "swin_tiny_cpu"
    model, _ = load_pretraining_model(ck)
    x, mask = _inputs(cfg, 4, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encoder(x, mask), ref_swin(official, x, mask, cfg), atol=ATOL, rtol=1e-5)


def test_finetuned_checkpoint_into_a_classifier_with_other_classes_keeps_the_encoder_only():
    src = build_classifier(classifier_spec("vit_tiny_cpu", num_classes=5, img_size=64)).eval()
    dst = build_classifier(classifier_spec("vit_tiny_cpu", num_classes=3, img_size=64)).eval()
    report = load_pretrained(dst, Checkpoint("finetune", src.state_dict()))
    assert set(report.missing) == {"head.weight", "head.bias"} and set(report.dropped) == {"head.weight", "head.bias"}
    for k, v in src.state_dict().items():
        if not k.startswith("head"):
            torch.testing.assert_close(dst.state_dict()[k], v, atol=0, rtol=0)
    # per-block tables cannot become the pretraining model's shared table: a clear error, not a silent init
    with pytest.raises(ValueError, match="rel_pos_bias.relative_position_bias_table"):
        interchange.load_simmim_weights(create_model("vit_tiny_cpu", img_size=64), {"encoder." + k: v for k, v in src.state_dict().items()})


def test_safetensors_export_has_the_usual_permissions(tmp_path):
    """The safetensors writer creates 0600 files; an export is meant to be shared (mode from the umask)."""
    import stat

    from simmim_fast.models.interchange import save_state_dict

    old = os.umask(0o022)
    try:
        p = save_state_dict({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o644


# ---------------------------------------------------------------------------------------------
# ours -> the official layout (export --format official)
# ---------------------------------------------------------------------------------------------
SWIN_192 = dict(img_size=192, patch_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=6)


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))[:8]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch,cfg", [("swin", SWIN), ("swin", SWIN_192), ("vit", VIT)])
def test_official_to_ours_to_official_gives_identical_tensors(arch, cfg):
    """Buffers included: ours recomputes relative_position_index / attn_mask as the official code does."""
    if arch == "swin":
        official = official_swin_state(cfg, seed=7)
        model = create_model("swin_tiny_cpu", **{k: cfg[k] for k in ("img_size", "embed_dim", "depths", "num_heads", "window_size")})
    else:
        official, model = official_vit_state(cfg, seed=7), _vit_model()
    interchange.load_simmim_weights(model, official)
    back = interchange.ours_to_official(model.state_dict(), grid=model.encoder.grid_size)
    _same(back, official)
    if arch == "swin":  # official module order: a stage's patch merging after its blocks
        keys = list(back)
        assert keys.index("encoder.layers.0.downsample.reduction.weight") > keys.index("encoder.layers.0.blocks.0.mlp.fc2.bias")
        assert keys.index("encoder.layers.0.downsample.reduction.weight") < keys.index("encoder.layers.1.blocks.0.norm1.weight")
    with pytest.raises(ValueError, match="already in the official layout"):
        interchange.ours_to_official(official, grid=model.encoder.grid_size)


def official_load_pretrained(checkpoint_model: dict, model_keys: dict, arch: str):
    """Key handling of the official utils.load_pretrained + model.load_state_dict(strict=False) ->
    (missing, unexpected); ``model_keys``: name -> shape of the official fine-tuning model."""
    if any("encoder." in k for k in checkpoint_model):
        checkpoint_model = {k.replace("encoder.", ""): v for k, v in checkpoint_model.items() if k.startswith("encoder.")}
    if arch == "swin":
        for key in list(checkpoint_model):
            if "relative_position_bias_table" in key:
                assert checkpoint_model[key].shape[1] == model_keys[key][1]  # state_dict[key]: a KeyError there is fatal
        for word in ("relative_position_index", "relative_coords_table", "attn_mask"):
            for k in [k for k in checkpoint_model if word in k]:
                del checkpoint_model[k]
    else:
        table = checkpoint_model["rel_pos_bias.relative_position_bias_table"]  # a KeyError there is fatal
        for i in range(sum(1 for k in model_keys if k.endswith("attn.relative_position_bias_table"))):
            checkpoint_model[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
        checkpoint_model.pop("rel_pos_bias.relative_position_bias_table")
        for k in [k for k in checkpoint_model if "relative_position_index" in k]:
            checkpoint_model.pop(k)
    for k, v in checkpoint_model.items():
        if k in model_keys:
            assert tuple(v.shape) == tuple(model_keys[k]), k  # load_state_dict: a size mismatch is fatal
    return sorted(set(model_keys) - set(checkpoint_model)), sorted(set(checkpoint_model) - set(model_keys))


def _official_finetune_keys(arch: str, cfg: dict, classes: int = 10) -> dict:
    """The official fine-tuning model's state_dict shapes (SwinTransformer / VisionTransformer with
    use_rel_pos_bias and use_mean_pooling), from the official pretraining layout."""
    if arch == "swin":
        keys = {k[len("encoder."):]: tuple(v.shape) for k, v in official_swin_state(cfg).items()
                if k.startswith("encoder.") and k != "encoder.mask_token"}
        last = cfg["embed_dim"] * 2 ** (len(cfg["depths"]) - 1)
    else:
        sd = official_vit_state(cfg)
        keys = {k[len("encoder."):]: tuple(v.shape) for k, v in sd.items()
                if k.startswith("encoder.") and not k.startswith(("encoder.rel_pos_bias", "encoder.norm.", "encoder.mask_token"))}
        for i in range(cfg["depth"]):
            keys[f"blocks.{i}.attn.relative_position_bias_table"] = tuple(sd["encoder.rel_pos_bias.relative_position_bias_table"].shape)
            keys[f"blocks.{i}.attn.relative_position_index"] = tuple(sd["encoder.rel_pos_bias.relative_position_index"].shape)
        last = cfg["embed_dim"]
        keys.update({"fc_norm.weight": (last,), "fc_norm.bias": (last,)})
    keys.update({"head.weight": (classes, last), "head.bias": (classes,)})
    return keys


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_official_export_is_accepted_by_the_official_finetune_loader_like_an_official_checkpoint(arch):
    cfg = SWIN if arch == "swin" else VIT
    official = official_swin_state(cfg, seed=2) if arch == "swin" else official_vit_state(cfg, seed=2)
    ours = _swin_model() if arch == "swin" else _vit_model()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
    export = interchange.ours_to_official(ours.state_dict(), grid=ours.encoder.grid_size)
    ft = _official_finetune_keys(arch, cfg)
    missing, unexpected = official_load_pretrained(dict(export), ft, arch)
    assert (missing, unexpected) == official_load_pretrained(dict(official), ft, arch)  # as for a real one
    # nothing of the encoder left out: only what the loader itself deletes, and the new head / fc-norm
    assert all(("relative_position_index" in k or "attn_mask" in k or k.startswith(("head.", "fc_norm."))) for k in missing)
    # the official forward over the exported keys gives our features
    x, mask = _inputs(cfg, cfg["patch_size"], batch=1)
    with torch.no_grad():
        got = ours.eval().encoder(x, mask)
        want = ref_swin(export, x, mask, cfg) if arch == "swin" else ref_vit(export, x, mask, cfg)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_export_format_official_cli_round_trip(tmp_path, capsys):
    model, path = _pretrain_checkpoint(tmp_path, "swin_tiny_cpu", 192)
    out = tmp_path / "official.pth"
    assert interchange.main(["export", "--format", "official", "--checkpoint", str(tmp_path), "--output", str(out),
                             "--check"]) == 0
    printed = capsys.readouterr().out
    assert "--pretrained" in printed and "max |difference| = 0" in printed
    obj = torch.load(out, map_location="cpu", weights_only=True)  # what the official loader does (plain data)
    assert set(obj) >= {"model", "config"} and obj["config"]["DATA"]["IMG_SIZE"] == 192
    sd = obj["model"]
    assert is_official_layout(sd) and "encoder.layers.0.downsample.reduction.weight" in sd
    assert "encoder.layers.2.blocks.1.attn_mask" in sd and "decoder.0.weight" in sd
    _same(official_to_ours(sd), model.state_dict())
    # official -> ours (the usual reader: preset from the shapes, size from the config) -> official: identical
    out2 = tmp_path / "official2.pth"
    assert interchange.main(["export", "--format", "official", "--checkpoint", str(out), "--output", str(out2)]) == 0
    assert "from the official checkpoint" in capsys.readouterr().out
    obj2 = torch.load(out2, weights_only=True)
    assert obj2["simmim_fast"]["preset"] == "swin_tiny_cpu" and obj2["simmim_fast"]["img_size"] == 192
    _same(obj2["model"], sd)
    assert interchange.main(["export", "--format", "official", "--checkpoint", str(tmp_path), "--output",
                             str(tmp_path / "x.safetensors")]) == 2
    assert ".pth" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_official_export_of_a_finetuned_classifier(tmp_path, arch):
    preset = "swin_tiny_cpu" if arch == "swin" else "vit_tiny_cpu"
    spec = classifier_spec(preset, num_classes=5, img_size=128, window_size=4) if arch == "swin" else \
        classifier_spec(preset, num_classes=5, img_size=64)
    clf = build_classifier(spec).eval()
    torch.save({"format": interchange.FINETUNE_FORMAT, "model": clf.state_dict(), "spec": spec, "classes": list("abcde")},
               tmp_path / "best.pt")
    export = interchange.official_export(tmp_path / "best.pt")
    sd = export["model"]
    assert {"head.weight", "head.bias"} <= set(sd) and not any(k.startswith("head.fc") for k in sd)
    if arch == "swin":
        assert "layers.0.downsample.reduction.weight" in sd and "layers.2.blocks.1.attn_mask" in sd
    else:
        assert "blocks.0.attn.relative_position_index" in sd and "fc_norm.weight" in sd
    _same(official_to_ours(sd), clf.state_dict())


def test_official_export_refuses_what_the_official_code_cannot_hold(tmp_path):
    model = create_model("swin_tiny_cpu", img_size=64)  # 16 x 16 tokens, window 6: timm pads, the official code cannot
    with pytest.raises(ValueError, match="not a multiple of their window"):
        interchange.ours_to_official(model.state_dict(), grid=model.encoder.grid_size)
    _, path = _pretrain_checkpoint(tmp_path, "vit_tiny_cpu", 64)
    export = timm_export(path)
    weights, _ = write_timm_export(export, tmp_path / "enc.safetensors")
    with pytest.raises(ValueError, match="timm export"):
        interchange.official_export(weights)
