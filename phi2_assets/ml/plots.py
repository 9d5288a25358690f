"""Figures as PNG bytes (matplotlib, no display), for metadata and report files alike."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def histograms_png(series: Mapping[str, Sequence[float]], title: str, xlabel: str, bins: int = 40) -> bytes:
    """One histogram panel per named series (e.g. document and summary word counts)."""
    figure, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.2), squeeze=False)
    for axis, (name, values) in zip(axes[0], series.items(), strict=True):
        axis.hist(list(values), bins=bins, color="#4C72B0")
        axis.set_title(name)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("rows")
    figure.suptitle(title)
    return _png(figure)


def curves_png(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
               ylabel: str) -> bytes:
    """Named (x, y) lines on one axis, e.g. train and eval loss by step."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in curves.items():
        axis.plot(list(xs), list(ys), marker="o" if len(xs) < 30 else None, label=name)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.legend()
    axis.grid(alpha=0.3)
    return _png(figure)


def bars_png(groups: Mapping[str, Mapping[str, float]], title: str, ylabel: str,
             errors: Mapping[str, Mapping[str, tuple[float, float]]] | None = None) -> bytes:
    """Grouped bars: `groups[series][category] = value`, optional (low, high) intervals per bar."""
    categories = list(next(iter(groups.values())).keys())
    width = 0.8 / len(groups)
    figure, axis = plt.subplots(figsize=(max(5, 1.4 * len(categories)), 3.5))
    for offset, (series, values) in enumerate(groups.items()):
        xs = [index + offset * width for index in range(len(categories))]
        heights = [values[c] for c in categories]
        yerr = None
        if errors and series in errors:
            yerr = [[h - errors[series][c][0] for c, h in zip(categories, heights, strict=True)],
                    [errors[series][c][1] - h for c, h in zip(categories, heights, strict=True)]]
        axis.bar(xs, heights, width=width, label=series, yerr=yerr, capsize=3)
    axis.set_xticks([index + width * (len(groups) - 1) / 2 for index in range(len(categories))], categories)
    axis.set_title(title)
    axis.set_ylabel(ylabel)
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    return _png(figure)
