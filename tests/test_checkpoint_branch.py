"""Resuming from an older checkpoint starts a branch (issue 15, item 4): ``checkpoint.plan_resume``.

Before it, ``--resume <output>/checkpoint_<s>.pt`` with later checkpoints next to it continued in the
same folder: pruning deleted the later checkpoints, the new line overwrote them at the same steps and
truncated metrics.csv, and the next ``--resume`` continued whichever line's file was newest. These tests
drive the loops' part by hand (plan, save into ``plan.write_dir``, prune there), as the trainers do.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from simmim_fast.training import checkpoint as ckpt
from simmim_fast.training.metrics import MetricsLog


def _save(folder: Path, step: int, **extra) -> Path:
    return ckpt.atomic_save({"step": step, "args": {"preset": "p"}, **extra}, ckpt.checkpoint_path(folder, step))


def _metrics(folder: Path, steps) -> None:
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "run"])
        w.writeheader()
        w.writerows({"step": s, "loss": 1.0 / s, "run": 1} for s in steps)


def _steps(folder: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(folder)]


@pytest.fixture()
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    for s in (100, 200, 300):
        _save(out, s)
    (out / "reconstruction_00000200.png").write_bytes(b"png 200")
    (out / "reconstruction_00000100.png").write_bytes(b"png 100")
    _metrics(out, range(10, 301, 10))
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_resuming_an_older_checkpoint_writes_a_branch_and_leaves_the_later_ones(run, caplog):
    before = _snapshot(run)
    with caplog.at_level(logging.WARNING):
        plan = ckpt.plan_resume(str(ckpt.checkpoint_path(run, 100)), run)
    assert plan.step == 100 and plan.state["step"] == 100
    assert plan.write_dir == run / "branch-100" and plan.branched_from == ckpt.checkpoint_path(run, 100)
    assert [p.name for p in plan.newer] == ["checkpoint_00000200.pt", "checkpoint_00000300.pt"]
    assert any("branch" in r.getMessage() and "--force" in r.getMessage() for r in caplog.records)
    info = json.loads((plan.write_dir / ckpt.BRANCH_INFO).read_text())
    assert info["step"] == 100 and info["parent"].endswith("checkpoint_00000100.pt")

    # the loop: logs and checkpoints go to write_dir, pruning there only
    log = MetricsLog(plan.write_dir, resume_step=plan.step, tensorboard=False)
    for step in (150, 200, 250):
        log.write({"step": step, "loss": 0.5})
        _save(plan.write_dir, step)
        ckpt.prune_checkpoints(plan.write_dir, keep=2)
    log.close()
    assert _snapshot(run) == before  # nothing of the original line changed: files, bytes, metrics
    assert _steps(plan.write_dir) == [200, 250]
    rows = list(csv.DictReader(open(plan.write_dir / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [*range(10, 101, 10), 150, 200, 250]  # parent's history up to 100

    # --resume (auto) on the run folder continues its own line, and names the branch
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = ckpt.plan_resume("auto", run)
    assert again.path == ckpt.checkpoint_path(run, 300) and again.write_dir == run and again.branched_from is None
    assert any("branch-100" in r.getMessage() for r in caplog.records)
    # and the branch is continued from its own folder, as the note says
    cont = ckpt.plan_resume("auto", plan.write_dir)
    assert cont.path == ckpt.checkpoint_path(plan.write_dir, 250) and cont.write_dir == plan.write_dir
    # the same older checkpoint once more: another branch, the first one untouched
    second = ckpt.plan_resume(ckpt.checkpoint_path(run, 100), run)
    assert second.write_dir == run / "branch-100-2" and _steps(run / "branch-100") == [200, 250]
    assert [b.name for b in ckpt.branch_folders(run)] == ["branch-100", "branch-100-2"]


def test_force_continues_in_the_folder_and_moves_the_later_steps_aside(run):
    ckpt.atomic_save({"step": 250, "model": {}}, run / "best.pt")  # saved after step 100: the abandoned line's
    ckpt.atomic_save({"step": 50, "model": {}}, run / "best_ema.pt")  # before 100: this line's too, stays
    plan = ckpt.plan_resume(ckpt.checkpoint_path(run, 100), run, force=True)
    assert plan.write_dir == run and plan.moved_to == run / "abandoned-1"
    moved = sorted(p.name for p in plan.moved_to.iterdir())
    assert moved == ["best.pt", "checkpoint_00000200.pt", "checkpoint_00000300.pt", "metrics.csv",
                     "reconstruction_00000200.png"]
    assert _steps(run) == [100] and (run / "best_ema.pt").is_file() and (run / "reconstruction_00000100.png").is_file()
    assert ckpt.load_checkpoint(plan.moved_to / "checkpoint_00000300.pt")["step"] == 300
    # the next --resume continues the forced line, never the abandoned one
    _save(run, 150)
    assert ckpt.plan_resume("auto", run).path == ckpt.checkpoint_path(run, 150)
    # a second forced resume gets its own folder
    _save(run, 200)
    assert ckpt.plan_resume(ckpt.checkpoint_path(run, 100), run, force=True).moved_to == run / "abandoned-2"


def test_what_is_not_a_branch(run, tmp_path):
    # the newest checkpoint, by path or auto
    for resume in (str(ckpt.checkpoint_path(run, 300)), "auto", str(run)):
        plan = ckpt.plan_resume(resume, run)
        assert plan.path == ckpt.checkpoint_path(run, 300) and plan.write_dir == run and not plan.newer
    # a checkpoint of another run into a folder with nothing newer
    fresh = tmp_path / "other"
    plan = ckpt.plan_resume(ckpt.checkpoint_path(run, 100), fresh)
    assert plan.write_dir == fresh and plan.branched_from is None
    # ... but into a folder that holds later steps, a branch there
    _save(fresh, 500)
    assert ckpt.plan_resume(ckpt.checkpoint_path(run, 100), fresh).write_dir == fresh / "branch-100"
    # auto past a damaged newest checkpoint: the damaged file is not kept as a "later line"
    whole = _save(tmp_path / "scratch", 400).read_bytes()
    ckpt.checkpoint_path(run, 400).write_bytes(whole[: len(whole) // 2])  # a save cut short
    plan = ckpt.plan_resume("auto", run)
    assert plan.path == ckpt.checkpoint_path(run, 300) and plan.write_dir == run and any("skipped" in n for n in plan.notes)
    assert not list(run.glob("branch-*")) and not list(run.glob("abandoned-*"))
    # fresh runs keep their rules
    assert ckpt.plan_resume(None, tmp_path / "new").path is None
    with pytest.raises(ValueError, match="already holds checkpoints"):
        ckpt.plan_resume(None, run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        ckpt.plan_resume(str(tmp_path / "empty"), tmp_path / "x")


def test_other_ranks_change_nothing_and_take_the_main_folder(run):
    before = sorted(p.name for p in run.iterdir())
    plan = ckpt.plan_resume(ckpt.checkpoint_path(run, 100), run, is_main=False, write_dir=run / "branch-100-7")
    assert plan.write_dir == run / "branch-100-7" and plan.state["step"] == 100
    assert sorted(p.name for p in run.iterdir()) == before  # no folder made, nothing moved
    forced = ckpt.plan_resume(ckpt.checkpoint_path(run, 100), run, force=True, is_main=False, write_dir=run)
    assert forced.moved_to is None and _steps(run) == [100, 200, 300]
