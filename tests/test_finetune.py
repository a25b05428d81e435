"""Fine-tuning, evaluation and linear probing on CPU: layer decay, data, the CLIs end to end.

The CLI runs use a generated data set of 4 colour classes (32 px) and the small presets at 32 px
(Swin window 4), so that a 2-epoch run takes a few seconds on 2 cores.
"""
from __future__ import annotations

import csv
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from simmim_fast import finetune, linear_probe, serialization
from simmim_fast.data.classification import (
    ClassificationFolder, _posterize_any_bits, build_train_transform, split_dirs,
)
from simmim_fast.models import create_model
from simmim_fast.models.classifier import FINETUNE_PRESETS, build_classifier, classifier_spec
from simmim_fast.models.interchange import PRETRAIN_FORMAT, read_checkpoint
from simmim_fast.training.layer_decay import ScaledWarmupScheduler, layer_decay_param_groups

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40), "yellow": (220, 210, 40)}
SMALL = ["--img-size", "32", "--window-size", "4", "--batch-size", "8", "--num-workers", "0", "--warmup-epochs", "0"]


def make_colour_data(root: Path, train: int, val: int) -> Path:
    """train/ and val/ folders of noisy colour patches, 32 px, ``train`` / ``val`` images per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for name, c in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(c)[None, None] + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    return make_colour_data(tmp_path_factory.mktemp("colours"), 24, 8)


@pytest.fixture(scope="module")
def colour_small(tmp_path_factory) -> Path:
    return make_colour_data(tmp_path_factory.mktemp("colours_small"), 8, 4)


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory) -> Path:
    """A pretraining checkpoint in our format (swin_tiny_cpu, 192 px, window 6), random weights."""
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu")
    path = tmp_path_factory.mktemp("pre") / "checkpoint_00000001.pt"
    torch.save({"format": PRETRAIN_FORMAT, "model": model.state_dict(), "step": 1, "args": {"preset": "swin_tiny_cpu"},
                "plan": {"img_size": 192, "mask_patch_size": 32, "mask_ratio": 0.6}}, path)
    return path


@pytest.fixture(scope="module")
def pretrain_ckpt_96(tmp_path_factory) -> Path:
    """swin_tiny_cpu pretrained at 96 px (the linear probe runs the encoder at its pretraining size)."""
    torch.manual_seed(0)
    model = create_model("swin_tiny_cpu", img_size=96)
    path = tmp_path_factory.mktemp("pre96") / "checkpoint_00000001.pt"
    torch.save({"format": PRETRAIN_FORMAT, "model": model.state_dict(), "step": 1, "args": {"preset": "swin_tiny_cpu"},
                "plan": {"img_size": 96, "mask_patch_size": 32, "mask_ratio": 0.6}}, path)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# layer-wise lr decay
# ---------------------------------------------------------------------------------------------
def official_swin_layer(name: str, num_layers: int, depths) -> int:
    """The official get_swin_layer, restated, on official-layout names."""
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        stage, block = int(name.split(".")[1]), name.split(".")[3]
        if block in ("reduction", "norm"):
            return sum(depths[: stage + 1])
        return sum(depths[:stage]) + int(block) + 1
    return num_layers - 1


def to_official_name(name: str) -> str:
    """timm puts the patch merging at the start of stage s, the official code at the end of stage s-1."""
    parts = name.split(".")
    if name.startswith("layers.") and parts[2] == "downsample":
        parts[1] = str(int(parts[1]) - 1)
    return ".".join(parts)


def expect_no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 1 or name.endswith(".bias") or "relative_position_bias_table" in name or \
        name in ("cls_token", "mask_token", "pos_embed", "absolute_pos_embed")


def check_groups(model, groups, level_of, levels, decay, lr, wd):
    by_param = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in by_param, "a parameter in two groups"
            by_param[id(p)] = g
    expected_keys = set()
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        level = level_of(name)
        scale = decay ** (levels - 1 - level)
        assert g["lr_scale"] == pytest.approx(scale, rel=1e-12), name
        assert g["lr"] == pytest.approx(lr * scale, rel=1e-12), name
        assert g["weight_decay"] == (0.0 if expect_no_decay(name, p) else wd), name
        expected_keys.add((level, expect_no_decay(name, p)))
    assert len(by_param) == sum(1 for _ in model.parameters())
    assert len(groups) == len(expected_keys)


def test_layer_decay_swin_matches_the_official_assignment():
    spec = classifier_spec("swin_base_224", num_classes=10)
    with torch.device("meta"):
        model = build_classifier(spec, attn_backend="timm")
    depths = spec["kwargs"]["depths"]
    levels = sum(depths) + 2
    groups = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    check_groups(model, groups, lambda n: official_swin_layer(to_official_name(n), levels, depths), levels, 0.9, 1e-3, 0.05)
    scale = {n: g["lr_scale"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.9 ** 25)   # Swin-B: 24 blocks, 26 levels
    assert scale["layers.3.downsample.reduction.weight"] == pytest.approx(0.9 ** 3)  # = last block of stage 2 (level 22)
    assert scale["layers.2.blocks.17.attn.qkv.weight"] == pytest.approx(0.9 ** 3)
    assert scale["head.fc.weight"] == 1.0 and scale["norm.weight"] == 1.0


def test_layer_decay_vit_by_block_index():
    spec = classifier_spec("vit_base_224", num_classes=10)
    with torch.device("meta"):
        model = build_classifier(spec)
    depth = len(model.blocks)
    levels = depth + 2

    def level_of(name):  # independent: read the block index off the module tree
        for i, blk in enumerate(model.blocks):
            if any(name == f"blocks.{i}.{n}" for n, _ in blk.named_parameters()):
                return i + 1
        return 0 if name in ("cls_token", "pos_embed") or name.startswith("patch_embed") else depth + 1

    groups = layer_decay_param_groups(model, lr=2e-3, weight_decay=0.05, layer_decay=0.65)
    check_groups(model, groups, level_of, levels, 0.65, 2e-3, 0.05)
    assert len(groups) == 2 * levels  # every level has decayed weights and undecayed biases/norms/tokens
    by_name = {n: g for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert by_name["blocks.0.attn.relative_position_bias_table"]["weight_decay"] == 0.0
    assert by_name["blocks.11.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65)
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65 ** 13)


def test_scaled_scheduler_applies_each_groups_scale():
    model = build_classifier(classifier_spec("swin_tiny_cpu", num_classes=3, img_size=32, window_size=4))
    groups = layer_decay_param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    opt = torch.optim.AdamW(groups, lr=1.0)
    sched = ScaledWarmupScheduler(opt, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, total_steps=100, warmup_steps=10)
    for t in (0, 5, 10, 60, 99):
        base = sched.step_update(t)
        assert base == pytest.approx(sched.lr_at(t))
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base * g["lr_scale"], rel=1e-12)
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=1.5)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def test_train_transform_survives_randaugment_posterize_to_zero_bits():
    """timm's RandAugment at magnitude 10 asks posterize for 0 bits, which Pillow >= 13 rejects."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    black = np.asarray(_posterize_any_bits(img, 0))
    assert black.shape == (32, 32, 3) and black.max() == 0
    assert np.array_equal(np.asarray(_posterize_any_bits(img, 8)), np.asarray(img))
    t = build_train_transform(32)
    for s in range(200):  # seeds that hit magnitude-10 posterize are among these (22 with timm 1.0.31)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        assert t(img).shape == (3, 32, 32)


def test_item_seeded_samples_are_reproducible(colour_data):
    ds = ClassificationFolder(colour_data / "train", transform=build_train_transform(32))
    a, la, _ = ds[(5, 1234)]
    state = random.getstate()
    b, lb, _ = ds[(5, 1234)]
    assert torch.equal(a, b) and la == lb == 0 and random.getstate() == state
    assert ds.classes == sorted(COLOURS)


def test_split_dirs_errors(tmp_path, colour_data):
    with pytest.raises(FileNotFoundError, match="train"):
        split_dirs(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "b").mkdir(parents=True)
    for d in ("train/a", "val/b"):
        Image.new("RGB", (8, 8)).save(tmp_path / d / "x.png")
    (tmp_path / "train" / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c" / "x.png")
    with pytest.raises(ValueError, match="class folders differ"):
        split_dirs(tmp_path)


# ---------------------------------------------------------------------------------------------
# fine-tuning CLI
# ---------------------------------------------------------------------------------------------
def test_two_epoch_finetune_beats_chance_keeps_best_and_evaluates(tmp_path, colour_data, pretrain_ckpt, capsys):
    out = tmp_path / "ft"
    args = ["--data", str(colour_data), "--output", str(out), "--pretrained", str(pretrain_ckpt), "--epochs", "2",
            "--log-every", "4", "--ema", "--ema-decay", "0.9", *SMALL]
    assert finetune.main(args) == 0
    rows = read_csv(out / "eval.csv")
    assert [int(r["step"]) for r in rows] == [12, 24]  # 96 images / batch 8 = 12 steps per epoch
    acc = [float(r["acc1"]) for r in rows]
    assert acc[-1] > 50.0, f"4 classes: chance is 25 %, got {acc}"
    assert rows[-1]["ema_acc1"] != "" and float(rows[-1]["best_acc1"]) == max(acc)
    assert {"best.pt", "best_ema.pt", "metrics.csv", "checkpoint_00000024.pt"} <= {p.name for p in out.iterdir()}
    best = read_checkpoint(out / "best.pt")
    assert best.kind == "finetune" and best.meta["classes"] == sorted(COLOURS)
    assert best.meta["spec"]["kwargs"]["window_size"] == 4 and best.meta["metrics"]["acc1"] == max(acc)
    capsys.readouterr()
    assert finetune.main(["--eval", "--resume", str(out / "best.pt"), "--data", str(colour_data), "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 {max(acc):.2f}%" in printed


def test_resume_mid_epoch_gives_the_same_result_as_an_uninterrupted_run(tmp_path, colour_small):
    """Stopped at step 6 (mid epoch 2 of 4-step epochs), resumed: same losses and accuracies, bit for bit
    (per-sample augmentation seeds; torch/numpy/python RNG states, optimizer and scheduler restored)."""
    common = ["--data", str(colour_small), "--epochs", "2", "--seed", "3", "--log-every", "2", *SMALL]
    ref = tmp_path / "ref"
    assert finetune.main([*common, "--output", str(ref)]) == 0
    split = tmp_path / "split"
    assert finetune.main([*common, "--output", str(split), "--max-steps", "6"]) == 0
    assert finetune.main([*common, "--output", str(split), "--resume"]) == 0
    by_step = {r["step"]: r for r in read_csv(split / "eval.csv")}
    assert sorted(by_step, key=int) == ["4", "6", "8"]  # the stop at step 6 evaluated and saved too
    assert [by_step["4"], by_step["8"]] == read_csv(ref / "eval.csv")
    assert read_csv(split / "metrics.csv") != [] and \
        [(r["step"], r["loss"]) for r in read_csv(split / "metrics.csv")] == [(r["step"], r["loss"]) for r in read_csv(ref / "metrics.csv")]


def test_vit_finetune_runs(tmp_path, colour_data):
    out = tmp_path / "vit"
    assert finetune.main(["--preset", "vit_tiny_cpu", "--data", str(colour_data), "--output", str(out), "--img-size", "32",
                          "--batch-size", "8", "--num-workers", "0", "--max-steps", "3", "--mixup", "0", "--cutmix", "0"]) == 0
    assert read_csv(out / "eval.csv")[-1]["step"] == "3"


def test_finetune_bad_input(tmp_path, colour_data, capsys):
    base = ["--data", str(colour_data), "--num-workers", "0"]

    def err(args) -> str:
        assert finetune.main([*base, *args]) == 2
        return capsys.readouterr().err

    assert "unknown fine-tuning preset" in err(["--preset", "nope", "--output", str(tmp_path / "a")])
    assert "cannot run the fine-tuning DALI pipeline" in err(["--data-backend", "dali", *SMALL, "--output", str(tmp_path / "b")])
    assert "even batch size" in err(["--batch-size", "7", "--output", str(tmp_path / "c")])
    assert "--layer-decay" in err(["--layer-decay", "1.5", "--output", str(tmp_path / "d")])
    assert "--window-size" in err(["--preset", "vit_tiny_cpu", "--window-size", "7", "--output", str(tmp_path / "e")])
    assert "multiple of the encoder stride" in err(["--img-size", "40", "--output", str(tmp_path / "f")])
    assert "does not exist" in err(["--pretrained", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "g"), *SMALL])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"layer_decayy": 0.5}))
    assert "unknown key" in err(["--config", str(cfg)])
    assert "expected" in err(["--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "h")])


def test_official_and_small_presets_mirror_the_official_configs():
    assert FINETUNE_PRESETS["swin_base_224"].recipe.layer_decay == 0.9
    assert FINETUNE_PRESETS["vit_base_224"].recipe.layer_decay == 0.65
    assert FINETUNE_PRESETS["swin_large_224"].overrides["window_size"] == 14
    spec = classifier_spec("swin_base_224", num_classes=1000)
    assert spec["kwargs"]["img_size"] == 224 and spec["kwargs"]["window_size"] == 7
    assert spec["kwargs"]["drop_path_rate"] == 0.1 and spec["kwargs"]["embed_dim"] == 128
    vit = classifier_spec("vit_base_224", num_classes=1000)["kwargs"]
    assert vit["use_rel_pos_bias"] and not vit["use_shared_rel_pos_bias"] and vit["global_pool"] == "avg"
    r = FINETUNE_PRESETS["swin_base_224"].recipe
    assert (r.base_lr, r.warmup_lr, r.min_lr, r.warmup_epochs, r.epochs) == (1.25e-3, 2.5e-7, 2.5e-7, 20, 100)
    assert (r.mixup, r.cutmix, r.label_smoothing, r.reprob, r.auto_augment) == (0.8, 1.0, 0.1, 0.25, "rand-m9-mstd0.5-inc1")


# ---------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------
def test_linear_probe_trains_only_the_head_and_beats_chance(tmp_path, colour_data, pretrain_ckpt_96, capsys):
    out = tmp_path / "lp"
    before = serialization.load(pretrain_ckpt_96)["model"]
    res = linear_probe.linear_probe(linear_probe.parse_args([
        "--pretrained", str(pretrain_ckpt_96), "--data", str(colour_data), "--output", str(out), "--precompute",
        "--epochs", "3", "--warmup-epochs", "0", "--batch-size", "16", "--num-workers", "0"]))
    assert res["best"]["acc1"] > 50.0, res
    rows = read_csv(out / "eval.csv")
    assert len(rows) == 3 and (out / "best.pt").is_file()
    head = serialization.load(out / "best.pt")["head"]
    assert set(head) >= {"1.weight", "1.bias"} and "0.running_mean" in head and "0.weight" not in head  # BN without affine
    # the encoder is frozen: the probe never touches it (it is rebuilt from the unchanged checkpoint)
    assert all(torch.equal(v, serialization.load(pretrain_ckpt_96)["model"][k]) for k, v in before.items())


def test_linear_probe_augmented_path_and_bad_input(tmp_path, colour_data, pretrain_ckpt_96, capsys):
    out = tmp_path / "lp2"
    assert linear_probe.main(["--pretrained", str(pretrain_ckpt_96), "--data", str(colour_data), "--output", str(out),
                              "--epochs", "1", "--batch-size", "32", "--num-workers", "0"]) == 0
    assert len(read_csv(out / "eval.csv")) == 1
    assert linear_probe.main(["--data", str(colour_data), "--output", str(tmp_path / "x")]) == 2
    assert "--pretrained" in capsys.readouterr().err
    assert linear_probe.main(["--pretrained", str(pretrain_ckpt_96), "--data", str(colour_data), "--batch-size", "1000",
                              "--output", str(tmp_path / "y"), "--num-workers", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_process_gloo_matches_single_process(tmp_path):
    """2 ranks x batch 4 (gloo, CPU) = 1 process x batch 8: same scaled lr, same samples (per-item seeds),
    the whole (odd-sized) val set evaluated once across ranks. Drop-path and mixup off (their draws are per rank)."""
    data = make_colour_data(tmp_path / "data", 8, 4)
    Image.new("RGB", (32, 32), COLOURS["red"]).save(data / "val" / "red" / "extra.png")  # 17 val images
    common = ["--data", str(data), "--max-steps", "2", "--log-every", "1", "--img-size", "32", "--window-size", "4",
              "--num-workers", "0", "--seed", "3", "--drop-path", "0", "--mixup", "0", "--cutmix", "0", "--warmup-epochs", "0"]
    ddp = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), "-m", "simmim_fast.finetune", *common, "--batch-size", "4", "--output", str(ddp)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    single = tmp_path / "single"
    # torchrun gives each rank one thread (OMP_NUM_THREADS=1): the single process must sum in the same order,
    # else AdamW's division by sqrt(v) amplifies last-bit gradient differences into visible weight changes
    assert finetune.main([*common, "--batch-size", "8", "--threads", "1", "--output", str(single)]) == 0
    d, s = read_csv(ddp / "eval.csv")[-1], read_csv(single / "eval.csv")[-1]
    assert d["images"] == s["images"] == "17"  # every val image once: no padding, no duplicates
    assert float(d["loss"]) == pytest.approx(float(s["loss"]), rel=1e-4)
    sd = serialization.load(ddp / "checkpoint_00000002.pt")
    ss = serialization.load(single / "checkpoint_00000002.pt")
    assert sd["world_size"] == 2 and sd["plan"]["lr"] == pytest.approx(ss["plan"]["lr"])
    for k, v in ss["model"].items():
        torch.testing.assert_close(sd["model"][k], v, atol=1e-5, rtol=1e-4)


def test_linear_probe_nan_stops_without_saving(tmp_path, colour_data, pretrain_ckpt_96, capsys):
    out = tmp_path / "lp_nan"
    rc = linear_probe.main(["--pretrained", str(pretrain_ckpt_96), "--data", str(colour_data), "--output", str(out),
                            "--precompute", "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16",
                            "--num-workers", "0", "--base-lr", "1e38"])
    assert rc == 3
    assert "NaN/inf" in capsys.readouterr().err
    assert not list(out.glob("checkpoint_*.pt")) and not (out / "best.pt").exists()
