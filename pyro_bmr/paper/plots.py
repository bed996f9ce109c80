"""Figures comparing sparsification methods, after Figs. 1-4 of Marković et al. (2023).

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg
canvas, writes it to ``path`` (PNG unless the suffix names another format that
matplotlib knows; parent directories are created) and returns the path. Nothing
goes through :mod:`matplotlib.pyplot`, so no global backend is switched, no
window opens and no figure is left registered for the caller to close.

Training curves come as the ``"methods"`` part of ``results.json``::

    {"<method>": {"epoch": [...], "accuracy": [...], "nll": [...], "ece": [...],
                  "pruned_fraction": [...], "seconds": [...]}}

where every list is as long as ``"epoch"`` and ``None`` marks a missing value.
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_first_layer", "plot_metrics", "plot_pruned_fraction", "plot_weight_cdf"]

# Fixed colours so a method looks the same in every figure.
_METHOD_COLORS = {"flat-map": "C0", "flat-ff": "C1", "tiered-ff": "C2", "bmr": "C3"}
_OTHER_COLORS = ("C4", "C5", "C6", "C7", "C8", "C9")
_PANEL_SIZE = (4.0, 3.2)


def _colors(methods: Sequence[str]) -> dict[str, str]:
    others = iter(_OTHER_COLORS * (1 + len(methods) // len(_OTHER_COLORS)))
    return {m: _METHOD_COLORS.get(m) or next(others) for m in methods}


def _figure(num_panels: int, max_cols: int = 3) -> tuple[Figure, list]:
    ncols = min(num_panels, max_cols)
    nrows = math.ceil(num_panels / ncols)
    fig = Figure(figsize=(_PANEL_SIZE[0] * ncols, _PANEL_SIZE[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes[:num_panels]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _check_results(results: Mapping, keys: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    if not isinstance(results, Mapping):
        raise TypeError(f"results must map method names to dicts, got {type(results).__name__}")
    if not results:
        raise ValueError("results is empty: there is no method to plot")
    series = {}
    for method, curves in results.items():
        if not isinstance(curves, Mapping):
            raise TypeError(f"results[{method!r}] must be a dict, got {type(curves).__name__}")
        out = {}
        for key in ("epoch", *keys):
            if key not in curves:
                raise ValueError(
                    f"results[{method!r}] has no key {key!r} (has: {', '.join(map(str, curves))})"
                )
            values = curves[key]
            if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
                raise TypeError(
                    f"results[{method!r}][{key!r}] must be a list, got {type(values).__name__}"
                )
            try:
                out[key] = np.array([np.nan if v is None else v for v in values], dtype=float)
            except (TypeError, ValueError):
                raise TypeError(
                    f"results[{method!r}][{key!r}] must hold numbers or None, got {values!r}"
                ) from None
            if out[key].ndim != 1:
                raise ValueError(f"results[{method!r}][{key!r}] must be a flat list of numbers")
            if len(out[key]) != len(out["epoch"]):
                raise ValueError(
                    f"results[{method!r}][{key!r}] has {len(out[key])} values but "
                    f"'epoch' has {len(out['epoch'])}"
                )
        series[method] = out
    return series


def _plot_curves(
    results: Mapping, path: str | Path, panels: Sequence[tuple[str, str]], title: str | None
) -> Path:
    series = _check_results(results, [key for key, _ in panels])
    colors = _colors(list(series))
    fig, axes = _figure(len(panels))
    for ax, (key, label) in zip(axes, panels):
        for method, curves in series.items():
            ax.plot(curves["epoch"], curves[key], marker=".", color=colors[method], label=method)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_metrics(results: Mapping, path: str | Path, *, title: str | None = None) -> Path:
    """Test accuracy, ECE and NLL against epoch, one line per method (Fig. 1).

    :param results: ``{method: {"epoch": [...], "accuracy": [...], "ece": [...],
        "nll": [...], ...}}``.
    :type results: Mapping[str, Mapping[str, list]]
    :param path: output file.
    :type path: str or pathlib.Path
    :param title: figure title.
    :type title: str or None
    :returns: ``path``.
    :rtype: pathlib.Path
    """
    panels = [("accuracy", "accuracy"), ("ece", "ECE"), ("nll", "NLL (nats)")]
    return _plot_curves(results, path, panels, title)


def plot_pruned_fraction(results: Mapping, path: str | Path, *, title: str | None = None) -> Path:
    """Fraction of pruned weights against epoch, one line per method (Fig. 2).

    :param results: ``{method: {"epoch": [...], "pruned_fraction": [...], ...}}``.
    :type results: Mapping[str, Mapping[str, list]]
    :param path: output file.
    :type path: str or pathlib.Path
    :param title: figure title.
    :type title: str or None
    :returns: ``path``.
    :rtype: pathlib.Path
    """
    return _plot_curves(results, path, [("pruned_fraction", "fraction pruned")], title)


def _as_array(tensor: torch.Tensor, what: str) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.numel() == 0:
        raise ValueError(f"{what} is empty")
    return tensor.detach().to("cpu", torch.float64).numpy()


def _ecdf_points(values: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the empirical CDF at them, thinned to about ``max_points``
    while keeping the last exact zero so the jump at 0 keeps its true height."""
    x = np.sort(values)
    n = x.size
    idx = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
    num_zeros = int(np.searchsorted(x, 0.0, side="right"))
    if num_zeros:
        idx = np.union1d(idx, [num_zeros - 1])
    # Start the step curve at height 0 from the smallest value.
    return np.concatenate([x[:1], x[idx]]), np.concatenate([[0.0], (idx + 1) / n])


def plot_weight_cdf(
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | Path,
    *,
    max_points: int = 2000,
    title: str | None = None,
) -> Path:
    """Empirical CDF of :math:`|\\mu|`, the absolute posterior means, per layer (Fig. 3).

    One panel per layer (in order of first appearance), one line per method; a
    method without that layer is left out of the panel. The x-axis is symmetric-log
    (:func:`matplotlib.scale.SymmetricalLogScale`): logarithmic above the smallest
    non-zero :math:`|\\mu|` in the panel (rounded down to a power of ten, and at
    least :math:`10^{-6}` times the largest) and linear below, so exact zeros from
    pruning sit at :math:`x = 0` and show as a vertical jump at the left. The
    legend gives each method's fraction of exact zeros.

    :param weights: ``{method: {layer name: tensor of posterior means}}``.
    :type weights: Mapping[str, Mapping[str, torch.Tensor]]
    :param path: output file.
    :type path: str or pathlib.Path
    :param int max_points: curve points per line; the CDF is evaluated exactly at
        that many sorted values.
    :param title: figure title.
    :type title: str or None
    :returns: ``path``.
    :rtype: pathlib.Path
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must be a non-empty {method: {layer: Tensor}} mapping")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int >= 2, got {max_points!r}")
    abs_means: dict[str, dict[str, np.ndarray]] = {}
    for method, layers in weights.items():
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError(f"weights[{method!r}] must be a non-empty {{layer: Tensor}} mapping")
        abs_means[method] = {
            layer: np.abs(_as_array(w, f"weights[{method!r}][{layer!r}]"))
            for layer, w in layers.items()
        }
    layer_names = list(dict.fromkeys(name for layers in abs_means.values() for name in layers))
    colors = _colors(list(abs_means))
    fig, axes = _figure(len(layer_names))
    for ax, layer in zip(axes, layer_names):
        present = {m: layers[layer] for m, layers in abs_means.items() if layer in layers}
        values = np.concatenate([v.ravel() for v in present.values()])
        if not np.isfinite(values).all():
            raise ValueError(f"weights of layer {layer!r} contain NaN or infinity")
        positive = values[values > 0]
        if positive.size:
            smallest = max(positive.min(), positive.max() * 1e-6)
            linthresh = 10.0 ** math.floor(math.log10(smallest))
        else:
            linthresh = 1.0
        for method, v in present.items():
            x, y = _ecdf_points(v.ravel(), max_points)
            zeros = float(np.mean(v == 0))
            label = f"{method} ({zeros:.1%} zero)"
            ax.step(x, y, where="post", color=colors[method], label=label)
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
        # A little room left of 0 keeps the jump at exact zeros clear of the spine.
        ax.set_xlim(left=-0.3 * linthresh)
        ax.set_ylim(0.0, 1.02)
        ax.set_title(layer)
        ax.set_xlabel("|posterior mean|")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best", framealpha=0.6)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _image_shape(num_inputs: int, image_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if image_shape is None:
        for channels in (1, 3):
            side = math.isqrt(num_inputs // channels)
            if channels * side * side == num_inputs:
                return channels, side, side
        raise ValueError(
            f"cannot infer an image shape for {num_inputs} inputs per unit; pass image_shape"
        )
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (2, 3) or math.prod(shape) != num_inputs:
        raise ValueError(
            f"image_shape must be (H, W) or (C, H, W) with {num_inputs} elements, got {shape}"
        )
    return shape if len(shape) == 3 else (1, *shape)


def plot_first_layer(
    weight: torch.Tensor,
    path: str | Path,
    image_shape: Sequence[int] | None = None,
    max_units: int = 64,
    *,
    title: str | None = None,
) -> Path:
    """First-layer posterior means as images, one tile per hidden unit (Fig. 4).

    Row :math:`j` of the ``(out, in)`` weight matrix is reshaped to the image shape
    and drawn with a diverging colour map centred at 0 on one shared scale, so
    pruned weights (exactly 0) are the neutral colour. Channels of a colour image
    are drawn side by side. The first ``max_units`` units are shown in a square-ish
    grid separated by grey lines.

    :param torch.Tensor weight: posterior means of shape ``(out, in)``.
    :param path: output file.
    :type path: str or pathlib.Path
    :param image_shape: ``(H, W)`` or ``(C, H, W)`` with ``in`` elements; inferred
        when ``in`` is a square or three times a square.
    :type image_shape: Sequence[int] or None
    :param int max_units: most units (rows) to draw.
    :param title: figure title; defaults to the number of units and exact zeros.
    :type title: str or None
    :returns: ``path``.
    :rtype: pathlib.Path
    """
    w = _as_array(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must have shape (out, in), got {w.shape}")
    if isinstance(max_units, bool) or not isinstance(max_units, int) or max_units < 1:
        raise ValueError(f"max_units must be a positive int, got {max_units!r}")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity")
    channels, height, width = _image_shape(w.shape[1], image_shape)
    units = w[:max_units].reshape(-1, channels, height, width)
    num = units.shape[0]
    tile_w = channels * width + (channels - 1)
    # Enough columns for a roughly square mosaic; units are set further apart than
    # the channels within a unit.
    ncols = min(num, max(1, round(math.sqrt(num * height / tile_w))))
    nrows = math.ceil(num / ncols)
    gap = 1 if channels == 1 else 3
    # NaN gaps are drawn in the colour map's "bad" colour, separating tiles.
    mosaic = np.full((nrows * (height + gap) - gap, ncols * (tile_w + gap) - gap), np.nan)
    for k in range(num):
        r, c = divmod(k, ncols)
        top, left = r * (height + gap), c * (tile_w + gap)
        for ch in range(channels):
            col = left + ch * (width + 1)
            mosaic[top : top + height, col : col + width] = units[k, ch]
    vmax = float(np.abs(units).max()) or 1.0

    import matplotlib

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.55")
    aspect = mosaic.shape[1] / mosaic.shape[0]
    fig = Figure(figsize=(min(14.0, 1.5 + 6.0 * aspect), 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(mosaic, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    fig.colorbar(image, ax=ax, shrink=0.8, label="posterior mean")
    if title is None:
        title = f"first layer: {num} of {w.shape[0]} units, {np.mean(w == 0):.1%} of weights zero"
    ax.set_title(title)
    return _save(fig, path)
