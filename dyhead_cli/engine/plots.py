"""The pictures of a run: ``results.png`` (losses, lr and AP over training), a confusion matrix and
per-class precision-recall curves. matplotlib with the Agg backend: files only, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dyhead_cli.errors import DyheadError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise DyheadError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def plot_results(events: list[dict[str, Any]], path: Path) -> None:
    """``results.png``: total and per-term training loss, lr, and AP/AP50/AP75 at each evaluation, by step."""
    plt = _pyplot()
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if train:
        steps = [e["step"] for e in train]
        ax.plot(steps, [e["loss"] for e in train], label="loss", color="black", linewidth=1.6)
        for name in sorted({k for e in train for k in e if k.startswith("loss_")}):
            ax.plot(steps, [e.get(name, math.nan) for e in train], label=name, linewidth=1.0)
        if all(e["loss"] > 0 for e in train):
            ax.set_yscale("log")
    ax.set(title="training loss", xlabel="step")
    if train:  # an empty legend is a matplotlib warning on stderr (an evaluation before the first logged step)
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    if train:
        ax.plot([e["step"] for e in train], [e["lr"] for e in train], color="tab:purple")
    ax.set(title="learning rate", xlabel="step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    ax = axes[2]
    for name, style in (("AP", "o-"), ("AP50", "s--"), ("AP75", "^:")):
        values = [(e["step"], e.get(name)) for e in evals if e.get(name) is not None]
        if values:
            ax.plot(*zip(*values), style, label=name)
    ax.set(title="validation (COCO bbox, %)", xlabel="step", ylim=(0, 100))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path, score_thr: float, iou_thr: float) -> None:
    """Rows: true class (last: background = a detection that matched nothing); columns: predicted class
    (last: background = a ground-truth box no detection found). Cells show counts; colour is the share of
    the row, so a rare class reads as clearly as a common one."""
    plt = _pyplot()
    names = list(class_names) + ["background"]
    n = len(names)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = max(4.5, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (score >= {score_thr:.2f}, IoU >= {iou_thr:.2f})")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class's row")
    fig.tight_layout()
    _save(fig, path)


def plot_pr_curves(recall: np.ndarray, precision: dict[str, np.ndarray], ap50: dict[str, float | None], path: Path) -> None:
    """Per-class precision over COCOeval's 101 recall points at IoU 0.5 (area all, 100 detections), with
    the mean over the classes in black."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    curves = []
    for name, p in precision.items():
        value = ap50.get(name)
        ax.plot(recall, p, linewidth=1.2, label=f"{name} {value:.1f}" if value is not None else name)
        curves.append(p)
    if curves:
        mean = np.mean(np.stack(curves), axis=0)
        ax.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes {100 * float(np.mean(mean)):.1f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall at IoU 0.5 (AP50 in legend)")
    if curves:
        ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
