"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils.results import write_atomic

DPI = 120
MAX_ANNOTATED_TASKS = 12  # beyond this the per-cell numbers no longer fit
# tab20's strong shades, then its light ones: 20 colours, neighbours in the list far apart.
PALETTE = [colormaps["tab20"](i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
# Seven markers against twenty colours: two methods share a (colour, marker) pair only after
# 140 methods.
MARKERS = "os^DvPX"
# A method's several rows (protocols): line styles, and marker fills for points without lines.
LINESTYLES = ("-", "--", ":", "-.")
FILLSTYLES = ("full", "none", "left", "bottom")
HIGHLIGHTED = "bmkp"  # the framework's headline method, drawn to stand out


def method_styles(methods: Sequence[str], rows: dict[str, str]) -> dict[str, dict]:
    """Line styles by row label (`rows`: label -> method): the colour and marker of the
    method's place in `methods` (methods not listed follow, in order of appearance), so a
    method keeps them in every figure drawn from the same list, and a line style and marker
    fill per row of the same method; BMKP in black, thicker and on top."""
    order = [*methods, *(m for m in dict.fromkeys(rows.values()) if m not in methods)]
    styles, variants = {}, {}
    for label, method in rows.items():
        index = order.index(method)
        variant = variants[method] = variants.get(method, -1) + 1
        style = {"color": PALETTE[index % len(PALETTE)], "marker": MARKERS[index % len(MARKERS)],
                 "linestyle": LINESTYLES[variant % len(LINESTYLES)],
                 "fillstyle": FILLSTYLES[variant % len(FILLSTYLES)], "linewidth": 1.4}
        if method == HIGHLIGHTED:
            style.update(color="black", marker="*", markersize=10, linewidth=2.6, zorder=5)
        styles[label] = style
    return styles


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight"),
                 binary=True)


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
                path: Path, styles: dict[str, dict] | None = None) -> None:
    """One line per label over tasks 1..T: the mean, with a +-std band where std > 0, in the
    label's style (method_styles); the legend sits outside the axes, right of them."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for label, stats in series.items():
        tasks = range(1, len(stats["mean"]) + 1)
        style = (styles or {}).get(label, {"marker": "o"})
        line, = ax.plot(tasks, stats["mean"], label=label, **style)
        if any(stats["std"]):
            low = [m - s for m, s in zip(stats["mean"], stats["std"])]
            high = [m + s for m, s in zip(stats["mean"], stats["std"])]
            ax.fill_between(tasks, low, high, alpha=0.15, color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    _save(fig, path)


def accuracy_memory(points: dict[str, tuple[float, float, float]], title: str, path: Path,
                    styles: dict[str, dict] | None = None) -> None:
    """The paper's Figure 3: one point per label at (memory in MB, ACC), with the ACC's std as
    an error bar, in the label's style; a log memory axis when the memories span a decade."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for label, (memory, acc, std) in points.items():
        style = {k: v for k, v in (styles or {}).get(label, {}).items()
                 if k in ("color", "marker", "fillstyle", "zorder")}
        ax.errorbar([memory], [acc], yerr=[std] if std else None, label=label, linestyle="none",
                    markersize=12 if style.get("marker") == "*" else 7, capsize=3, **style)
    memories = [m for m, _, _ in points.values()]
    if min(memories) > 0 and max(memories) / min(memories) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("memory after the last task (MB)")
    ax.set_ylabel("final average accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    _save(fig, path)
