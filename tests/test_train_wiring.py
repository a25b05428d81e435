"""The trainer's wiring of the library features: --recipe, --norm-target, branch-on-resume / --force, the memory check.

The features themselves are tested in test_recipe.py, test_norm_target.py, test_checkpoint_branch.py and
test_memory.py; these runs check that the CLI passes them through (small preset at 96 px, ~0.2 s a step).
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from simmim_fast import train, visualize
from simmim_fast.training.checkpoint import list_checkpoints, load_checkpoint

FAST = ["--img-size", "96", "--batch-size", "2", "--num-workers", "0"]


@pytest.fixture(scope="module", autouse=True)
def _private_cache(cache_env):
    """Every test of this module uses the private photo cache (``conftest.cache_env``)."""
    yield


def lrs(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}


def test_recipe_official_groups_lr_lag_and_resume_mismatch(tmp_path, capsys):
    from simmim_fast.models import create_model
    from simmim_fast.training.optim import weight_decay_names

    out = tmp_path / "official"
    assert train.main(["--max-steps", "2", "--log-every", "1", "--recipe", "official", "--output", str(out), *FAST]) == 0
    state = load_checkpoint(out / "checkpoint_00000002.pt")
    assert state["args"]["recipe"] == "official" and state["plan"]["recipe"] == "official"
    decay, no_decay = weight_decay_names(create_model("swin_tiny_cpu", img_size=96), recipe="official")
    groups = state["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]
    assert any("relative_position_bias_table" in n for n in decay)  # the official quirk
    lr = lrs(out)
    assert lr[2] == lr[1]  # official: step 1 runs at lr(0) (one step behind); step 0 at the warmup lr

    clean = tmp_path / "clean"
    assert train.main(["--max-steps", "2", "--log-every", "1", "--output", str(clean), *FAST]) == 0
    assert load_checkpoint(clean / "checkpoint_00000002.pt")["args"]["recipe"] is None  # the preset's default ...
    assert load_checkpoint(clean / "checkpoint_00000002.pt")["plan"]["recipe"] == "clean"  # ... is clean here
    assert lrs(clean)[2] > lrs(clean)[1]  # clean: step 1 at lr(1), warming up
    capsys.readouterr()

    assert train.main(["--max-steps", "3", "--output", str(out), "--resume", "--recipe", "clean", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--recipe" in err and "official" in err


def test_norm_target_flag_trains_and_pictures_the_targets(tmp_path, capsys):
    out = tmp_path / "norm"
    assert train.main(["--max-steps", "1", "--norm-target", "5", "--output", str(out), *FAST]) == 0
    state = load_checkpoint(out / "checkpoint_00000001.pt")
    assert state["args"]["norm_target"] == 5
    assert (out / "reconstruction_00000001.png").is_file()
    model = visualize.load_model(state)
    assert model.norm_target == 5  # visualize rebuilds the model with the run's targets
    off = tmp_path / "off"  # 0 = raw pixels, whatever the preset's default
    assert train.main(["--max-steps", "1", "--norm-target", "0", "--output", str(off), *FAST]) == 0
    assert visualize.load_model(load_checkpoint(off / "checkpoint_00000001.pt")).norm_target is None
    capsys.readouterr()
    assert train.main(["--max-steps", "1", "--norm-target", "4", "--output", str(tmp_path / "bad"), *FAST]) == 2
    assert "--norm-target" in capsys.readouterr().err


def test_resume_from_an_older_checkpoint_branches_unless_forced(tmp_path):
    out = tmp_path / "run"
    assert train.main(["--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "0", "--output", str(out), *FAST]) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]

    # branch: the newer checkpoint survives pruning (--keep-checkpoints 1 would have deleted it)
    assert train.main(["--max-steps", "3", "--keep-checkpoints", "1", "--output", str(out),
                       "--resume", str(out / "checkpoint_00000002.pt"), *FAST]) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert [s for s, _ in list_checkpoints(out / "branch-2")] == [3]

    # --force: continue in the folder, the later steps moved aside (never deleted)
    assert train.main(["--max-steps", "3", "--output", str(out), "--force",
                       "--resume", str(out / "checkpoint_00000002.pt"), *FAST]) == 0
    assert 3 in [s for s, _ in list_checkpoints(out)] and 4 not in [s for s, _ in list_checkpoints(out)]
    assert [s for s, _ in list_checkpoints(out / "abandoned-1")] == [4]


def test_impossible_batch_fails_before_the_first_step(tmp_path, capsys):
    out = tmp_path / "huge"
    assert train.main(["--max-steps", "1", "--output", str(out), "--img-size", "96", "--batch-size", "200000",
                       "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and "largest batch that fits" in err
    assert not list_checkpoints(out)


def test_one_gpu_index_for_every_local_rank_is_refused(tmp_path, capsys, monkeypatch):
    """``--device cuda:1`` under torchrun with 2 local processes: refused before anything starts (exit 2)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.main(["--max-steps", "1", "--output", str(tmp_path / "r"), "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "one GPU" in err


@pytest.mark.parametrize("workers", [0, 2])
def test_a_folder_of_unreadable_files_is_bad_input(tmp_path, capsys, workers):
    """Every file unreadable: exit 2 with one line naming the folder (a traceback before; also from a loader worker)."""
    data = tmp_path / "junk"
    data.mkdir()
    for i in range(3):
        (data / f"x{i}.jpg").write_bytes(b"not a jpeg")
    assert train.main(["--max-steps", "1", "--output", str(tmp_path / "r"), "--data", str(data),
                       "--num-workers", str(workers)]) == 2
    err = capsys.readouterr().err
    assert "error: data: none of the 3 files" in err and str(data) in err and "Traceback" not in err
