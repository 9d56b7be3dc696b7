"""The training curves a trajectory records, drawn as one chart (`info --plot`, `push --plot`).

A trajectory keeps, besides its step records, the loss MeZO measured at every step (unless it was
trained with --no-record-losses) and the evaluations made during training. That is enough to see a run
without its logs: this module draws them for one or several trajectories, one colour per file.

What is drawn, against the steps done before each measurement (or the training forward passes, two per
step, 2N for n-SPSA's N perturbations a step; evaluations are not counted):
- training loss: the recorded value of each step, (L(θ+εz) + L(θ-εz))/2, the mean of the two perturbed
  losses MeZO measured on the batch (for --objective accuracy or f1 that is 1 - accuracy or 1 - F1). The
  loss of step k was measured on the weights after k-1 steps, so it is drawn at k-1, where an evaluation
  of those same weights would be. Light points are the raw values (noisy: one batch, perturbed weights);
  the line is their centred mean over √n steps for a run of n (8 of 60, 32 of 1,000, 141 of 20,000):
  wide enough to show the trend through the noise, narrow enough to keep its bends.
- evaluations: each recorded (split, metric) as markers joined by a dashed line. Losses share the upper
  panel with the training loss; other metrics (accuracy, f1, ...) get a lower panel.

matplotlib is an optional dependency (`pip install 'mezo-replay[plot]'`); it is imported here, lazily,
and only through its object API with the Agg canvas, so no display and no pyplot state are involved.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import MezoReplayError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .format.mzt import Trajectory

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
X_AXES = ("steps", "forward-passes")
INSTALL = "pip install 'mezo-replay[plot]'"
MAX_LINE_POINTS = 2000  # the smoothed line is drawn through at most this many of its points
CAPTION = ("Training loss: (L(θ+εz) + L(θ−εz))/2 of each step, drawn at the steps done before it; points raw, "
           "line their centred mean (window in the legend). Evaluations: markers, dashed.")
_OBJECTIVE = {"accuracy": "training 1 − accuracy", "f1": "training 1 − F1"}
_MARKERS = "osD^vP*Xph"


def require_matplotlib() -> None:
    """One clear line, before any work, where the optional dependency is missing."""
    import importlib

    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise MezoReplayError(f"drawing the chart needs matplotlib, which is not installed: {INSTALL}") from None


def chart_format(out: Path) -> str:
    """png, svg or pdf, from the file's suffix (any case); anything else is refused in one line."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise MezoReplayError(f"{out}: the chart is written as .png, .svg or .pdf (chosen by the suffix), "
                              f"not {out.suffix or 'a file without a suffix'}")
    return fmt


def smoothing_window(steps: int) -> int:
    """√steps, rounded: the trend of a noisy per-step loss without flattening its bends."""
    return max(1, round(math.sqrt(steps)))


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean of the finite values within `window` steps (fewer at the ends); NaN where none is.

    A diverged step (inf or NaN loss) or a step with no recorded loss is left out, not averaged in.
    """
    n = values.size
    ok = np.isfinite(values)
    total = np.concatenate(([0.0], np.cumsum(np.where(ok, values, 0.0), dtype=np.float64)))
    count = np.concatenate(([0], np.cumsum(ok)))
    i = np.arange(n)
    lo = np.clip(i - window // 2, 0, n)
    hi = np.clip(i - window // 2 + window, 0, n)
    have = count[hi] - count[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(have > 0, (total[hi] - total[lo]) / np.maximum(have, 1), np.nan)


@dataclass(frozen=True)
class Curves:
    """What one trajectory contributes to the chart."""

    name: str
    losses: np.ndarray | None      # one per step (NaN: none recorded), None: the file records no losses
    evals: list[dict[str, Any]]    # {"step", "split", "metrics"} as the file holds them
    objective: str
    forwards: int = 2              # training forward passes a step: 2, or 2N with N perturbations (spec/nspsa.md)

    @classmethod
    def of(cls, name: str, traj: Trajectory) -> Curves:
        return cls(name, traj.losses, list(traj.evals), str(traj.header.get("metadata", {}).get("objective", "ce")),
                   2 * int(traj.header["rule"].get("perturbations", 1)))

    @property
    def has_losses(self) -> bool:
        return self.losses is not None and bool(np.isfinite(self.losses).any())

    def missing(self) -> str | None:
        """One line saying what of this trajectory is not on the chart and why, or None."""
        if self.losses is None:
            lost = "no per-step losses (trained with --no-record-losses)"
        elif not self.has_losses:
            lost = "no finite per-step losses" if self.losses.size else "no steps yet"
        else:
            lost = None
        if lost is None:
            return None if self.evals else f"{self.name}: no evaluations recorded: drew its training loss only"
        if not self.evals:
            return f"{self.name}: {lost} and no evaluations: nothing of it is drawn"
        return f"{self.name}: {lost}: drew its evaluations only"


def _x(steps: np.ndarray, axis: str, forwards: int = 2) -> np.ndarray:
    return steps * forwards if axis == "forward-passes" else steps


def draw(curves: Sequence[Curves], *, x_axis: str = "steps") -> Figure:
    """The chart of several trajectories: training loss and evaluated losses above, other metrics below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {X_AXES}")
    if not any(c.has_losses or c.evals for c in curves):
        names = ", ".join(c.name for c in curves)
        raise MezoReplayError(f"nothing to draw: {names} record{'s' if len(curves) == 1 else ''} no per-step losses "
                              f"and no evaluations")
    metric_panel = any(k != "loss" for c in curves for e in c.evals for k in e["metrics"])
    fig = Figure(figsize=(9, 8 if metric_panel else 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    if metric_panel:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        top, bottom = fig.subplots(1, 1), None
    markers: dict[tuple[str, str], str] = {}  # the same (split, metric) has the same marker in every file
    objectives = set()
    for i, c in enumerate(curves):
        colour = f"C{i % 10}"
        if c.has_losses:
            assert c.losses is not None
            objectives.add(c.objective)
            steps = np.arange(c.losses.size)
            top.plot(_x(steps, x_axis, c.forwards), c.losses, ".", color=colour, alpha=0.35, markersize=3.5, rasterized=True)
            window = smoothing_window(c.losses.size)
            line = smoothed(c.losses.astype(np.float64), window)
            every = max(1, math.ceil(c.losses.size / MAX_LINE_POINTS))
            keep = np.unique(np.append(steps[::every], steps[-1:]))
            top.plot(_x(keep, x_axis, c.forwards), line[keep], "-", color=colour, linewidth=1.6,
                     label=f"{c.name}: {_OBJECTIVE.get(c.objective, 'training loss')}"
                           + (f" (mean over {window} steps)" if window > 1 else ""))
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for e in c.evals:
            for metric, value in e["metrics"].items():
                series.setdefault((e["split"], metric), []).append((e["step"], float(value)))
        for (split, metric), points in series.items():
            marker = markers.setdefault((split, metric), _MARKERS[len(markers) % len(_MARKERS)])
            points.sort(key=lambda p: p[0])
            xs = _x(np.array([p[0] for p in points]), x_axis, c.forwards)
            ax = top if metric == "loss" or bottom is None else bottom
            ax.plot(xs, [p[1] for p in points], "--", marker=marker, color=colour, linewidth=1.1, markersize=5,
                    label=f"{c.name}: {split} {metric}")
    top.set_ylabel("loss" if objectives <= {"ce"} else "loss / objective")
    top.set_title("training loss and evaluations")
    axes = [top] if bottom is None else [top, bottom]
    if bottom is not None:
        bottom.set_ylabel("evaluation metric")
    axes[-1].set_xlabel("steps" if x_axis == "steps" else "training forward passes (2 per step)"
                        if all(c.forwards == 2 for c in curves) else "training forward passes (2N per step for N perturbations)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.text(0.5, 0.0, CAPTION, ha="center", va="bottom", fontsize="x-small", wrap=True)
    fig.get_layout_engine().set(h_pad=0.2)
    return fig


def chart_bytes(curves: Sequence[Curves], fmt: str = "png", *, x_axis: str = "steps") -> bytes:
    """The chart as the bytes of a png, svg or pdf file (no date inside, so a redraw gives the same file)."""
    require_matplotlib()
    fig = draw(curves, x_axis=x_axis)
    buf = io.BytesIO()
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None, "ModDate": None}}.get(fmt)
    fig.savefig(buf, format=fmt, dpi=120, metadata=metadata)
    return buf.getvalue()


def write_chart(curves: Sequence[Curves], out: Path, *, overwrite: bool = False, x_axis: str = "steps") -> None:
    """Writes the chart to `out` (its suffix says the format) through a temporary sibling and a rename, so
    `out` is never half-written; an existing `out` is replaced only with `overwrite`."""
    from .rebuild.adapter import atomic_output, check_output

    fmt = chart_format(out)
    check_output(out, overwrite=overwrite, folder=False)
    data = chart_bytes(curves, fmt, x_axis=x_axis)
    with atomic_output(out, overwrite=overwrite, folder=False) as tmp:
        tmp.write_bytes(data)
