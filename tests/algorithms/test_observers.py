import pytest
import torch

from bitsmith import BitsmithError
from bitsmith.algorithms.observers import OBSERVERS, make_observer, qparams_u8


def test_qparams_u8_covers_zero_exactly():
    scale, zero = qparams_u8(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and zero == 64
    assert (0 - zero) * scale == pytest.approx(-1.0, abs=scale / 2)
    assert qparams_u8(0.5, 2.0) == (pytest.approx(2.0 / 255), 0)  # range widened to hold 0


def test_minmax_and_moving_average():
    minmax, moving = make_observer("minmax"), make_observer("moving_average")
    for batch in (torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0])):
        minmax.update(batch)
        moving.update(batch)
    assert minmax.range() == (-3.0, 2.0)
    assert moving.range() == pytest.approx((0.9 * -1 + 0.1 * -3, 0.9 * 2 + 0.1 * 1))


@pytest.mark.parametrize("name", ["percentile", "entropy"])
def test_histogram_observers_clip_a_rare_outlier(name):
    torch.manual_seed(0)
    observer = make_observer(name)
    for _ in range(4):
        x = torch.randn(20000).abs()
        x[0] = 50.0  # one outlier per batch
        observer.update(x)
    low, high = observer.range()
    assert 0.0 <= low < 1e-3  # non-negative data keeps its zero side
    assert 2.0 < high < 6.0  # percentile 4.10, entropy 3.52: clipped far below the outlier


def _quant_error(x, low, high):
    scale, zero = qparams_u8(low, high)
    return ((torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale - x).pow(2).sum().item()


def test_mse_observer_has_the_lowest_error():
    torch.manual_seed(0)
    x = torch.cat([torch.rand(20000), 1 + 9 * torch.rand(400)])  # dense [0, 1) plus a thin shelf to 10
    errors = {}
    for name in OBSERVERS:
        observer = make_observer(name)
        observer.update(x)
        errors[name] = _quant_error(x, *observer.range())
    assert errors["mse"] <= min(errors.values()) * 1.02, errors


def test_histogram_regrows_when_a_wider_value_arrives():
    observer = make_observer("percentile")
    observer.update(torch.linspace(0, 1, 1000))
    observer.update(torch.linspace(0, 10, 1000))
    assert observer.counts.sum() == 2000 and observer.edge > 10.0


def test_unknown_and_empty():
    with pytest.raises(BitsmithError, match="unknown observer 'kl'"):
        make_observer("kl")
    with pytest.raises(BitsmithError, match="saw no calibration data"):
        make_observer("minmax").range()
    assert set(OBSERVERS) == {"minmax", "moving_average", "percentile", "entropy", "mse"}


def test_entropy_is_not_pulled_down_by_exact_zeros():
    """After a ReLU most values are exactly 0 (represented exactly by any range): the KL threshold follows the
    nonzero values (before zeros were left out it clipped digits-cnn's activations to a tenth of their range,
    and its accuracy fell to 76%)."""
    torch.manual_seed(0)
    nonzero = torch.randn(20_000).abs() * 2.0
    observer = make_observer("entropy")
    observer.update(torch.cat([torch.zeros(180_000), nonzero]))
    low, high = observer.range()
    assert low == 0.0 and high > 0.5 * nonzero.max().item()


@pytest.mark.parametrize("name", ["minmax", "percentile", "entropy", "mse"])
def test_observers_of_two_shares_merge_into_the_observer_of_all(name):
    """Data parallel calibration: each process observes some batches, then the observers are merged."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 32, generator=generator) * (1 + i) for i in range(6)]  # later batches widen the range
    whole, first, second = make_observer(name), make_observer(name), make_observer(name)
    for i, x in enumerate(batches):
        whole.update(x)
        (first if i % 2 == 0 else second).update(x)
    first.merge(second)
    low, high = whole.range()
    merged = first.range()
    if name == "minmax":
        assert merged == (low, high)
    else:
        # a histogram is re-binned each time a batch widens its range, so one observer's range already depends
        # on the order of the batches (entropy here: -19.7 in this order, -21.7 in reverse); the merged one is
        # within what the two orders give, give or take 2%
        reverse = make_observer(name)
        for x in reversed(batches):
            reverse.update(x)
        for side in (0, 1):
            ends = sorted((whole.range()[side], reverse.range()[side]))
            assert ends[0] - 0.02 * abs(ends[0]) <= merged[side] <= ends[1] + 0.02 * abs(ends[1])
    assert first.mergeable and not make_observer("moving_average").mergeable
