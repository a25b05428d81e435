"""The fused Swin window-attention kernel (``simmim_fast.ops.swin_window_attention``) against its twins.

On CPU the kernels run under Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``);
on a GPU the same tests run the compiled kernels. Compared, with the tolerances stored on the op
(``TOLERANCES``: ``atol = rel * max|reference|``):

- the op against its plain-PyTorch twin ``swin_window_attention_reference``: the output and both
  gradients (the packed ``(B, Hq, Wq, 3*C)`` qkv gradient, padded tokens included, and the bias-table
  gradient) for windows 6/7/8/12/14/16, head dims 16/32/48/64, shifted and not, a non-multiple
  resolution (10x10 with window 6), a one-axis shift, fp32/bf16/fp16, the 3-D and 6-D qkv forms, a
  strided qkv inside a NaN-filled buffer, and every kernel output allocated NaN-filled
  (``POISON_OUTPUTS``) so an element a kernel forgets to write fails the comparison;
- whole Swin blocks (timm's ``SwinTransformerBlock``, math branch = the official code) against the
  same block swapped to ``backend="triton"``: output and the gradients of the block input, the qkv
  and proj weights and biases, the norms and the relative-position table (the fused block path, with
  and without padding, and the window-level module path with timm's shift mask).

Batches of 1-2 and a few windows: the interpreter runs every program in Python.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformerBlock

from simmim_fast import ops
from simmim_fast.models import window_attention as wa
from simmim_fast.models.swin_block import SwinBlock
from simmim_fast.models.window_attention import WindowAttention, swap_window_attention
from simmim_fast.ops import _common, launch_log
from simmim_fast.ops import window_attention as W

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA and not _common.INTERPRET else "cpu")
pytestmark = pytest.mark.skipif(
    not _common.HAS_TRITON or not (DEV.type == "cuda" or _common.INTERPRET),
    reason="needs Triton and a CUDA device, or TRITON_INTERPRET=1 at import (tests/conftest.py sets it on CPU)",
)
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    monkeypatch.setattr(wa, "_DECISIONS", {})
    monkeypatch.setattr(wa, "_REASONS", {})
    monkeypatch.setattr(wa, "_LOGGED", set())


def _assert_close(got, ref, dtype, label):
    tol = W.TOLERANCES[dtype]
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol["rtol"], atol=tol["rel"] * scale,
                               msg=lambda m: f"{label}: {m}")


def _inputs(B, grid, heads, hd, window, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    wh, ww = (window, window) if isinstance(window, int) else window
    qkv = torch.randn(B, *grid, 3 * heads * hd, generator=g).to(dtype).to(DEV)
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, generator=g).to(DEV)  # a trained-size bias
    return qkv, table


def _run(fn, qkv, table, grad_seed=7, **kw):
    qkv = qkv.detach().clone().requires_grad_(True)
    table = table.detach().clone().requires_grad_(True)
    out = fn(qkv, table, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(DEV)
    dqkv, dtable = torch.autograd.grad((out.float() * g).sum(), (qkv, table))
    return out, dqkv, dtable


def _compare(qkv, table, dtype, label="", **kw):
    got = _run(W.swin_window_attention, qkv, table, backend="triton", **kw)
    ref = _run(W.swin_window_attention_reference, qkv, table, **kw)
    for name, a, b in zip(("out", "dqkv", "dtable"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.isfinite(a).all(), f"{label} {name}: not finite (an unwritten NaN-poisoned element?)"
        _assert_close(a, b, dtype, f"{label} {name}")
    return got


# (batch, grid (Hq, Wq), resolution, window, shift, heads, head dim, dtype)
CASES = [
    (1, (12, 12), None, 6, 3, 2, 32, FP32),     # Swin-B/192 geometry, fp32: split backward, 16-row tiles
    (2, (12, 12), None, 6, 3, 2, 32, BF16),     # fused backward (whole window in one tile)
    (1, (12, 12), None, 6, 0, 2, 16, FP16),     # unshifted
    (1, (14, 14), None, 7, 3, 2, 48, FP16),     # N = 49, head dim 48 (not a power of 2)
    (1, (12, 12), (10, 10), 6, 3, 2, 16, BF16),  # padding: 10x10 tokens, window 6
    (1, (16, 16), None, 8, 4, 1, 64, BF16),     # N = 64, head dim 64
    (1, (24, 24), None, 12, 6, 1, 16, BF16),    # N = 144: split backward, 16-row tiles, 4 windows
    (1, (12, 12), None, 12, 0, 2, 16, FP16),    # window = resolution (timm clamps, no shift)
    (1, (14, 14), None, 14, 0, 1, 16, BF16),    # N = 196
    (1, (16, 16), None, 16, 0, 1, 32, FP16),    # N = 256, the largest window
    (1, (6, 12), None, 6, (0, 3), 2, 16, FP32),  # shift on one axis only (timm's "-0" slices)
]


@pytest.mark.parametrize("B,grid,res,ws,shift,heads,hd,dtype", CASES,
                         ids=[f"w{c[3]}-g{c[1][0]}x{c[1][1]}{'-r' + str(c[2][0]) if c[2] else ''}-s{c[4]}-hd{c[6]}-"
                              f"{str(c[7])[6:]}" for c in CASES])
def test_matches_reference(B, grid, res, ws, shift, heads, hd, dtype):
    qkv, table = _inputs(B, grid, heads, hd, ws, dtype)
    _compare(qkv, table, dtype, num_heads=heads, window_size=ws, shift_size=shift, resolution=res)


def test_split_backward_tiles_of_older_gpus():
    """The tiles the op picks below sm_90 for 16-bit inputs (split backward at 36 tokens) give the same
    numbers (on CPU only this plan switch reaches them; on a GPU its own capability decides)."""
    if DEV.type == "cuda":
        pytest.skip("the plan follows the GPU's capability")
    qkv, table = _inputs(1, (12, 12), 2, 32, 6, BF16, seed=3)
    with W.planned_for((8, 0)):
        assert not W.tiles(36, 32, BF16, W.plan_capability(qkv.device)).fused
        with launch_log.record() as log:
            _compare(qkv, table, BF16, num_heads=2, window_size=6, shift_size=3)
    assert {r["kernel"].split(":")[1] for r in log} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_kv_kernel"}


def test_layouts_3d_6d_strided_and_nan_outside_the_view():
    """(B, L, 3C) and (B, H, W, 3, nH, hd) forms; a qkv that is a strided view into a NaN-filled buffer
    (the kernel reads nothing outside the view: the NaNs must not leak)."""
    qkv, table = _inputs(1, (12, 12), 2, 16, 6, BF16, seed=1)
    kw = dict(num_heads=2, window_size=6, shift_size=3)
    ref = _run(W.swin_window_attention_reference, qkv, table, **kw)
    for form in ("3d", "6d", "strided"):
        if form == "3d":
            x, extra = qkv.reshape(1, 144, -1), dict(resolution=(12, 12))
        elif form == "6d":
            x, extra = qkv.view(1, 12, 12, 3, 2, 16), {}
        else:
            big = torch.full((1, 14, 13, 3 * 32 + 5), float("nan"), dtype=BF16, device=DEV)
            big[:, 1:13, :12, 2:98] = qkv
            x, extra = big[:, 1:13, :12, 2:98], {}
            assert not x.is_contiguous()
        out, dq, dt = _run(W.swin_window_attention, x, table, backend="triton", **kw, **extra)
        _assert_close(out.reshape(ref[0].shape), ref[0], BF16, f"{form} out")
        _assert_close(dq.reshape(ref[1].shape), ref[1], BF16, f"{form} dqkv")
        _assert_close(dt, ref[2], BF16, f"{form} dtable")
        assert out.shape == ((1, 144, 32) if form == "3d" else (1, 12, 12, 32))


def test_window_level_mask_and_determinism():
    """An explicit (nW, N, N) mask read per window (``g % nW``), windows as images; backward twice is
    bit-identical (two-stage bias-gradient reduction, no atomics)."""
    qkv, table = _inputs(8, (6, 6), 2, 16, 6, FP16, seed=2)
    mask = W.shift_mask(12, 12, (6, 6), (3, 3)).to(DEV)
    got = _compare(qkv, table, FP16, num_heads=2, window_size=6, attn_mask=mask)
    again = _run(W.swin_window_attention, qkv, table, backend="triton", num_heads=2, window_size=6, attn_mask=mask)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


def test_table_gradient_is_the_index_add_of_the_bias_gradient():
    """Stage 2 (fixed-order gather-sum) equals ``index_add`` onto the table through timm's index."""
    for wh, ww in ((6, 6), (7, 7), (3, 5), (12, 12)):
        N = wh * ww
        dbias = torch.randn(3, N, N, dtype=torch.float64)
        index = W.relative_position_index(wh, ww)
        from timm.models.swin_transformer import get_relative_position_index

        assert torch.equal(index, get_relative_position_index(wh, ww))
        want = torch.zeros((2 * wh - 1) * (2 * ww - 1), 3, dtype=torch.float64)
        want.index_add_(0, index.reshape(-1), dbias.reshape(3, -1).t())
        torch.testing.assert_close(W.table_gradient(dbias, wh, ww), want, rtol=1e-12, atol=1e-12)


def test_shift_mask_is_timms():
    for res, ws, shift in (((12, 12), 6, 3), ((14, 14), 7, 3), ((12, 6), 6, 3)):
        blk = SwinTransformerBlock(dim=8, input_resolution=res, num_heads=1, window_size=ws, shift_size=shift)
        wh, ww = blk.window_size
        hp, wp = -(-res[0] // wh) * wh, -(-res[1] // ww) * ww
        assert torch.equal(W.shift_mask(hp, wp, blk.window_size, blk.shift_size), blk.attn_mask)


# --------------------------------------------------------------------------------------------------
# errors and capability


def test_bad_inputs_name_the_argument():
    qkv, table = _inputs(1, (12, 12), 2, 16, 6, FP32)
    kw = dict(num_heads=2, window_size=6)
    with pytest.raises(ValueError, match=r"qkv: token grid \(10, 10\) must be the resolution \(10, 10\) rounded up"):
        W.swin_window_attention(qkv[:, :10, :10], table, resolution=(10, 10), **kw)
    with pytest.raises(ValueError, match="bias_table: expected"):
        W.swin_window_attention(qkv, table[:-1], **kw)
    with pytest.raises(ValueError, match="last dimension"):
        W.swin_window_attention(qkv[..., :-3], table, **kw)
    with pytest.raises(ValueError, match="shift_size"):
        W.swin_window_attention(qkv, table, shift_size=6, **kw)
    with pytest.raises(TypeError, match="window_size"):
        W.swin_window_attention(qkv, table, num_heads=2, window_size=6.0)
    with pytest.raises(ValueError, match="resolution: required"):
        W.swin_window_attention(qkv.reshape(1, 144, -1), table, **kw)
    with pytest.raises(ValueError, match="attn_mask: 3 masks do not divide"):
        W.swin_window_attention(qkv, table, attn_mask=torch.zeros(3, 36, 36, device=DEV), **kw)
    with pytest.raises(TypeError, match="qkv: expected a floating"):
        W.swin_window_attention(qkv.long(), table, **kw)
    with pytest.raises(ValueError, match="backend"):
        W.swin_window_attention(qkv, table, backend="fast", **kw)


def test_forced_triton_lists_every_reason():
    qkv = torch.zeros(1, 17, 17, 3 * 2 * 128, dtype=torch.float64, device=DEV)
    table = torch.zeros(33 * 33, 2, dtype=torch.float64, device=DEV)
    mask = torch.zeros(1, 289, 289, dtype=torch.float64, device=DEV, requires_grad=True)
    reasons = W.not_supported_reasons(qkv, table, num_heads=2, window_size=17, attn_mask=mask)
    text = " | ".join(reasons)
    for part in ("qkv dtype torch.float64", "bias_table dtype", "289 tokens", "head dim 128", "requires grad"):
        assert part in text, text
    with pytest.raises(NotImplementedError, match="cannot take this input: .*289 tokens.*head dim 128"):
        W.swin_window_attention(qkv, table, num_heads=2, window_size=17, attn_mask=mask, backend="triton")
    fp32_w12 = torch.zeros(1, 12, 12, 3 * 32, device=DEV)
    assert any("float32 with a window of 144" in r for r in
               W.not_supported_reasons(fp32_w12, torch.zeros(529, 2, device=DEV), num_heads=2, window_size=12))
    g = W.Geometry(1, 8, 8, 8, 8, 4, 4, 0, 0, 1, 16)
    assert any("dropout" in r for r in W.capability_reasons(g, dtype=BF16, table_dtype=FP32, dropout_p=0.1))
    assert any("cosine" in r for r in W.capability_reasons(g, dtype=BF16, table_dtype=FP32, cosine=True))
    assert "swin_window_attention" in ops.backend_report()


def test_kernel_traffic_model():
    """Swin-B/192 batch 128 stage 1: the bias-gradient partials are a small fraction of the per-image
    (B, nW*nH, N, N) fp32 gradient the unfused path writes; compulsory <= issued bytes."""
    geo = W.Geometry(128, 48, 48, 48, 48, 6, 6, 3, 3, 4, 32)
    t = W.kernel_traffic(geo, dtype=BF16)
    per_image_bias_grad = 128 * 64 * 4 * 36 * 36 * 4
    assert t["backward"]["bias_grad_partial_bytes"] < per_image_bias_grad / 20
    for d in ("forward", "backward"):
        assert 0 < t[d]["compulsory_bytes"] <= t[d]["issued_bytes"]
    assert t["forward"]["flops"] == 4 * 128 * 64 * 4 * 36 * 36 * 32 and t["tiles"]["fused_backward"]
    assert not W.kernel_traffic(geo, dtype=BF16, capability=(8, 0))["tiles"]["fused_backward"]


# --------------------------------------------------------------------------------------------------
# the Swin block and the module


def _timm_block(res, ws, heads, hd, shift, seed=0):
    torch.manual_seed(seed)
    blk = SwinTransformerBlock(dim=heads * hd, input_resolution=res, num_heads=heads, window_size=ws,
                               shift_size=ws // 2 if shift else 0)
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()
        for m in (blk.norm1, blk.norm2):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    return blk.to(DEV)


def _block_grads(blk, x, g, call=None):
    blk.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = (blk if call is None else call)(x)
    (y.float() * g).sum().backward()
    out = {"y": y.detach(), "x": x.grad}
    out.update({n: p.grad.clone() for n, p in blk.named_parameters()})
    return out


@pytest.mark.parametrize("res,ws,shift,module_path", [((12, 12), 6, True, False), ((10, 10), 6, True, False),
                                                      ((12, 12), 6, True, True)],
                         ids=["block-shifted", "block-padded-shifted", "module-windows-mask"])
def test_swin_block_matches_timm(res, ws, shift, module_path, caplog):
    """timm's block (math branch, the official code) vs the same weights swapped to ``"triton"``: the
    fused block path (no roll/partition/reverse; padded when 10x10), or timm's ``_attn`` calling our
    module on windows with timm's shift mask (``module_path``)."""
    ref = _timm_block(res, ws, 2, 16, shift)
    blk = copy.deepcopy(ref)
    holder = nn.Sequential(blk)
    keys = list(holder.state_dict())
    swap_window_attention(holder, backend="triton")
    assert type(blk) is SwinBlock and type(blk.attn) is WindowAttention and list(holder.state_dict()) == keys
    if module_path:
        blk.__class__ = SwinTransformerBlock  # timm's _attn: roll, partition, module(windows, mask), reverse
    x = torch.randn(2, *res, 32, generator=torch.Generator().manual_seed(1)).to(DEV)
    g = torch.randn(2, *res, 32, generator=torch.Generator().manual_seed(2)).to(DEV)
    with launch_log.record() as log:
        got = _block_grads(blk, x, g)
    kernels = {r["kernel"].split(":")[1] for r in log}
    assert "_fwd_kernel" in kernels and "_bwd_kv_kernel" in kernels
    want = _block_grads(ref, x, g)
    assert got.keys() == want.keys()
    for name in want:
        _assert_close(got[name], want[name], FP32, name)


def test_auto_on_cpu_keeps_sdpa_and_forced_triton_reports(caplog):
    """auto never runs the interpreter (CPU: the block takes timm's path and SDPA, nothing launched);
    forcing triton on an input it cannot take names the reasons (dropout in training; none in eval)."""
    blk = _timm_block((12, 12), 6, 2, 16, True)
    swap_window_attention(nn.Sequential(blk), backend="auto")
    x = torch.randn(1, 12, 12, 32).to(DEV)
    if DEV.type == "cpu":
        with launch_log.record() as log:
            blk(x)
        assert log == []
    blk.attn.backend = "triton"
    blk.attn.attn_drop.p = 0.1
    blk.train()
    with pytest.raises(NotImplementedError, match="backend='triton' cannot run this input: attention dropout"):
        blk(x)
    assert not wa.triton_not_supported_reasons(blk.attn.eval(), device=DEV, dtype=BF16, qkv_shape=(1, 12, 12, 96),
                                               window_size=(6, 6), shift_size=(3, 3), resolution=(12, 12))


@pytest.mark.skipif(DEV.type != "cuda", reason="auto picks the kernel on CUDA only")
def test_gpu_auto_picks_triton(caplog):
    blk = _timm_block((12, 12), 6, 2, 32, True)
    swap_window_attention(nn.Sequential(blk), backend="auto")
    x = torch.randn(2, 12, 12, 64, device=DEV)
    with caplog.at_level(logging.INFO, logger="simmim_fast.attention"), torch.autocast("cuda", dtype=BF16):
        with launch_log.record() as log:
            blk(x).float().sum().backward()
    assert any("backend 'triton' runs" in r.getMessage() for r in caplog.records)
    assert any(r["kernel"].endswith("_fwd_kernel") for r in log)
    assert wa.window_attention_report()["auto"] == "triton"


def test_torch_compile_block_no_graph_break():
    """The block with ``backend="triton"`` traces into one graph (``custom_op`` on CPU/interpreter;
    the ``triton_op`` on a GPU) and gives the eager numbers (``aot_eager``: no code generation)."""
    torch._dynamo.reset()
    try:
        blk = _timm_block((12, 12), 6, 2, 16, True)
        swap_window_attention(nn.Sequential(blk), backend="triton")
        x = torch.randn(1, 12, 12, 32, generator=torch.Generator().manual_seed(4)).to(DEV)
        explain = torch._dynamo.explain(blk)(x)
        assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
        g = torch.randn(1, 12, 12, 32, generator=torch.Generator().manual_seed(5)).to(DEV)
        got = _block_grads(blk, x, g, call=compiled)
        want = _block_grads(blk, x, g)
        for name in want:
            _assert_close(got[name], want[name], FP32, name)
    finally:
        torch._dynamo.reset()
