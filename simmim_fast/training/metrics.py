"""Training logs: a CSV file (resumable: rows past the resumed step are dropped; ``elapsed_s`` cumulative
across resumes, ``run`` counts the invocations), ``loss.png`` (``plot.py``) and TensorBoard if installed."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

log = logging.getLogger("simmim_fast.train")

FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "img_per_s", "skipped_images", "elapsed_s", "run")


class MetricsLog:
    def __init__(self, output: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(output) / "metrics.csv"
        rows = []
        if resume_step > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k) or ("1" if k == "run" else "") for k in FIELDS} for r in rows)
        #: ``elapsed_s`` carries on across resumes: this run's clock starts at the kept rows' last value
        self.elapsed_offset = float(rows[-1].get("elapsed_s") or 0.0) if rows else 0.0
        #: which invocation of the run this is (1, then +1 per resume): the loss plot marks the changes
        self.run = int(rows[-1].get("run") or 1) + 1 if rows else 1
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(output) / "tensorboard"), purge_step=resume_step + 1)
            except Exception:  # tensorboard not installed: CSV only
                log.debug("tensorboard not installed; logging to CSV only")

    def write(self, row: dict) -> None:
        row = dict(row, run=self.run)
        if isinstance(row.get("elapsed_s"), (int, float)):
            row["elapsed_s"] = round(row["elapsed_s"] + self.elapsed_offset, 3)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow({k: row.get(k, "") for k in FIELDS})
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "img_per_s"):
                if isinstance(row.get(k), (int, float)):
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
