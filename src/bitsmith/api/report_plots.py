"""The plots of ``bitsmith report``, each returned as a ``data:image/png;base64,...`` URI to embed in the page.

Figures are drawn by matplotlib's Agg canvas on ``Figure`` objects of their own (no pyplot, no global backend
switch, nothing shown on screen), so making a report never opens a window and never depends on a display.

    plot             | x                          | y                | marks
    pareto_png       | size (MB) / latency ratio  | the tune metric  | front joined, best a star, peers X, target line
    sensitivity_png  | layer (or group)           | measured harm    | one bar colour per candidate
    bits_png         | layer                      | bits             | one bar colour per scheme
"""

from __future__ import annotations

import base64
import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["pareto_png", "sensitivity_png", "bits_png"]

_MAX_WIDTH_IN = 16.0  # inches: a plot of many layers grows sideways up to this, then its labels get smaller
_DPI = 100


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})  # no version string in the file
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _front_axes(ax, trials, cost, scale, front, metric, best, target) -> None:
    """One panel: every trial, the front's trials joined in order of ``cost`` (divided by ``scale``), the best a
    star, the target a line."""
    points = [(t[cost] / scale, t[metric], t["name"]) for t in trials if _finite(t.get(cost), t.get(metric))]
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=36, color="#9aa5b1", zorder=2, label="trial")
    on_front = sorted(p for p in points if p[2] in front)
    if on_front:
        ax.plot([p[0] for p in on_front], [p[1] for p in on_front], "-o", color="#1f77b4", markersize=7, zorder=3,
                label="Pareto front")
    for x, y, name in points:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color="#333333")
        if name == best:
            ax.scatter([x], [y], marker="*", s=320, color="#d62728", edgecolors="black", zorder=5, label="best")
    if target is not None:
        op, value = target
        ax.axhline(value, color="#2ca02c", linestyle="--", linewidth=1.5, zorder=1,
                   label=f"target {metric} {op} {value:g}")
    ax.set_ylabel(metric if target is None else f"{metric} ({'higher' if target[0] == '>=' else 'lower'} is better)")
    ax.margins(x=0.12, y=0.08)  # room for the names beside the points
    ax.grid(True, alpha=0.3)


def pareto_png(trials: list[dict], metric: str, fronts: dict[str, list[str]], best: str | None,
               peers: list[dict] | None = None, target: tuple[str, float] | None = None) -> str:
    """Quality against size and against latency ratio side by side; ``fronts`` {"size": [...], "latency": [...]}
    names the trials on each front, ``target`` is (">=" or "<=", value) in the metric's units."""
    fig = Figure(figsize=(12, 4.8))
    size_ax, latency_ax = fig.subplots(1, 2)
    _front_axes(size_ax, trials, "bytes", 1e6, set(fronts.get("size", [])), metric, best, target)
    size_ax.set_xlabel("size (MB)")
    size_ax.ticklabel_format(axis="x", style="plain", useOffset=False)  # full values, not "+1.117" and offsets
    size_ax.set_title("quality vs size")
    _front_axes(latency_ax, trials, "latency_ratio", 1.0, set(fronts.get("latency", [])), metric, best, target)
    latency_ax.set_xlabel("latency / float latency")
    latency_ax.set_title("quality vs latency")
    for ax, cost in ((size_ax, "bytes"), (latency_ax, "latency_ratio")):
        shown = [p for p in peers or [] if _finite(p.get(cost), p.get(metric))]
        if shown:
            scale = 1e6 if cost == "bytes" else 1.0
            ax.scatter([p[cost] / scale for p in shown], [p[metric] for p in shown], marker="X", s=70,
                       color="#ff7f0e", zorder=4, label="peer")
            for p in shown:
                ax.annotate(str(p.get("name", "")), (p[cost] / scale, p[metric]), textcoords="offset points",
                            xytext=(5, -11), fontsize=8, color="#b35900")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _data_uri(fig)


def _wide_figure(count: int, per_item: float, height: float) -> Figure:
    return Figure(figsize=(min(_MAX_WIDTH_IN, max(6.0, 1.5 + per_item * count)), height))


def _layer_labels(ax, labels: list[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center",
                       fontsize=8 if len(labels) <= 40 else 6)


def sensitivity_png(rows: list[dict], metric: str) -> str:
    """Measured harm of each layer (or group) under each candidate, as grouped bars (a missing or non-finite
    measurement leaves its bar out)."""
    groups = list(dict.fromkeys(str(r["group"]) for r in rows))
    candidates = list(dict.fromkeys(str(r["candidate"]) for r in rows))
    harm = {(str(r["group"]), str(r["candidate"])): r.get("measured") for r in rows}
    fig = _wide_figure(len(groups) * len(candidates), 0.25, 4.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(candidates))
    for index, name in enumerate(candidates):
        xs = [g + (index - (len(candidates) - 1) / 2) * width for g in range(len(groups))]
        heights = [harm.get((group, name)) for group in groups]
        kept = [(x, h) for x, h in zip(xs, heights) if _finite(h)]
        ax.bar([x for x, _ in kept], [h for _, h in kept], width=width, label=name, color=f"C{index % 10}")
    ax.axhline(0, color="black", linewidth=0.8)
    _layer_labels(ax, groups)
    ax.set_ylabel(f"measured harm ({metric})")
    ax.set_title("measured harm of each layer alone, per candidate")
    ax.legend(title="candidate", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside, never on a bar
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


def bits_png(layers: list[dict]) -> str:
    """Bits of each layer's weights, one colour per scheme (the legend names them)."""
    names = [str(row["name"]) for row in layers]
    schemes = list(dict.fromkeys(str(row["scheme"]) for row in layers))
    fig = _wide_figure(len(names), 0.3, 4.2)
    ax = fig.subplots()
    for index, scheme in enumerate(schemes):
        xs = [i for i, row in enumerate(layers) if str(row["scheme"]) == scheme]
        bits = [layers[i]["bits"] if _finite(layers[i].get("bits")) else 0 for i in xs]
        ax.bar(xs, bits, width=0.7, color=f"C{index % 10}", label=scheme)
    _layer_labels(ax, names)
    ax.set_xlim(-1, len(names))  # one or two layers keep narrow bars
    bits = {row["bits"] for row in layers if _finite(row.get("bits"))}
    ax.set_yticks(sorted({0, 4, 8, 16} | bits))
    ax.set_ylim(0, max(bits | {16}) * 1.2)
    ax.set_ylabel("bits per weight")
    ax.set_title("scheme of each layer")
    ax.legend(title="scheme", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)
