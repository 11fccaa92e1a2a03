"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils.results import write_atomic

DPI = 120
MAX_ANNOTATED_TASKS = 12  # beyond this the per-cell numbers no longer fit


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI), binary=True)


def accuracy_heatmap(matrix: Sequence[Sequence[float]], title: str, path: Path) -> None:
    """R[i][j] (accuracy on task j after learning task i) as a lower-triangular heatmap."""
    n = len(matrix)
    grid = [[row[j] if j < len(row) else math.nan for j in range(n)] for row in matrix]
    fig = Figure(figsize=(max(4.0, 1.5 + 0.6 * n), max(3.5, 1.3 + 0.55 * n)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if n <= MAX_ANNOTATED_TASKS:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 60 else "black")
    ticks = range(n)
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after learning task")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def task_curves(series: dict[str, dict[str, list[float]]], title: str, ylabel: str,
                path: Path) -> None:
    """One line per label over tasks 1..T: the mean, with a +-std band where std > 0."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, stats in series.items():
        tasks = range(1, len(stats["mean"]) + 1)
        ax.plot(tasks, stats["mean"], marker="o", label=label)
        if any(stats["std"]):
            low = [m - s for m, s in zip(stats["mean"], stats["std"])]
            high = [m + s for m, s in zip(stats["mean"], stats["std"])]
            ax.fill_between(tasks, low, high, alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
