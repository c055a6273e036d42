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
    """(rows, cols, 8, 8) pixels in [0, 16] -> a PNG, one row per label. The images are tiled
    into one array with a 1-pixel gap and drawn with one `imshow` (many subplots are slow)."""
    plt = pyplot()
    rows, cols, height, width = images.shape
    gap = 1
    canvas = torch.full((rows * (height + gap) - gap, cols * (width + gap) - gap), float('nan'))
    for r in range(rows):
        for c in range(cols):
            canvas[r * (height + gap):r * (height + gap) + height, c * (width + gap):c * (width + gap) + width] = images[r, c]
    figure, axis = plt.subplots(figsize = (0.45 * cols + (0.7 if row_labels else 0.1), 0.45 * rows + (0.35 if title else 0.1)))
    cmap = plt.get_cmap('gray_r').copy()
    cmap.set_bad('white')
    axis.imshow(canvas.numpy(), cmap = cmap, vmin = 0, vmax = 16, interpolation = 'nearest')
    axis.set_xticks([])
    axis.set_yticks([r * (height + gap) + (height - 1) / 2 for r in range(rows)] if row_labels else [])
    if row_labels:
        axis.set_yticklabels(row_labels)
    axis.tick_params(length = 0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    if title:
        axis.set_title(title, fontsize = 9)
    figure.tight_layout(pad = 0.2)
    path = Path(path)
    path.parent.mkdir(parents = True, exist_ok = True)
    figure.savefig(path, dpi = 80, bbox_inches = 'tight', pad_inches = 0.05)
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


def save_tradeoff_plot(curves: dict[str, list[tuple[str, dict]]], path: str | Path, floor: float, default: dict | None = None,
                       title: str | None = None) -> Path:
    """Two panels for a sweep of sampling settings: accuracy against the Fréchet distance (log
    scale, with the real-against-real floor dashed) and against the diversity ratio (real digits
    at 1). `curves` maps a curve's name to its (label, row) points; a row holds the measures
    (and their `_std` over seeds). The `default` row is drawn as a star."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize = (11, 4.6), sharey = True)
    panels = ((axes[0], 'frechet_distance', 'Fréchet distance to held-out real digits (lower is better)', floor, 'real against real'),
              (axes[1], 'diversity', "diversity: drawings' spread over real digits' (1 = as varied)", 1., 'real digits'))
    for axis, key, name, reference, reference_name in panels:
        for curve, points in curves.items():
            x = [row[key] for _, row in points]
            y = [100 * row['text_to_image_accuracy'] for _, row in points]
            axis.errorbar(x, y, xerr = [row.get(f'{key}_std', 0.) for _, row in points],
                          yerr = [100 * row.get('text_to_image_accuracy_std', 0.) for _, row in points],
                          marker = 'o', markersize = 4, linewidth = 1, capsize = 2, label = curve or None)
            for (label, _), xi, yi in zip(points, x, y):
                axis.annotate(label, (xi, yi), fontsize = 6, xytext = (4, -9), textcoords = 'offset points')
        if default is not None:
            axis.scatter([default[key]], [100 * default['text_to_image_accuracy']], s = 220, marker = '*', color = 'tab:red',
                         zorder = 5, label = 'default')
        axis.axvline(reference, color = 'gray', linestyle = '--', linewidth = 1, label = reference_name)
        if key == 'frechet_distance':
            from matplotlib.ticker import FormatStrFormatter
            axis.set_xscale('log')
            axis.xaxis.set_major_formatter(FormatStrFormatter('%g'))
            axis.xaxis.set_minor_formatter(FormatStrFormatter('%g'))
            axis.tick_params(axis = 'x', which = 'minor', labelsize = 6)
        axis.set_xlabel(name, fontsize = 8)
        axis.grid(alpha = 0.3, which = 'both')
        axis.legend(fontsize = 7, loc = 'lower right' if key == 'frechet_distance' else 'lower left')
    axes[0].set_ylabel('drawings read as the digit asked for (%)', fontsize = 8)
    if title:
        figure.suptitle(title, fontsize = 9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents = True, exist_ok = True)
    figure.savefig(path, dpi = 100)
    plt.close(figure)
    return path
