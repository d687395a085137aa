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


@pytest.mark.parametrize("seed", range(4))
def test_an_infinite_option_is_never_chosen_and_the_rest_is_optimal(seed):
    """A candidate that does not apply to a layer (GPTQ on an embedding table) has infinite harm and cost there."""
    rng = random.Random(seed)
    cost = [[rng.uniform(1, 10) for _ in range(3)] for _ in range(5)]
    harm = [[rng.uniform(0, 1) for _ in range(3)] for _ in range(5)]
    cost[0][2] = harm[0][2] = float("inf")
    cost[1][1] = harm[1][1] = float("inf")
    cost[0][1] = 0.5  # cheapest of all on layer 0: the budget below must use it
    budget = sum(min(row) for row in cost) + rng.uniform(0, 10)
    picks = choose_mix(harm, cost, budget)
    assert picks[0] != 2 and picks[1] != 1
    assert sum(h[p] for h, p in zip(harm, picks)) == pytest.approx(_brute(harm, cost, budget)[0], abs=1e-9)


def test_a_layer_with_no_finite_option_is_refused():
    with pytest.raises(BitsmithError, match="at least one finite option"):
        choose_mix([[float("inf")], [0.0]], [[float("inf")], [1.0]], 10.0)
