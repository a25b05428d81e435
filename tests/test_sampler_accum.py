"""Gradient accumulation and epochs: an epoch is a whole number of optimizer steps, so a run resumed in a later
epoch sees exactly the micro-batches of the uninterrupted run (before, an epoch's leftover micro-batch joined the
next epoch's first step and a resume diverged)."""
from __future__ import annotations

import csv
import os

import pytest

from simmim_fast import train
from simmim_fast.training.sampler import ResumableSampler


@pytest.mark.parametrize("n, batch, world, accum, expected", [
    (15, 2, 1, 2, 6),   # 7 full batches -> 6 (3 steps of 2)
    (15, 1, 2, 2, 6),   # 7 per rank -> 6
    (15, 2, 1, 1, 7),
    (15, 2, 1, 3, 6),
    (3, 2, 1, 4, 4),    # a small set is repeated up to one whole step
])
def test_epoch_is_a_whole_number_of_steps(n, batch, world, accum, expected):
    s = ResumableSampler(n, batch_size=batch, epochs=2, world_size=world, min_batches=accum)
    assert s.batches_per_epoch == expected and s.batches_per_epoch % accum == 0


def test_resume_in_a_later_epoch_with_accumulation_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMIM_FAST_CACHE", str(tmp_path / "cache"))
    fast = ["--img-size", "96", "--batch-size", "2", "--num-workers", "0", "--accum-steps", "2", "--log-every", "1"]
    # 15 embedded photos, batch 2, accumulation 2: 3 steps per epoch; step 4 is the 2nd step of epoch 1
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train.main(["--max-steps", "5", "--output", str(whole), *fast]) == 0
    assert train.main(["--max-steps", "4", "--output", str(part), *fast]) == 0
    assert train.main(["--max-steps", "5", "--output", str(part), "--resume", *fast]) == 0

    def losses(run):
        with open(run / "metrics.csv", newline="") as f:
            return {int(r["step"]): r["loss"] for r in csv.DictReader(f)}

    assert losses(part)[5] == losses(whole)[5]
