"""The README's main command can be run again, and CPU runs do not oversubscribe the cores."""
from __future__ import annotations

import pytest
import torch

from simmim_fast import train
from simmim_fast.training import checkpoint as ckpt
from simmim_fast.training import threads

FAST = ["--img-size", "96", "--batch-size", "2", "--num-workers", "0"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMIM_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _fake_run(folder, step=1):
    ckpt.atomic_save({"step": step}, ckpt.checkpoint_path(folder, step))


def test_default_run_dir_rule(tmp_path):
    root = tmp_path / "runs"
    assert train.default_run_dir("p", resume=False, root=root) == root / "p"
    assert train.default_run_dir("p", resume=True, root=root) == root / "p"
    _fake_run(root / "p")
    assert train.default_run_dir("p", resume=False, root=root) == root / "p-2"
    (root / "p-2").mkdir()  # a folder without checkpoints is reused
    assert train.default_run_dir("p", resume=False, root=root) == root / "p-2"
    _fake_run(root / "p-2")
    _fake_run(root / "p-10")
    assert train.default_run_dir("p", resume=False, root=root) == root / "p-3"
    assert train.default_run_dir("p", resume=True, root=root) == root / "p-10"  # the most recent run
    _fake_run(root / "pq")  # another preset's prefix is not a sibling
    assert train.default_run_dir("p", resume=False, root=root) == root / "p-3"


def test_main_command_twice_without_output_succeeds_twice(tmp_path, monkeypatch, capsys, keep_threads):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--max-steps", "1", *FAST]) == 0
    assert train.main(["--max-steps", "1", *FAST]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "runs" / "swin_tiny_cpu")] == [1]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "runs" / "swin_tiny_cpu-2")] == [1]
    # an explicit --output keeps the explicit rule: an existing run needs --resume
    assert train.main(["--max-steps", "1", "--output", "runs/swin_tiny_cpu", *FAST]) == 2
    assert "--resume" in capsys.readouterr().err


def test_thread_choice(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert threads.choose_threads(requested=None, num_workers=1)[0] == 1
    assert threads.choose_threads(requested=None, num_workers=0)[0] == 2
    assert threads.choose_threads(requested=None, num_workers=4)[0] == 1
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    assert threads.choose_threads(requested=None, num_workers=2, local_world_size=4)[0] == 2
    assert threads.choose_threads(requested=3, num_workers=8) == (3, "--threads")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--threads"):
            threads.choose_threads(requested=bad, num_workers=0)


def test_set_threads_respects_omp_and_cuda(monkeypatch, keep_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.set_threads(device=torch.device("cpu"), requested=None, num_workers=1) == 1
    assert torch.get_num_threads() == 1
    assert threads.set_threads(device=torch.device("cuda"), requested=None, num_workers=1) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.set_threads(device=torch.device("cpu"), requested=None, num_workers=1) is None
    assert threads.set_threads(device=torch.device("cpu"), requested=2, num_workers=1) == 2


def test_threads_flag_bad_value_exits_2(tmp_path, capsys, keep_threads):
    assert train.main(["--max-steps", "1", "--threads", "0", "--output", str(tmp_path / "r"), *FAST]) == 2
    assert "--threads" in capsys.readouterr().err


def test_resuming_a_finished_run_says_already_complete(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--max-steps", "2", "--output", str(out), *FAST]) == 0
    capsys.readouterr()
    assert train.main(["--max-steps", "2", "--output", str(out), "--resume", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "already complete: step 2/" in printed and "nan" not in printed


def test_loss_plot_and_cumulative_elapsed_across_a_resume(tmp_path):
    import csv

    from PIL import Image

    out = tmp_path / "run"
    assert train.main(["--max-steps", "4", "--log-every", "2", "--output", str(out), *FAST]) == 0
    assert train.main(["--max-steps", "6", "--log-every", "2", "--output", str(out), "--resume", *FAST]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [r["run"] for r in rows] == ["1", "1", "2"]
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[2] > elapsed[1]  # the clock carries on after the resume
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_info_logs_once_per_job_under_torchrun():
    import logging

    from simmim_fast.training.cli import quiet_other_ranks

    root, pkg = logging.getLogger(), logging.getLogger("simmim_fast")
    levels = root.level, pkg.level
    try:
        quiet_other_ranks(0, False)  # rank 0: unchanged
        assert (root.level, pkg.level) == levels
        quiet_other_ranks(1, True)  # --log-all-ranks: unchanged
        assert (root.level, pkg.level) == levels
        quiet_other_ranks(1, False)
        assert not pkg.isEnabledFor(logging.INFO) and pkg.isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(levels[0])
        pkg.setLevel(levels[1])
