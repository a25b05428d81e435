"""The fast training step (issue 11): compiled blocks / model, the static masked-only head, fused/foreach
AdamW and its checkpoints, the CUDA-graph step's plumbing, the new CLI flags.

Backends: every compiled model here uses ``backend="aot_eager"`` (Dynamo + AOT autograd: the same
forward and backward graphs Inductor would get, without its C++ code generation, which takes ~30 s
per graph on 2 CPU cores; the lead measured a full Inductor compile of swin_tiny_cpu not finishing in
20 minutes). One test compiles one ViT block with Inductor under bf16 autocast (the numerics of the
fused LayerNorm / residual / casts). Graph breaks are counted with ``torch._dynamo.explain`` (tracing
only). Compiled graphs are shared between assertions through module-scoped fixtures.

What no test here can check: the CUDA-graph capture itself and its replay (no GPU), Inductor's CUDA
kernels, and every speed-up (benchmarks/test_end_to_end.py on a GPU).
"""
from __future__ import annotations

import copy
import csv
import shutil

import pytest
import torch

from simmim_fast import MaskGenerator, train
from simmim_fast.models import create_model
from simmim_fast.ops import _common
from simmim_fast.ops.masked_head import masked_token_index, static_head_count, static_token_index
from simmim_fast.training.compile import (
    TOLERANCES,
    TensorDropPath,
    compile_model,
    compile_stats,
    transformer_blocks,
)
from simmim_fast.training.cuda_graphs import (
    DeviceLr,
    GraphedStepper,
    StaticBatch,
    cuda_graph_reasons,
    make_capturable,
)
from simmim_fast.training.distributed import DistInfo
from simmim_fast.training.optim import WarmupScheduler, adamw_implementation, build_optimizer
from simmim_fast.training.optim_state import load_portable_state_dict, portable_state_dict
from simmim_fast.training.stepper import Stepper

SWIN = dict(img_size=64, depths=(4, 1, 1, 1), embed_dim=16, num_heads=(1, 1, 1, 1), window_size=2,
            drop_path_rate=0.0)
VIT = dict(img_size=64, depth=3, drop_path_rate=0.0)
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
FAST = ["--img-size", "96", "--batch-size", "2", "--num-workers", "0", "--log-every", "1"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _batch(model, batch=2, seed=1):
    gen = MaskGenerator(input_size=model.img_size[0], mask_patch_size=32, model_patch_size=model.patch_size,
                        mask_ratio=0.6)
    mask = gen.generate(batch, generator=_gen(seed))
    images = torch.randn(batch, 3, *model.img_size, generator=_gen(seed + 1))
    return images, mask, gen


def _loss_and_grads(model, images, mask, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(images, mask, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, dtype=None, what=""):
    tol = TOLERANCES[dtype]
    (la, ga), (lb, gb) = got, want
    torch.testing.assert_close(la, lb, **tol["loss"], msg=f"{what}: loss")
    assert ga.keys() == gb.keys(), what
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], **tol["grad"], msg=f"{what}: grad of {n}")


# ----------------------------------------------------------------------------------------------------
# static masked-only head (no compile)


def test_static_head_count_geometries():
    # Swin-B/192: 6x6 cells of 32 px, head grid 6x6: 22 masked cells x 1 token
    assert static_head_count(batch_size=128, grid=(6, 6), mask_grid=(6, 6), masked_cells=22) == (128 * 22, "")
    # ViT-B/224: 7x7 cells, head grid 14x14 (stride 16): 30 cells x 4 tokens
    assert static_head_count(batch_size=4, grid=(14, 14), mask_grid=(7, 7), masked_cells=30) == (4 * 30 * 4, "")
    n, why = static_head_count(batch_size=2, grid=(2, 2), mask_grid=(4, 4), masked_cells=10)
    assert n is None and "depends on the mask" in why  # 16 px cells on a stride-32 head
    n, why = static_head_count(batch_size=2, grid=(6, 6), mask_grid=(6, 6), masked_cells=22, region="all")
    assert n is None and "every token" in why
    assert static_head_count(batch_size=2, grid=(6, 6), mask_grid=(6, 6), masked_cells=36)[0] is None
    with pytest.raises(ValueError, match="masked_cells"):
        static_head_count(batch_size=2, grid=(6, 6), mask_grid=(6, 6), masked_cells=37)
    with pytest.raises(ValueError, match="batch_size"):
        static_head_count(batch_size=-1, grid=(6, 6), mask_grid=(6, 6), masked_cells=3)


def test_static_token_index_matches_and_flags_overflow():
    gen = MaskGenerator(input_size=96, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    mask = gen.generate(3, generator=_gen(0))
    grid, size = (3, 3), (96, 96)
    want = masked_token_index(mask, grid, size)
    index, over = static_token_index(mask, grid, size, want.numel())
    assert torch.equal(index, want) and not over
    more, over = static_token_index(mask, grid, size, want.numel() + 2)  # fewer masked than the count: exact
    assert torch.equal(more[: want.numel()], want) and not over
    assert not set(more[want.numel():].tolist()) & set(want.tolist())
    _, over = static_token_index(mask, grid, size, want.numel() - 1)
    assert over
    with pytest.raises(ValueError, match="count"):
        static_token_index(mask, grid, size, 0)


def test_model_head_count_equals_dynamic_head_and_is_checked(monkeypatch):
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", ops_backend="reference", **SWIN)
    images, mask, gen = _batch(model)
    n, why = model.static_head_count(2, gen)
    assert n == 2 * gen.mask_count and why == ""
    dynamic = _loss_and_grads(model, images, mask)
    static = _loss_and_grads(model, images, mask, head_count=n)
    assert torch.equal(static[0], dynamic[0])  # the same index, the same op
    for k in dynamic[1]:
        assert torch.equal(static[1][k], dynamic[1][k]), k
    with pytest.raises(ValueError, match="head_count: 7, but 6 tokens"):
        model(images, mask, head_count=7)
    with pytest.raises(ValueError, match="head_count"):
        model(images, mask, head_count=n, head_tokens=model.masked_head_tokens(images, mask))
    with pytest.raises(ValueError, match="head_count"):
        model(images, mask, head_count=0)
    with pytest.raises(ValueError, match="input_size"):
        model.static_head_count(2, MaskGenerator(input_size=96, mask_patch_size=32))
    # a device mask is not checked on the host: too few head tokens give NaN, never a partial loss
    monkeypatch.setattr(type(model), "check_head_count", lambda self, m, c: None)
    assert torch.isnan(model(images, mask, head_count=n - 1))
    assert torch.equal(model(images, mask, head_count=n + 1), dynamic[0])  # more: exact
    model.masked_head = False
    assert model.static_head_count(2, gen) == (None, "the model's masked_head is off")


# ----------------------------------------------------------------------------------------------------
# compiled vs eager vs reference (aot_eager), zero graph breaks


def _variants(preset, kw):
    torch.manual_seed(0)
    ref = create_model(preset, ops_backend="reference", masked_head=False, **kw)  # full head (official)
    out = {"reference": ref}
    for name in ("eager", "blocks", "model"):
        m = create_model(preset, ops_backend="reference", **kw)
        m.load_state_dict(ref.state_dict())
        out[name] = m
    return out


@pytest.fixture(scope="module")
def compiled_runs():
    """Loss and gradients of reference / eager / blocks / model for Swin and ViT (one compile each)."""
    torch._dynamo.reset()
    res = {}
    for preset, kw in (("swin_tiny_cpu", SWIN), ("vit_tiny_cpu", dict(VIT, drop_path_rate=0.1))):
        models = _variants(preset, kw)
        keys = {k: list(m.state_dict()) for k, m in models.items()}
        images, mask, gen = _batch(models["eager"])
        n = models["eager"].static_head_count(2, gen)[0]
        graphs = {}
        out = {"reference": _loss_and_grads(models["reference"].eval(), images, mask)}
        for name in ("eager", "blocks", "model"):
            m = models[name]
            if name != "eager":
                compile_model(m, name, backend="aot_eager", device="cpu")
            m.train()
            for mod in m.modules():  # drop path off (random): compiled and eager numbers stay comparable
                if isinstance(mod, TensorDropPath) or type(mod).__name__ == "DropPath":
                    mod.eval()
            before = compile_stats()["graphs"]
            out[name] = _loss_and_grads(m, images, mask, head_count=n)
            graphs[name] = compile_stats()["graphs"] - before
        res[preset] = dict(out=out, graphs=graphs, models=models, keys=keys, batch=(images, mask, n))
    yield res
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", ["swin_tiny_cpu", "vit_tiny_cpu"])
def test_compiled_equals_eager_and_reference(compiled_runs, preset):
    r = compiled_runs[preset]
    out = r["out"]
    for name in ("blocks", "model"):
        _assert_same(out[name], out["eager"], what=f"{preset} {name} vs eager")
        _assert_same(out[name], out["reference"], what=f"{preset} {name} vs reference (full head)")
    _assert_same(out["eager"], out["reference"], what=f"{preset} eager vs reference")
    for name, m in r["models"].items():  # compiled modules keep their state_dict keys (no _orig_mod.)
        assert list(m.state_dict()) == r["keys"][name], name


def test_one_graph_per_block_shape(compiled_runs):
    vit = compiled_runs["vit_tiny_cpu"]
    assert vit["graphs"]["eager"] == 0
    # three ViT blocks with drop-path rates 0, 0.05, 0.1: one graph (TensorDropPath), not three
    assert vit["graphs"]["blocks"] == 1
    assert sum(isinstance(m, TensorDropPath) for m in vit["models"]["blocks"].modules()) == 6
    assert vit["graphs"]["model"] == 1
    swin = compiled_runs["swin_tiny_cpu"]
    blocks = transformer_blocks(swin["models"]["blocks"])
    shapes = {(b.norm1.normalized_shape, tuple(b.shift_size), tuple(b.window_size)) for b in blocks}
    # 7 blocks: stage 1 alternates unshifted / shifted (4 blocks, 2 graphs), stages 2-4 one block each
    assert len(blocks) == 7 and swin["graphs"]["blocks"] == len(shapes) == 5


def test_eval_and_no_grad_run_eager(compiled_runs):
    m = compiled_runs["vit_tiny_cpu"]["models"]["blocks"]
    images, mask, n = compiled_runs["vit_tiny_cpu"]["batch"]
    before = compile_stats()["graphs"]
    m.eval()
    with torch.no_grad():
        m(images[:1], mask[:1])  # another batch size and mode: eager, no recompilation
    m.predict(images, mask)
    m.train()
    assert compile_stats()["graphs"] == before


def _explain_breaks(fn, *args, **kwargs) -> int:
    return torch._dynamo.explain(fn)(*args, **kwargs).graph_break_count


@pytest.mark.parametrize("ops", ["reference", "triton"])
def test_zero_graph_breaks(ops):
    if ops == "triton" and not (_common.HAS_TRITON and _common.INTERPRET):
        pytest.skip("the Triton paths need TRITON_INTERPRET=1 at import on CPU (tests/conftest.py)")
    torch._dynamo.reset()
    for preset, kw in (("swin_tiny_cpu", SWIN), ("vit_tiny_cpu", VIT)):
        torch.manual_seed(0)
        model = create_model(preset, ops_backend=ops, **kw).train()
        images, mask, gen = _batch(model)
        n = model.static_head_count(2, gen)[0]
        assert _explain_breaks(type(model).forward, model, images, mask, head_count=n) == 0, (preset, ops, "model")
        if preset.startswith("swin") and ops == "triton":  # the block with the fused window-attention kernel
            # (head dims <= 64; the model above runs attention 'auto' = SDPA on CPU: the interpreter is slow)
            model = create_model(preset, ops_backend=ops, **dict(kw, attn_backend="triton", num_heads=(1, 1, 2, 4)))
        blk = transformer_blocks(model)[-1 if preset.startswith("vit") else 1]  # Swin: a shifted block
        x = torch.randn(2, *blk.input_resolution, blk.dim) if preset.startswith("swin") else torch.randn(2, 17, 96)
        extra = {} if preset.startswith("swin") else {"shared_rel_pos_bias": model.encoder.rel_pos_bias()}
        assert _explain_breaks(type(blk).forward, blk.train(), x, **extra) == 0, (preset, ops, "block")
    torch._dynamo.reset()


def test_inductor_block_bf16_matches_autocast():
    """One ViT block (LayerNorm, attention, GELU MLP, layer scale, residuals) compiled by Inductor under bf16
    autocast against the eager autocast block: fp32 master weights, bf16 GEMMs, fp32 LayerNorm statistics."""
    from timm.models.beit import Block

    torch._dynamo.reset()
    torch.manual_seed(0)
    blk = Block(dim=32, num_heads=2, mlp_ratio=4.0, qkv_bias=True, init_values=0.1, window_size=None).train()
    x = torch.randn(2, 17, 32, generator=_gen(5))
    w = torch.randn(2, 17, 32, generator=_gen(6))

    def run(fn):
        blk.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(blk, xi)
        loss = (y.float() * w).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in blk.named_parameters()}
        grads["x"] = xi.grad.clone()
        return loss.detach(), grads

    eager = run(type(blk).forward)
    compiled = run(torch.compile(type(blk).forward, backend="inductor", fullgraph=True, dynamic=False))
    _assert_same(compiled, eager, dtype=torch.bfloat16, what="inductor bf16 block")
    torch._dynamo.reset()


def test_tensor_drop_path():
    from timm.layers import drop_path

    x = torch.randn(64, 3, 4)
    m = TensorDropPath(0.25).train()
    torch.manual_seed(3)
    a = m(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop_path(x, 0.25, True, True))  # eager: timm exactly
    assert torch.equal(m.eval()(x), x)
    assert list(m.state_dict()) == []  # the rate buffer is not persistent
    torch._dynamo.reset()
    f = torch.compile(lambda mod, t: mod(t), backend="aot_eager", fullgraph=True)
    m.train()
    big = torch.ones(4096, 2)
    before = compile_stats()["graphs"]
    y = f(m, big)
    kept = (y[:, 0] != 0).float().mean().item()
    scaled = (torch.ones(()) / torch.tensor(0.75)).item()
    assert set(torch.unique(y).tolist()) <= {0.0, scaled} and 0.70 < kept < 0.80
    z = TensorDropPath(0.0).train()
    assert torch.equal(f(z, big), big)  # rate 0: the identity ...
    assert compile_stats()["graphs"] - before == 1  # ... from the same graph
    torch._dynamo.reset()


def test_compile_model_arguments():
    m = create_model("vit_tiny_cpu", ops_backend="reference", **VIT)
    with pytest.raises(ValueError, match="compile: expected one of auto, off, blocks, model"):
        compile_model(m, "fast")
    with pytest.raises(ValueError, match="backend"):
        compile_model(m, "blocks", backend="tvm")
    with pytest.raises(ValueError, match="no transformer block"):
        compile_model(torch.nn.Linear(2, 2), "blocks")
    assert compile_model(m, "auto", device="cpu").mode == "off"  # auto: off on CPU, says why
    assert "CUDA only" in compile_model(m, "auto", device="cpu").why_off
    compile_model(m, "blocks", backend="aot_eager")
    with pytest.raises(ValueError, match="already compiled"):
        compile_model(m, "model", backend="aot_eager")


# ----------------------------------------------------------------------------------------------------
# optimizer: fused / foreach, portable checkpoints, tensor lr


def _tiny_model(seed=0, img_size=32):
    torch.manual_seed(seed)
    return create_model("vit_tiny_cpu", ops_backend="reference", img_size=img_size, depth=1)


def _train_steps(model, opt, batches):
    for images, mask in batches:
        loss = model(images, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 5.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_adamw_implementation_choice_and_groups():
    m = _tiny_model()
    assert adamw_implementation(m.parameters()) == "foreach"  # CPU
    with pytest.raises(ValueError, match="implementation"):
        adamw_implementation(m.parameters(), "apex")
    for impl in ("fused", "foreach", "single"):
        opt = build_optimizer(m, lr=1e-3, implementation=impl)
        assert bool(opt.defaults.get("fused")) == (impl == "fused")
        ref = build_optimizer(m, lr=1e-3, implementation="single")
        assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in ref.param_groups]
        assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in ref.param_groups]


@pytest.mark.parametrize("first,second", [("fused", "foreach"), ("foreach", "fused"), ("fused", "capturable")])
def test_optimizer_state_loads_across_implementations(first, second):
    images, mask, _ = _batch(_tiny_model(), seed=3)
    batches = [(images, mask)] * 3

    def build(model, impl):
        opt = build_optimizer(model, lr=1e-3, implementation="fused" if impl == "capturable" else impl)
        if impl == "capturable":
            make_capturable(opt)
        return opt

    a = _tiny_model()
    opt_a = build(a, first)
    _train_steps(a, opt_a, batches)
    saved = copy.deepcopy(portable_state_dict(opt_a))
    assert all(isinstance(g["lr"], float) for g in saved["param_groups"])
    b = _tiny_model()
    b.load_state_dict(a.state_dict())
    opt_b = build(b, second)
    lr_obj = opt_b.param_groups[0]["lr"]
    load_portable_state_dict(opt_b, saved)
    assert opt_b.param_groups[0]["lr"] is lr_obj  # a tensor lr keeps its identity (a captured graph reads it)
    assert float(opt_b.param_groups[0]["lr"]) == pytest.approx(1e-3, rel=1e-7)
    assert bool(opt_b.param_groups[0].get("fused")) == (second in ("fused", "capturable"))
    for pa, pb in zip(a.parameters(), b.parameters()):  # the moments and step counts carried over exactly
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert float(sa["step"]) == float(sb["step"]) == 3
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert sb["step"].device == pb.device
    _train_steps(a, opt_a, batches[:1])
    _train_steps(b, opt_b, batches[:1])
    # one more step each: fused and foreach apply the same rule; they differ by float32 rounding of the
    # weights (measured <= 6e-8 absolute on weights <= 0.2, i.e. a few ulps). Further steps let Adam's
    # normalisation (m / sqrt(v)) amplify such differences for near-zero gradients, so one step is compared.
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    with pytest.raises(ValueError, match="parameter groups"):
        load_portable_state_dict(opt_b, {"state": {}, "param_groups": saved["param_groups"][:1]})


# ----------------------------------------------------------------------------------------------------
# CUDA-graph step: reasons, tensor lr, static buffers, the captured body run eagerly


def test_cuda_graph_reasons():
    assert cuda_graph_reasons(device="cuda", precision="bf16", distributed=False, accum_steps=1) == []
    reasons = cuda_graph_reasons(device="cpu", precision="fp16", distributed=True, accum_steps=2,
                                 grad_checkpointing=True)
    text = " | ".join(reasons)
    assert len(reasons) == 5
    for needle in ("device is cpu", "fp16", "DDP", "--accum-steps 2", "checkpointing"):
        assert needle in text


def test_cuda_graphs_auto_stays_off_until_verified():
    from simmim_fast.training.cuda_graphs import AUTO_OFF_REASON, resolve_cuda_graphs

    assert resolve_cuda_graphs("on", []) == (True, [])
    assert resolve_cuda_graphs("auto", []) == (False, [AUTO_OFF_REASON])
    assert resolve_cuda_graphs("off", ["device is cpu"]) == (False, [])
    assert resolve_cuda_graphs("on", ["device is cpu"]) == (False, ["device is cpu"])
    with pytest.raises(ValueError, match="cuda_graphs"):
        resolve_cuda_graphs("yes", [])


def test_device_lr_schedule_equals_float_schedule():
    m = _tiny_model()
    for recipe in ("clean", "official"):
        opt = build_optimizer(m, lr=1e-3, implementation="fused")
        sched = WarmupScheduler(opt, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, total_steps=50, warmup_steps=7,
                                recipe=recipe)
        plain = WarmupScheduler(build_optimizer(m, lr=1e-3), base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, total_steps=50,
                                warmup_steps=7, recipe=recipe)
        lr = make_capturable(opt)
        dev = DeviceLr(sched, lr)
        for t in range(0, 60, 3):
            assert dev.step_update(t) == plain.step_update(t)
            assert lr.item() == pytest.approx(plain.optimizer.param_groups[0]["lr"], rel=1e-7)  # float32 tensor
            assert all(g["lr"] is lr for g in opt.param_groups)
    _train_steps(m, opt, [_batch(m)[:2]])
    with pytest.raises(ValueError, match="first step"):
        make_capturable(opt)


def test_static_batch_checks_shapes():
    sb = StaticBatch(torch.zeros(2, 3, 8, 8), torch.zeros(2, 2, 2, dtype=torch.int64), device="cpu")
    sb.fill(torch.ones(2, 3, 8, 8), torch.ones(2, 2, 2, dtype=torch.int64))
    assert sb.images.sum() == 2 * 3 * 64 and sb.masks.sum() == 8
    with pytest.raises(ValueError, match=r"images: expected \(2, 3, 8, 8\).*masks: expected"):
        sb.fill(torch.ones(1, 3, 8, 8), torch.ones(2, 2, 2, dtype=torch.bool))


def test_graphed_body_equals_the_stepper():
    """The body the CUDA graph captures (capture=False: eager every step) trains as the Stepper does."""
    runs = {}
    images, mask, gen = _batch(_tiny_model(img_size=64), seed=7)
    mask = mask.to(torch.int64)  # the loader's dtype: the body converts it (bool, no value check)
    for kind in ("stepper", "graphed"):
        m = _tiny_model(img_size=64)
        n = m.static_head_count(2, gen)[0]
        assert n == 2 * 3 * 4  # 3 of 2x2 cells masked, 4 head tokens each: the masked-only head runs
        opt = build_optimizer(m, lr=1e-3, implementation="fused")  # capturable AdamW: fused on CPU
        sched = WarmupScheduler(opt, base_lr=1e-3, warmup_lr=1e-5, min_lr=1e-5, total_steps=10, warmup_steps=3)
        if kind == "graphed":
            stepper = GraphedStepper(m, opt, DeviceLr(sched, make_capturable(opt)), info=CPU, clip_grad=5.0,
                                     head_count=n, capture=False)
            for t in range(4):
                stepper.train_step(t, images, mask)
        else:
            stepper = Stepper(m, opt, sched, torch.amp.GradScaler("cpu", enabled=False), info=CPU, clip_grad=5.0)
            for t in range(4):
                stepper.micro_step(t, lambda: m(images, mask.bool(), head_count=n))
        runs[kind] = (stepper.pop_mean_loss(), float(stepper.grad_norm), [p.detach().clone() for p in m.parameters()])
        assert not stepper.diverged()
    (la, na, pa), (lb, nb, pb) = runs["graphed"], runs["stepper"]
    assert la == pytest.approx(lb, rel=1e-6) and na == pytest.approx(nb, rel=1e-5)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="capture: CUDA graphs need a CUDA device"):
        GraphedStepper(m, opt, DeviceLr(sched, opt.param_groups[0]["lr"]), info=CPU)
    with pytest.raises(ValueError, match="masks: expected"):
        stepper_g = GraphedStepper(m, opt, DeviceLr(sched, opt.param_groups[0]["lr"]), info=CPU, capture=False)
        stepper_g.train_step(0, images, mask)
        stepper_g.train_step(1, images, mask.bool())


# ----------------------------------------------------------------------------------------------------
# the trainer: 20 compiled steps = 20 eager steps; resume compiled <-> eager; flags


def _losses(run) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


#: compiled (aot_eager) vs eager loss curve over 20 steps. Measured on torch 2.14: identical (aot_eager runs
#: the same aten kernels in the same order); 1e-6 leaves room for another torch's decompositions reordering
#: an fp32 sum (~1e-7 relative per step), not for a wrong gradient (a different step shows up at 1e-3).
CURVE_RTOL = 1e-6


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("fast_step")
    old = os.environ.get("SIMMIM_FAST_CACHE")
    os.environ["SIMMIM_FAST_CACHE"] = str(root / "cache")
    common = ["--max-steps", "20", "--save-every", "10", "--keep-checkpoints", "0", *FAST]
    compiled = ["--compile", "blocks", "--compile-backend", "aot_eager"]
    try:
        torch._dynamo.reset()
        runs = {"eager": root / "eager", "compiled": root / "compiled"}
        assert train.main([*common, "--output", str(runs["eager"]), "--cuda-graphs", "on"]) == 0
        assert train.main([*common, "--output", str(runs["compiled"]), *compiled]) == 0
        for src, dst, flags in (("compiled", "compiled_then_eager", ["--compile", "off"]),
                                ("eager", "eager_then_compiled", compiled)):
            runs[dst] = root / dst
            runs[dst].mkdir()
            shutil.copy(runs[src] / "checkpoint_00000010.pt", runs[dst])
            # a few steps past the checkpoint say whether the model and optimizer state loaded right
            assert train.main([*common, "--max-steps", "14", "--output", str(runs[dst]), "--resume", *flags]) == 0
        yield {k: _losses(v) for k, v in runs.items()}
    finally:
        torch._dynamo.reset()
        if old is None:
            os.environ.pop("SIMMIM_FAST_CACHE", None)
        else:
            os.environ["SIMMIM_FAST_CACHE"] = old


def test_compiled_training_curve_equals_eager(trainer_runs):
    eager, compiled = trainer_runs["eager"], trainer_runs["compiled"]
    assert sorted(eager) == sorted(compiled) == list(range(1, 21))
    for s in eager:
        assert compiled[s] == pytest.approx(eager[s], rel=CURVE_RTOL), s


def test_checkpoints_resume_across_compile(trainer_runs):
    eager = trainer_runs["eager"]
    for name in ("compiled_then_eager", "eager_then_compiled"):
        got = trainer_runs[name]
        assert sorted(got) == list(range(11, 15)), name
        for s in got:
            assert got[s] == pytest.approx(eager[s], rel=CURVE_RTOL), (name, s)


@pytest.mark.parametrize("cli,argv,needle", [
    ("train", ["--compile", "fast"], "--compile"),
    ("train", ["--compile-backend", "tvm"], "--compile-backend"),
    ("train", ["--cuda-graphs", "maybe"], "--cuda-graphs"),
    ("finetune", ["--compile", "yes"], "--compile"),
])
def test_bad_flag_values_exit_2(tmp_path, capsys, cli, argv, needle):
    from simmim_fast import finetune

    main = train.main if cli == "train" else finetune.main
    assert main([*argv, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert needle in err and argv[1] in err, err


def test_names_agree_and_info_reports_the_step():
    from simmim_fast.cli import names
    from simmim_fast.training import compile as compile_mod
    from simmim_fast.training import cuda_graphs
    from simmim_fast.training.step_report import fast_step_report, format_fast_step

    assert names.COMPILE_MODES == compile_mod.COMPILE_MODES
    assert names.COMPILE_BACKENDS == compile_mod.COMPILE_BACKENDS
    assert names.CUDA_GRAPH_MODES == cuda_graphs.CUDA_GRAPH_MODES
    report = fast_step_report("cpu")
    assert report["compile"]["active"] is False and "CUDA only" in report["compile"]["reasons"][0]
    assert "foreach" in report["optimizer"]["what"]
    assert report["cuda_graphs"]["reasons"] == ["device is cpu: CUDA graphs need a CUDA device"]
    assert report["masked_head"]["active"] is True
    text = "\n".join(format_fast_step(report))
    assert "cuda_graphs" in text and "static count" in text
    cuda = fast_step_report("cuda")  # what a GPU run would use (no device needed to decide)
    assert cuda["compile"]["what"].endswith("blocks")
    # auto keeps the capture off on CUDA until it has run on a GPU; the reason says how to turn it on
    assert not cuda["cuda_graphs"]["active"] and "--cuda-graphs on" in cuda["cuda_graphs"]["reasons"][0]
    assert "fused" in cuda["optimizer"]["what"]


def test_finetune_compiled_blocks_equal_eager(tmp_path):
    """finetune --compile blocks (aot_eager): the same losses as eager (drop path 0: no random branch)."""
    import numpy as np
    from PIL import Image

    from simmim_fast import finetune

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for name, colour in {"blue": (40, 60, 200), "red": (200, 40, 40)}.items():
            d = tmp_path / "data" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 30, (32, 32, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    common = ["--data", str(tmp_path / "data"), "--img-size", "32", "--window-size", "4", "--batch-size", "4",
              "--num-workers", "0", "--max-steps", "2", "--log-every", "1", "--drop-path", "0"]
    torch._dynamo.reset()
    for mode in ("off", "blocks"):
        assert finetune.main([*common, "--output", str(tmp_path / mode), "--compile", mode,
                              "--compile-backend", "aot_eager"]) == 0
    torch._dynamo.reset()
    eager, compiled = _losses(tmp_path / "off"), _losses(tmp_path / "blocks")
    assert sorted(eager) == [1, 2] and all(compiled[s] == pytest.approx(eager[s], rel=CURVE_RTOL) for s in eager)


def test_results_table_from_benchmark_json(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "results_table.py"
    spec = importlib.util.spec_from_file_location("results_table_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    row = {"status": "ok", "preset": "swin_base_192", "variant": "ours_compiled", "img_per_s": 2000.0,
           "speedup_vs_official_equiv": 2.1, "speedup_vs_official_equiv_compiled": 1.4, "mfu": 0.42,
           "peak_memory_gib": 20.5, "first_step_s": 61.0, "compile_s": 60.7, "loss_rel_diff_vs_official": 1e-3,
           "device": "H200", "precision": "bf16", "batch": 128, "rounds": 5, "steps_per_round": 10,
           "peak_matmul": {"dtype": "torch.bfloat16", "n": 8192, "tflops": 700.0}, "compile_backend": "inductor"}
    data = {"benchmarks": [{"fullname": "benchmarks/test_end_to_end.py::test_end_to_end[x]", "extra_info": row},
                           {"fullname": "benchmarks/test_ops.py::test_x", "extra_info": {"a": 1}}]}
    (tmp_path / "e2e.json").write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{mod.START}\nold\n{mod.END}\nafter\n")
    assert mod.main([str(tmp_path / "e2e.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| swin_base_192 | ours_compiled | 2000 | 2.1 | 1.4 | 42.0 % | 20.5 | 61 | 60.7 | 0.001 |" in text
    assert "H200, bf16, batch 128" in text
    readme.write_text("no markers\n")
    assert mod.main([str(tmp_path / "e2e.json"), "--readme", str(readme)]) == 2
