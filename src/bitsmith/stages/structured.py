"""The prune_structured stage: whole FFN channels, attention heads and convolution channels removed, so the
layers really get smaller (``prune_(model, StructuredPruneConfig(...))``).

    group            | found by                                  | producers lose rows, consumers lose columns
    ffn, heads       | the family's ``structures`` (families.yaml) | e.g. up/gate rows and down_proj columns
    Conv2d           | the traced graph (torch.fx)               | the conv's channels, its BatchNorm, the next
                     |                                           | conv's inputs (or a Linear after a flatten)

Every group's units (channels, heads, key/value groups) are scored (algorithms/structured.py) and the lowest
``fraction`` removed; with ``importance: activations`` the scores use the consumers' real inputs, block by
block in the one block runner (each block pruned before the next one's inputs are computed) or, for a model
without repeated blocks, over one pass of the calibration set. Then (``update``) a Linear consumer's kept
columns and bias are refitted by least squares to its outputs on those inputs (``refit``); a convolution
consumer gets the removed channels' mean contribution added to its bias, or to the BatchNorm right after it.

What changed is recorded on the model (``bitsmith_shapes``: every resized module's tensor shapes and shape
attributes), which ``save`` writes and ``load`` applies to the skeleton before reading tensors. Where every
block keeps the same sizes and the family says how, the model's config is updated too (``intermediate_size``,
head counts), so the saved directory loads in plain transformers; where blocks differ, only ``bitsmith.load``
rebuilds it (and the report says so).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.algorithms._modules import replace_module, shape_record
from bitsmith.algorithms.structured import (
    channel_energy, kept_units, mean_shift, refit_columns, shrink_batchnorm, shrink_conv, shrink_linear, unit_channels,
    unit_scores,
)
from bitsmith.errors import BitsmithError
from bitsmith.nn import QUANTIZED_MODULES
from bitsmith.pipeline.blocks import find_blocks, run_blocks
from bitsmith.pipeline.calibration import call_on_calibration, run_batch, run_calibration
from bitsmith.pipeline.families import Structure, family_of
from bitsmith.pipeline.registry import register_stage
from bitsmith.pipeline.report import StageReport
from bitsmith.pipeline.run import Context
from bitsmith.recipe.schemes import target_matches
from bitsmith.recipe.stages import StructuredPruneConfig, StructuredRule

__all__ = ["Group", "structured_groups", "structured_plan"]

_CONV_KIND = "Conv2d"
REFIT_POSITIONS = 4  # calibration positions per refitted column below which a least-squares refit overfits
# what may lie between a convolution and the layer that reads its channels: channel-wise operations
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Dropout,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)
_PASS_FUNCTIONS = {"relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "dropout", "max_pool2d",
                   "avg_pool2d", "adaptive_avg_pool2d", "leaky_relu", "hardswish"}


@dataclass
class Group:
    """Layers whose channels go together. Names are full module names; ``unit_sizes`` is channels per unit."""

    name: str  # e.g. model.layers.3.ffn, encoder.layer.0.heads, features.0
    kind: str  # ffn | heads | Conv2d
    producers: list[str]
    consumers: list[tuple[str, int]]  # (name, columns per channel: >1 after a flatten)
    units: int
    unit_sizes: dict[str, int]  # member -> channels per unit
    norms: list[str] = field(default_factory=list)  # BatchNorms on the producers' channels
    module: str | None = None  # the module whose attributes describe the group (attention)
    structure: Structure | None = None
    block: int | None = None  # index in the repeated blocks (None: outside them)
    blocks: str | None = None  # the name of those blocks' ModuleList
    after_norm: dict[str, str] = field(default_factory=dict)  # consumer -> the BatchNorm right after it


# ---------------------------------------------------------------------------------------------- finding groups

def _one(block: nn.Module, pattern: str, prefix: str) -> str:
    found = [n for n, _ in block.named_modules() if n and re.fullmatch(pattern, n)]
    if len(found) != 1:
        raise BitsmithError(f"{prefix}: the family's layer pattern {pattern!r} matches {len(found)} modules, not one")
    return found[0]


def _block_groups(model: nn.Module, config: StructuredPruneConfig) -> list[Group]:
    """FFN and head groups of every repeated block, from the family's ``structures``."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED_MODULES))]
    try:
        prefix, blocks = find_blocks(model, linears, "structured pruning of FFN channels and heads")
        family = family_of(model, blocks[0], config.family, None)
    except BitsmithError as err:
        raise BitsmithError(f"structured pruning of FFN channels and heads needs a known model family: {err}") from None
    if not family.structures:
        raise BitsmithError(f"model family '{family.name}' has no structures for structured pruning (families.yaml)")
    groups = []
    for index, block in enumerate(blocks):
        base = f"{prefix}.{index}"
        for structure in family.structures:
            where = f"{base} ({family.name} {structure.kind})"
            producers = [_one(block, p, where) for p in structure.producers]
            consumers = [_one(block, p, where) for p in structure.consumers]
            module = _one(block, structure.module, where) if structure.module else None
            count = _one(block, structure.count, where) if structure.count else producers[0]
            widths = {n: _width(block.get_submodule(n), n in producers) for n in [*producers, *consumers]}
            unit = 1
            if structure.unit is not None:
                unit = getattr(block.get_submodule(module), structure.unit, None) if module else None
                if not isinstance(unit, int) or unit < 1:
                    raise BitsmithError(f"{where}: {module} has no integer attribute '{structure.unit}'")
            units = widths[count] // unit
            if units < 1 or any(w % units for w in widths.values()):
                raise BitsmithError(f"{where}: layer widths {widths} are not whole units of {units}")
            groups.append(Group(
                f"{base}.{structure.kind}", structure.kind, [f"{base}.{n}" for n in producers],
                [(f"{base}.{n}", 1) for n in consumers], units,
                {f"{base}.{n}": w // units for n, w in widths.items()},
                module=f"{base}.{module}" if module else None, structure=structure, block=index, blocks=prefix))
    return groups


def _width(module: nn.Module, rows: bool) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if rows else module.in_features
    if isinstance(module, QUANTIZED_MODULES):
        raise BitsmithError(f"a {type(module).__name__} ({module.scheme}) is already quantized: prune before quantizing"
                            " (list prune_structured before quantize)")
    raise BitsmithError(f"structured pruning changes Linear layers, not {type(module).__name__}")


def _conv_groups(model: nn.Module) -> list[Group]:
    """A group per Conv2d whose output reaches, through channel-wise operations only, the inputs of other
    convolutions (or a Linear after a flatten); others are left out (their channels cannot move alone)."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure is the same one line for the user
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise BitsmithError(f"cannot trace the model to find what reads each convolution's channels"
                            f" ({type(err).__name__}: {first})") from None
    modules = dict(model.named_modules())
    convs = [n for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]
    after_norm = {}
    for node in convs:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], nn.BatchNorm2d):
            after_norm[node.target] = users[0].target
    groups = []
    for node in convs:
        conv = modules[node.target]
        if conv.groups != 1:
            continue
        found = _follow(node, modules, conv.out_channels)
        if found is None:
            continue
        norms, consumers = found
        sizes = {node.target: 1, **{n: s for n, s in consumers}}
        groups.append(Group(node.target, _CONV_KIND, [node.target], consumers, conv.out_channels, sizes,
                            norms=norms, after_norm={c: after_norm[c] for c, _ in consumers if c in after_norm}))
    return groups


def _follow(start, modules: dict, channels: int) -> tuple[list[str], list[tuple[str, int]]] | None:
    """(BatchNorms, consumers) reached from ``start``'s output through channel-wise operations, or None."""
    norms, consumers, frontier, flat = [], [], [(start, False)], False
    while frontier:
        node, flat = frontier.pop()
        for user in node.users:
            if len(user.all_input_nodes) != 1:
                return None  # an add or concat: other tensors share these channels
            if user.op == "call_module":
                module = modules[user.target]
                if isinstance(module, nn.BatchNorm2d) and not flat:
                    norms.append(user.target)
                    frontier.append((user, flat))
                elif isinstance(module, _PASS_MODULES):
                    frontier.append((user, flat))
                elif isinstance(module, nn.Flatten) and module.start_dim == 1:
                    frontier.append((user, True))
                elif isinstance(module, nn.Conv2d) and not flat and module.groups == 1:
                    consumers.append((user.target, 1))
                elif isinstance(module, nn.Linear) and flat and module.in_features % channels == 0:
                    consumers.append((user.target, module.in_features // channels))
                else:
                    return None
            elif user.op in ("call_function", "call_method"):
                name = getattr(user.target, "__name__", str(user.target))
                if name in _PASS_FUNCTIONS:
                    frontier.append((user, flat))
                elif name == "flatten" and (user.args[1:2] == (1,) or user.kwargs.get("start_dim") == 1):
                    frontier.append((user, True))
                else:
                    return None
            else:
                return None  # the model's output
    return (norms, consumers) if consumers else None


def structured_groups(model: nn.Module, config: StructuredPruneConfig) -> list[Group]:
    """Every group the rules could reach: FFN and head groups when a target names them (or a regex might:
    then a model without a known family just has none), convolution groups when a target may match one."""
    targets = [t for rule in config.rules for t in rule.targets]
    explicit = any(t in ("ffn", "heads") or t.endswith((".ffn", ".heads")) for t in targets)
    regex = any(t.startswith("re:") for t in targets)
    groups = []
    if explicit:
        groups += _block_groups(model, config)
    elif regex:
        try:
            groups += _block_groups(model, config)
        except BitsmithError:
            pass
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if has_conv and any(not (t in ("ffn", "heads") or t.endswith((".ffn", ".heads"))) for t in targets):
        groups += _conv_groups(model)
    return groups


def structured_plan(model: nn.Module, config: StructuredPruneConfig,
                    groups: list[Group] | None = None) -> list[tuple[Group, StructuredRule]]:
    """(group, rule) for every group a rule matches (first match wins; ``ignore`` first)."""
    groups = structured_groups(model, config) if groups is None else groups
    chosen = []
    for group in groups:
        if any(target_matches(t, group.name, group.kind) for t in config.ignore):
            continue
        rule = next((r for r in config.rules if any(target_matches(t, group.name, group.kind) for t in r.targets)), None)
        if rule is not None and rule.fraction > 0:
            chosen.append((group, rule))
    known = {g.name for g in groups}
    for index, rule in enumerate(config.rules):
        for target in rule.targets:
            named = not target.startswith("re:") and target not in ("ffn", "heads", _CONV_KIND)
            if named and target not in known:
                raise BitsmithError(f"prune_structured rule {index + 1} names '{target}', which is no layer group of"
                                    f" this model (groups are named like {sorted(known)[:3] or 'none'})")
    if not chosen:
        kinds = sorted({g.kind for g in groups}) or ["none"]
        raise BitsmithError(f"no layer group matches the prune_structured rules (this model has: {', '.join(kinds)})")
    return chosen


# ---------------------------------------------------------------------------------------------- statistics

class _Energy:
    """Per consumer, from forward pre-hooks on calibration inputs: a Linear's Gram matrix of [x; 1] (for the
    least-squares refit; its diagonal and last row give the energies and means), a convolution's sum of x_c^2
    and of x_c per input channel."""

    def __init__(self, root: nn.Module, consumers: dict[str, str], gram: bool):  # local name -> full name
        self.sums: dict[str, list] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.kernel: dict[str, int] = {}  # consumer -> kernel positions per input channel (a convolution's)
        self.handles = []
        for local, full in consumers.items():
            module = root.get_submodule(local)
            conv = isinstance(module, nn.Conv2d)
            self.kernel[full] = math.prod(module.kernel_size) if conv else 1
            self.handles.append(module.register_forward_pre_hook(self._hook(full, conv, gram)))

    def _hook(self, full: str, conv: bool, gram: bool):
        def hook(module, args):
            x = args[0].detach()
            if gram:
                if conv:  # the patches the convolution multiplies: (positions, channels * kernel)
                    x = F.unfold(x.float(), module.kernel_size, module.dilation, module.padding, module.stride)
                    x = x.transpose(1, 2)
                rows = x.reshape(-1, x.shape[-1]).double()
                rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
                product = rows.T @ rows
                self.grams[full] = product if full not in self.grams else self.grams[full] + product
                return
            x = x.float()
            x = x.transpose(0, 1).reshape(x.shape[1], -1) if conv else x.reshape(-1, x.shape[-1]).T
            square, total, count = x.pow(2).sum(dim=1), x.sum(dim=1), x.shape[1]
            if full in self.sums:
                old = self.sums[full]
                square, total, count = old[0] + square, old[1] + total, old[2] + count
            self.sums[full] = [square, total, count]
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def gram(self, full: str) -> torch.Tensor | None:
        return self.grams.get(full)

    def channels(self, full: str, spread: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(energy, mean) per channel of the producer (``spread`` consumer columns each), or None if unseen."""
        if full in self.grams:
            gram = self.grams[full]
            square, total, count = gram.diagonal()[:-1].float(), gram[-1, :-1].float(), float(gram[-1, -1])
            spread = spread * self.kernel.get(full, 1)  # a convolution's patches: kernel positions per channel
        elif full in self.sums:
            square, total, count = self.sums[full]
        else:
            return None
        if spread > 1:
            square, total = square.reshape(-1, spread).sum(dim=1), total.reshape(-1, spread).sum(dim=1)
            count = count * spread
        return square, total / max(count, 1)


# ---------------------------------------------------------------------------------------------- applying

def _keep_count(units: int, fraction: float, multiple_of: int) -> int:
    keep = units - math.floor(fraction * units + 1e-9)
    return min(units, max(1, math.ceil(keep / multiple_of) * multiple_of))


def _bn_scale(norm: nn.Module) -> torch.Tensor:
    scale = 1.0 / torch.sqrt(norm.running_var.float() + norm.eps)
    return scale * norm.weight.detach().float() if norm.weight is not None else scale


def _evaluate(expression: str, kept: dict[str, int], module: nn.Module | None, prefix: str) -> int:
    """A width expression of families.yaml: "LAYER" or "LAYER/ATTR" (ATTR of the group's module)."""
    layer, _, attribute = expression.partition("/")
    width = next((w for n, w in kept.items() if re.fullmatch(layer, n[len(prefix) + 1:])), None)
    if width is None:
        raise BitsmithError(f"family structure expression {expression!r} names no layer of the group")
    return width // getattr(module, attribute) if attribute else width


def _apply(root: nn.Module, group: Group, keep: torch.Tensor, energy: _Energy | None, update: str,
           prefix: str, group_notes: list) -> dict[str, int]:
    """Shrink ``group``'s members in ``root`` to the kept units; returns each member's kept width."""
    removed = torch.tensor([u for u in range(group.units) if u not in set(keep.tolist())], dtype=torch.long)
    kept_width = {}
    for name in group.producers:
        old = root.get_submodule(_local(name, prefix))
        rows = unit_channels(keep, group.unit_sizes[name])
        new = shrink_linear(old, rows=rows) if isinstance(old, nn.Linear) else shrink_conv(old, out_channels=rows)
        replace_module(root, _local(name, prefix), new)
        kept_width[name] = len(rows)
    for name in group.norms:
        rows = unit_channels(keep, 1)
        replace_module(root, _local(name, prefix), shrink_batchnorm(root.get_submodule(_local(name, prefix)), rows))
    for name, spread in group.consumers:
        local = _local(name, prefix)
        old = root.get_submodule(local)
        linear = isinstance(old, nn.Linear)
        size = group.unit_sizes[name] // spread if linear else group.unit_sizes[name]
        columns = unit_channels(keep, size)
        if linear:
            new = shrink_linear(old, columns=columns, spread=spread)
            flat_columns = unit_channels(columns, spread) if spread > 1 else columns
        else:
            new = shrink_conv(old, in_channels=columns)
            flat_columns = unit_channels(columns, math.prod(old.kernel_size))
        if len(removed) and energy is not None and update != "none":
            notes = []
            _update_consumer(root, group, name, old, new, energy, update, flat_columns,
                             unit_channels(removed, size), spread, prefix, notes)
            group_notes.extend((name, note) for note in notes)
        replace_module(root, local, new)
        kept_width[name] = new.in_features if linear else new.in_channels
    return kept_width


def _update_consumer(root: nn.Module, group: Group, name: str, old: nn.Module, new: nn.Module, energy: _Energy,
                     update: str, flat_columns: torch.Tensor, removed: torch.Tensor, spread: int, prefix: str,
                     notes: list[str]) -> None:
    """What the consumer ``new`` gets for the removed channels: refitted kept columns and bias (``refit``, where
    its Gram matrix was collected), or their mean contribution (``mean``). A consumer without a bias gets the
    bias part through the BatchNorm right after it; with neither, only its weights are refitted."""
    norm_name = group.after_norm.get(name)
    gram = energy.gram(name) if update == "refit" else None
    if gram is not None and float(gram[-1, -1]) < REFIT_POSITIONS * (len(flat_columns) + 1):
        notes.append(f"{int(gram[-1, -1])} calibration positions for {len(flat_columns)} kept columns: the removed"
                     " channels' mean instead of a least-squares refit (it would overfit)")
        gram = None
    shift = None
    if gram is not None:
        bias_slot = old.bias if old.bias is not None else (torch.zeros(old.weight.shape[0]) if norm_name else None)
        weight, bias = refit_columns(old.weight, bias_slot, gram, flat_columns)
        new.weight = nn.Parameter(weight.reshape(new.weight.shape).to(old.weight.dtype))
        if old.bias is not None:
            new.bias = nn.Parameter(bias.to(old.bias.dtype))
        elif bias is not None:
            shift = bias.float()
    else:
        stats = energy.channels(name, spread)
        if stats is None:
            return
        shift = mean_shift(old.weight, removed, stats[1], spread)
        if old.bias is not None:
            new.bias = nn.Parameter((new.bias.detach().float() + shift).to(new.bias.dtype))
            shift = None
    if shift is not None and norm_name is not None:  # BN(z + shift) is BN with its running mean moved by -shift
        norm_local = _local(norm_name, prefix)
        norm = copy.copy(root.get_submodule(norm_local))
        norm._buffers = dict(norm._buffers)
        norm._buffers["running_mean"] = (norm.running_mean.float() - shift).to(norm.running_mean.dtype)
        replace_module(root, norm_local, norm)


def _local(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix else name


def _scores(root: nn.Module, group: Group, importance: str, energy: _Energy | None, prefix: str) -> torch.Tensor:
    """Per unit of ``group``: its channels' energy summed (algorithms/structured.py)."""
    total = None
    for name, spread in group.consumers:
        consumer = root.get_submodule(_local(name, prefix))
        size = group.unit_sizes[name] // spread if isinstance(consumer, nn.Linear) else group.unit_sizes[name]
        stats = energy.channels(name, spread) if importance == "activations" and energy is not None else None
        if stats is not None:
            per_channel = channel_energy([], [(consumer.weight, spread)], stats[0])
        else:
            producers = [root.get_submodule(_local(p, prefix)).weight for p in group.producers]
            scale = _bn_scale(root.get_submodule(_local(group.norms[0], prefix))) if group.norms else None
            if len(producers) > 1 and len({p.shape[0] for p in producers}) > 1:  # q/k/v of grouped heads
                per_channel = channel_energy([], [(consumer.weight, spread)])
                rows = sum(unit_scores(p.detach().float().pow(2).sum(dim=1), p.shape[0] // group.units)
                           for p in producers)
                per_channel = per_channel * rows.repeat_interleave(size)
            else:
                per_channel = channel_energy(producers, [(consumer.weight, spread)], None, scale)
        scores = unit_scores(per_channel, size)
        total = scores if total is None else total + scores
    return total


class _Run:
    """One stage run: the plan, the report, and what was kept per group."""

    def __init__(self, model: nn.Module, config: StructuredPruneConfig, report: StageReport):
        self.model, self.config, self.report = model, config, report
        self.groups = structured_groups(model, config)
        self.chosen = structured_plan(model, config, self.groups)
        self.kept: dict[str, dict[str, int]] = {}  # group -> member -> kept width
        self.resized: set[str] = set()

    def prune(self, root: nn.Module, groups: list[tuple[Group, StructuredRule]], collect, prefix: str = "") -> None:
        """Prune ``groups`` of ``root`` in order, each on statistics ``collect(root, group)`` gathers after the
        groups before it are pruned (None: from the weights alone)."""
        for group, rule in groups:
            energy = collect(root, group) if collect is not None else None
            scores = _scores(root, group, self.config.importance, energy, prefix)
            count = _keep_count(group.units, rule.fraction, self.config.multiple_of)
            keep = kept_units(scores, count)
            notes: list[tuple[str, str]] = []
            kept = _apply(root, group, keep, energy, self.config.update, prefix, notes)
            for name, note in notes:
                self.report.note(name, note)
            self.kept[group.name] = kept
            sizes = {group.unit_sizes[p] for p in group.producers}
            unit = "key/value groups" if group.kind == "heads" and len(sizes) > 1 else \
                "heads" if group.kind == "heads" else "channels"
            how = "activations" if energy is not None and self.config.importance == "activations" else "weights"
            for name in [*group.producers, *(c for c, _ in group.consumers), *group.norms]:
                self.report.done(name, f"{group.kind}: {count} of {group.units} {unit} kept ({how})")
            self.report.summary.setdefault("structured", {})[group.name] = {"kept": count, "of": group.units}
            if group.module is not None:
                self._set_attributes(root, group, kept, prefix)
            self.resized.update([*kept, *group.norms, *group.after_norm.values(), *([group.module] if group.module else [])])

    def _set_attributes(self, root: nn.Module, group: Group, kept: dict[str, int], prefix: str) -> None:
        module = root.get_submodule(_local(group.module, prefix))
        base = group.name.rsplit(".", 1)[0]
        for attribute, expression in group.structure.attributes:
            object.__setattr__(module, attribute, _evaluate(expression, kept, module, base))

    def finish(self) -> None:
        """Record every resized module's shapes, and update the config where the sizes are uniform."""
        record = dict(getattr(self.model, "bitsmith_shapes", {}) or {})
        for name in sorted(self.resized):
            record[name] = shape_record(self.model.get_submodule(name))
        self.model.bitsmith_shapes = record
        self._update_config()

    def _update_config(self) -> None:
        config = getattr(self.model, "config", None)
        by_structure: dict[Structure, list[Group]] = {}
        for group, _ in self.chosen:
            if group.structure is not None:
                by_structure.setdefault(group.structure, []).append(group)
        if config is None or not by_structure:
            return
        values, notes = {}, []
        for structure, groups in by_structure.items():
            sizes = {tuple(sorted(self.kept[g.name].values())) for g in groups}
            total = sum(g.structure == structure for g in self.groups)
            if structure.config is None:
                notes.append(f"{structure.kind}: the model config cannot express fewer {structure.kind}")
            elif len(sizes) > 1 or len(groups) != total:
                notes.append(f"{structure.kind}: blocks keep different sizes")
            else:
                module = self.model.get_submodule(groups[0].module) if groups[0].module else None
                base = groups[0].name.rsplit(".", 1)[0]
                for key, expression in structure.config:
                    values[key] = _evaluate(expression, self.kept[groups[0].name], module, base)
        if values:
            new = copy.deepcopy(config)
            for key, value in values.items():
                setattr(new, key, value)
            for module in self.model.modules():
                if vars(module).get("config") is config:
                    object.__setattr__(module, "config", new)
            self.report.summary["config"] = values
        for note in notes:
            self.report.note(self.chosen[0][0].name, f"{note}: the saved directory loads with bitsmith.load only"
                             " (plain transformers reads the sizes from config.json)")
        self.report.summary["transformers_loadable"] = not notes


def _check(model: nn.Module, config: StructuredPruneConfig, context: Context) -> None:
    for group, _ in structured_plan(model, config):
        for name in [*group.producers, *(c for c, _ in group.consumers)]:
            weight = model.get_submodule(name).weight
            if weight.device.type != "meta" and not torch.isfinite(weight).all():
                raise BitsmithError(f"layer '{name}' has NaN or infinite weights; fix the model before pruning")


def _collector(run_calibration_on, gram: bool):
    """``collect(root, group)``: the group's consumer statistics over one calibration pass of ``root``."""
    def collect(root: nn.Module, group: Group, prefix: str = "") -> _Energy:
        energy = _Energy(root, {_local(c, prefix): c for c, _ in group.consumers}, gram)
        try:
            run_calibration_on(root)
        finally:
            energy.remove()
        return energy

    return collect


def _block_work(run: _Run, inside: list[tuple[Group, StructuredRule]], prefix: str, context: Context):
    by_block: dict[int, list] = {}
    for group, rule in inside:
        by_block.setdefault(group.block, []).append((group, rule))

    def work(index: int, block: nn.Module, inputs):
        groups = by_block.get(index)
        if not groups:
            return None
        base = f"{prefix}.{index}"
        collect = None
        if inputs is not None:
            def on_block(root: nn.Module) -> None:
                with torch.inference_mode():
                    for args, kwargs in inputs:
                        call_on_calibration(root, *args, **kwargs)

            collect_in = _collector(on_block, run.config.update == "refit")
            collect = lambda root, group: collect_in(root, group, base)  # noqa: E731
        run.prune(block, groups, collect, base)
        if context.progress is not None:
            context.progress(f"{base}: structured")
        return None

    return work


@register_stage(StructuredPruneConfig, check=_check, why_not_offload="shrunk blocks are not written from disk yet")
def structured_stage(model: nn.Module, config: StructuredPruneConfig, context: Context, report: StageReport) -> None:
    run = _Run(model, config, report)
    activations = config.importance == "activations" and context.calibration is not None
    before = sum(p.numel() for p in model.parameters())
    inside = [(g, r) for g, r in run.chosen if g.block is not None]
    outside = [(g, r) for g, r in run.chosen if g.block is None]
    if inside:
        prefix = inside[0][0].blocks
        run_blocks(model, model.get_submodule(prefix), context.blocks, context.calibration if activations else None,
                   _block_work(run, inside, prefix, context), run_batch)
    if outside:
        collect = None
        if activations:
            collect = _collector(lambda root: run_calibration(root, context.calibration, [], "prune_structured"),
                                 config.update == "refit")
        run.prune(model, outside, collect)
    run.finish()
    after = sum(p.numel() for p in model.parameters())
    report.summary.update(groups=len(run.chosen), parameters_before=before, parameters_after=after,
                          parameters_removed=round(1 - after / max(before, 1), 4))
