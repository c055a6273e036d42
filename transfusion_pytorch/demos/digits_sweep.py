"""`transfusion eval RUN --sweep KEY=V1,V2 ...`: the digits evaluation of the drawings at every
combination of sampling settings, as a table and a plot of accuracy against Fréchet distance
and diversity.

    transfusion eval runs/digits --sweep cfg_scale=1,2,3 guidance_interval=0:1,0.6:1 seed=0,1,2

Each KEY is an option of `digits_eval.Sampling` (an interval is written `t_lo:t_hi`) or `seed`:
the figures of a point are then the mean over the seeds, with their spread (a point's accuracy
moves by about 1.5 points and its Fréchet distance by about 0.1 from seed to seed at 50
drawings per label). Settings not swept are the evaluation's (its --cfg-scale and the like,
else the defaults). Captioning and the held-out losses do not depend on how images are
sampled, so a sweep leaves them out.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import fields, replace

from ..config import closest_match
from .digits_eval import Sampling, evaluate

MEASURES = ('text_to_image_accuracy', 'frechet_distance', 'frechet_distance_real', 'diversity')


def parse_interval(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(':')
    if not sep:
        raise ValueError(f'expected t_lo:t_hi, got {text!r}')
    return float(low), float(high)


PARSERS = dict(modality_steps = int, ode_method = str, time_shift = float, cfg_scale = float,
               guidance_interval = parse_interval, guidance_schedule = str, seed = int)
SAMPLING_KEYS = [f.name for f in fields(Sampling)]
assert set(PARSERS) == {*SAMPLING_KEYS, 'seed'}


def parse_value(key: str, text: str):
    """One value of a sweep key, as written on the command line; errors name the key."""
    if key not in PARSERS:
        close = closest_match(key, PARSERS)
        hint = f"; did you mean '{close}'?" if close else ''
        raise ValueError(f"unknown key '{key}'{hint} Valid keys: {', '.join(PARSERS)}")
    try:
        return PARSERS[key](text.strip())
    except ValueError:
        kind = 't_lo:t_hi (two numbers)' if key == 'guidance_interval' else PARSERS[key].__name__
        raise ValueError(f'{key}: expected {kind}, got {text!r}') from None


def parse_sweep(specs: list[str]) -> dict[str, list]:
    """['cfg_scale=1,2', 'guidance_interval=0:1,0.5:1'] -> {'cfg_scale': [1., 2.], 'guidance_interval': [(0., 1.), (0.5, 1.)]}"""
    axes = {}
    for spec in specs:
        key, sep, values = spec.partition('=')
        if not sep or not values.strip():
            raise ValueError(f'expected KEY=V1,V2,... (keys: {", ".join(PARSERS)}), got {spec!r}')
        key = key.strip()
        if key in axes:
            raise ValueError(f'{key} is given twice')
        axes[key] = [parse_value(key, value) for value in values.split(',')]
    return axes


def sweep_points(base: Sampling, axes: dict[str, list]) -> list[Sampling]:
    """Every combination of the sampling axes' values over `base`, checked before anything is sampled."""
    sampling_axes = {key: values for key, values in axes.items() if key != 'seed'}
    points = []
    for values in itertools.product(*sampling_axes.values()):
        changes = dict(zip(sampling_axes, values))
        try:
            points.append(replace(base, **changes))
        except ValueError as error:
            raise ValueError(f"the point {', '.join(f'{k} = {v}' for k, v in changes.items())}: {error}") from None
    return points


def run_sweep(model, codec, points: list[Sampling], seeds: list[int], per_label: int = 50, progress = print) -> list[dict]:
    """One row per point: its settings, and the mean and the standard deviation over the seeds of each measure."""
    rows, done = [], {}
    for index, point in enumerate(points):
        # without guidance the interval and the schedule change nothing: such points are drawn once
        same = replace(point, guidance_interval = Sampling.guidance_interval, guidance_schedule = Sampling.guidance_schedule) if point.cfg_scale == 1. else point
        if same not in done:
            done[same] = [evaluate(model, codec, per_label = per_label, sampling = point, seed = seed, losses = False, captions = False)
                          for seed in seeds]
        runs = done[same]
        row = dict(point.options(), seeds = list(seeds))
        for key in MEASURES + tuple(key for key in runs[0] if key.startswith(('diversity_', 'text_to_image_accuracy_'))):
            values = [run[key] for run in runs]
            row[key] = statistics.fmean(values)
            if key in MEASURES:
                row[f'{key}_std'] = statistics.stdev(values) if len(values) > 1 else 0.
        rows.append(row)
        progress(f'[{index + 1}/{len(points)}] {point.describe()}: accuracy {row["text_to_image_accuracy"]:.1%}, '
                 f'Fréchet distance {row["frechet_distance"]:.3f}, diversity {row["diversity"]:.3f}')
    return rows


def format_value(value) -> str:
    if isinstance(value, (tuple, list)):
        return f'{format_value(value[0])}:{format_value(value[1])}'
    return f'{value:g}' if isinstance(value, float) else str(value)


def is_point(row: dict, sampling: Sampling) -> bool:
    return all(row[key] == getattr(sampling, key) for key in SAMPLING_KEYS)


def table(rows: list[dict], keys: list[str], default: Sampling) -> str:
    """A markdown table: the swept settings, accuracy, Fréchet distance, mean and lowest per-label
    diversity (means over the seeds, with their standard deviation when there are several)."""
    def measure(row, key, form):
        spread = f' ± {form(row[key + "_std"])}' if len(row['seeds']) > 1 else ''
        return form(row[key]) + spread

    lines = ['| ' + ' | '.join([*keys, 'accuracy', 'Fréchet distance', 'diversity', 'lowest label diversity', '']) + ' |',
             '|' + '---|' * (len(keys) + 5)]
    for row in rows:
        lowest = min(row[f'diversity_{label}'] for label in range(10) if f'diversity_{label}' in row)
        cells = [format_value(row[key]) for key in keys]
        cells += [measure(row, 'text_to_image_accuracy', lambda v: f'{100 * v:.1f}%'), measure(row, 'frechet_distance', lambda v: f'{v:.3f}'),
                  measure(row, 'diversity', lambda v: f'{v:.3f}'), f'{lowest:.3f}', 'default' if is_point(row, default) else '']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def curves(rows: list[dict], keys: list[str]) -> dict[str, list[tuple[str, dict]]]:
    """The rows as curves for the plot: along cfg_scale when it is swept (one curve per setting
    of the other keys), else one curve of single points; each point with its label."""
    along = 'cfg_scale' if 'cfg_scale' in keys else None
    others = [key for key in keys if key != along]
    grouped: dict[str, list[tuple[str, dict]]] = {}
    for row in sorted(rows, key = lambda row: row['cfg_scale']):
        name = ' '.join(f'{key}={format_value(row[key])}' for key in others) or 'cfg_scale'
        label = f'cfg {format_value(row[along])}' if along else name
        grouped.setdefault(name if along else '', []).append((label, row))
    return grouped
