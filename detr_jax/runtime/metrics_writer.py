"""Metrics to the workdir: JSON lines, TensorBoard events, and a loss-curve picture."""

from __future__ import annotations

import json
import math
import pathlib
import time

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"


class MetricsWriter:
    """Appends {"step": s, ...} lines to workdir/metrics.jsonl and TensorBoard scalars to
    workdir/tensorboard. On resume, lines past `resume_step` (written after the checkpoint
    the run resumed from) are dropped so the log matches the resumed run.
    Only the enabled writer (process 0) touches the disk."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, resume_step: int = 0):
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self.path = self.workdir / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        # "time" (seconds since the epoch, when the line was written): learning against
        # wall-clock time, evaluation and checkpoints included (TensorBoard keeps its own).
        record = {"step": int(step), "time": round(time.time(), 3),
                  **{k: _plain(v) for k, v in metrics.items() if k not in ("step", "time")}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._tb.close()
        plot_curves(self.path, self.workdir / CURVE_FILE)


def _plain(value):
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return float(value)


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_values(path: str | pathlib.Path) -> dict:
    """{key: its value in the last line of a metrics file that has it}: the last logged
    training metrics and the last evaluation's."""
    latest = {}
    for record in read_metrics(path):
        latest.update(record)
    return latest


def plot_curves(metrics_path: str | pathlib.Path, out_path: str | pathlib.Path) -> pathlib.Path | None:
    """Training loss (and its terms) and validation AP (and PQ, mask AP) against step, as a PNG."""
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_AP" in r or "eval_AP50" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 6, 4), squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in train]
    for key, style in (("loss", "-"), ("loss_ce", "--"), ("loss_bbox", "--"), ("loss_giou", "--"),
                       ("loss_mask", ":"), ("loss_dice", ":")):
        if key in train[0]:
            ax.plot(steps, [r[key] for r in train], style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        ax = axes[0, 1]
        for key in ("eval_AP", "eval_AP50", "eval_AP75", "eval_PQ", "eval_PQ_th", "eval_PQ_st", "eval_mask_AP"):
            if key in evals[0]:
                ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("validation")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_path = pathlib.Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
