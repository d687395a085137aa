"""The search's arithmetic: Pareto fronts, the next budgets to try, the greedy fallback's order, blocking layers.

Pure functions over plain numbers; what a trial is and how it is measured lives in ``api.tune``.

A per-layer mix is searched along one axis, the budget fraction f in [0, 1]: the mix chosen (``mixed.choose_mix``)
within ``budget_at(f)`` = cheapest * (float / cheapest) ** f of cost, a log scale between the cheapest mix and all
float (their costs differ several-fold, and the budgets that matter lie near the cheap end: f = 0.0625 is 1.1x
the cheapest mix's cost where float is 5x it). Predicted harm falls as f grows, so the cheapest f whose
*measured* quality meets the target is found by bisection (k-section with k workers): each round tries k fractions
spread over the interval still open, then keeps the part between the largest fraction that missed and the
smallest that met.

    round | open interval | tried (k=1) | measured      | next interval
    1     | (0, 1)        | 0.5         | meets         | (0, 0.5)
    2     | (0, 0.5)      | 0.25        | misses        | (0.25, 0.5)
"""

from __future__ import annotations

__all__ = ["pareto_front", "budget_at", "open_interval", "next_fractions", "greedy_order", "blocking_layers"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, loss) points no other point beats on both (lower is better for each)."""
    front = []
    for i, (cost, loss) in enumerate(points):
        dominated = any(c <= cost and l <= loss and (c < cost or l < loss) for c, l in points)
        if not dominated:
            front.append(i)
    return front


def budget_at(fraction: float, cheapest: float, most: float) -> float:
    """The cost at ``fraction`` of the way from ``cheapest`` to ``most`` on a log scale (linear if either is 0)."""
    if cheapest <= 0 or most <= cheapest:
        return cheapest + fraction * (most - cheapest)
    return cheapest * (most / cheapest) ** fraction


def open_interval(tried: dict[float, bool]) -> tuple[float, float]:
    """(largest fraction that missed below the smallest that met, smallest that met); 0 and 1 when none."""
    met = [f for f, ok in tried.items() if ok]
    high = min(met, default=1.0)
    low = max((f for f, ok in tried.items() if not ok and f < high), default=0.0)
    return low, high


def next_fractions(tried: dict[float, bool], count: int, digits: int = 4) -> list[float]:
    """``count`` untried fractions spread evenly inside ``open_interval(tried)`` (rounded to ``digits``, so a log
    names them exactly); empty when the interval is narrower than the rounding."""
    low, high = open_interval(tried)
    picks = []
    for i in range(1, count + 1):
        f = round(low + (high - low) * i / (count + 1), digits)
        if low < f < high and f not in tried and f not in picks:
            picks.append(f)
    return picks


def greedy_order(harm: dict[str, float]) -> list[str]:
    """Layers from the most to the least harmful (ties by name): the order an INC-style fallback returns them to
    float in."""
    return sorted(harm, key=lambda layer: (-harm[layer], layer))


def blocking_layers(harm: dict[str, list[float]], allowed: float) -> list[tuple[str, float]]:
    """Layers every cost-saving option of which alone already exceeds the ``allowed`` harm of the target, with the
    least of those harms, worst first: no mix that changes them can meet the target."""
    blocking = [(layer, min(options)) for layer, options in harm.items() if options and min(options) > allowed]
    return sorted(blocking, key=lambda item: (-item[1], item[0]))
