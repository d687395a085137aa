"""Activation range observers for static quantization.

Each observer sees calibration tensors through ``update(x)`` and then proposes a range
``(low, high)`` that covers 0; ``qparams_u8(low, high)`` turns a range into the per-tensor uint8
scale and zero point the int8 kernels take. The histogram-based observers (percentile, entropy, MSE)
share one fixed-range histogram that grows by re-binning when a wider value arrives.

    observer            | range it proposes
      minmax            | [min, max] over all samples
      moving_average    | exponential moving average (0.9) of each batch's min and max
      percentile        | the 0.01% / 99.99% quantiles of the histogram
      entropy           | the threshold minimising KL(P || Q) between the clipped histogram and its
                        | 256-level quantization (TensorRT's calibration)
      mse               | the threshold minimising expected squared quantization + clipping error
"""

from __future__ import annotations

import math

import torch

from bitsmith.errors import BitsmithError

__all__ = ["OBSERVERS", "make_observer", "qparams_u8"]

_BINS = 2048


def qparams_u8(low: float, high: float) -> tuple[float, int]:
    """Asymmetric uint8 parameters for a range (widened to hold 0): ``x = (q - zero) * scale``."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255.0, 1e-8)
    zero = int(min(max(round(-low / scale), 0), 255))
    return scale, zero


class MinMax:
    def __init__(self):
        self.low, self.high = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        low, high = torch.aminmax(x.detach().float())
        self.low, self.high = min(self.low, low.item()), max(self.high, high.item())

    mergeable = True  # observers of shares of the calibration batches combine into the observer of them all

    def merge(self, other: "MinMax") -> None:
        """Add what ``other`` saw (data parallel calibration: another process's share of the batches)."""
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)

    def range(self) -> tuple[float, float]:
        if self.low > self.high:
            raise BitsmithError("an observer saw no calibration data")
        return self.low, self.high


class MovingAverageMinMax(MinMax):
    mergeable = False  # depends on the order of the batches: every process sees them all

    def __init__(self, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        low, high = (v.item() for v in torch.aminmax(x.detach().float()))
        if self.low > self.high:
            self.low, self.high = low, high
        else:
            self.low = self.momentum * self.low + (1 - self.momentum) * low
            self.high = self.momentum * self.high + (1 - self.momentum) * high


def _rebinned(counts: torch.Tensor, edge: float, wider: float) -> torch.Tensor:
    """Counts of bins over [0, edge) moved, by their centres, into bins over [0, wider)."""
    if edge <= 0 or edge == wider or counts.sum() == 0:
        return counts
    centres = (torch.arange(_BINS, dtype=torch.float64) + 0.5) * (edge / _BINS)
    index = (centres / wider * _BINS).long().clamp(max=_BINS - 1)
    return torch.zeros(_BINS, dtype=torch.float64).index_add_(0, index, counts)


class _Histogram:
    """Histogram of |x| over [0, edge) with _BINS bins, plus the sign range seen."""

    def __init__(self):
        self.counts = torch.zeros(_BINS, dtype=torch.float64)
        self.zeros = 0.0  # how many of bin 0's values are exactly 0 (a ReLU's output: represented exactly)
        self.edge = 0.0
        self.minmax = MinMax()

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.minmax.update(x)
        magnitude = x.abs().flatten()
        top = magnitude.max().item()
        if top >= self.edge:
            self._grow(max(top * 1.0001, 1e-8))
        self.counts += torch.histc(magnitude, bins=_BINS, min=0.0, max=self.edge).double()
        self.zeros += float((magnitude == 0).sum())

    mergeable = True

    def merge(self, other: "_Histogram") -> None:
        """Add ``other``'s counts: both are re-binned to the wider edge first (as one observer re-bins when a
        batch widens its range), so the result matches one observer of every batch to within a bin's re-binning."""
        if other.edge > self.edge:
            self._grow(other.edge)
        self.counts = self.counts + _rebinned(other.counts, other.edge, self.edge)
        self.zeros += other.zeros
        self.minmax.merge(other.minmax)

    def _grow(self, edge: float) -> None:
        self.counts = _rebinned(self.counts, self.edge, edge)  # old counts into the wider range
        self.edge = edge

    def to_range(self, threshold: float) -> tuple[float, float]:
        """A magnitude threshold back to a signed range: clip the side(s) the data has."""
        low, high = self.minmax.range()
        return max(low, -threshold), min(high, threshold)


class Percentile(_Histogram):
    def __init__(self, percentile: float = 99.99):
        super().__init__()
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        cumulative = torch.cumsum(self.counts, 0) / self.counts.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        return self.to_range((min(index, _BINS - 1) + 1) * self.edge / _BINS)


class Entropy(_Histogram):
    """KL-divergence calibration over candidate thresholds of 128..2048 bins (128 levels per sign). Exact zeros
    are left out: every range represents them exactly, and after a ReLU their spike in the first bin would
    otherwise dominate the divergence and pull the threshold far down (digits-cnn: 0.86 of a 8.4 range)."""

    levels = 128

    def range(self) -> tuple[float, float]:
        counts = self.counts.clone()
        counts[0] -= min(self.zeros, float(counts[0]))
        best, best_bins = math.inf, _BINS
        for bins in range(self.levels, _BINS + 1, 16):
            reference = counts[:bins].clone()
            reference[-1] += counts[bins:].sum()  # clipped mass lands in the last bin
            if reference.sum() == 0:
                continue
            candidate = _requantize(counts[:bins], self.levels)
            divergence = _kl(reference, candidate)
            if divergence < best:
                best, best_bins = divergence, bins
        return self.to_range(best_bins * self.edge / _BINS)


class MSE(_Histogram):
    """Threshold minimising sum(count * error^2) with bin centres as the values (uint8, 255 steps)."""

    def range(self) -> tuple[float, float]:
        centres = (torch.arange(_BINS, dtype=torch.float64) + 0.5) * (self.edge / _BINS)
        low, high = self.minmax.range()
        one_sided = low >= 0 or high <= 0  # e.g. after ReLU all 255 steps cover one sign
        best, best_t = math.inf, self.edge
        for bins in range(16, _BINS + 1, 16):
            threshold = bins * self.edge / _BINS
            step = threshold / (255 if one_sided else 127.5)
            rounding = torch.where(centres <= threshold, torch.full_like(centres, step**2 / 12), centres * 0)
            clipping = (centres - threshold).clamp(min=0) ** 2
            error = (self.counts * (rounding + clipping)).sum().item()
            if error < best:
                best, best_t = error, threshold
        return self.to_range(best_t)


def _requantize(counts: torch.Tensor, levels: int) -> torch.Tensor:
    """Merge ``counts`` into ``levels`` groups, then spread each group's mass over its non-empty bins."""
    bins = counts.numel()
    group = torch.arange(bins) * levels // bins
    merged = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, counts)
    nonzero = (counts > 0).double()
    occupancy = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nonzero)
    spread = merged[group] / occupancy[group].clamp(min=1)
    return spread * nonzero


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p = p / p.sum()
    q = q / q.sum().clamp(min=1e-12)
    mask = p > 0
    return float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())


OBSERVERS = {
    "minmax": MinMax,
    "moving_average": MovingAverageMinMax,
    "percentile": Percentile,
    "entropy": Entropy,
    "mse": MSE,
}


def make_observer(name: str):
    if name not in OBSERVERS:
        raise BitsmithError(f"unknown observer '{name}'; choose one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name]()
