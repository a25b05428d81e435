"""The CLI layer: one declaration per option, checks before any work, one-line errors, fast ``--help``.

Most checks call the parse/validate functions in process (no model, no data). Three subprocesses, each
without torch: ``--help`` / path errors import no torch, and one end-to-end exit code with and without
``--debug``. One linear-probe run (tiny data, precomputed features) checks its step-named checkpoints.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import finetune, linear_probe, probe, train, visualize
from simmim_fast.cli import names
from simmim_fast.cli.commands import FINETUNE, LINEAR_PROBE, PROBE, TRAIN, VISUALIZE
from simmim_fast.cli.options import UsageError
from simmim_fast.training import checkpoint as ckpt

COMMANDS = {"train": TRAIN, "finetune": FINETUNE, "linear_probe": LINEAR_PROBE, "visualize": VISUALIZE, "probe": PROBE}
WITH_CONFIG = ("train", "finetune", "linear_probe")


@pytest.fixture
def paths(tmp_path):
    """A file (stands in for a checkpoint: only its existence is checked here), a folder, a missing path."""
    f = tmp_path / "checkpoint_00000001.pt"
    f.write_bytes(b"not read by the checks")
    d = tmp_path / "run"
    d.mkdir()
    return {"file": str(f), "dir": str(d), "missing": str(tmp_path / "nowhere"), "tmp": tmp_path}


def _usage_error(cmd, argv) -> str:
    with pytest.raises(UsageError) as e:
        cmd.parse(argv)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# the names the light layer accepts are the ones the heavy modules define
# ---------------------------------------------------------------------------------------------
def test_names_agree_with_the_modules_that_use_them():
    from simmim_fast.data.dali import DATA_BACKENDS
    from simmim_fast.data.masking import STRATEGIES
    from simmim_fast.jobs.pretrain import PRECISIONS
    from simmim_fast.jobs.probe import POOLS
    from simmim_fast.models import DEFAULT_PRESET, PRESETS
    from simmim_fast.models.classifier import ATTN_BACKENDS, DEFAULT_FINETUNE_PRESET, FINETUNE_PRESETS
    from simmim_fast.ops.masked_l1_loss import LOSSES, REGIONS

    assert names.PRESETS == tuple(PRESETS) and names.DEFAULT_PRESET == DEFAULT_PRESET
    assert names.FINETUNE_PRESETS == tuple(FINETUNE_PRESETS) and names.DEFAULT_FINETUNE_PRESET == DEFAULT_FINETUNE_PRESET
    assert names.MASK_STRATEGIES == STRATEGIES and names.DATA_BACKENDS == DATA_BACKENDS
    assert (names.LOSSES, names.REGIONS, names.ATTN_BACKENDS, names.POOLS) == (LOSSES, REGIONS, ATTN_BACKENDS, POOLS)
    assert names.PRECISIONS == ("auto", *PRECISIONS)
    from simmim_fast.models.presets import RECIPES

    assert names.RECIPES == RECIPES


def test_one_declaration_gives_the_dataclass_the_parser_and_the_help():
    for cli, (module, cls) in {"train": (train, "TrainArgs"), "finetune": (finetune, "FinetuneArgs"),
                               "linear_probe": (linear_probe, "ProbeArgs"), "visualize": (visualize, "VisualizeArgs"),
                               "probe": (probe, "OcclusionProbeArgs")}.items():
        cmd = COMMANDS[cli]
        args = getattr(module, cls)()
        assert {k: getattr(args, k) for k in cmd.defaults()} == cmd.defaults()
        help_text = cmd.build_parser().format_help()
        assert "(default: None)" not in help_text and "--debug" in help_text
        assert all(o.flag in help_text for o in cmd.options)
    assert "(default: 2)" in TRAIN.build_parser().format_help()  # --keep-checkpoints, once
    assert TRAIN.not_resumed == ("output", "resume", "max_steps", "device", "num_workers", "threads",
                                 "log_all_ranks", "strategy", "data_backend", "compile", "compile_backend",
                                 "cuda_graphs", "force")


def test_heavy_names_are_still_importable_from_the_cli_modules():
    from simmim_fast.jobs import finetune as ft_job
    from simmim_fast.jobs import pretrain
    from simmim_fast.train import default_run_dir, make_plan, train as train_fn  # noqa: F401
    from simmim_fast.visualize import build_eval_transform, reconstruct  # noqa: F401

    assert train_fn is pretrain.train and finetune.evaluate is ft_job.evaluate
    with pytest.raises(AttributeError, match="simmim_fast.train"):
        train.no_such_name  # noqa: B018
    import simmim_fast

    from simmim_fast.data.masking import MaskGenerator
    assert simmim_fast.MaskGenerator is MaskGenerator and simmim_fast.ops.__name__ == "simmim_fast.ops"


# ---------------------------------------------------------------------------------------------
# bad values, each kind, per CLI: one line that names the flag and what was expected
# ---------------------------------------------------------------------------------------------
BAD = [
    ("train", ["--batch-size", "x"], "--batch-size: expected a positive integer, got 'x'"),
    ("train", ["--epochs", "0"], "--epochs: expected a positive integer"),
    ("train", ["--epochs", "1.5"], "--epochs: expected a positive integer"),
    ("train", ["--base-lr", "nan"], "--base-lr: expected a positive finite number"),
    ("train", ["--base-lr", "0"], "--base-lr: expected a positive finite number"),
    ("train", ["--warmup-epochs", "-1"], "--warmup-epochs: expected a finite number >= 0"),
    ("train", ["--weight-decay=-0.1"], "--weight-decay: expected a finite number >= 0"),
    ("train", ["--clip-grad", "inf"], "--clip-grad: expected a finite number >= 0"),
    ("train", ["--mask-ratio", "0"], "--mask-ratio: expected a number in (0, 1)"),
    ("train", ["--drop-path", "1"], "--drop-path: expected a number in [0, 1)"),
    ("train", ["--keep-checkpoints", "-1"], "--keep-checkpoints: expected an integer >= 0"),
    ("train", ["--vis-images", "0"], "--vis-images: expected a positive integer"),
    ("train", ["--threads", "0"], "--threads: expected a positive integer"),
    ("train", ["--seed", "-3"], "--seed: expected an integer >= 0"),
    ("train", ["--loss", "l3"], "--loss: expected one of l1, l2, smooth_l1, got 'l3'"),
    ("train", ["--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("train", ["--preset", "bogus"], "--preset: unknown preset 'bogus'; expected one of swin_base_192"),
    ("train", ["--img-size", "96", "--mask-patch-size", "40"], "--mask-patch-size: 40 must divide --img-size 96"),
    ("train", ["--data", "{missing}"], "--data: {missing} does not exist (expected a folder of images)"),
    ("train", ["--data", "{file}"], "--data: {file} is a file"),
    ("train", ["--resume", "{missing}"], "--resume: {missing} does not exist (expected a checkpoint file)"),
    ("train", ["--output", "{file}"], "--output: {file} is a file (expected a run folder)"),
    ("train", ["--output", "{file}/sub"], "--output: {file}/sub cannot be created"),
    ("train", ["--config", "{missing}"], "--config: {missing} does not exist (expected a YAML file)"),
    ("train", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ("train", ["--batch-size"], "argument --batch-size: expected one argument"),
    ("finetune", ["--preset", "nope"], "--preset: unknown fine-tuning preset 'nope'"),
    ("finetune", ["--layer-decay", "0"], "--layer-decay: expected a number in (0, 1]"),
    ("finetune", ["--label-smoothing", "1"], "--label-smoothing: expected a number in [0, 1)"),
    ("finetune", ["--mixup-prob", "1.5"], "--mixup-prob: expected a number in [0, 1]"),
    ("finetune", ["--ema-decay", "1"], "--ema-decay: expected a number in (0, 1)"),
    ("finetune", ["--mixup-mode", "x"], "--mixup-mode: expected one of batch, pair, elem"),
    ("finetune", ["--window-size", "0"], "--window-size: expected a positive integer"),
    ("finetune", ["--batch-size", "7", "--mixup", "0.8", "--cutmix", "0"], "--batch-size: mixup/cutmix need an even"),
    ("finetune", ["--pretrained", "{missing}"], "--pretrained: {missing} does not exist"),
    ("finetune", ["--data", "{missing}"], "expected a folder with train/<class>/ and val/<class>/"),
    ("linear_probe", ["--momentum", "1"], "--momentum: expected a number in [0, 1)"),
    ("linear_probe", ["--base-lr", "0"], "--base-lr: expected a positive finite number"),
    ("linear_probe", ["--preset", "nope"], "--preset: unknown preset 'nope'"),
    ("visualize", ["--checkpoint", "{file}", "--num-images", "0"], "--num-images: expected a positive integer"),
    ("visualize", ["--checkpoint", "{file}", "--mask-ratio", "1"], "--mask-ratio: expected a number in (0, 1)"),
    ("visualize", ["--checkpoint", "{file}", "--mask-strategy", "x"], "--mask-strategy: expected one of random"),
    ("visualize", ["--checkpoint", "{file}", "--output", "{dir}"], "--output: {dir} is a folder (expected the PNG"),
    ("visualize", ["--checkpoint", "{file}", "--images", "{dir}", "{missing}"], "--images: {missing} does not exist"),
    ("visualize", ["--checkpoint", "{missing}"], "--checkpoint: {missing} does not exist"),
    ("visualize", ["--config", "x.yaml"], "unrecognized arguments: --config"),
    ("probe", ["--checkpoint", "{file}", "--all"], "--all: --checkpoint must be a run folder"),
    ("probe", ["--checkpoint", "{dir}", "--num-images", "1"], "--num-images: expected at least 2 images"),
    ("probe", ["--checkpoint", "{dir}", "--pool", "max"], "--pool: expected one of mean, tokens"),
    ("probe", ["--checkpoint", "{dir}", "--device", "tpu"], "--device: expected auto, cpu"),
]


@pytest.mark.parametrize("cli, argv, needle", BAD, ids=[f"{c}:{' '.join(a)}" for c, a, _ in BAD])
def test_bad_values_name_the_flag_and_what_was_expected(paths, cli, argv, needle):
    argv = [a.format(**paths) for a in argv]
    assert needle.format(**paths) in _usage_error(COMMANDS[cli], argv)


def test_good_values_are_typed():
    v = TRAIN.parse(["--batch-size", "4", "--base-lr", "1e-3", "--grad-checkpointing", "--resume", "--mask-ratio", "0.5"])
    assert v == {"batch_size": 4, "base_lr": 1e-3, "grad_checkpointing": True, "resume": "auto", "mask_ratio": 0.5}
    assert TRAIN.parse([]) == {}  # the default job: nothing given, nothing refused


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: permissions do not apply")
def test_output_that_is_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "is not writable" in _usage_error(TRAIN, ["--output", str(ro / "run")])
        assert "is not writable" in _usage_error(VISUALIZE, ["--checkpoint", str(tmp_path), "--output", str(ro / "x.png")])
    finally:
        ro.chmod(0o700)


def test_required_options(paths):
    with pytest.raises(UsageError, match="--checkpoint: missing"):
        visualize.parse_args([])
    with pytest.raises(UsageError, match="--checkpoint: missing"):
        probe.parse_args([])
    with pytest.raises(UsageError, match="--pretrained: missing"):
        linear_probe.parse_args(["--data", paths["dir"]])


def test_values_resolved_later_are_checked_by_the_same_rules(tmp_path):
    from simmim_fast.training.distributed import DistInfo

    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(UsageError, match=r"--mask-patch-size: 32 must divide --img-size 100"):  # 32: the recipe's
        train.make_plan(train.parse_args(["--img-size", "100"]), cpu)
    with pytest.raises(UsageError, match="even batch size"):  # mixup from the recipe, batch from the flag
        finetune.make_plan(finetune.parse_args(["--batch-size", "7"]), cpu)
    # a resumed run's stored settings are checked too, and the error says where the value came from
    old = tmp_path / "old.pt"
    torch.save({"args": {"preset": "swin_tiny_cpu", "mask_ratio": 1.0}}, old)
    with pytest.raises(UsageError, match=r"--mask-ratio \(the setting of the resumed run\)"):
        train.parse_args(["--resume", str(old), "--output", str(tmp_path / "o")])
    assert train.parse_args(["--resume", str(old), "--output", str(tmp_path / "o"), "--mask-ratio", "0.5"]).mask_ratio == 0.5


# ---------------------------------------------------------------------------------------------
# YAML --config: file:line errors, types, refused tags, unknown keys
# ---------------------------------------------------------------------------------------------
YAML_BAD = [
    ("seed: 1\nbatch_size: [oops\n", "{f}:2: expected ',' or ']'"),  # parse error at the line it starts
    ("seed: 1\n\tepochs: 2\n", "{f}:2: found character '\\t'"),
    ("data: 5\n", "{f}:1: data: expected a path to"),
    ("seed: 0\nbatch_size: \"x\"\n", "{f}:2: batch_size: expected a positive integer, got 'x'"),
    ("batch_size: 8.0\n", "{f}:1: batch_size: expected a positive integer, got 8.0"),
    ("base_lr: fast\n", "{f}:1: base_lr: expected a positive finite number, got 'fast'"),
    ("seed: 1\nlearning_rate: 3\n", "{f}:2: unknown key 'learning_rate'"),
    ("seed: 1\nseed: 2\n", "{f}:2: key 'seed' given twice (first at line 1)"),
    ("- seed\n- 1\n", "{f}:1: expected a mapping of option: value"),
    ("seed: !!python/object/apply:os.system [\"touch {marker}\"]\n", "{f}:1: a Python object tag"),
]


@pytest.mark.parametrize("cli", WITH_CONFIG)
@pytest.mark.parametrize("text, needle", YAML_BAD, ids=[n.split(": ", 1)[1][:24] for _, n in YAML_BAD])
def test_yaml_errors_name_the_file_and_line(tmp_path, cli, text, needle):
    f, marker = tmp_path / "c.yaml", tmp_path / "marker"
    f.write_text(text.format(marker=marker))
    assert needle.format(f=f) in _usage_error(COMMANDS[cli], ["--config", str(f)])
    assert not marker.exists()


def test_yaml_values_typed_and_flags_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base-lr: 1e-4\nmax_steps: 3\nepochs:\nseed: 2\nmask_strategy: block\n")  # 1e-4: a string to PyYAML
    v = TRAIN.parse(["--config", str(f), "--seed", "7"])
    assert v == {"base_lr": 1e-4, "max_steps": 3, "seed": 7, "mask_strategy": "block"}  # null: the default
    f.write_text("layer_decayy: 0.5\n")
    assert "did you mean 'layer_decay'?" in _usage_error(FINETUNE, ["--config", str(f)])


def test_main_exits_2_with_one_line_and_help_exits_0(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: [oops\n")
    assert train.main(["--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {f}:1:") and "Traceback" not in err
    assert finetune.main(["--config", str(f), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(f"error: {f}:1:")
    assert linear_probe.main(["--help"]) == 0
    assert "--pretrained" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# subprocesses: no torch for --help and argument errors; the exit code end to end
# ---------------------------------------------------------------------------------------------
_NO_TORCH = r"""
import contextlib, io, sys
from simmim_fast import train, finetune, linear_probe, visualize, probe
cases = [(train, ["--data", "/nonexistent/images"]), (train, ["--resume", "/nonexistent.pt"]),
         (train, ["--config", "/nonexistent.yaml"]), (finetune, ["--pretrained", "/nonexistent.pt"]),
         (linear_probe, ["--pretrained", "/nonexistent.pt"]), (visualize, ["--checkpoint", "/nonexistent"]),
         (probe, ["--checkpoint", "/nonexistent"])]
for m in (train, finetune, linear_probe, visualize, probe):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert m.main(["--help"]) == 0, m.__name__
    assert "usage: python -m " + m.__name__ in out.getvalue()
for m, argv in cases:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert m.main(argv) == 2, (m.__name__, argv)
    assert "does not exist" in err.getvalue(), err.getvalue()
print(sorted(n for n in ("torch", "timm", "triton", "torchvision", "nvidia.dali", "xformers") if n in sys.modules))
"""


def _python(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_help_and_path_errors_import_no_torch():
    r = _python("-c", _NO_TORCH)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    r = _python("-X", "importtime", "-m", "simmim_fast.train", "--help")  # the module run as a script, too
    assert r.returncode == 0 and "--keep-checkpoints" in r.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "simmim_fast.cli.options" in imported and not {"torch", "timm", "triton"} & imported


def test_exit_code_2_one_line_and_debug_traceback_end_to_end(tmp_path):
    r = _python("-m", "simmim_fast.train", "--batch-size", "x")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: --batch-size: expected a positive integer, got 'x'"]
    r = _python("-m", "simmim_fast.train", "--batch-size", "x", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr and "UsageError" in r.stderr
    assert r.stderr.splitlines()[-1] == "error: --batch-size: expected a positive integer, got 'x'"


# ---------------------------------------------------------------------------------------------
# linear probe: checkpoints named by step, resume (also from a folder of epoch-named files)
# ---------------------------------------------------------------------------------------------
def test_linear_probe_checkpoints_by_step_and_resume(tmp_path, capsys, monkeypatch):
    from simmim_fast.models import create_model
    from simmim_fast.models.interchange import PRETRAIN_FORMAT

    torch.manual_seed(0)
    pre = tmp_path / "pre.pt"
    torch.save({"format": PRETRAIN_FORMAT, "model": create_model("swin_tiny_cpu", img_size=96).state_dict(),
                "step": 1, "args": {"preset": "swin_tiny_cpu"},
                "plan": {"img_size": 96, "mask_patch_size": 32, "mask_ratio": 0.6}}, pre)
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / split / c / f"{i}.png")
    out = tmp_path / "lp"
    common = ["--pretrained", str(pre), "--data", str(data), "--output", str(out), "--precompute", "--batch-size", "4",
              "--warmup-epochs", "0", "--num-workers", "0"]
    assert linear_probe.main([*common, "--epochs", "1"]) == 0  # 8 images / batch 4: 2 steps per epoch
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    state = ckpt.load_checkpoint(out / "checkpoint_00000002.pt")
    assert (state["step"], state["epoch"]) == (2, 1)
    assert linear_probe.main([*common, "--epochs", "1"]) == 2  # no --resume: the folder's run is not overwritten
    assert "--resume" in capsys.readouterr().err
    assert linear_probe.main([*common, "--epochs", "2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out and [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    # a folder written before the rename (checkpoint_<epoch>.pt): resumed from the epoch stored in the file
    (out / "checkpoint_00000004.pt").unlink()
    (out / "checkpoint_00000002.pt").rename(out / "checkpoint_00000001.pt")
    assert linear_probe.main([*common, "--epochs", "2", "--resume"]) == 0
    assert "at epoch 1" in capsys.readouterr().out and [s for s, _ in ckpt.list_checkpoints(out)] == [1, 4]
