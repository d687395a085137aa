"""Calibration data inside the pipeline: checked once, then run through a model (or a block) by any stage."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bitsmith.errors import BitsmithError

__all__ = ["calibration_batches", "call_on_calibration", "run_batch", "run_calibration"]


def _is_batch(item) -> bool:
    if isinstance(item, torch.Tensor):
        return True
    if isinstance(item, (tuple, list)):
        return bool(item) and all(isinstance(v, torch.Tensor) for v in item)
    if isinstance(item, dict):
        return bool(item) and all(isinstance(k, str) for k in item)
    return False


def calibration_batches(calibration: Iterable) -> list:
    """The calibration set as a list of model inputs (tensors, tuples of tensors, keyword dicts), checked:
    an empty set or an item that is no model input is a one-line error, before the model changes."""
    if isinstance(calibration, (torch.Tensor, str, bytes, dict)):
        raise BitsmithError("calibration must be an iterable of batches (tensors, tuples or keyword dicts),"
                            f" not a single {type(calibration).__name__}")
    try:
        batches = list(calibration)
    except TypeError:
        raise BitsmithError(f"calibration must be an iterable of batches, not {type(calibration).__name__}") from None
    if not batches:
        raise BitsmithError("the calibration set is empty: give at least one sample")
    for number, batch in enumerate(batches, 1):
        if not _is_batch(batch):
            raise BitsmithError(f"calibration batch {number} is a {type(batch).__name__}, not a tensor, a tuple of"
                                " tensors or a dict of keyword inputs")
        tensors = batch.values() if isinstance(batch, dict) else (batch,) if isinstance(batch, torch.Tensor) else batch
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise BitsmithError(f"calibration batch {number} holds NaN or infinite values")
    return batches


def call_on_calibration(module: nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)`` on calibration inputs; inputs it cannot take are a one-line BitsmithError."""
    try:
        return module(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BitsmithError(f"a calibration batch does not fit the model ({type(err).__name__}: {first[:200]})") from None


def run_batch(model: nn.Module, batch):
    """``model`` on one batch (a keyword dict, a tuple of positional inputs, or one tensor)."""
    if isinstance(batch, dict):
        return call_on_calibration(model, **batch)
    if isinstance(batch, (tuple, list)):
        return call_on_calibration(model, *batch)
    return call_on_calibration(model, batch)


def run_calibration(model: nn.Module, batches: Iterable, handles: list, what: str, progress=None) -> None:
    """Run every batch through ``model`` (observer hooks do the work), then remove ``handles``;
    an empty calibration set is an error naming ``what`` needed it."""
    seen = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                run_batch(model, batch)
                seen += 1
                if progress is not None:
                    progress(f"{what}: calibration batch {seen}")
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise BitsmithError(f"the calibration set is empty: {what} needs at least one sample")


