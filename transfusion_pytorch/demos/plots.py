"""The pictures a run writes: a grid of digits and the loss curves (matplotlib, Agg backend,
so no display is needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_digit_grid(images: torch.Tensor, path: str | Path, row_labels: list[str] | None = None, title: str | None = None) -> Path:
    """(rows, cols, 8, 8) pixels in [0, 16] -> a PNG, one row per label."""
    plt = pyplot()
    rows, cols = images.shape[:2]
    figure, axes = plt.subplots(rows, cols, figsize = (0.6 * cols + 0.4, 0.6 * rows + (0.4 if title else 0.1)), squeeze = False)
    for r in range(rows):
        for c in range(cols):
            axis = axes[r][c]
            axis.imshow(images[r, c].numpy(), cmap = 'gray_r', vmin = 0, vmax = 16)
            axis.set_xticks([]), axis.set_yticks([])
            if c == 0 and row_labels is not None:
                axis.set_ylabel(row_labels[r], rotation = 0, labelpad = 10, va = 'center')
    if title:
        figure.suptitle(title, fontsize = 9)
    figure.tight_layout(pad = 0.2, rect = (0, 0, 1, 0.96 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents = True, exist_ok = True)
    figure.savefig(path, dpi = 80)
    plt.close(figure)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_loss_curve(metrics: list[dict], path: str | Path, keys: tuple[str, ...] = ('loss', 'text_loss', 'flow_loss', 'held_out_text_loss', 'held_out_flow_loss')) -> Path:
    """Each of `keys` found in the metrics, against the step, on a log scale."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize = (5, 3.2))
    for key in keys:
        points = [(m['step'], m[key]) for m in metrics if key in m and m[key] is not None and m[key] > 0]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, label = key.replace('_', ' '), marker = 'o' if len(points) < 30 else None, markersize = 3)
    axis.set_xlabel('step'), axis.set_yscale('log'), axis.grid(alpha = 0.3)
    axis.legend(fontsize = 7)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi = 80)
    plt.close(figure)
    return path
