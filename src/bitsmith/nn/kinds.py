"""Module kinds: how a saved layer description (``layer_info()``, in bitsmith.json) becomes an empty module.

A registry, not an ``if`` chain: each runtime module class names the fields of its description and how to
build itself from them; ``module_from_info`` checks a description against those fields (types, ranges) and
builds the module on the ``meta`` device, so a hostile or corrupt description (a 10^12-wide layer) costs no
memory: its shapes are compared with the checkpoint's before any tensor is allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["KINDS", "register_kind", "module_from_info", "InfoError"]


class InfoError(ValueError):
    """A layer description that does not describe a module bitsmith can build."""


@dataclass(frozen=True)
class Field:
    kind: type | tuple  # int, bool, str, list (of two ints), or a tuple of allowed values
    minimum: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class Kind:
    fields: dict[str, Field]
    build: Callable[[dict], nn.Module]


KINDS: dict[str, Kind] = {}


def register_kind(name: str, fields: dict[str, Field], build: Callable[[dict], nn.Module]) -> None:
    KINDS[name] = Kind(fields, build)


def _check(name: str, value, spec: Field) -> None:
    if value is None:
        if spec.optional:
            return
        raise InfoError(f"'{name}' is missing")
    if isinstance(spec.kind, tuple):
        if value not in spec.kind:
            raise InfoError(f"'{name}' is {value!r}, not one of {', '.join(map(repr, spec.kind))}")
        return
    if spec.kind is list:
        if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)):
            raise InfoError(f"'{name}' must be a list of two integers, got {value!r}")
        values = value
    elif spec.kind is int:
        if type(value) is not int:  # bool is an int subclass: refused here
            raise InfoError(f"'{name}' must be an integer, got {value!r}")
        values = [value]
    elif spec.kind is bool:
        if type(value) is not bool:
            raise InfoError(f"'{name}' must be true or false, got {value!r}")
        return
    else:
        if not isinstance(value, spec.kind):
            raise InfoError(f"'{name}' must be a {spec.kind.__name__}, got {value!r}")
        return
    if spec.minimum is not None and any(v < spec.minimum for v in values):
        raise InfoError(f"'{name}' must be at least {spec.minimum}, got {value!r}")


def module_from_info(info: dict) -> nn.Module:
    """An empty module, on the ``meta`` device, of the kind and shape ``info`` describes (weights come from
    the checkpoint, loaded with ``assign=True``)."""
    if not isinstance(info, dict):
        raise InfoError(f"a layer description must be a mapping, got {type(info).__name__}")
    kind = KINDS.get(info.get("module"))
    if kind is None:
        raise InfoError(f"unknown module kind {info.get('module')!r}")
    for name, spec in kind.fields.items():
        _check(name, info.get(name), spec)
    with torch.device("meta"):
        return kind.build(info)


def tensor_problems(module: nn.Module, positive: tuple[str, ...] = (), finite: tuple[str, ...] = (),
                    codes: dict[str, int] | None = None, nonnegative: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a loaded module's tensors, or None: ``positive`` ones must be finite and > 0
    (scales), ``nonnegative`` ones finite and >= 0, ``finite`` ones finite (biases, 16-bit weights), ``codes``
    name -> largest allowed value."""
    for name in nonnegative:
        tensor = getattr(module, name, None)
        if tensor is not None and not (torch.isfinite(tensor.float()).all() and (tensor.float() >= 0).all()):
            return f"{name} holds NaN, infinite or negative values"
    for name in positive + finite:
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        values = tensor.float()
        if not torch.isfinite(values).all():
            return f"{name} holds NaN or infinite values"
        if name in positive and not (values > 0).all():
            return f"{name} holds zero or negative scales"
    for name, largest in (codes or {}).items():
        tensor = getattr(module, name, None)
        if tensor is not None and tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) > largest):
            return f"{name} holds values outside [0, {largest}]"
    return None
