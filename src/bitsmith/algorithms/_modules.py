"""The one way algorithms change a module's tensors: bind a new tensor, never write into the old one.

A caller can then undo any change by putting back the tensors it still holds (``quantize_`` keeps every
module's parameter and buffer dicts as they were, and restores them if a later step fails), and no
tensor the caller shares with the model is modified behind its back.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["assign_", "replace_module"]


def assign_(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Bind ``value`` as ``module.<name>``: a new Parameter if the old one was a parameter (or absent), else a
    buffer; dtype follows the old tensor."""
    old = getattr(module, name, None)
    value = value.detach()
    if isinstance(old, torch.Tensor):
        value = value.to(old.dtype)
    if name in module._buffers:
        module._buffers[name] = value
    else:
        requires_grad = old.requires_grad if isinstance(old, nn.Parameter) else False
        module._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` (a dotted path) of ``root`` is; returns the module it replaced.
    The one way bitsmith swaps a layer (quantizing, loading, exporting), so that every swap is undone alike."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)  # AttributeError for a name that is not there: a bug, not user input
    setattr(parent, child, new)
    return old
