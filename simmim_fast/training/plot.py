"""``loss.png`` next to ``metrics.csv``: loss and learning rate against the step, resumes marked.

Rendered with matplotlib's Agg backend (no display) and written atomically; the training loop calls it
at log steps at most once a minute, and at the end of the run.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _floats(rows: list[dict], key: str) -> list[float]:
    out = []
    for r in rows:
        try:
            out.append(float(r[key]))
        except (KeyError, TypeError, ValueError):
            out.append(float("nan"))
    return out


def write_loss_plot(metrics_csv: str | os.PathLike, out_png: str | os.PathLike, *, title: str = "") -> Path | None:
    """Plot ``metrics.csv`` into ``out_png``; None when there is nothing to plot yet."""
    rows = read_metrics(metrics_csv)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    runs = [r.get("run") or "1" for r in rows]
    resumes = [steps[i] for i in range(1, len(rows)) if runs[i] != runs[i - 1]]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(steps, _floats(rows, "loss"), color="tab:blue", lw=1.2, marker="." if len(rows) < 50 else None)
    ax_loss.set_ylabel("loss (masked pixels)")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, _floats(rows, "lr"), color="tab:orange", lw=1.2)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    for i, s in enumerate(resumes):
        for ax in (ax_loss, ax_lr):
            ax.axvline(s - 0.5, color="grey", ls="--", lw=0.8, label="resumed" if (i == 0 and ax is ax_loss) else None)
    if resumes:
        ax_loss.legend(loc="upper right")
    ax_loss.set_title(title or f"{Path(metrics_csv).parent.name}: {len(rows)} log steps, last step {steps[-1]}")
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out_png
