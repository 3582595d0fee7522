"""A sweep's results: a table (printed and CSV) and learning curves (PNG), from saved trial records.

Reads only `trials.jsonl` in the results folder, so `raydpo report DIR` works without Ray.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Tuple

TRIALS_FILE = "trials.jsonl"
SUMMARY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "global_step")


def load_trials(results_dir: str) -> list:
    path = os.path.join(results_dir, TRIALS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{results_dir} holds no {TRIALS_FILE}: is it a raydpo sweep folder?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def write_report(results_dir: str, metric: str = "loss", mode: str = "min") -> Tuple[list, Optional[dict]]:
    """Write results.csv and learning_curves.png, print the table; return (table, best trial)."""
    trials = load_trials(results_dir)
    metrics = list(dict.fromkeys([metric, *SUMMARY_METRICS]))
    table = []
    for trial in trials:
        row = {"trial_id": trial["trial_id"], **trial["config"]}
        # each metric's latest value (eval metrics are logged only at evaluation steps)
        row.update({m: next((h[m] for h in reversed(trial["history"]) if m in h), None) for m in metrics})
        row["status"] = "error" if trial.get("error") else "ok"
        table.append(row)
    scored = [(row[metric], trial) for row, trial in zip(table, trials) if row.get(metric) is not None]
    best = (min if mode == "min" else max)(scored, key=lambda pair: pair[0])[1] if scored else None

    columns = list(dict.fromkeys(key for row in table for key in row))
    with open(os.path.join(results_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(v) if v is not None else "" for k, v in row.items()} for row in table)
    _print_table(table, columns, best)
    _plot(trials, metric, os.path.join(results_dir, "learning_curves.png"))
    return table, best


def _print_table(table: list, columns: list, best: Optional[dict]):
    cells = [[_cell(row.get(c, "")) for c in columns] for row in table]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row, line in zip(table, cells):
        mark = " <- best" if best is not None and row["trial_id"] == best["trial_id"] else ""
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)) + mark)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_run(history: list, path: str, metrics=("loss", "eval_rewards/accuracies"), title: str = "") -> str:
    """One run's learning curves, a panel per metric against global_step (a metric logged only at
    evaluation steps has a point per evaluation). Returns the PNG's path."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        points = [(h["global_step"], h[metric]) for h in history if metric in h and "global_step" in h]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3)
        if "accuracies" in metric:  # a fraction of pairs: the whole range, and chance marked
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_xlabel("global_step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot(trials: list, metric: str, path: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial in trials:
        points = [(h["global_step"], h[metric]) for h in trial["history"] if metric in h and "global_step" in h]
        if points:
            label = ", ".join(f"{k}={_cell(v)}" for k, v in trial["config"].items()) or trial["trial_id"]
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("global_step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
