"""The search's arithmetic: fronts, bisection over the budget, the greedy order, blocking layers."""

import itertools
import random

import pytest

from bitsmith.algorithms.search import (
    blocking_layers, budget_at, greedy_order, next_fractions, open_interval, pareto_front,
)


def test_the_front_is_every_point_no_other_beats_on_both_axes():
    rng = random.Random(0)
    points = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(40)]
    front = set(pareto_front(points))
    for i, (c, l) in enumerate(points):
        beaten = any(c2 <= c and l2 <= l and (c2, l2) != (c, l) for c2, l2 in points)
        assert (i in front) == (not beaten)
    assert pareto_front([(1, 1), (1, 1)]) == [0, 1]  # equal points do not dominate each other


def test_bisection_closes_on_the_cheapest_fraction_that_meets():
    threshold = 0.3719  # the (unknown to the search) fraction above which the measured quality meets the target
    tried: dict[float, bool] = {}
    for _ in range(12):
        for f in next_fractions(tried, 1):
            tried[f] = f >= threshold
    low, high = open_interval(tried)
    assert low < threshold <= high and high - low < 1e-3
    assert min(f for f, ok in tried.items() if ok) == high


def test_k_workers_split_the_open_interval_into_k_plus_one_parts():
    assert next_fractions({}, 3) == [0.25, 0.5, 0.75]
    assert next_fractions({0.25: False, 0.5: True, 0.75: True}, 3) == [0.3125, 0.375, 0.4375]
    assert open_interval({0.6: False, 0.2: True, 0.1: False}) == (0.1, 0.2)  # a miss above a met point is noise
    assert next_fractions({0.5: False, 0.5001: True}, 2) == []  # narrower than the rounding: done


def test_same_results_give_the_same_fractions():
    def run():
        tried = {}
        for _ in range(5):
            for f in next_fractions(tried, 2):
                tried[f] = f > 0.61
        return tried
    assert run() == run()


def test_greedy_returns_the_most_harmful_first_with_ties_by_name():
    assert greedy_order({"b": 0.5, "a": 0.5, "c": 0.9, "d": 0.0}) == ["c", "a", "b", "d"]


def test_blocking_layers_are_those_whose_every_saving_option_misses_alone():
    harm = {"q": [0.002, 0.0004], "ffn": [0.003, 0.0011], "head": [], "out": [0.01, 0.02]}
    assert blocking_layers(harm, 0.001) == [("out", 0.01), ("ffn", 0.0011)]
    assert blocking_layers(harm, 1.0) == []
    for allowed in (0.0005, 0.0015, 0.005):  # never a layer with an option within the allowance
        for layer, least in blocking_layers(harm, allowed):
            assert all(h > allowed for h in harm[layer]) and least == min(harm[layer])
    assert list(itertools.chain(blocking_layers({}, 0.1))) == []


def test_budgets_run_on_a_log_scale_from_the_cheapest_mix_to_float():
    assert budget_at(0.0, 10.0, 50.0) == 10.0 and budget_at(1.0, 10.0, 50.0) == pytest.approx(50.0)
    assert budget_at(0.5, 10.0, 50.0) == pytest.approx(10.0 * 5 ** 0.5)  # 22.4: the geometric middle
    assert budget_at(0.0625, 10.0, 50.0) == pytest.approx(11.06, abs=0.01)  # four halvings: 1.1x the cheapest
    assert budget_at(0.5, 0.0, 4.0) == 2.0  # no ratio to take: linear
