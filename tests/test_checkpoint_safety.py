"""Checkpoints that are what they claim: no NaN weights saved, no leaked temp files, resume past a damaged file.

Runs use the small preset at 96 px (as tests/test_train.py), in process.
"""
from __future__ import annotations

import errno
import os

import pytest
import torch

from simmim_fast import train
from simmim_fast.training import checkpoint as ckpt

FAST = ["--img-size", "96", "--batch-size", "2", "--num-workers", "0"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMIM_FAST_CACHE", str(tmp_path / "cache"))


def test_nonfinite_weights_after_a_finite_loss_are_never_saved(tmp_path, monkeypatch, capsys):
    """The loss is computed before the update: a step that turns the weights NaN must stop the run at the
    next save, with nothing written (the loss check alone would have saved it as good)."""
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    out = tmp_path / "run"
    assert train.main(["--max-steps", "1", "--output", str(out), *FAST]) == 3
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "model." in err and "without saving" in err
    assert ckpt.list_checkpoints(out) == []


def test_nonfinite_tensors_names_them():
    state = {"model": {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "i": torch.arange(3)},
             "optimizer": {0: {"exp_avg": torch.tensor([float("nan")])}}}
    assert ckpt.nonfinite_tensors(state) == ["model.b", "optimizer.0.exp_avg"]
    assert ckpt.nonfinite_tensors({"model": {"a": torch.ones(2)}}) == []


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / ".checkpoint_00000004.pt.999999999.tmp"  # no such pid
    alive = tmp_path / f".checkpoint_00000006.pt.{os.getpid()}.tmp"  # a save in progress
    foreign = tmp_path / ".notes.txt.999999999.tmp"  # not ours
    for p in (dead, alive, foreign):
        p.write_bytes(b"x" * 10)
    assert ckpt.clean_stale_temps(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and foreign.exists()


def test_a_run_cleans_the_temp_files_a_killed_save_left(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    leftover = out / ".checkpoint_00000002.pt.999999999.tmp"
    leftover.write_bytes(b"partial")
    assert train.main(["--max-steps", "2", "--output", str(out), "--resume", *FAST]) == 0
    assert not leftover.exists()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]


def test_failed_save_removes_its_temp_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.atomic_save({"step": 1}, tmp_path / "checkpoint_00000001.pt")

    def disk_full(obj, f):
        f.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": 2}, tmp_path / "checkpoint_00000002.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000001.pt"]
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path / "checkpoint_00000001.pt") == {"step": 1}


def test_resume_steps_back_past_a_damaged_newest_checkpoint(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert train.main(["--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "0", "--output", str(out),
                       *FAST]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    newest = out / "checkpoint_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    assert train.main(["--max-steps", "6", "--output", str(out), "--resume", *FAST]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert any("skipped checkpoint_00000004.pt" in r.getMessage() for r in caplog.records)
    assert ckpt.load_checkpoint(out / "checkpoint_00000006.pt")["step"] == 6


def test_one_run_owns_an_output_folder(tmp_path, capsys, monkeypatch):
    """Two runs on one --output used to both say "done" with one's checkpoints lost: a live lock is refused,
    a stale one (its process gone) is taken over, and a finished run leaves no lock behind."""
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ckpt.LOCK_NAME
    import socket

    lock.write_text(f"{socket.gethostname()} {os.getppid()}\n")  # a live process (pytest's parent)
    assert train.main(["--max-steps", "1", "--output", str(out), *FAST]) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert ckpt.list_checkpoints(out) == []
    lock.write_text(f"{socket.gethostname()} 999999999\n")  # stale
    assert train.main(["--max-steps", "1", "--output", str(out), *FAST]) == 0
    assert not lock.exists() and [s for s, _ in ckpt.list_checkpoints(out)] == [1]


def test_default_run_dir_skips_a_folder_a_live_run_is_starting_in(tmp_path):
    import socket

    root = tmp_path / "runs"
    (root / "p").mkdir(parents=True)
    (root / "p" / ckpt.LOCK_NAME).write_text(f"{socket.gethostname()} {os.getppid()}\n")
    assert train.default_run_dir("p", resume=False, root=root) == root / "p-2"


@pytest.fixture()
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), so that a save runs out of space for real; skipped where mounting
    is refused (not root, no CAP_SYS_ADMIN in the container)."""
    import shutil
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here: {(r.stderr or r.stdout).strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_save_on_a_full_disk_frees_its_space_and_keeps_the_previous_checkpoint(small_disk):
    out = small_disk / "run"
    ckpt.atomic_save({"step": 1, "w": torch.ones(100_000)}, ckpt.checkpoint_path(out, 1))  # 0.4 MB
    free = _free(small_disk)
    with pytest.raises(OSError) as info:
        ckpt.atomic_save({"step": 2, "w": torch.ones(600_000)}, ckpt.checkpoint_path(out, 2))  # 2.4 MB: no room
    assert info.value.errno == errno.ENOSPC and "checkpoint_00000002.pt" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_00000001.pt"]  # no temp file left
    assert _free(small_disk) == free  # the space the failed write took is free again
    plan = ckpt.plan_resume("auto", out)  # resume reads the previous checkpoint, no traceback
    assert plan.path == ckpt.checkpoint_path(out, 1) and torch.equal(plan.state["w"], torch.ones(100_000))
    ckpt.atomic_save({"step": 2, "w": torch.ones(100_000)}, ckpt.checkpoint_path(out, 2))  # room for the next
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]


def test_a_killed_saves_temp_file_filling_the_disk_is_removed_at_start_others_are_kept(small_disk):
    out = small_disk / "run"
    ckpt.atomic_save({"step": 1}, ckpt.checkpoint_path(out, 1))
    killed = out / ".checkpoint_00000002.pt.999999999.tmp"  # a SIGKILLed writer's (no such pid)
    killed.write_bytes(b"\0" * (1600 * 1024))
    not_ours = [out / n for n in (".checkpoint_00000002.pt.tmp", ".checkpoint_00000002.pt.abc.tmp",
                                  "checkpoint_00000002.pt.999999999.tmp", ".best.pt.999999999.tmp.part",
                                  ".model.pt.999999999.tmp", "notes.999999999.tmp")]
    for p in not_ours:
        p.write_bytes(b"x")
    live = out / f".best.pt.{os.getpid()}.tmp"  # a save in progress (this process)
    live.write_bytes(b"x")
    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_save({"step": 2, "w": torch.ones(200_000)}, ckpt.checkpoint_path(out, 2))  # 0.8 MB: full
    plan = ckpt.plan_resume("auto", out)  # start-up of the next run in this folder
    assert plan.path == ckpt.checkpoint_path(out, 1) and not killed.exists()
    assert all(p.exists() for p in not_ours) and live.exists()
    ckpt.atomic_save({"step": 2, "w": torch.ones(200_000)}, ckpt.checkpoint_path(out, 2))


@pytest.mark.parametrize("data", [b"\x80", b"\x80\x02]q\x00(", b"PK\x03\x04garbage"])
def test_short_garbage_file_is_a_clean_error(tmp_path, data):
    """A few garbled bytes (IndexError / EOFError / RuntimeError inside torch.load) -> ValueError naming the file."""
    from simmim_fast import serialization

    p = tmp_path / "checkpoint_00000001.pt"
    p.write_bytes(data)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        serialization.load(p)
