"""The training CLI end to end on CPU: checkpoints, PNGs, resume, SIGKILL + resume, DDP (gloo), NaN stop, bad input.

Runs use the small preset at 96 px (grid 24, mask cells 3x3) so that each step takes ~0.1 s on 2 cores.
"""
from __future__ import annotations

import csv
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from simmim_fast import train
from simmim_fast.training.checkpoint import list_checkpoints, load_checkpoint

FAST = ["--img-size", "96", "--batch-size", "2", "--num-workers", "0"]


def read_losses(run: Path) -> dict[int, str]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f)}


def run_cli(args, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "simmim_fast.train", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_short_run_writes_checkpoint_png_and_resumes(tmp_path, cache_env, capsys):
    out = tmp_path / "run"
    assert train.main(["--max-steps", "4", "--output", str(out), "--log-every", "2", *FAST]) == 0
    assert [s for s, _ in list_checkpoints(out)] == [4]
    assert (out / "reconstruction_00000004.png").is_file()
    assert sorted(read_losses(out)) == [2, 4]
    state = load_checkpoint(out / "checkpoint_00000004.pt")
    assert state["step"] == 4 and state["args"]["preset"] == "swin_tiny_cpu"
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "plan"} <= set(state)

    assert train.main(["--max-steps", "6", "--output", str(out), "--resume", "--log-every", "2", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 4" in printed
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    assert sorted(read_losses(out)) == [2, 4, 6]
    assert (out / "reconstruction_00000006.png").is_file()


def test_existing_run_needs_resume_flag(tmp_path, cache_env, capsys):
    out = tmp_path / "run"
    assert train.main(["--max-steps", "1", "--output", str(out), *FAST]) == 0
    assert train.main(["--max-steps", "2", "--output", str(out), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err


def test_sigkill_midway_resumes_with_identical_losses(tmp_path, cache_env):
    """An uninterrupted run and a run killed with SIGKILL then resumed log the same losses after the checkpoint."""
    steps = 30
    # one torch thread on both sides: the automatic choice (cores minus loader workers) differs between
    # 0 and 2 workers, and CPU sums depend on the thread count
    common = ["--max-steps", str(steps), "--save-every", "3", "--log-every", "1", "--keep-checkpoints", "0",
              "--img-size", "96", "--batch-size", "2", "--seed", "7", "--threads", "1"]
    ref = tmp_path / "ref"
    r = run_cli([*common, "--output", str(ref), "--num-workers", "0"], cache_env)
    assert r.returncode == 0, r.stderr
    ref_losses = read_losses(ref)
    assert sorted(ref_losses) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    # the interrupted run uses 2 loader workers: the result must not depend on them
    proc = subprocess.Popen(
        [sys.executable, "-m", "simmim_fast.train", *common, "--output", str(killed), "--num-workers", "2"],
        env=cache_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    # no clock: the run itself ends (at --max-steps), so the wait is bounded by it on any machine
    while True:
        done = [s for s, _ in list_checkpoints(killed)]
        if done and done[-1] >= 6:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.02)
    assert proc.poll() is None, "the run must still be going when it is killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    resumed_at = list_checkpoints(killed)[-1][0]
    assert 6 <= resumed_at < steps

    r = run_cli([*common, "--output", str(killed), "--num-workers", "2", "--resume"], cache_env)
    assert r.returncode == 0, r.stderr
    assert f"at step {resumed_at}" in r.stdout
    got = read_losses(killed)
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert got[s] == ref_losses[s], f"step {s}: {got[s]} != {ref_losses[s]} (resumed at {resumed_at})"
    a = load_checkpoint(ref / f"checkpoint_{steps:08d}.pt")["model"]
    b = load_checkpoint(killed / f"checkpoint_{steps:08d}.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_process_gloo_matches_single_process(tmp_path, cache_env):
    """2 ranks x batch 2 (gloo, CPU) take the same steps as 1 process x batch 4 on the same samples."""
    common = ["--max-steps", "2", "--log-every", "1", "--img-size", "96", "--num-workers", "0", "--seed", "3"]
    ddp = tmp_path / "ddp"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "simmim_fast.train", *common, "--batch-size", "2", "--output", str(ddp)],
        env=cache_env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    single = tmp_path / "single"
    r = run_cli([*common, "--batch-size", "4", "--output", str(single)], cache_env)
    assert r.returncode == 0, r.stderr

    sd = load_checkpoint(ddp / "checkpoint_00000002.pt")
    ss = load_checkpoint(single / "checkpoint_00000002.pt")
    assert sd["world_size"] == 2 and ss["world_size"] == 1
    assert sd["plan"]["lr"] == pytest.approx(ss["plan"]["lr"])  # same total batch 4 -> same scaled lr
    ld, ls = read_losses(ddp), read_losses(single)
    for s in (1, 2):
        assert float(ld[s]) == pytest.approx(float(ls[s]), rel=1e-5, abs=1e-6)
    for k, v in ss["model"].items():
        torch.testing.assert_close(sd["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cache_env, capsys):
    out = tmp_path / "run"
    rc = train.main(["--max-steps", "8", "--save-every", "2", "--log-every", "1", "--output", str(out),
                     "--base-lr", "1e30", "--warmup-epochs", "0", *FAST])
    err = capsys.readouterr().err
    assert rc == 3
    assert "NaN/inf" in err and "last good checkpoint" in err
    ckpts = list_checkpoints(out)
    for _, p in ckpts:  # whatever was saved holds finite weights
        assert all(torch.isfinite(v).all() for v in load_checkpoint(p)["model"].values() if v.is_floating_point())
    assert max(read_losses(out)) < 8


def test_yaml_config_and_flag_precedence(tmp_path, cache_env):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"max-steps": 1, "mask_ratio": 0.4, "loss": "l2", "img_size": 96, "batch_size": 2,
                                   "num_workers": 0, "seed": 5}))
    a = train.parse_args(["--config", str(cfg), "--seed", "9"])
    assert (a.max_steps, a.mask_ratio, a.loss, a.img_size, a.seed) == (1, 0.4, "l2", 96, 9)
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--output", str(out)]) == 0
    state = load_checkpoint(out / "checkpoint_00000001.pt")
    assert state["plan"]["mask_ratio"] == 0.4 and state["args"]["loss"] == "l2"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--data", "/nonexistent/images"], "--data"),
        (["--mask-patch-size", "40"], "--mask-patch-size"),
        (["--img-size", "100"], "--mask-patch-size"),
        (["--preset", "bogus"], "swin_base_192"),
        (["--batch-size", "0"], "--batch-size"),
        (["--mask-ratio", "1.5"], "--mask-ratio"),
        (["--mask-ratio", "0"], "--mask-ratio"),
        (["--mask-ratio", "1"], "--mask-ratio"),
        (["--base-lr", "inf"], "--base-lr"),
        (["--base-lr", "0"], "--base-lr"),
        (["--min-lr=-1e-5"], "--min-lr"),
        (["--warmup-epochs", "-1"], "--warmup-epochs"),
        (["--weight-decay", "-0.05"], "--weight-decay"),
        (["--clip-grad", "nan"], "--clip-grad"),
        (["--drop-path", "2"], "--drop-path"),
        (["--keep-checkpoints", "-1"], "--keep-checkpoints"),
        (["--vis-images", "0"], "--vis-images"),
        (["--vis-every", "-5"], "--vis-every"),
        (["--device", "cuda:0"], "--device"),
        (["--device", "tpu"], "--device"),
        (["--accum-steps", "0"], "--accum-steps"),
        (["--preset", "vit_tiny_cpu", "--attn-backend", "sdpa"], "--attn-backend"),
    ],
)
def test_bad_input_names_the_argument(tmp_path, cache_env, capsys, argv, needle):
    if needle == "--device" and "cuda" in argv[1] and torch.cuda.is_available():
        pytest.skip("a CUDA device exists")
    rc = train.main([*argv, "--output", str(tmp_path / "run"), "--max-steps", "1"])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_bad_config_key(tmp_path, cache_env, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 3\n")
    assert train.main(["--config", str(cfg)]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_empty_data_folder(tmp_path, cache_env, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(["--data", str(tmp_path / "empty"), "--output", str(tmp_path / "run"), *FAST]) == 2
    assert "empty" in capsys.readouterr().err


def test_precision_and_accumulation_options_run(tmp_path, cache_env):
    for i, extra in enumerate([["--precision", "bf16"], ["--precision", "fp16"], ["--accum-steps", "2"],
                               ["--grad-checkpointing", "--mask-strategy", "block", "--predict", "all"],
                               ["--attn-backend", "math", "--loss", "smooth_l1"]]):
        out = tmp_path / f"run{i}"
        assert train.main(["--max-steps", "2", "--output", str(out), *FAST, *extra]) == 0, extra
        assert (out / "checkpoint_00000002.pt").is_file()


def test_resume_keeps_the_runs_settings_unless_overridden(tmp_path, cache_env):
    """``--resume`` continues the same run: unspecified settings come from the checkpoint, flags still win."""
    out = tmp_path / "run"
    assert train.main(["--max-steps", "2", "--output", str(out), "--mask-ratio", "0.5", "--seed", "4", *FAST]) == 0
    a = train.parse_args(["--max-steps", "3", "--output", str(out), "--resume", "--loss", "l2"])
    assert (a.img_size, a.batch_size, a.mask_ratio, a.seed, a.max_steps, a.loss) == (96, 2, 0.5, 4, 3, "l2")
    assert train.main(["--max-steps", "3", "--output", str(out), "--resume"]) == 0
    state = load_checkpoint(out / "checkpoint_00000003.pt")
    assert state["plan"]["batch_size"] == 2 and state["plan"]["img_size"] == 96 and state["plan"]["mask_ratio"] == 0.5
