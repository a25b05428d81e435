"""``torch.compile`` traces the model and every op without graph breaks (``fullgraph=True``).

- The SimMIM model with the reference ops on CPU: compiled loss and gradients equal eager ones
  (while compiling, the model runs the full head: the masked-only head's token count is
  data-dependent).
- The Triton paths' ``torch.library`` registrations: one compiled call of each op (forward and
  backward) equals the eager reference. On CPU that is the ``custom_op`` registration running the
  interpreter; on a GPU both the ``custom_op`` and the ``triton_op`` (Inductor sees the kernels)
  registrations are compiled.

Compilation is slow on 2 CPU cores (~20-40 s per graph), so each test compiles one graph.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from simmim_fast import MaskGenerator, ops
from simmim_fast.models import create_model
from simmim_fast.ops import _common

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
SWIN_SMALL = dict(img_size=64, depths=(2, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1), window_size=2)

triton_paths = pytest.mark.skipif(
    not _common.HAS_TRITON or not (CUDA or _common.INTERPRET),
    reason="needs Triton and a CUDA device, or TRITON_INTERPRET=1 at import (tests/conftest.py sets it on CPU)",
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_compile_model_reference_ops_fullgraph():
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", ops_backend="reference", **SWIN_SMALL)
    gen = MaskGenerator(input_size=64, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    mask = gen.generate(2, generator=_gen(1))
    images = torch.randn(2, 3, 64, 64, generator=_gen(2))
    params = [p for p in model.parameters() if p.requires_grad]

    eager = model(images, mask)  # masked-only head (eager decides it applies)
    assert model.masked_head_tokens(images, mask) is not None
    eager_grads = torch.autograd.grad(eager, params, allow_unused=True)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # Inductor codegen: minutes on 2 cores
    loss = compiled(images, mask)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _op_inputs():
    g = _gen(3)
    tokens = torch.randn(2, 6, 6, 16, generator=g).to(DEV).requires_grad_(True)
    fill_mask = (torch.rand(2, 3, 3, generator=g) < 0.5).to(DEV)
    mask_token = torch.randn(16, generator=g).to(DEV).requires_grad_(True)
    pred = torch.randn(2, 3, 2, 48, generator=g).to(DEV).requires_grad_(True)  # s = 4
    images = torch.randn(2, 3, 12, 8, generator=g).to(DEV)
    loss_mask = (torch.rand(2, 3, 2, generator=g) < 0.5).to(DEV)
    return tokens, fill_mask, mask_token, pred, images, loss_mask


def _all_ops(tokens, fill_mask, mask_token, pred, images, loss_mask, backend):
    filled = ops.mask_token_fill(tokens, fill_mask, mask_token, deterministic=True, backend=backend)
    image = ops.pixel_shuffle_head(pred, backend=backend)
    loss = ops.masked_l1_loss(pred, images, loss_mask, backend=backend)
    return filled, image, loss


def _outputs_and_grads(fn, inputs):
    tokens, _, mask_token, pred, _, _ = inputs
    filled, image, loss = fn(*inputs)
    g = _gen(4)
    w1 = torch.randn(filled.shape, generator=g).to(DEV)
    w2 = torch.randn(image.shape, generator=g).to(DEV)
    total = (filled * w1).sum() + (image * w2).sum() + loss
    return (filled, image, loss), torch.autograd.grad(total, (tokens, mask_token, pred))


def _check_against_reference(fn):
    inputs = _op_inputs()
    outs, grads = _outputs_and_grads(fn, inputs)
    ref_outs, ref_grads = _outputs_and_grads(lambda *a: _all_ops(*a, backend="reference"), inputs)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@triton_paths
def test_compile_each_op_triton_custom_op_fullgraph(monkeypatch):
    """The opaque ``custom_op`` registration (the one the interpreter runs) compiles without graph breaks."""
    if CUDA:  # on a GPU the public ops pick the triton_op registration: force the custom_op one here
        for name in ("mask_token_fill", "pixel_shuffle_head", "masked_l1_loss"):
            mod = importlib.import_module(f"simmim_fast.ops.{name}")
            monkeypatch.setattr(mod, "_FWD", type(mod._FWD)(mod._FWD.opaque, None))
    compiled = torch.compile(lambda *a: _all_ops(*a, backend="triton"), fullgraph=True)
    _check_against_reference(compiled)


@pytest.mark.skipif(not (CUDA and _common.HAS_TRITON and not _common.INTERPRET), reason="triton_op needs CUDA kernels")
def test_compile_each_op_triton_op_fullgraph_cuda():
    """On a GPU the public ops use the ``triton_op`` registration: Inductor compiles into the kernels."""
    for name in ("mask_token_fill", "pixel_shuffle_head", "masked_l1_loss"):
        mod = importlib.import_module(f"simmim_fast.ops.{name}")
        assert mod._FWD.pick(torch.empty(0, device="cuda")) is mod._FWD.traceable
    compiled = torch.compile(lambda *a: _all_ops(*a, backend="triton"), fullgraph=True)
    _check_against_reference(compiled)
