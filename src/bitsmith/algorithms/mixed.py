"""Mixed precision as an integer program: one option per layer, the least summed harm within a budget.

Pure function over an additive table (``harm[l][o]``, ``cost[l][o]`` for layer l and option o): minimise
sum harm[l][o] x[l][o] subject to sum_o x[l][o] = 1 for every l and sum cost[l][o] x[l][o] <= budget, x binary,
solved exactly by scipy's ``milp`` (HiGHS branch and bound). Additivity is the approximation: each layer's harm
was measured with that layer alone changed, so the chosen mix must be evaluated for real afterwards. An option
whose harm or cost is infinite does not exist for that layer (its variable is held at 0).
"""

from __future__ import annotations

import math

import numpy as np

from bitsmith.errors import BitsmithError

__all__ = ["choose_mix"]


def choose_mix(harm: list[list[float]], cost: list[list[float]], budget: float) -> list[int]:
    """The option index chosen for each layer (see the module docstring); a budget no mix fits is an error."""
    if not harm or len(harm) != len(cost) or any(len(h) != len(c) or not h for h, c in zip(harm, cost)):
        raise BitsmithError("mixed precision needs, for every layer, the same non-empty list of options in both tables")
    allowed = [[math.isfinite(h) and math.isfinite(c) for h, c in zip(hs, cs)] for hs, cs in zip(harm, cost)]
    if not all(any(row) for row in allowed):
        raise BitsmithError("mixed precision needs at least one finite option for every layer")
    cheapest = sum(min(c for c, ok in zip(row, oks) if ok) for row, oks in zip(cost, allowed))
    if cheapest > budget:
        raise BitsmithError(f"the budget {budget:,.6g} is below the smallest possible model ({cheapest:,.6g} with the"
                            " cheapest option on every layer)")
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(row) for row in harm]
    offsets = np.cumsum([0, *sizes])
    n = int(offsets[-1])
    usable = np.concatenate([np.asarray(row, dtype=bool) for row in allowed])
    objective = np.where(usable, np.concatenate([np.asarray(row, dtype=float) for row in harm]), 0.0)
    one_each = np.zeros((len(harm), n))
    for layer, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        one_each[layer, start:stop] = 1
    spend = np.where(usable, np.concatenate([np.asarray(row, dtype=float) for row in cost]), 0.0)[None, :]
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(spend, -np.inf, budget)]
    result = milp(objective, constraints=constraints, integrality=np.ones(n),
                  bounds=Bounds(0, usable.astype(float)))
    if result.x is None:
        raise BitsmithError(f"no mix fits the budget {budget:,.6g} ({result.message})")
    chosen = np.asarray(result.x).round().astype(int)
    return [int(np.argmax(chosen[start:stop])) for start, stop in zip(offsets[:-1], offsets[1:])]
