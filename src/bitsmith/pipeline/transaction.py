"""All-or-nothing changes to a caller's model.

``quantize_`` (and ``load(path, model=...)``) replace submodules, bind new parameters and buffers, and add
hooks; none of them writes into a tensor the model already holds (``algorithms._modules.assign_``). So the
model as it was is fully described by every module's child, parameter, buffer and hook dicts and its plain
attributes (a head count, the config object, bitsmith's records), copied shallowly up front (references only,
no tensor is copied), and putting them back undoes everything.

    with all_or_nothing(model):
        ...  # any exception inside restores the model exactly, then propagates
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["all_or_nothing", "ModelState"]

_DICTS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_state_dict_hooks", "_load_state_dict_pre_hooks")


class ModelState:
    """A shallow record of every module of ``model``: enough to put the tree back as it was."""

    def __init__(self, model: nn.Module):
        self._records = []
        for module in model.modules():
            dicts = {name: getattr(module, name).copy() for name in _DICTS if hasattr(module, name)}
            self._records.append((module, dicts, dict(vars(module))))

    def restore(self) -> None:
        for module, dicts, attributes in self._records:
            for name, saved in dicts.items():
                current = getattr(module, name)
                current.clear()
                current.update(saved)
            current = vars(module)
            for name in [n for n in current if n not in attributes]:
                del current[name]
            current.update(attributes)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[ModelState]:
    """Run the block; if it raises (KeyboardInterrupt included), restore ``model`` and re-raise."""
    state = ModelState(model)
    try:
        yield state
    except BaseException:
        state.restore()
        raise
