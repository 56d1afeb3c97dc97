"""Validation AP50 against steps and wall-clock time for several training runs: one plot
(two panels), one table.

Each run is a `detr-jax train` workdir; its metrics.jsonl lines carry the time they were
written ("time"), and `--starts` gives each command's start (seconds since the epoch, e.g.
`date +%s` just before it), so the time axis counts everything the command did: start-up,
compilation, training, evaluations and checkpoints.

    python scripts/compare_learning.py --runs /tmp/l/tiny /tmp/l/vit \\
        --labels synthetic_tiny synthetic_vit_tiny --starts 1764640000 1764640600 \\
        --plot docs/synthetic_vit_vs_resnet_ap50.png

Prints a markdown table (one row per evaluation) and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detr_jax.runtime.metrics_writer import read_metrics  # noqa: E402


def run_table(workdir: pathlib.Path, start: float) -> dict:
    """{"evals": [{step, minutes, AP, AP50, AP75, loss, class_error}], "median_step_s", "end_minutes"}."""
    rows = read_metrics(workdir / "metrics.jsonl")
    if not rows or "time" not in rows[0]:
        raise SystemExit(f"{workdir}/metrics.jsonl: no timed metrics lines (written by an older detr-jax?)")
    train = [r for r in rows if "loss" in r]
    evals = []
    for r in rows:
        if "eval_AP50" not in r:
            continue
        before = [t for t in train if t["step"] <= r["step"]]
        evals.append({"step": r["step"], "minutes": (r["time"] - start) / 60, "AP": r["eval_AP"],
                      "AP50": r["eval_AP50"], "AP75": r.get("eval_AP75"),
                      "loss": before[-1]["loss"] if before else None,
                      "class_error": before[-1]["class_error"] if before else None})
    return {"evals": evals, "median_step_s": statistics.median(r["step_time"] for r in train),
            "end_minutes": (rows[-1]["time"] - start) / 60}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, type=pathlib.Path)
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--starts", nargs="+", required=True, type=float)
    parser.add_argument("--plot", default="bench_results/learning_ap50.png")
    parser.add_argument("--out", default="bench_results/compare_learning.json")
    args = parser.parse_args()
    if not len(args.runs) == len(args.labels) == len(args.starts):
        parser.error("--runs, --labels and --starts need one value per run")

    tables = {label: run_table(run, start) for run, label, start in zip(args.runs, args.labels, args.starts)}
    print("| config | step | wall clock (min) | loss | class error | AP | AP50 | AP75 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, table in tables.items():
        for e in table["evals"]:
            print(f"| {label} | {e['step']} | {e['minutes']:.1f} | {e['loss']:.2f} | {e['class_error']:.1f}% | "
                  f"{e['AP']:.3f} | {e['AP50']:.3f} | {e['AP75']:.3f} |")
    for label, table in tables.items():
        print(f"{label}: median step {table['median_step_s'] * 1000:.0f} ms, command ended at "
              f"{table['end_minutes']:.1f} min")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, x_key, x_label in ((axes[0], "step", "training steps"),
                               (axes[1], "minutes", "wall-clock minutes since the command started")):
        for label, table in tables.items():
            ax.plot([0] + [e[x_key] for e in table["evals"]], [0] + [e["AP50"] for e in table["evals"]], "o-",
                    label=label)
        ax.set_xlabel(x_label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation AP50 (200 held-out images)")
    axes[0].legend()
    fig.tight_layout()
    for path in (pathlib.Path(args.plot), pathlib.Path(args.out)):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=100)
    pathlib.Path(args.out).write_text(json.dumps(tables, indent=2))
    print(f"wrote {args.plot} and {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
