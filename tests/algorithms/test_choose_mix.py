"""choose_mix against brute force on small tables."""

import itertools
import random

import pytest

from bitsmith import BitsmithError
from bitsmith.algorithms.mixed import choose_mix


def _brute(harm, cost, budget):
    best = None
    for picks in itertools.product(*[range(len(row)) for row in harm]):
        if sum(c[p] for c, p in zip(cost, picks)) <= budget + 1e-9:
            total = sum(h[p] for h, p in zip(harm, picks))
            if best is None or total < best[0] - 1e-12:
                best = (total, picks)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_integer_program_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    layers, options = 6, 4
    cost = [[rng.uniform(1, 10) for _ in range(options)] for _ in range(layers)]
    harm = [[rng.uniform(0, 1) for _ in range(options)] for _ in range(layers)]
    budget = sum(min(row) for row in cost) + rng.uniform(0, 15)
    picks = choose_mix(harm, cost, budget)
    assert sum(c[p] for c, p in zip(cost, picks)) <= budget + 1e-6
    assert sum(h[p] for h, p in zip(harm, picks)) == pytest.approx(_brute(harm, cost, budget)[0])


def test_a_budget_below_the_cheapest_mix_is_refused():
    with pytest.raises(BitsmithError, match="below the smallest possible model"):
        choose_mix([[0, 1], [0, 1]], [[4, 2], [4, 2]], 3.9)
    with pytest.raises(BitsmithError, match="same non-empty list"):
        choose_mix([[0, 1]], [[4]], 10)
