"""SimMIM models against a transcription of the official microsoft/SimMIM ``models/simmim.py`` (CPU).

The official forward is transcribed here on top of our modules' weights: patch embedding, mask-token
substitution ``x * (1 - w) + mask_token * w``, the encoder blocks, the 1x1-conv decoder + PixelShuffle
on NCHW features and the official loss with the mask upsampled by the patch size. Presets are checked
against the official configs (architecture and exact parameter counts), the optimizer groups against
the official ``get_pretrain_param_groups`` rule and the schedule against timm's schedulers.

Small models only for forward/backward (2 CPU cores); big presets are built on the meta device
(structure and parameter counts) except ViT-B, built once on CPU to check initial values.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from simmim_fast import create_model as top_level_create_model
from simmim_fast.models import PRESETS, create_model
from simmim_fast.training.optim import WarmupScheduler, build_optimizer, param_groups

SWIN_SMALL = dict(img_size=64, depths=(2, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1), window_size=2)
VIT_SMALL = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; the model's NHWC linear head vs the official NCHW conv


def small_model(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    if arch == "swin":
        return create_model("swin_tiny_cpu", **{**SWIN_SMALL, **kw})
    return create_model("vit_tiny_cpu", **{**VIT_SMALL, **kw})


def _images(B=2, size=64, seed=1):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(shape, seed=2, p=0.5, dtype=torch.int64):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p).to(dtype)


def _up(mask, r):
    return mask.repeat_interleave(r, 1).repeat_interleave(r, 2)


# ----------------------------------------------------------------------------------------------------
# transcription of the official forward (microsoft/SimMIM models/simmim.py)


def official_swin_encoder(enc, x, mask):
    """SwinTransformerForSimMIM.forward; ``mask`` at patch resolution. Returns NCHW features."""
    x = enc.patch_embed(x)  # timm keeps (B, H, W, C); the official one is (B, L, C)
    B, Hp, Wp, C = x.shape
    x = x.reshape(B, Hp * Wp, C)
    mask_tokens = enc.mask_token.expand(B, Hp * Wp, -1)
    w = mask.flatten(1).unsqueeze(-1).type_as(mask_tokens)
    x = x * (1.0 - w) + mask_tokens * w
    x = x.reshape(B, Hp, Wp, C)  # ape=False in every official config, pos_drop p=0
    for layer in enc.layers:
        x = layer(x)
    x = enc.norm(x)
    return x.permute(0, 3, 1, 2)


def official_vit_encoder(enc, x, mask):
    """VisionTransformerForSimMIM.forward; ``mask`` at patch resolution. Returns NCHW features."""
    x = enc.patch_embed(x)
    B, L, _ = x.shape
    mask_token = enc.mask_token.expand(B, L, -1)
    w = mask.flatten(1).unsqueeze(-1).type_as(mask_token)
    x = x * (1 - w) + mask_token * w
    cls_tokens = enc.cls_token.expand(B, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    if enc.pos_embed is not None:
        x = x + enc.pos_embed
    x = enc.pos_drop(x)
    rel_pos_bias = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
    for blk in enc.blocks:
        x = blk(x, shared_rel_pos_bias=rel_pos_bias)
    x = enc.norm(x)
    x = x[:, 1:]
    B, L, C = x.shape
    H = W = int(L**0.5)
    return x.permute(0, 2, 1).reshape(B, C, H, W)


def official_encoder(model, x, mask):
    fn = official_vit_encoder if hasattr(model.encoder, "blocks") else official_swin_encoder
    return fn(model.encoder, x, mask)


def official_reconstruction(model, x, mask):
    z = official_encoder(model, x, mask)
    conv = model.decoder[0]
    return F.pixel_shuffle(F.conv2d(z, conv.weight, conv.bias), model.encoder_stride)


def official_loss_from_rec(x, x_rec, mask, patch_size, in_chans=3):
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


def official_forward(model, x, mask):
    """SimMIM.forward(x, mask) with ``mask`` at model-patch resolution."""
    return official_loss_from_rec(x, official_reconstruction(model, x, mask), mask, model.patch_size)


# ----------------------------------------------------------------------------------------------------
# presets


def _swin_param_count(C, depths, heads, windows, patch=4, in_ch=3, mlp=4, stride=32):
    """Parameters of the official SimMIM Swin (encoder + mask token + 1x1-conv decoder), by formula."""
    n = in_ch * patch * patch * C + C + 2 * C + C  # patch conv, patch norm, mask token
    for i, (d, h) in enumerate(zip(depths, heads)):
        dim = C * 2**i
        if i > 0:  # patch merging: LayerNorm(4 prev) + Linear(4 prev -> 2 prev, no bias)
            prev = dim // 2
            n += 2 * 4 * prev + 4 * prev * 2 * prev
        ws = windows[i]
        n += d * (2 * dim + (2 * ws - 1) ** 2 * h + 3 * dim * dim + 3 * dim + dim * dim + dim
                  + 2 * dim + dim * mlp * dim + mlp * dim + mlp * dim * dim + dim)
    nf = C * 8
    return n + 2 * nf + nf * stride * stride * in_ch + stride * stride * in_ch


def _vit_param_count(D=768, depth=12, heads=12, grid=14, patch=16, in_ch=3, mlp=4):
    """Parameters of the official SimMIM BEiT-style ViT (shared rel-pos bias, q/v biases, layer scale)."""
    blk = (2 * D + 2 * D + 3 * D * D + 2 * D + D * D + D + 2 * D
           + D * mlp * D + mlp * D + mlp * D * D + D)
    return (in_ch * patch * patch * D + D + D + D + ((2 * grid - 1) ** 2 + 3) * heads
            + depth * blk + 2 * D + D * patch * patch * in_ch + patch * patch * in_ch)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    with torch.device("meta"):  # structure only: fast even for Swin-L
        model = create_model(name)
    assert isinstance(model, nn.Module)
    s = model.encoder_stride
    assert model.decoder[0].out_channels == s * s * 3
    assert model.decoder[0].kernel_size == (1, 1)
    assert model.decoder[1].upscale_factor == s
    assert model.decoder[0].in_channels == model.encoder.num_features
    assert model.encoder.mask_token.shape == (1, 1, model.encoder.embed_dim)
    recipe = PRESETS[name].recipe
    assert recipe.img_size == model.img_size[0] == model.img_size[1]
    assert recipe.mask_patch_size % model.patch_size == 0


@pytest.mark.parametrize("name,C,heads,window,windows", [
    ("swin_base_192", 128, (4, 8, 16, 32), 6, (6, 6, 6, 6)),
    ("swin_base_192_800ep", 128, (4, 8, 16, 32), 6, (6, 6, 6, 6)),
    # window 12 at 192 px: stage 4 (6x6 tokens) is one clamped 6x6 window, as in the official Swin
    ("swin_large_192", 192, (6, 12, 24, 48), 12, (12, 12, 12, 6)),
])
def test_swin_presets_architecture(name, C, heads, window, windows):
    with torch.device("meta"):
        model = create_model(name)
    enc = model.encoder
    assert enc.embed_dim == C and enc.patch_size == 4
    assert enc.num_features == 8 * C
    assert model.encoder_stride == 32 and model.patch_size == 4
    assert model.img_size == (192, 192)
    assert [len(layer.blocks) for layer in enc.layers] == [2, 2, 18, 2]
    assert [layer.blocks[0].attn.num_heads for layer in enc.layers] == list(heads)
    res = 48
    for i, layer in enumerate(enc.layers):
        res = 48 // 2**i
        for j, blk in enumerate(layer.blocks):
            assert tuple(blk.window_size) == (windows[i], windows[i])
            # official: no shift when the window covers the whole map, else shift window//2 every other block
            shift = 0 if res <= window or j % 2 == 0 else window // 2
            assert tuple(blk.shift_size) == (shift, shift), (i, j)
            assert blk.attn.relative_position_bias_table.shape == ((2 * windows[i] - 1) ** 2, heads[i])
            assert blk.attn.qkv.bias is not None
            assert blk.mlp.fc1.out_features == 4 * blk.mlp.fc1.in_features
            assert isinstance(blk.drop_path1, nn.Identity) and isinstance(blk.drop_path2, nn.Identity)
    assert enc.patch_embed.norm is not None and not isinstance(enc.patch_embed.norm, nn.Identity)
    assert getattr(enc, "absolute_pos_embed", None) is None
    n = sum(p.numel() for p in model.parameters())
    assert n == _swin_param_count(C, (2, 2, 18, 2), heads, windows)


def test_vit_base_preset_architecture_and_init():
    torch.manual_seed(0)
    model = create_model("vit_base_224")  # real weights: one ~1 s build
    enc = model.encoder
    assert enc.embed_dim == 768 and enc.patch_size == 16 and len(enc.blocks) == 12
    assert model.encoder_stride == 16 and model.img_size == (224, 224)
    assert model.decoder[0].out_channels == 16 * 16 * 3
    assert enc.rel_pos_bias is not None
    assert enc.rel_pos_bias.relative_position_bias_table.shape == (27 * 27 + 3, 12)
    assert enc.pos_embed is None
    assert enc.cls_token.shape == (1, 1, 768)
    for i, blk in enumerate(enc.blocks):
        assert blk.attn.num_heads == 12
        assert getattr(blk.attn, "relative_position_bias_table", None) is None  # only the shared one
        assert blk.attn.q_bias is not None and blk.attn.v_bias is not None
        assert torch.equal(blk.gamma_1, torch.full((768,), 0.1))
        assert torch.equal(blk.gamma_2, torch.full((768,), 0.1))
        # stochastic depth decays linearly to 0.1 at the last block
        dp = getattr(blk.drop_path1, "drop_prob", 0.0)
        assert dp == pytest.approx(0.1 * i / 11)
    norms = [m for m in enc.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1
    assert all(m.eps == 1e-6 for m in norms)
    # mask token: trunc_normal(std=.02) cut at +-std, as the official ViT
    mt = enc.mask_token
    assert mt.abs().max() <= 0.02 and mt.std() > 0.005
    assert torch.isfinite(enc.cls_token).all() and enc.cls_token.std() > 0
    assert sum(p.numel() for p in model.parameters()) == _vit_param_count()


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError) as ei:
        create_model("swin_gigantic_9000")
    msg = str(ei.value)
    assert "swin_gigantic_9000" in msg
    for name in PRESETS:
        assert name in msg
    with pytest.raises(ValueError):
        top_level_create_model("nope")


def test_bad_wrapper_options():
    with pytest.raises(ValueError, match="loss"):
        small_model("swin", loss="bogus")
    with pytest.raises(ValueError, match="predict"):
        small_model("vit", predict="everything")


# ----------------------------------------------------------------------------------------------------
# loss == official forward


@pytest.mark.parametrize("arch", ["swin", "vit"])
@pytest.mark.parametrize("grid", ["patch", "coarse"])
def test_loss_matches_official_forward(arch, grid):
    model = small_model(arch).eval()
    x = _images()
    gh = model.encoder.grid_size[0]  # swin 16, vit 4
    if grid == "patch":
        mask = _mask((2, gh, gh))
        mask_patch = mask
    else:
        mask = _mask((2, 2, 2), seed=3)  # 32-px mask patches, the official mask geometry
        mask[0, 0, 0], mask[0, 1, 1] = 1, 0  # at least one masked and one visible cell
        mask_patch = _up(mask, gh // 2)
    with torch.no_grad():
        loss = model(x, mask)
        z = model.encoder(x, mask)
        exp_z = official_encoder(model, x, mask_patch)
        exp = official_forward(model, x, mask_patch)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(z.permute(0, 3, 1, 2), exp_z, **TOL)
    torch.testing.assert_close(loss, exp, **TOL)
    assert 0.1 < loss.item() < 10  # a real loss, not a degenerate 0


@pytest.mark.parametrize("arch", ["swin", "vit"])
@pytest.mark.parametrize("loss_kind,predict", [("l2", "masked"), ("smooth_l1", "masked"), ("l1", "all")])
def test_loss_variants_match_transcription(arch, loss_kind, predict):
    model = small_model(arch, loss=loss_kind, predict=predict).eval()
    x = _images(seed=4)
    gh = model.encoder.grid_size[0]
    mask = _mask((2, gh, gh), seed=5)
    per_elem = {"l1": F.l1_loss, "l2": F.mse_loss, "smooth_l1": F.smooth_l1_loss}[loss_kind]
    with torch.no_grad():
        got = model(x, mask)
        x_rec = official_reconstruction(model, x, mask)
        m = _up(mask, model.patch_size).unsqueeze(1).float()
        if predict == "all":
            m = torch.ones_like(m)
        exp = (per_elem(x_rec, x, reduction="none") * m).sum() / (m.sum() + 1e-5) / 3
    torch.testing.assert_close(got, exp, **TOL)


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_mask_token_substituted_after_patch_embedding(arch):
    model = small_model(arch).eval()
    enc = model.encoder
    x = _images(seed=6)
    gh = enc.grid_size[0]
    mask = _mask((2, 2, 2), seed=7)
    mask[0, 0, 0], mask[0, 1, 1] = 1, 0
    up = _up(mask, gh // 2).bool()  # (B, gh, gw)
    captured = {}
    target = enc.layers[0] if arch == "swin" else enc.blocks[0]
    h = target.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(x, mask)
            pe = enc.patch_embed(x)
    finally:
        h.remove()
    seen = captured["x"]
    C = enc.embed_dim
    if arch == "vit":
        assert torch.equal(seen[:, 0], enc.cls_token.detach().view(1, C).expand(2, C))  # cls first, no pos-embed
        seen = seen[:, 1:].reshape(2, gh, gh, C)
        pe = pe.reshape(2, gh, gh, C)
    assert seen.shape == (2, gh, gh, C)
    mt = enc.mask_token.detach().view(C)
    assert torch.equal(seen[up], mt.expand(int(up.sum()), C))
    assert torch.equal(seen[~up], pe[~up])


# ----------------------------------------------------------------------------------------------------
# gradients


def _backward(model, x, mask):
    model.zero_grad(set_to_none=True)
    loss = model(x, mask)
    loss.backward()
    return loss


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_forward_backward_gradients(arch):
    model = small_model(arch)  # train mode
    x = _images(seed=8)
    gh = model.encoder.grid_size[0]
    mask = _mask((2, gh, gh), seed=9)
    loss = _backward(model, x, mask)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_gradients_match_official_forward(arch):
    model = small_model(arch).eval()
    x = _images(seed=10)
    gh = model.encoder.grid_size[0]
    mask = _mask((2, 2, 2), seed=11)
    mask[0, 0, 0], mask[1, 1, 1] = 1, 0
    params = [p for _, p in model.named_parameters()]
    got = torch.autograd.grad(model(x, mask), params)
    exp = torch.autograd.grad(official_forward(model, x, _up(mask, gh // 2)), params)
    for (name, _), g, e in zip(model.named_parameters(), got, exp):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_none_masked_gives_zero_loss_and_zero_mask_token_grad(arch):
    model = small_model(arch)
    x = _images(seed=12)
    gh = model.encoder.grid_size[0]
    loss = _backward(model, x, torch.zeros(2, gh, gh, dtype=torch.int64))
    assert loss.item() == 0.0
    # nothing masked: the loss is 0 and every gradient exactly 0 (finite, none missing)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p.grad)), name


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_all_masked_blocks_patch_embedding_gradient(arch):
    model = small_model(arch)
    x = _images(seed=13)
    loss = _backward(model, x, torch.ones(2, 2, 2, dtype=torch.bool))
    assert torch.isfinite(loss) and loss.item() > 0
    enc = model.encoder
    assert enc.mask_token.grad.abs().sum() > 0
    # every token replaced: the patch embedding (conv and, for Swin, its norm) gets exactly zero gradient
    for name, p in enc.patch_embed.named_parameters():
        assert torch.equal(p.grad, torch.zeros_like(p.grad)), name
    for name, p in model.named_parameters():
        if not name.startswith("encoder.patch_embed."):
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_mask_token_gradient_depends_on_mask(arch):
    """Mask token gets a nonzero gradient as soon as one token is masked."""
    model = small_model(arch)
    gh = model.encoder.grid_size[0]
    mask = torch.zeros(2, gh, gh, dtype=torch.int64)
    mask[1, 0, 0] = 1  # a single masked token
    _backward(model, _images(seed=14), mask)
    assert model.encoder.mask_token.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# predict


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_predict_matches_official_reconstruction(arch):
    model = small_model(arch).eval()
    x = _images(seed=15)
    gh = model.encoder.grid_size[0]
    mask = _mask((2, 2, 2), seed=16)
    mask[0, 0, 0] = 1
    pred = model.predict(x, mask)
    assert pred.shape == (2, 3, 64, 64) and pred.dtype == torch.float32
    assert not pred.requires_grad
    mask_patch = _up(mask, gh // 2)
    with torch.no_grad():
        torch.testing.assert_close(pred, official_reconstruction(model, x, mask_patch), **TOL)
        torch.testing.assert_close(
            official_loss_from_rec(x, pred, mask_patch, model.patch_size), model(x, mask), **TOL
        )


# ----------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_bad_inputs(arch):
    model = small_model(arch)
    gh = model.encoder.grid_size[0]
    x = _images()
    mask = _mask((2, gh, gh))
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 1, 64, 64), mask)  # channels
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 4, 64, 64), mask)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 32, 32), _mask((2, gh // 2, gh // 2)))  # size of another model
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 64, 96), mask)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(3, 64, 64), mask)  # not 4-D
    with pytest.raises(ValueError, match="mask"):
        model(x, _mask((2, 3, 3)))  # 3 does not divide the patch grid
    with pytest.raises(ValueError, match="mask"):
        model(x, _mask((2, gh, gh - 1)))
    with pytest.raises(ValueError, match="mask"):
        model(x, _mask((3, gh, gh)))  # batch mismatch
    with pytest.raises(ValueError, match="mask"):
        model(x, _mask((2, gh * gh)))  # flat (B, L) mask
    with pytest.raises(ValueError, match="images"):
        model.predict(torch.randn(2, 3, 48, 48), mask)
    with pytest.raises(ValueError, match="mask"):
        model.predict(x, _mask((1, gh, gh)))


# ----------------------------------------------------------------------------------------------------
# optimizer groups


def _expected_no_decay(model) -> set[str]:
    """The official rule (get_pretrain_param_groups): 1-D params, biases, no_weight_decay names and
    keywords; written out from the module types rather than read from ``model.no_weight_decay()``."""
    names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            names.update(f"{mname}.{n}" for n, _ in mod.named_parameters(recurse=False))
    for name, p in model.named_parameters():
        if p.ndim == 1 or name.endswith(".bias"):
            names.add(name)
        if any(k in name for k in ("mask_token", "relative_position_bias_table", "cls_token", "pos_embed")):
            names.add(name)
    return names


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_param_groups(arch):
    model = small_model(arch)
    groups = param_groups(model, weight_decay=0.05)
    assert len(groups) == 2
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for p in groups[0]["params"]}
    no_decay = {by_id[id(p)] for p in groups[1]["params"]}
    assert len(decay) == len(groups[0]["params"]) and len(no_decay) == len(groups[1]["params"])
    assert not decay & no_decay
    assert decay | no_decay == set(by_id.values())

    expected = _expected_no_decay(model)
    assert no_decay == expected
    # explicit landmarks
    assert "encoder.mask_token" in no_decay
    assert all(n in no_decay for n in by_id.values() if "relative_position_bias_table" in n)
    assert any("relative_position_bias_table" in n for n in no_decay)
    if arch == "vit":
        assert "encoder.cls_token" in no_decay
        assert "encoder.rel_pos_bias.relative_position_bias_table" in no_decay
        assert {n for n in no_decay if "gamma" in n}  # layer scale is 1-D
    weights = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            weights.add(f"{mname}.weight")
    assert weights and weights <= decay
    assert decay == weights  # nothing else is decayed in these models
    assert "decoder.0.weight" in decay and "decoder.0.bias" in no_decay

    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_param_groups_skip_frozen():
    model = small_model("vit")
    model.encoder.patch_embed.proj.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05)
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(model.encoder.patch_embed.proj.weight) not in ids


# ----------------------------------------------------------------------------------------------------
# gradient checkpointing


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_grad_checkpointing_same_loss_and_grads(arch):
    model = small_model(arch)  # drop_path 0 (swin_tiny_cpu default, VIT_SMALL override)
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    model.train(), ckpt.train()
    x = _images(seed=17)
    gh = model.encoder.grid_size[0]
    mask = _mask((2, 2, 2), seed=18)
    mask[0, 0, 0] = 1

    block = (lambda m: m.encoder.layers[0].blocks[0]) if arch == "swin" else (lambda m: m.encoder.blocks[0])
    calls = {"plain": 0, "ckpt": 0}
    # pre-hooks: non-reentrant checkpointing stops the recomputation early, before forward hooks run
    h1 = block(model).register_forward_pre_hook(lambda *a: calls.__setitem__("plain", calls["plain"] + 1))
    h2 = block(ckpt).register_forward_pre_hook(lambda *a: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    try:
        l1 = _backward(model, x, mask)
        l2 = _backward(ckpt, x, mask)
    finally:
        h1.remove(), h2.remove()
    # checkpointing really happened: the block ran again in backward
    assert calls == {"plain": 1, "ckpt": 2}
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------------
# learning-rate schedule


def _opt():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)


def test_warmup_is_linear():
    s = WarmupScheduler(_opt(), base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5, total_steps=100, warmup_steps=10)
    assert s.lr_at(0) == pytest.approx(1e-6, rel=1e-12)
    for t in range(10):
        assert s.lr_at(t) == pytest.approx(1e-6 + t * (2e-4 - 1e-6) / 10, rel=1e-12)
    # the warmup reaches base_lr at t = warmup_steps (first cosine step: cos(pi * 10 / 100))
    assert s.lr_at(10) == pytest.approx(1e-5 + 0.5 * (2e-4 - 1e-5) * (1 + math.cos(math.pi * 0.1)), rel=1e-12)


@pytest.mark.parametrize("total,warm,base,warmup_lr,min_lr", [
    (100, 10, 2e-4, 1e-6, 1e-5),
    (1000, 100, 1e-4, 5e-7, 5e-6),
    (37, 0, 1e-3, 0.0, 0.0),
])
def test_cosine_matches_timm(total, warm, base, warmup_lr, min_lr):
    from timm.scheduler.cosine_lr import CosineLRScheduler

    ours = WarmupScheduler(_opt(), base_lr=base, warmup_lr=warmup_lr, min_lr=min_lr,
                           total_steps=total, warmup_steps=warm, kind="cosine")
    timm_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    # as the official lr_scheduler.build_scheduler builds it
    timm_sched = CosineLRScheduler(timm_opt, t_initial=total, lr_min=min_lr, warmup_lr_init=warmup_lr,
                                   warmup_t=warm, cycle_limit=1, t_in_epochs=False)
    for t in sorted(set(range(0, total + 5, max(1, total // 50))) | {0, warm, max(warm - 1, 0), total - 1, total}):
        (expected,) = timm_sched._get_lr(t)
        assert ours.lr_at(t) == pytest.approx(expected, rel=1e-9, abs=1e-15), t
    assert ours.lr_at(total) == pytest.approx(min_lr, abs=1e-15)
    assert ours.lr_at(total - 1) == pytest.approx(
        min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (total - 1) / total)), rel=1e-9)


def test_multistep():
    s = WarmupScheduler(_opt(), base_lr=1e-4, warmup_lr=5e-7, min_lr=5e-6, total_steps=800, warmup_steps=10,
                        kind="multistep", milestones=(700, 750), gamma=0.1)
    assert s.lr_at(0) == pytest.approx(5e-7)
    assert s.lr_at(5) == pytest.approx(5e-7 + 5 * (1e-4 - 5e-7) / 10)
    assert s.lr_at(10) == pytest.approx(1e-4)
    assert s.lr_at(699) == pytest.approx(1e-4)
    assert s.lr_at(700) == pytest.approx(1e-5)
    assert s.lr_at(749) == pytest.approx(1e-5)
    assert s.lr_at(750) == pytest.approx(1e-6)
    assert s.lr_at(799) == pytest.approx(1e-6)
    # same as the official MultiStepLRScheduler._get_lr: base * gamma ** bisect_right(milestones, t)
    import bisect

    for t in range(10, 800, 7):
        assert s.lr_at(t) == pytest.approx(1e-4 * 0.1 ** bisect.bisect_right([700, 750], t))


def test_step_update_sets_every_group():
    model = small_model("vit")
    opt = build_optimizer(model, lr=1.0)
    s = WarmupScheduler(opt, base_lr=1e-3, warmup_lr=1e-5, min_lr=1e-6, total_steps=50, warmup_steps=5)
    lr = s.step_update(3)
    assert lr == pytest.approx(s.lr_at(3))
    assert all(g["lr"] == lr for g in opt.param_groups)
    state = s.state_dict()
    s2 = WarmupScheduler(opt, base_lr=9.0, warmup_lr=9.0, min_lr=9.0, total_steps=1, warmup_steps=0)
    s2.load_state_dict(state)
    assert [s2.lr_at(t) for t in range(60)] == [s.lr_at(t) for t in range(60)]


def test_scheduler_bad_args():
    with pytest.raises(ValueError):
        WarmupScheduler(_opt(), base_lr=1e-3, warmup_lr=0, min_lr=0, total_steps=10, warmup_steps=1, kind="linear")
    with pytest.raises(ValueError):
        WarmupScheduler(_opt(), base_lr=1e-3, warmup_lr=0, min_lr=0, total_steps=0, warmup_steps=0)


def test_precomputed_head_tokens_match_the_models_own_choice():
    """The trainer passes ``head_tokens`` computed on the CPU mask; same loss and gradients as the model's own plan."""
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", img_size=64, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1),
                         window_size=2, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    coarse = torch.zeros(2, 2, 2, dtype=torch.long)
    coarse[0, 0, 1] = coarse[1, 1, 0] = coarse[1, 0, 0] = 1
    mask = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)  # model-patch resolution (16x16)
    idx = model.masked_head_tokens(x, mask)
    assert idx is not None and idx.tolist() == [1, 4, 6]
    l1 = model(x, mask)
    g1 = torch.autograd.grad(l1, list(model.parameters()), allow_unused=True)
    l2 = model(x, mask, head_tokens=idx)
    g2 = torch.autograd.grad(l2, list(model.parameters()), allow_unused=True)
    assert torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="head_tokens"):
        model(x, mask, head_tokens=idx.to(torch.int32))


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_mask_values_other_than_0_1_are_refused(arch):
    """``model(x, mask * 2)`` used to give another loss silently; bool and 0/1 int/float masks are accepted."""
    torch.manual_seed(0)
    model = small_model(arch)
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 2, 2, dtype=torch.int64)
    mask[:, 0, 0] = 1
    ref = model(images, mask)
    torch.testing.assert_close(model(images, mask.bool()), ref)
    torch.testing.assert_close(model(images, mask.float()), ref)
    for bad in (mask * 2, mask.float() * 0.5, mask - 1):
        with pytest.raises(ValueError, match="^mask: expected 0/1"):
            model(images, bad)
