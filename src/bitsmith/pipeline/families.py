"""Model families as data: which operation's output each quantized layer reads (algorithms/families.yaml).

SmoothQuant and AWQ move a per-channel scale from a layer's input into the operation that produced
it; this module finds those pairs inside one repeated block from regex maps, never from isinstance
chains, so a new family is a few lines of YAML (or ``mappings`` in a recipe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import yaml
from torch import nn

from bitsmith.algorithms.smooth import output_width
from bitsmith.errors import BitsmithError

__all__ = ["Family", "Structure", "Mapping", "families", "family_for", "family_of", "custom_family", "resolve_block"]


@dataclass(frozen=True)
class Structure:
    """Layers whose channels structured pruning removes together inside one block (families.yaml explains)."""

    kind: str  # ffn | heads
    producers: tuple[str, ...]  # regexes: output rows removed
    consumers: tuple[str, ...]  # regexes: input columns removed
    module: str | None = None  # regex of the module whose attributes describe the group (attention)
    unit: str | None = None  # attribute of ``module``: channels per unit of ``count`` (None: 1)
    count: str | None = None  # the layer whose width / unit is the number of units (default: first producer)
    attributes: tuple[tuple[str, str], ...] = ()  # (attribute of module, width expression)
    config: tuple[tuple[str, str], ...] | None = None  # (model config key, width expression); None: not expressible


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    mappings: tuple[tuple[str, tuple[str, ...]], ...]  # (prev regex, layer regexes)
    unfoldable: tuple[tuple[str, ...], ...] = ()
    structures: tuple[Structure, ...] = ()


@dataclass
class Mapping:
    """One resolved pair inside a block: local module names."""

    prev: str
    layers: list[str]


@dataclass
class BlockPlan:
    mappings: list[Mapping] = field(default_factory=list)
    unfoldable: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[list[str], str]] = field(default_factory=list)  # (local layer names, why not mapped)


def _structure(kind: str, entry: dict) -> Structure:
    config = entry.get("config")
    return Structure(kind, tuple(entry["producers"]), tuple(entry["consumers"]), entry.get("module"), entry.get("unit"),
                     entry.get("count"), tuple((entry.get("attributes") or {}).items()),
                     tuple(config.items()) if config is not None else None)


@lru_cache(maxsize=1)
def families() -> dict[str, Family]:
    data = yaml.safe_load(resources.files("bitsmith.algorithms").joinpath("families.yaml").read_text())
    return {
        name: Family(
            name,
            tuple(entry.get("model_types", [])),
            tuple((m["prev"], tuple(m["layers"])) for m in entry.get("mappings", [])),
            tuple(tuple(group) for group in entry.get("unfoldable", [])),
            tuple(_structure(kind, spec) for kind, spec in (entry.get("structures") or {}).items()),
        )
        for name, entry in data.items()
    }


def custom_family(mappings: list, unfoldable: list | None = None) -> Family:
    """A family from a recipe's own ``mappings`` ([{prev, layers}, ...])."""
    return Family("custom", (), tuple((m.prev, tuple(m.layers)) for m in mappings), tuple(tuple(g) for g in unfoldable or ()))


def _match(pattern: str, names: list[str]) -> list[str]:
    return [n for n in names if re.fullmatch(pattern, n)]


def family_for(model: nn.Module, block: nn.Module, name: str | None = None) -> Family:
    """The family named in the recipe, else by ``config.model_type``, else the first whose names the block has."""
    table = families()
    if name is not None:
        if name not in table:
            raise BitsmithError(f"unknown model family '{name}': known are {', '.join(sorted(table))}")
        return table[name]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in table.values():
        if model_type in family.model_types:
            return family
    local = [n for n, _ in block.named_modules()]
    for family in table.values():
        if any(_match(prev, local) and any(_match(p, local) for p in layers) for prev, layers in family.mappings):
            return family
    raise BitsmithError(
        f"no known model family matches this model (model_type {model_type!r}); "
        f"name one with 'family:' or give 'mappings:' in the recipe (known: {', '.join(sorted(table))})"
    )


def resolve_block(block: nn.Module, family: Family, targets: set[str]) -> BlockPlan:
    """The family's mappings inside ``block`` restricted to ``targets`` (local names of layers being
    quantized). A mapping whose prev is missing, cannot take a scale, or whose width differs from
    its layers' inputs (grouped-query v_proj -> o_proj) is dropped with a note."""
    modules = dict(block.named_modules())
    names = list(modules)
    plan = BlockPlan()
    for prev_pattern, layer_patterns in family.mappings:
        layers = [n for p in layer_patterns for n in _match(p, names) if n in targets]
        prevs = _match(prev_pattern, names)
        if not layers:
            continue
        if len(prevs) != 1:
            why = f"{len(prevs)} matches for the previous operation {prev_pattern!r}"
            plan.notes.append(f"{prev_pattern}: {why}; not smoothed")
            plan.skipped.append((layers, why))
            continue
        width = output_width(modules[prevs[0]])
        widths = {modules[n].in_features for n in layers if isinstance(modules[n], nn.Linear)}
        if width is None or widths != {width}:
            why = f"{prevs[0]} -> {', '.join(layers)}: widths differ ({width} vs {sorted(widths)})"
            plan.notes.append(f"{why}; not smoothed")
            plan.skipped.append((layers, why))
            continue
        plan.mappings.append(Mapping(prevs[0], layers))
    for group in family.unfoldable:
        layers = [n for p in group for n in _match(p, names) if n in targets]
        if layers:
            plan.unfoldable.append(layers)
    return plan


def family_of(model: nn.Module, first_block: nn.Module, family: str | None, mappings) -> Family:
    """The recipe's own ``mappings``, else the named ``family``, else the one detected for ``model``."""
    if mappings is not None:
        return custom_family(mappings)
    return family_for(model, first_block, family)
