"""``recipe="official" | "clean"``: weight-decay sets, lr timing and ViT initialisation.

The official side is an independent transcription of microsoft/SimMIM written here from its code
(``optimizer.get_pretrain_param_groups`` / ``check_keywords_in_name`` with ``models/simmim.py``'s
``no_weight_decay(_keywords)``; ``lr_scheduler.build_scheduler`` driven by ``main_simmim.train_one_epoch``,
which calls ``lr_scheduler.step_update(epoch * num_steps + idx)`` after ``optimizer.step()``;
``VisionTransformerForSimMIM._trunc_normal_``), not our functions.
"""
from __future__ import annotations

import bisect
import math

import pytest
import torch
import torch.nn as nn
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler

from simmim_fast.models import PRESETS, create_model
from simmim_fast.models.presets import RECIPES, build_encoder, check_recipe, get_preset
from simmim_fast.training.optim import WarmupScheduler, build_optimizer, param_groups, weight_decay_names

VIT_SMALL = dict(img_size=64, embed_dim=96, depth=3, num_heads=3)


# ---------------------------------------------------------------------------------------------
# weight decay
# ---------------------------------------------------------------------------------------------
def official_split(model: nn.Module, arch: str) -> tuple[set[str], set[str]]:
    """microsoft/SimMIM get_pretrain_param_groups over the official SimMIM wrapper's skip sets."""
    # SwinTransformerForSimMIM: {'absolute_pos_embed'} | {'mask_token'}, keywords {'relative_position_bias_table'}
    if arch == "swin":
        skip, keywords = {"encoder.absolute_pos_embed", "encoder.mask_token"}, {"encoder.relative_position_bias_table"}
    else:  # VisionTransformer: {'pos_embed', 'cls_token'}; no keywords method -> {}
        skip, keywords = {"encoder.pos_embed", "encoder.cls_token"}, set()
    decay, no_decay = set(), set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        isin = False
        for keyword in keywords:
            if keyword in name:
                isin = True
        if len(param.shape) == 1 or name.endswith(".bias") or (name in skip) or isin:
            no_decay.add(name)
        else:
            decay.add(name)
    return decay, no_decay


def _names(model, groups):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [{by_id[id(p)] for p in g["params"]} for g in groups]


@pytest.mark.parametrize("preset", ["swin_base_192", "vit_base_224"])
def test_official_weight_decay_sets_of_the_official_presets(preset):
    with torch.device("meta"):  # names and shapes only
        model = create_model(preset)
    arch = get_preset(preset).arch
    want_decay, want_no_decay = official_split(model, arch)
    groups = param_groups(model, weight_decay=0.05, recipe="official")
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay, no_decay = _names(model, groups)
    assert decay == want_decay and no_decay == want_no_decay
    # what the issue lists: official runs decay these, clean runs do not
    clean_decay, _ = _names(model, param_groups(model, weight_decay=0.05, recipe="clean"))
    extra = decay - clean_decay
    assert clean_decay <= decay
    if arch == "swin":
        assert len(extra) == 24 and all(n.endswith("attn.relative_position_bias_table") for n in extra)
    else:
        assert extra == {"encoder.mask_token", "encoder.rel_pos_bias.relative_position_bias_table"}
        assert "encoder.cls_token" in no_decay


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_official_weight_decay_on_small_models_and_frozen_parameters(arch):
    model = create_model("swin_tiny_cpu") if arch == "swin" else create_model("vit_tiny_cpu", **VIT_SMALL)
    model.encoder.patch_embed.proj.weight.requires_grad_(False)
    decay, no_decay = weight_decay_names(model, recipe="official")
    assert (set(decay), set(no_decay)) == official_split(model, arch)
    assert "encoder.patch_embed.proj.weight" not in decay + no_decay
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, recipe="official")
    assert sum(len(g["params"]) for g in opt.param_groups) == len(decay) + len(no_decay)
    # clean is the default and unchanged
    assert _names(model, param_groups(model, weight_decay=0.05)) == _names(
        model, param_groups(model, weight_decay=0.05, recipe="clean"))


def test_recipe_errors():
    model = create_model("swin_tiny_cpu")
    with pytest.raises(ValueError, match="recipe: expected one of 'official', 'clean', got 'offical'"):
        param_groups(model, weight_decay=0.05, recipe="offical")
    with pytest.raises(TypeError, match="official weight-decay rules .* got Linear"):
        param_groups(nn.Linear(2, 2), weight_decay=0.05, recipe="official")
    with pytest.raises(ValueError, match="recipe"):
        WarmupScheduler(_sgd(), base_lr=1.0, warmup_lr=0.0, min_lr=0.0, total_steps=10, warmup_steps=1, recipe=None)
    with pytest.raises(ValueError, match="accum_steps"):
        WarmupScheduler(_sgd(), base_lr=1.0, warmup_lr=0.0, min_lr=0.0, total_steps=10, warmup_steps=1, accum_steps=0)
    with pytest.raises(ValueError, match="init: expected one of"):
        build_encoder(get_preset("vit_tiny_cpu"), init="timm")
    assert check_recipe("clean") == "clean" and RECIPES == ("official", "clean")


def test_presets_default_recipe():
    for name, p in PRESETS.items():
        assert p.default_recipe == ("clean" if name.endswith("_cpu") else "official"), name


# ---------------------------------------------------------------------------------------------
# learning-rate timing
# ---------------------------------------------------------------------------------------------
def _sgd(lr=1.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


class OfficialMultiStep(Scheduler):
    """lr_scheduler.MultiStepLRScheduler of microsoft/SimMIM."""

    def __init__(self, optimizer, milestones, gamma=0.1, warmup_t=0, warmup_lr_init=0.0, t_in_epochs=True):
        super().__init__(optimizer, param_group_field="lr")
        self.milestones, self.gamma = milestones, gamma
        self.warmup_t, self.warmup_lr_init, self.t_in_epochs = warmup_t, warmup_lr_init, t_in_epochs
        if self.warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / self.warmup_t for v in self.base_values]
            super().update_groups(self.warmup_lr_init)
        else:
            self.warmup_steps = [1 for _ in self.base_values]

    def _get_lr(self, t):
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        return [v * (self.gamma ** bisect.bisect_right(self.milestones, t)) for v in self.base_values]

    def get_update_values(self, num_updates):  # the older timm API
        return None if self.t_in_epochs else self._get_lr(num_updates)


def official_lrs(kind, *, epochs, n_iter, warmup_epochs, base, warmup_lr, min_lr, multisteps=(), accum=1, n=20):
    """The lr of each of the first ``n`` optimizer steps of official main_simmim.py (scheduler.build_scheduler)."""
    opt = _sgd(base)  # optimizer built with lr=config.TRAIN.BASE_LR
    num_steps, warmup_steps = int(epochs * n_iter), int(warmup_epochs * n_iter)
    if kind == "cosine":
        sched = CosineLRScheduler(opt, t_initial=num_steps, cycle_mul=1.0, lr_min=min_lr, warmup_lr_init=warmup_lr,
                                  warmup_t=warmup_steps, cycle_limit=1, t_in_epochs=False)
    else:
        sched = OfficialMultiStep(opt, milestones=[i * n_iter for i in multisteps], gamma=0.1,
                                  warmup_lr_init=warmup_lr, warmup_t=warmup_steps, t_in_epochs=False)
    lrs = []
    for epoch in range(epochs):
        for idx in range(n_iter):  # train_one_epoch
            if accum > 1:
                if (idx + 1) % accum == 0:
                    lrs.append(opt.param_groups[0]["lr"])  # optimizer.step()
                    sched.step_update(epoch * n_iter + idx)
            else:
                lrs.append(opt.param_groups[0]["lr"])  # optimizer.step()
                sched.step_update(epoch * n_iter + idx)
            if len(lrs) == n:
                return lrs
    return lrs


CASES = {  # name: (kind, epochs, micro-batches per epoch, warmup epochs, multisteps, accum)
    "swin_base_192-like cosine": ("cosine", 10, 4, 2, (), 1),
    "cosine, the whole 20-step run": ("cosine", 4, 5, 1, (), 1),
    "multistep, milestone inside": ("multistep", 20, 2, 2, (5,), 1),
    "multistep, 7 warmup steps (timm's arithmetic order shows)": ("multistep", 20, 7, 1, (2,), 1),
    "cosine, accumulation 2": ("cosine", 10, 4, 2, (), 2),
    "multistep, accumulation 3": ("multistep", 20, 6, 1, (4,), 3),
    "no warmup": ("cosine", 10, 5, 0, (), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_official_lr_of_the_first_20_steps(case):
    kind, epochs, n_iter, warmup_epochs, ms, accum = CASES[case]
    base, warmup_lr, min_lr = 8e-4, 4e-6, 4e-5  # swin_base_192 at batch 2048: 2e-4, 1e-6, 1e-5 x 4
    want = official_lrs(kind, epochs=epochs, n_iter=n_iter, warmup_epochs=warmup_epochs, base=base,
                        warmup_lr=warmup_lr, min_lr=min_lr, multisteps=ms, accum=accum)
    steps = n_iter // accum  # optimizer steps per epoch, as train.py counts them
    opt = _sgd()
    ours = WarmupScheduler(opt, base_lr=base, warmup_lr=warmup_lr, min_lr=min_lr, total_steps=epochs * steps,
                           warmup_steps=int(warmup_epochs * steps), kind=kind, milestones=tuple(m * steps for m in ms),
                           recipe="official", accum_steps=accum)
    got = []
    for t in range(len(want)):  # Stepper: step_update(t) before the step's micro-batches
        ours.step_update(t)
        got.append(opt.param_groups[0]["lr"])
    assert len(got) == 20
    assert got == want  # bit-identical
    clean = WarmupScheduler(_sgd(), base_lr=base, warmup_lr=warmup_lr, min_lr=min_lr, total_steps=epochs * steps,
                            warmup_steps=int(warmup_epochs * steps), kind=kind, milestones=tuple(m * steps for m in ms))
    assert [clean.step_update(t) for t in range(20)] == [clean.lr_at(t) for t in range(20)]
    if accum == 1:  # official = clean one step behind (to rounding)
        assert got[1:] == pytest.approx([clean.lr_at(t) for t in range(19)], rel=1e-12)
        assert got[0] == (warmup_lr if warmup_epochs else base)


# ---------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------
def truncated_std(std: float, a: float, b: float) -> float:
    """Standard deviation of N(0, std^2) truncated to [a, b] (a = -b)."""
    alpha, beta = a / std, b / std
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    z = 0.5 * (math.erf(beta / math.sqrt(2)) - math.erf(alpha / math.sqrt(2)))
    return std * math.sqrt(1 + (alpha * pdf(alpha) - beta * pdf(beta)) / z - ((pdf(alpha) - pdf(beta)) / z) ** 2)


def _vit(init):
    torch.manual_seed(0)
    return create_model("vit_tiny_cpu", init=init, **VIT_SMALL).encoder


def test_official_vit_init_statistics():
    enc = _vit("official")
    sd = {n: p.detach() for n, p in enc.named_parameters()}
    one_std = truncated_std(0.02, -0.02, 0.02)
    assert one_std == pytest.approx(0.0108, abs=5e-5)  # the "std ~ 0.011"
    plain = []  # weights not rescaled by fix_init_weight
    for name, mod in enc.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            w = mod.weight.detach()
            m = re_block(name)
            scale = 1.0 / math.sqrt(2.0 * (m + 1)) if m is not None and name.endswith(("attn.proj", "mlp.fc2")) else 1.0
            assert float(w.abs().max()) <= 0.02 * scale * (1 + 1e-6), name
            assert float(w.std()) == pytest.approx(one_std * scale, rel=0.03), name
            if scale == 1.0:
                plain.append(w.flatten())
            if mod.bias is not None:
                assert not mod.bias.any(), name
    assert float(torch.cat(plain).std()) == pytest.approx(one_std, rel=0.02)
    pe = sd["patch_embed.proj.weight"]  # a Conv2d, truncated like the Linear layers, bias 0
    assert float(pe.abs().max()) <= 0.02 and not sd["patch_embed.proj.bias"].any()
    for name in ("cls_token", "mask_token"):
        assert 0 < float(sd[name].abs().max()) <= 0.02, name
    assert not sd["rel_pos_bias.relative_position_bias_table"].any()
    for name, p in sd.items():
        if name.endswith(("q_bias", "v_bias")):
            assert not p.any(), name
        if "gamma_" in name:
            assert torch.equal(p, torch.full_like(p, 0.1)), name
        if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name


def re_block(name: str):
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def test_clean_vit_init_is_timms_and_unchanged():
    clean = _vit("clean")
    torch.manual_seed(0)
    default = create_model("vit_tiny_cpu", **VIT_SMALL).encoder  # the library default is clean, bit for bit
    for (n, a), (_, b) in zip(clean.state_dict().items(), default.state_dict().items()):
        assert torch.equal(a, b), n
    qkv = clean.blocks[0].attn.qkv.weight.detach()
    assert float(qkv.std()) == pytest.approx(0.02, rel=0.05) and float(qkv.abs().max()) > 0.04  # not truncated
    pe = clean.patch_embed.proj.weight.detach()  # PyTorch's Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(pe[0].numel())
    assert float(pe.abs().max()) <= bound and float(pe.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_swin_init_is_the_same_in_both_recipes():
    """The official Swin init (Linear/table N(0, .02) truncated at +-2, PyTorch's conv default) is timm's."""
    torch.manual_seed(0)
    a = create_model("swin_tiny_cpu", init="official")
    torch.manual_seed(0)
    b = create_model("swin_tiny_cpu", init="clean")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    sd = {n: p.detach() for n, p in a.encoder.named_parameters()}
    w = torch.cat([p.flatten() for n, p in sd.items() if n.endswith(("qkv.weight", "fc1.weight", "fc2.weight", "proj.weight"))
                   and "patch_embed" not in n])
    assert float(w.std()) == pytest.approx(0.02, rel=0.02)
    tables = torch.cat([p.flatten() for n, p in sd.items() if "relative_position_bias_table" in n])
    assert float(tables.std()) == pytest.approx(0.02, rel=0.05)
    pe = sd["patch_embed.proj.weight"]
    assert float(pe.abs().max()) <= 1 / math.sqrt(pe[0].numel())


@pytest.mark.parametrize("arch", ["swin", "vit"])
def test_checkpoints_of_one_recipe_load_in_the_other(arch):
    make = (lambda init: create_model("swin_tiny_cpu", init=init)) if arch == "swin" else \
        (lambda init: create_model("vit_tiny_cpu", init=init, **VIT_SMALL))
    official, clean = make("official"), make("clean")
    assert list(official.state_dict()) == list(clean.state_dict())
    clean.load_state_dict(official.state_dict(), strict=True)
    official.load_state_dict(make("clean").state_dict(), strict=True)
