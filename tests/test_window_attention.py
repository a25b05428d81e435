"""Window attention (``simmim_fast.models.window_attention``) against timm's explicit-softmax branch.

CPU CI: ``math`` (timm's branch, the reference) vs ``sdpa`` vs the xformers plumbing, for shifted and
unshifted windows of 6/7/12 (N = 36/49/144), 4-32 heads, batch 1 and 3: outputs and every gradient,
the relative-position-bias table's included. The xformers path runs on CPU through
:class:`FakeMemoryEfficientAttention`, a double with the contract of
``xformers.ops.memory_efficient_attention(query, key, value, attn_bias, p, scale)`` in the BMHK
layout, restrictions asserted (bias shape exactly ``(B, H, M, M)``, no broadcasting by shape, 16-byte
aligned strides, dtype of the query, unit last stride), so layout, padding, slicing and the
bias-gradient route are those of the GPU run. Numeric tests of the real kernel need CUDA and skip here.

Tolerances (fp32): ``atol = 4e-6 * max|reference|``, ``rtol = 1e-5`` -- SDPA's CPU kernel and the
double sum in another order than timm's matmuls (measured worst: 5e-7 of the max). In fp64 the same
comparisons hold to ``1e-12`` of the max: the plumbing is exact, not approximately right.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

import simmim_fast
from simmim_fast.models import create_model
from simmim_fast.models import window_attention as wa
from simmim_fast.models.window_attention import WindowAttention, swap_window_attention

CUDA = torch.cuda.is_available()
HEAD_DIM = 8  # small shapes for 2 CPU cores; head counts are the real ones


# --------------------------------------------------------------------------------------------------
# the xformers double


class FakeMemoryEfficientAttention:
    """CPU double of ``xformers.ops.memory_efficient_attention`` for BMHK inputs (xformers 0.0.35).

    Contract (``fmha.Inputs.validate_inputs`` + ``cutlass.FwOp/BwOp.not_supported_reasons``):
    q/k/v ``(B, M, H, K)`` of one dtype, last stride 1, ``K`` and ``stride(-2)`` multiples of the
    GEMM alignment (8 for 16-bit, 4 for fp32 on sm80+); a tensor ``attn_bias`` of shape exactly
    ``(B, H, M, M)`` (no broadcasting by shape -- with grad or without), of the query's dtype, every
    stride but the last a multiple of 16 bytes, last stride 1. Returns ``(B, M, H, K)``; autograd
    gives q/k/v grads and, for a bias that requires grad, its full-shape gradient (reduced by the
    caller's ``expand`` backward, as on the GPU).
    """

    def __init__(self):
        self.calls: list[dict] = []

    @staticmethod
    def contract_violations(query, key, value, attn_bias, *, p=0.0, scale=None, needs_grad=False) -> list[str]:
        r = []
        if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
            return [f"BMHK expected (this double covers the layout we use), got query.ndim={query.ndim}"]
        if not (query.shape == key.shape == value.shape):
            r.append(f"q/k/v shapes differ: {tuple(query.shape)} {tuple(key.shape)} {tuple(value.shape)}")
        if not (query.dtype == key.dtype == value.dtype):
            r.append("q/k/v dtypes differ")
        B, M, H, K = query.shape
        gemm_align = 4 if query.dtype == torch.float32 else 8
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.shape[-1] % gemm_align:
                r.append(f"{name}.shape[-1] % {gemm_align} != 0")
            elif t.stride(-2) % gemm_align:
                r.append(f"{name}.stride(-2) % {gemm_align} != 0")
            if t.stride(-1) != 1:
                r.append(f"{name}.stride(-1) > 1")
        if attn_bias is not None:
            if not isinstance(attn_bias, torch.Tensor):
                r.append(f"attn_bias type {type(attn_bias).__name__} (this double takes tensors)")
                return r
            expected = (B, H, M, M)
            if tuple(attn_bias.shape) != expected:
                what = "Broadcasting the `attn_bias` tensor is not supported" if attn_bias.requires_grad else (
                    "Invalid shape for attention bias")
                r.append(f"{what}: {tuple(attn_bias.shape)} (expected {expected})")
            if attn_bias.dtype != query.dtype:
                r.append(f"attn_bias.dtype {attn_bias.dtype} != query.dtype {query.dtype}")
            align = 128 // torch.finfo(attn_bias.dtype).bits
            for d in range(attn_bias.ndim - 1):
                if attn_bias.stride(d) % align:
                    r.append(f"attn_bias.stride({d}) % {align} != 0 (stride {attn_bias.stride()})")
            if attn_bias.stride(-1) != 1:
                r.append("attn_bias.stride(-1) > 1")
        if not 0.0 <= p <= 1.0:
            r.append(f"invalid dropout p={p}")
        return r

    def not_supported_reasons(self, query, key, value, attn_bias, *, p=0.0, scale=None, needs_grad=False):
        return self.contract_violations(query, key, value, attn_bias, p=p, scale=scale, needs_grad=needs_grad)

    def __call__(self, query, key, value, attn_bias=None, p=0.0, scale=None):
        violations = self.contract_violations(query, key, value, attn_bias, p=p, scale=scale)
        assert not violations, violations
        self.calls.append(
            dict(
                q_shape=tuple(query.shape),
                bias_shape=tuple(attn_bias.shape),
                bias_stride=attn_bias.stride(),
                bias_storage_elems=attn_bias.untyped_storage().nbytes() // attn_bias.element_size(),
                bias_requires_grad=attn_bias.requires_grad,
            )
        )
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        ct = torch.promote_types(query.dtype, torch.float32)  # the kernel accumulates in fp32
        q, k, v = (t.transpose(1, 2).to(ct) for t in (query, key, value))
        s = (q * scale) @ k.transpose(-2, -1)
        if attn_bias is not None:
            s = s + attn_bias.to(ct)
        a = s.softmax(-1)
        if p:
            a = torch.nn.functional.dropout(a, p)
        return (a @ v).transpose(1, 2).to(query.dtype)


@pytest.fixture
def fake_xformers(monkeypatch):
    fake = FakeMemoryEfficientAttention()
    monkeypatch.setattr(wa, "XFORMERS_KERNEL_OVERRIDE", fake)
    return fake


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    """Each test sees ``auto`` decide (and log) afresh."""
    monkeypatch.setattr(wa, "_DECISIONS", {})
    monkeypatch.setattr(wa, "_REASONS", {})
    monkeypatch.setattr(wa, "_LOGGED", set())


# --------------------------------------------------------------------------------------------------
# helpers


def _block(ws: int, heads: int, shift: bool, seed: int = 0, dim: int | None = None) -> SwinTransformerBlock:
    """A timm block on a 2x2-window grid (its shift mask is the real one: 0 / -100)."""
    torch.manual_seed(seed)
    blk = SwinTransformerBlock(dim=dim or heads * HEAD_DIM, input_resolution=(2 * ws, 2 * ws), num_heads=heads,
                               window_size=ws, shift_size=ws // 2 if shift else 0)
    with torch.no_grad():  # a bias table of the size training gives, not trunc_normal(0.02)
        blk.attn.relative_position_bias_table.normal_(0, 1.0)
    return blk


def _run(attn: nn.Module, x: torch.Tensor, mask, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and every gradient of one window attention call."""
    attn.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = attn(x, mask=mask)
    (y.float() * g).sum().backward()
    out = {"out": y.detach(), "x": x.grad}
    for name, prm in attn.named_parameters():
        out[name] = prm.grad.detach().clone()
    return out


def _assert_same(got: dict, ref: dict, *, rel: float, rtol: float, label: str) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=rel * scale,
                                   msg=lambda m: f"{label} {name}: {m}")


def _attn_inputs(blk: SwinTransformerBlock, B: int, seed: int = 1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    nW = 4
    x = torch.randn(B * nW, blk.window_area, blk.dim, generator=gen, dtype=dtype)
    g = torch.randn(B * nW, blk.window_area, blk.dim, generator=gen, dtype=torch.float32)
    mask = blk.attn_mask.to(dtype) if blk.attn_mask is not None else None
    return x, mask, g


FP32 = dict(rel=4e-6, rtol=1e-5)
FP64 = dict(rel=1e-12, rtol=1e-12)

CASES = [  # (window, heads, batch): N = 36 / 49 / 144, heads 4..32, batch 1 and 3
    (6, 4, 3),
    (6, 32, 1),
    (7, 8, 3),
    (7, 16, 1),
    (12, 4, 1),
    (12, 32, 3),
]


# --------------------------------------------------------------------------------------------------
# backends vs timm's math branch


@pytest.mark.parametrize("shift", [False, True], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("ws,heads,B", CASES, ids=[f"w{w}-h{h}-b{b}" for w, h, b in CASES])
def test_backends_match_math(ws, heads, B, shift, fake_xformers):
    blk = _block(ws, heads, shift)
    assert (blk.attn_mask is not None) == shift
    if shift:  # the real shift mask has both regions
        assert blk.attn_mask.min().item() == -100.0 and blk.attn_mask.max().item() == 0.0
    x, mask, g = _attn_inputs(blk, B)
    timm_attn = blk.attn
    timm_attn.fused_attn = False
    ref = _run(timm_attn, x, mask, g)  # timm's explicit-softmax branch

    ours = WindowAttention.from_timm(timm_attn, backend="math")
    got = _run(ours, x, mask, g)
    for name in ref:  # the math backend *is* timm's branch: bit-identical
        assert torch.equal(got[name], ref[name]), name

    for backend in ("sdpa", "xformers"):
        ours.backend = backend
        got = _run(ours, x, mask, g)
        _assert_same(got, ref, **FP32, label=backend)
    # the xformers path really ran through the double, with the bias gradient
    assert len(fake_xformers.calls) == 1 and fake_xformers.calls[0]["bias_requires_grad"]

    timm_attn.fused_attn = True  # timm's own SDPA branch agrees too
    _assert_same(_run(timm_attn, x, mask, g), ref, **FP32, label="timm-fused")


@pytest.mark.parametrize("shift", [False, True], ids=["unshifted", "shifted"])
def test_fp64_plumbing_is_exact(shift, fake_xformers):
    """In fp64 any indexing / padding / slicing / reduction slip would be O(1); only rounding is left."""
    blk = _block(7, 8, shift).double()
    x, mask, g = _attn_inputs(blk, 3, dtype=torch.float64)
    g = g.double()
    ours = WindowAttention.from_timm(blk.attn, backend="math")
    ref = _run(ours, x, mask, g)
    for backend in ("sdpa", "xformers"):
        ours.backend = backend
        _assert_same(_run(ours, x, mask, g), ref, **FP64, label=f"fp64 {backend}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_autocast(dtype, fake_xformers):
    """Under CPU autocast the bias is cast to the kernel dtype; error vs an fp32 reference stays at the
    level of timm's own math branch run in the same precision (bound: 3x that error + 1e-3 of max)."""
    blk = _block(6, 4, True)
    x, mask, g = _attn_inputs(blk, 3)
    ours = WindowAttention.from_timm(blk.attn, backend="math")
    ref = _run(ours, x, mask, g)
    with torch.autocast("cpu", dtype=dtype):
        base = _run(ours, x, mask, g)
    for backend in ("sdpa", "xformers"):
        ours.backend = backend
        with torch.autocast("cpu", dtype=dtype):
            got = _run(ours, x, mask, g)
        assert got["out"].dtype == dtype
        for name in ref:
            scale = ref[name].abs().max().item()
            err = (got[name].float() - ref[name]).abs().max().item()
            base_err = (base[name].float() - ref[name]).abs().max().item()
            assert err <= 3 * base_err + 1e-3 * scale, f"{backend} {name}: {err} vs math's {base_err}"
    if dtype is torch.float16:  # the double saw the bias in the query's dtype (asserted) and 16-byte aligned
        assert fake_xformers.calls[-1]["bias_stride"][-2] % 8 == 0


def test_full_block_and_dropout_eval(fake_xformers):
    """A whole timm block (roll, partition, mask, reverse) with ours swapped in; eval ignores dropout."""
    blk = _block(6, 4, True)
    blk.attn.attn_drop.p = 0.3
    blk.eval()
    x = torch.randn(3, 12, 12, blk.dim, generator=torch.Generator().manual_seed(5))
    ref_blk = copy.deepcopy(blk)
    ref_blk.attn.fused_attn = False
    ref = ref_blk(x)
    for backend in ("sdpa", "xformers"):
        swap_window_attention(blk, backend=backend)
        torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=4e-6 * ref.abs().max().item())
    blk.train()  # training applies dropout inside the kernel call: outputs differ, shapes do not
    assert blk(x).shape == x.shape


class _LinearSubclass(nn.Linear):
    """A replaced ``qkv`` (LoRA-style wrappers are subclasses): ours must call it, not slice its weight."""

    def forward(self, x):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


@pytest.mark.filterwarnings("ignore:.*(searchsorted|non-tuple sequence).*:UserWarning")  # timm's table resize
@pytest.mark.parametrize("variant", ["no_qkv_bias", "qkv_module", "resized_window"])
def test_variants_match_math(variant, fake_xformers):
    torch.manual_seed(0)
    if variant == "no_qkv_bias":
        blk = SwinTransformerBlock(dim=32, input_resolution=(12, 12), num_heads=4, window_size=6, shift_size=3,
                                   qkv_bias=False)
        assert blk.attn.qkv.bias is None
    else:
        blk = _block(6, 4, True)
    if variant == "qkv_module":
        lin = _LinearSubclass(blk.dim, 3 * blk.dim)
        lin.load_state_dict(blk.attn.qkv.state_dict())
        blk.attn.qkv = lin
    ours = WindowAttention.from_timm(blk.attn, backend="math")
    blk.attn = ours
    if variant == "resized_window":  # timm's set_input_size re-creates the table and index: still read live
        blk.set_input_size((14, 14), (7, 7))
        assert ours.window_area == 49 and ours.relative_position_bias_table.shape[0] == 13 * 13
    x, mask, g = _attn_inputs(blk, 3)
    ref = _run(ours, x, mask, g)
    for backend in ("sdpa", "xformers"):
        ours.backend = backend
        _assert_same(_run(ours, x, mask, g), ref, **FP32, label=f"{variant} {backend}")
    if variant == "qkv_module":
        assert ours.qkv.calls == 3  # math, sdpa, xformers: the module itself ran each time


# --------------------------------------------------------------------------------------------------
# the xformers plumbing (layout, padding, slicing, bias route)


@pytest.mark.parametrize("ws", [6, 7, 12])
def test_xformers_layout_padding_and_broadcast(ws, fake_xformers):
    heads, B, nW = 4, 3, 4
    N = ws * ws
    Np = -(-N // 8) * 8
    for shift in (False, True):
        blk = _block(ws, heads, shift)
        x, mask, g = _attn_inputs(blk, B)
        ours = WindowAttention.from_timm(blk.attn, backend="xformers")
        _run(ours, x, mask, g)
        call = fake_xformers.calls[-1]
        if shift:  # windows folded into heads: one launch, bias indexed by (window, head)
            assert call["q_shape"] == (B, N, nW * heads, HEAD_DIM)
            G = nW * heads
        else:
            assert call["q_shape"] == (B * nW, N, heads, HEAD_DIM)
            G = heads
        assert call["bias_shape"] == (call["q_shape"][0], G, N, N)
        # stride-0 batch, rows padded to Np (a multiple of 8), nothing materialised per batch element
        assert call["bias_stride"] == (0, N * Np, Np, 1)
        assert call["bias_storage_elems"] == G * N * Np
        assert call["bias_requires_grad"]


def test_double_enforces_xformers_restrictions():
    fake = FakeMemoryEfficientAttention()
    B, N, H, K = 2, 36, 4, 8
    q = torch.randn(B, N, H, K, dtype=torch.float16)
    ok = torch.zeros(H, N, 40, dtype=torch.float16)[..., :N].unsqueeze(0).expand(B, -1, -1, -1)
    assert fake.contract_violations(q, q, q, ok) == []
    unpadded = torch.zeros(B, H, N, N, dtype=torch.float16)  # stride(-2) = 36: not 16-byte aligned
    assert any("stride(2) % 8" in r for r in fake.contract_violations(q, q, q, unpadded))
    broadcast = torch.zeros(1, H, N, 40, dtype=torch.float16, requires_grad=True)[..., :N]
    assert any("Broadcasting" in r for r in fake.contract_violations(q, q, q, broadcast))
    wrong_dtype = torch.zeros(H, N, 40)[..., :N].unsqueeze(0).expand(B, -1, -1, -1)
    assert any("dtype" in r for r in fake.contract_violations(q, q, q, wrong_dtype))
    assert fake.contract_violations(q.unsqueeze(2), q.unsqueeze(2), q.unsqueeze(2), None)  # BMGHK: not ours
    with pytest.raises(AssertionError):
        fake(q, q, q, unpadded)
    # the double computes what xformers documents
    q32 = torch.randn(B, N, H, K)
    bias = torch.randn(H, N, 40)[..., :N]
    ref = wa.window_attention_reference(q32, q32, q32, bias, scale=0.3)
    torch.testing.assert_close(fake(q32, q32, q32, bias.unsqueeze(0).expand(B, -1, -1, -1), 0.0, 0.3), ref)


# --------------------------------------------------------------------------------------------------
# swap_window_attention


def _tiny_timm_swin(seed=0):
    torch.manual_seed(seed)
    # 48 px / patch 4 = 12x12 tokens: stage 1 has 2x2 windows of 6 (shifted block), stage 2 one window
    m = SwinTransformer(img_size=48, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=6,
                        num_classes=0, drop_path_rate=0.0)  # timm's default 0.1 would make runs differ
    for blk in m.modules():
        if isinstance(blk, TimmWindowAttention):
            with torch.no_grad():
                blk.relative_position_bias_table.normal_()
    return m


@pytest.mark.parametrize("backend", ["math", "sdpa", "xformers"])
def test_swap_on_timm_swin_keeps_weights_and_outputs(backend, fake_xformers):
    model = _tiny_timm_swin()
    ref_model = copy.deepcopy(model)
    keys = list(model.state_dict().keys())
    params = [id(p) for p in model.parameters()]
    assert swap_window_attention(model, backend=backend) is model
    attns = [m for m in model.modules() if isinstance(m, TimmWindowAttention)]
    assert len(attns) == 4 and all(type(m) is WindowAttention and m.backend == backend for m in attns)
    assert list(model.state_dict().keys()) == keys
    assert [id(p) for p in model.parameters()] == params  # same Parameter objects: optimizers stay valid
    model.load_state_dict(ref_model.state_dict(), strict=True)
    ref_model.load_state_dict(model.state_dict(), strict=True)

    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    y, y_ref = model(x), ref_model(x)  # timm's default Swin attention is its math branch
    y.square().sum().backward()
    y_ref.square().sum().backward()
    if backend == "math":
        assert torch.equal(y, y_ref)
    tol = dict(rtol=1e-5, atol=4e-6 * y_ref.abs().max().item())
    torch.testing.assert_close(y, y_ref, **tol)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=4e-6 * q.grad.abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")
    if backend == "xformers":
        assert len(fake_xformers.calls) == 4


def test_swap_again_sets_backend_and_bad_arguments():
    model = _tiny_timm_swin()
    swap_window_attention(model, backend="math")
    first = [m for m in model.modules() if isinstance(m, WindowAttention)]
    swap_window_attention(model, backend="sdpa")
    second = [m for m in model.modules() if isinstance(m, WindowAttention)]
    assert [id(m) for m in first] == [id(m) for m in second] and all(m.backend == "sdpa" for m in second)
    with pytest.raises(ValueError, match="backend"):
        swap_window_attention(model, backend="flash")
    with pytest.raises(TypeError, match="backend"):
        swap_window_attention(model, backend=None)
    with pytest.raises(ValueError, match="model: no timm"):
        swap_window_attention(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        swap_window_attention("swin")
    assert simmim_fast.swap_window_attention is swap_window_attention
    with pytest.raises(ValueError, match="backend"):
        WindowAttention(16, 2, window_size=6, backend="fast")


def test_bad_inputs_name_the_argument():
    attn = WindowAttention(16, 2, window_size=6, backend="sdpa")
    x = torch.randn(8, 36, 16)
    with pytest.raises(ValueError, match=r"x: expected \(num_windows\*B, 36, 16\)"):
        attn(torch.randn(8, 35, 16))
    with pytest.raises(ValueError, match="x: "):
        attn(torch.randn(8, 36, 12))
    with pytest.raises(ValueError, match="mask: expected"):
        attn(x, mask=torch.zeros(4, 36, 35))
    with pytest.raises(ValueError, match="mask: 3 windows do not divide"):
        attn(x, mask=torch.zeros(3, 36, 36))
    with pytest.raises(TypeError, match="mask: expected a floating"):
        attn(x, mask=torch.zeros(4, 36, 36, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# capability checks, fallback and logging


def test_auto_on_cpu_picks_sdpa_and_logs_once(caplog):
    blk = _block(6, 4, True)
    x, mask, g = _attn_inputs(blk, 1)
    ours = WindowAttention.from_timm(blk.attn)  # default backend: auto
    assert ours.backend == "auto"
    ref_attn = WindowAttention.from_timm(blk.attn, backend="sdpa")
    with caplog.at_level(logging.INFO, logger="simmim_fast.attention"):
        got = _run(ours, x, mask, g)
        _run(ours, x, mask, g)
        with torch.no_grad():
            ours(x, mask)  # another signature (no grad): decided, not logged again
    lines = [r for r in caplog.records if r.name == "simmim_fast.attention"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    msg = lines[0].getMessage()
    assert "backend 'sdpa' runs" in msg and wa.NO_CUDA_REASON in msg and lines[0].levelno == logging.INFO
    ref = _run(ref_attn, x, mask, g)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_forced_xformers_on_cpu_lists_reasons():
    attn = WindowAttention(16, 2, window_size=6, backend="xformers")
    with pytest.raises(NotImplementedError, match="backend='xformers' cannot run this input: device is not CUDA"):
        attn(torch.randn(4, 36, 16))


def test_real_xformers_dispatcher_reasons_are_reported(monkeypatch, caplog):
    """The real xformers dispatcher is asked (CPU tensors, the CUDA short-cut disabled): every operator's
    reasons come back condensed, and auto falls back to SDPA with one line that carries them."""
    pytest.importorskip("xformers")
    monkeypatch.setattr(wa, "_on_cuda", lambda t: True)
    q = torch.randn(2, 36, 4, 8)
    bias = torch.zeros(4, 36, 40)[..., :36].unsqueeze(0).expand(2, -1, -1, -1)
    reasons = wa.xformers_not_supported_reasons(q, q, q, bias, needs_grad=True)
    joined = " ".join(reasons)
    assert reasons[0].startswith("forward: ") and "cutlassF" in joined and "device=cpu" in joined
    assert any(r.startswith("backward: ") and "cutlassB" in r for r in reasons)
    blk = _block(6, 4, True)
    x, mask, g = _attn_inputs(blk, 1)
    with caplog.at_level(logging.INFO, logger="simmim_fast.attention"):
        _run(WindowAttention.from_timm(blk.attn), x, mask, g)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "simmim_fast.attention"]
    assert "backend 'sdpa' runs" in line and "cutlassF" in line


def test_xformers_import_failure_is_a_reason(monkeypatch):
    monkeypatch.setattr(wa, "_on_cuda", lambda t: True)
    monkeypatch.setattr(wa, "_XFORMERS", wa._XformersImport(error="xformers not importable: ImportError: boom"))
    q = torch.randn(1, 36, 2, 8)
    assert wa.xformers_not_supported_reasons(q, q, q, None) == ["xformers not importable: ImportError: boom"]


def test_auto_uses_xformers_when_it_dispatches_and_math_without_sdpa(monkeypatch, fake_xformers, caplog):
    blk = _block(6, 4, True)
    x, mask, g = _attn_inputs(blk, 1)
    ours = WindowAttention.from_timm(blk.attn)
    with caplog.at_level(logging.INFO, logger="simmim_fast.attention"):
        _run(ours, x, mask, g)
    assert len(fake_xformers.calls) == 1
    assert any("backend 'xformers' runs" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(wa, "XFORMERS_KERNEL_OVERRIDE", None)  # back to the CPU answer: no xformers
    monkeypatch.setattr(wa, "sdpa_not_supported_reasons", lambda: ["no SDPA in this torch"])
    got = _run(ours, x, mask, g)
    ref = _run(WindowAttention.from_timm(blk.attn, backend="math"), x, mask, g)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    with pytest.raises(NotImplementedError, match="no SDPA"):
        WindowAttention.from_timm(blk.attn, backend="sdpa")(x, mask)


# --------------------------------------------------------------------------------------------------
# torch.compile and gradient checkpointing


def _compare_compiled(blocks: nn.Module, compiled: nn.Module, ref: nn.Module) -> None:
    x = torch.randn(2, 12, 12, blocks[0].dim, generator=torch.Generator().manual_seed(0))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = compiled(x1), ref(x2)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=4e-6 * y_ref.abs().max().item())
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=4e-6 * x2.grad.abs().max().item())
    for (n, p), (_, q) in zip(blocks.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=4e-6 * q.grad.abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")


def test_torch_compile_fullgraph_block_inductor():
    """One shifted Swin block, ``sdpa`` backend, Inductor, ``fullgraph=True`` (cold compile ~25-45 s here)."""
    blocks = nn.Sequential(_block(6, 2, True, seed=1, dim=16))
    swap_window_attention(blocks, backend="sdpa")
    ref = copy.deepcopy(blocks)
    swap_window_attention(ref, backend="math")
    _compare_compiled(blocks, torch.compile(blocks, fullgraph=True, backend="inductor"), ref)


def test_torch_compile_auto_is_sdpa_and_xformers_is_a_graph_break(fake_xformers, caplog):
    """Tracing only (``aot_eager``: no code generation, a few seconds). ``auto`` inside compile takes SDPA
    without logging (a log call would break the graph); a forced ``xformers`` runs eagerly between graphs."""
    blocks = nn.Sequential(_block(6, 2, False, seed=0, dim=16), _block(6, 2, True, seed=1, dim=16))
    swap_window_attention(blocks, backend="auto")
    ref = copy.deepcopy(blocks)
    swap_window_attention(ref, backend="math")
    with caplog.at_level(logging.INFO, logger="simmim_fast.attention"):
        _compare_compiled(blocks, torch.compile(blocks, fullgraph=True, backend="aot_eager"), ref)
    assert fake_xformers.calls == [] and not [r for r in caplog.records if r.name == "simmim_fast.attention"]

    swap_window_attention(blocks, backend="xformers")
    blocks.zero_grad(), ref.zero_grad()
    _compare_compiled(blocks, torch.compile(blocks, backend="aot_eager"), ref)
    assert len(fake_xformers.calls) == 2


def test_grad_checkpointing_through_xformers_plumbing(fake_xformers):
    # 64 px: 16x16 tokens, windows of 4 (shifted blocks in stages 1-2), stride-32 head
    kw = dict(img_size=64, depths=(2, 2, 1, 1), embed_dim=16, num_heads=(2, 2, 2, 2), window_size=4)
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", attn_backend="xformers", **kw)
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2)) < 0.6).long()
    model(x, mask).backward()
    n_plain = len(fake_xformers.calls)
    ckpt(x, mask).backward()
    assert len(fake_xformers.calls) > 2 * n_plain  # the recomputation called the kernel again
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------
# our encoder


def test_encoder_default_is_ours_and_loads_old_checkpoints():
    kw = dict(img_size=64, depths=(2, 1, 1, 1), embed_dim=16, num_heads=(2, 2, 2, 2), window_size=4)
    torch.manual_seed(0)
    new = create_model("swin_tiny_cpu", **kw)
    attns = [m for m in new.modules() if isinstance(m, TimmWindowAttention)]
    assert attns and all(type(m) is WindowAttention and m.backend == "auto" for m in attns)
    torch.manual_seed(0)
    old = create_model("swin_tiny_cpu", attn_backend="timm", **kw)  # the encoder before this change
    assert all(type(m) is TimmWindowAttention for m in old.modules() if isinstance(m, TimmWindowAttention))
    assert list(old.state_dict().keys()) == list(new.state_dict().keys())
    new.load_state_dict(old.state_dict(), strict=True)
    math_model = create_model("swin_tiny_cpu", attn_backend="math", **kw)
    math_model.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(2)) < 0.6).long()
    assert torch.equal(math_model(x, mask), old(x, mask))  # timm's default branch is the math one
    torch.testing.assert_close(new(x, mask), old(x, mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attn_backend"):
        create_model("swin_tiny_cpu", attn_backend="flash", **kw)


# --------------------------------------------------------------------------------------------------
# report


def test_report_on_this_machine():
    rep = wa.window_attention_report()
    if not CUDA:
        assert rep["auto"] == "sdpa" and rep["xformers_reasons"] == [wa.NO_CUDA_REASON]
    from simmim_fast import info

    text = "\n".join(info.format_window_attention(rep))
    assert f"auto -> {rep['auto']}" in text


# --------------------------------------------------------------------------------------------------
# GPU (real xformers kernel): skipped without CUDA


def _gpu_xformers_reasons(dtype) -> list[str]:
    q = torch.randn(2, 36, 4, 32, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.zeros(4, 36, 40, device="cuda", dtype=dtype, requires_grad=True)[..., :36]
    return wa.xformers_not_supported_reasons(q, q, q, bias.unsqueeze(0).expand(2, -1, -1, -1), needs_grad=True)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the xformers kernels have no CPU implementation")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shift", [False, True], ids=["unshifted", "shifted"])
def test_gpu_xformers_matches_math(dtype, shift):
    """The real kernel (stride-0 bias with grad, kernel-side bias gradient) vs timm's math branch. Error
    bound against an fp64 math reference: fp32 1e-4 of the max; bf16/fp16 3x the error of timm's math
    branch run under the same autocast + 1e-3 of the max."""
    pytest.importorskip("xformers")
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    reasons = _gpu_xformers_reasons(dtype)
    if reasons:
        pytest.skip("xformers does not dispatch here: " + "; ".join(reasons))
    blk = _block(6, 4, shift, dim=128)
    x, mask, g = _attn_inputs(blk, 8)
    ours = WindowAttention.from_timm(blk.attn, backend="math").double()
    ref = _run(ours, x.double(), None if mask is None else mask.double(), g.double())
    ours = ours.float().cuda()
    x, g = x.cuda(), g.cuda()
    mask = None if mask is None else mask.cuda()
    auto = dict(device_type="cuda", dtype=dtype, enabled=dtype is not torch.float32)
    with torch.autocast(**auto):
        base = _run(ours, x, mask, g)
    ours.backend = "xformers"
    with torch.autocast(**auto):
        got = _run(ours, x, mask, g)
    assert got["out"].dtype == dtype
    for name in ref:
        scale = ref[name].abs().max().item()
        err = (got[name].double().cpu() - ref[name]).abs().max().item()
        base_err = (base[name].double().cpu() - ref[name]).abs().max().item()
        bound = 1e-4 * scale if dtype is torch.float32 else 3 * base_err + 1e-3 * scale
        assert err <= bound, f"{dtype} {name}: error {err} > {bound} (timm math: {base_err})"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_auto_picks_xformers_when_it_dispatches(caplog):
    pytest.importorskip("xformers")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    reasons = _gpu_xformers_reasons(dtype)
    blk = _block(6, 4, True, dim=128).cuda()
    ours = WindowAttention.from_timm(blk.attn)
    x = torch.randn(8, 36, 128, device="cuda", requires_grad=True)
    with caplog.at_level(logging.INFO, logger="simmim_fast.attention"), torch.autocast("cuda", dtype=dtype):
        ours(x, blk.attn_mask).float().sum().backward()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "simmim_fast.attention"]
    triton_reasons = wa.triton_not_supported_reasons(ours, device=x.device, dtype=dtype, qkv_shape=(8, 6, 6, 384),
                                                     window_size=(6, 6), mask=blk.attn_mask)
    if not triton_reasons:  # auto prefers the fused Triton kernel on CUDA (tests/test_window_attention_triton.py)
        assert "backend 'triton' runs" in line, line
    elif reasons:
        assert "backend 'sdpa' runs" in line and "xformers not usable" in line, line
    else:
        assert "backend 'xformers' runs" in line and "cutlass" in line, line
    assert ours.relative_position_bias_table.grad is not None


def test_bias_table_gradient_is_contiguous_for_ddp_buckets():
    """DDP warned "Grad strides do not match bucket view strides" for the (T, nH) tables: their gradient
    came out transposed, forcing a copy into the bucket every step. It must have the parameter's strides."""
    from timm.models.swin_transformer import WindowAttention as TimmWA

    from simmim_fast.models.window_attention import WindowAttention

    for heads in (1, 4):
        attn = WindowAttention.from_timm(TimmWA(32, num_heads=heads, window_size=(6, 6)), backend="math")
        attn(torch.randn(2, 36, 32)).sum().backward()
        table = attn.relative_position_bias_table
        assert table.grad.stride() == table.stride() == (heads, 1)
