"""The one way algorithms change a module's tensors: bind a new tensor, never write into the old one.

A caller can then undo any change by putting back the tensors it still holds (``quantize_`` keeps every
module's parameter and buffer dicts as they were, and restores them if a later step fails), and no
tensor the caller shares with the model is modified behind its back.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["assign_", "replace_module", "SHAPE_ATTRIBUTES", "shape_record", "resize_"]


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


# the integer attributes that describe a module's shapes (a Linear's widths, a convolution's channels, an
# attention module's head count): what structured pruning changes besides tensors
SHAPE_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "num_features",
                    "num_attention_heads", "all_head_size", "num_heads", "num_key_value_heads")


def shape_record(module: nn.Module) -> dict:
    """``module``'s own tensor shapes and shape attributes, as ``resize_`` takes them (JSON-ready)."""
    tensors = {name: list(t.shape) for name, t in [*module._parameters.items(), *module._buffers.items()]
               if t is not None}
    attributes = {name: getattr(module, name) for name in SHAPE_ATTRIBUTES
                  if isinstance(vars(module).get(name), int)}
    return {"tensors": tensors, "attributes": attributes}


def resize_(module: nn.Module, record: dict) -> None:
    """Give ``module`` the tensor shapes and attributes of ``record`` (``shape_record``'s form), its tensors empty
    on the ``meta`` device, to be bound by a checkpoint; a record that does not fit raises ``ValueError``."""
    if not isinstance(record, dict) or set(record) - {"tensors", "attributes"}:
        raise ValueError("a shape record holds 'tensors' and 'attributes'")
    tensors, attributes = record.get("tensors", {}), record.get("attributes", {})
    if not isinstance(tensors, dict) or not isinstance(attributes, dict):
        raise ValueError("'tensors' and 'attributes' are mappings")
    for name, shape in tensors.items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise ValueError(f"tensor '{name}' has no valid shape: {shape!r}")
        if name in module._buffers and module._buffers[name] is not None:
            module._buffers[name] = torch.empty(shape, dtype=module._buffers[name].dtype, device="meta")
        elif name in module._parameters:
            old = module._parameters[name]
            dtype = old.dtype if old is not None else module._parameters.get("weight", old).dtype
            module._parameters[name] = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"),
                                                    requires_grad=False)
        else:
            raise ValueError(f"{type(module).__name__} has no tensor '{name}'")
    for name, value in attributes.items():
        if name not in SHAPE_ATTRIBUTES or not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"attribute {name}={value!r} is not a shape attribute")
        if not isinstance(vars(module).get(name), int):
            raise ValueError(f"{type(module).__name__} has no attribute '{name}'")
        object.__setattr__(module, name, value)
