"""The one block runner: every stage that calibrates block by block (GPTQ, AWQ, and those to come) runs here.

    1. The calibration batches run up to the first block (an encoder or decoder layer), whose inputs
       (args and kwargs) are kept; nothing after the first block runs.
    2. For each block, in order: the block source makes it ready (in memory: nothing to do; with
       ``--offload``: its tensors are read from disk), the stage's ``work`` changes it on the kept inputs,
       the block runs once to give the next block its inputs, ``work``'s follow-up runs (e.g. fake-quantized
       layers become runtime modules), and the source lets it go (with ``--offload``: written, then dropped).

Only one block's inputs and outputs are held at a time, which is what lets models larger than memory be
compressed when blocks come from disk one at a time. The helpers below the runner (``execution_groups``,
``input_statistics``) are what calibrated stages measure inside one block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from bitsmith.algorithms.gptq import accumulate_hessian
from bitsmith.errors import BitsmithError
from bitsmith.pipeline.calibration import call_on_calibration
from bitsmith.pipeline.distributed import merge_means, merge_sums, world

__all__ = [
    "BlockSource", "run_blocks", "find_blocks", "block_targets", "capture_inputs", "run_block",
    "execution_groups", "input_statistics",
]


class BlockSource:
    """Where blocks come from. In memory (this class) every hook does nothing; ``api/offload.py`` reads each
    block from disk in ``load`` and writes and drops it in ``release``."""

    offloaded = False

    def start(self, model: nn.Module) -> None:
        """After the first block's inputs are captured, before the first block."""

    def load(self, index: int, block: nn.Module) -> None:
        """Before block ``index`` is worked on."""

    def release(self, index: int, block: nn.Module) -> None:
        """After block ``index`` is done and has given the next block its inputs."""

    def finish(self, model: nn.Module) -> None:
        """After the last block: what lies outside the blocks is ready to be worked on."""



Work = Callable[[int, nn.Module, list | None], Callable[[], None] | None]


def run_blocks(model: nn.Module, blocks: nn.ModuleList, source: BlockSource, batches: list | None,
               work: Work, run_batch) -> None:
    """Run ``work(index, block, inputs)`` on every block in order (see the module docstring); ``inputs`` is
    None when ``batches`` is None (a stage that needs no calibration, e.g. round-to-nearest from disk).
    ``work`` may return a follow-up, called once the block's outputs are computed."""
    inputs = capture_inputs(model, blocks[0], batches, run_batch) if batches is not None else None
    source.start(model)
    for index, block in enumerate(blocks):
        source.load(index, block)
        follow_up = work(index, block, inputs)
        if inputs is not None:
            inputs = run_block(block, inputs)
        if follow_up is not None:
            follow_up()
        source.release(index, block)
    del inputs
    source.finish(model)


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are captured."""


def find_blocks(model: nn.Module, targets: Iterable[str] | None = None, what: str = "this method"
                ) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated layers holding the most targets (e.g. ``encoder.layer``, ``model.layers``);
    ``targets`` None: the one holding the most modules."""
    targets = list(targets) if targets is not None else [name for name, _ in model.named_modules()]
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(t.startswith(f"{name}.") for t in targets)
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise BitsmithError(f"{what} needs a model made of repeated blocks (an nn.ModuleList of layers); none found")
    return best


def capture_inputs(model: nn.Module, first: nn.Module, batches: Iterable, run_batch) -> list:
    captured = []

    def hook(module, args, kwargs):
        # a KV cache passed down the blocks would grow with every block run on these inputs
        kwargs = {k: (None if k in _CACHE_KWARGS or "Cache" in type(v).__name__ else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not captured:
        raise BitsmithError("the calibration set is empty: gptq and awq need at least one sample")
    return captured


def run_block(block: nn.Module, inputs: list) -> list:
    outputs = []
    with torch.inference_mode():
        for args, kwargs in inputs:
            out = call_on_calibration(block, *args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


def execution_groups(block: nn.Module, names: dict[str, str], inputs: list) -> list[list[str]]:
    """Target Linears of the block grouped by the input tensor they read, in execution order."""
    seen: dict[int, list[str]] = {}
    alive = []  # keeps every input tensor referenced, so no two share an id() during the run
    handles = []
    for local, full in names.items():
        def hook(module, args, full=full):
            alive.append(args[0])
            seen.setdefault(id(args[0]), [])
            if full not in seen[id(args[0])]:
                seen[id(args[0])].append(full)

        handles.append(block.get_submodule(local).register_forward_pre_hook(hook))
    try:
        run_block(block, inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    groups = list(seen.values())
    missing = set(names.values()) - {n for g in groups for n in g}
    return groups + ([sorted(missing)] if missing else [])


def input_statistics(block: nn.Module, locals_: dict[str, str], inputs: list, absmean: bool = False) -> dict[str, tuple]:
    """Per target: (H, rows) from ``accumulate_hessian``, plus mean |x| per input channel with ``absmean``.

    Targets that read the same tensor (q/k/v) share one accumulation. Each batch runs only as far
    into the block as the last target's input: the rest of the block is not needed for these."""
    state = {full: (None, 0) for full in locals_.values()}
    sums = {}
    handles = []
    fired: set[str] = set()
    readers: dict[int, tuple[torch.Tensor, str]] = {}  # this batch: id(input) -> (input, first target)
    same_input: dict[str, str] = {}  # target -> the target whose accumulation it shares (first batch)
    first_batch = True

    for local, full in locals_.items():
        def hook(module, args, full=full):
            x = args[0]
            if x.shape[-1] != module.in_features:
                raise BitsmithError(f"a calibration batch does not fit the model ({full} reads {module.in_features}"
                                    f" inputs, got {x.shape[-1]})")
            if first_batch and id(x) in readers and readers[id(x)][0] is x:
                same_input[full] = readers[id(x)][1]
            readers.setdefault(id(x), (x, full))
            if full not in same_input:
                state[full] = accumulate_hessian(*state[full][:1], x, state[full][1])
                if absmean:
                    total = x.detach().reshape(-1, x.shape[-1]).float().abs().sum(dim=0)
                    sums[full] = total if full not in sums else sums[full] + total
            fired.add(full)
            if len(fired) == len(state):
                raise _Stop

        handles.append(block.get_submodule(local).register_forward_pre_hook(hook))
    rank, size = world()
    shard = size > 1 and len(inputs) >= size  # data parallel: a share of the batches each, merged below
    try:
        with torch.inference_mode():
            for args, kwargs in (inputs[rank::size] if shard else inputs):
                fired.clear()
                readers.clear()
                try:
                    call_on_calibration(block, *args, **kwargs)
                except _Stop:
                    pass
                first_batch = False
    finally:
        for handle in handles:
            handle.remove()
    if shard:
        for local, full in locals_.items():
            if full not in same_input:
                width = block.get_submodule(local).in_features
                state[full] = merge_means(*state[full], width)
                if absmean:
                    sums[full] = merge_sums(sums.get(full), width)
    for full, source in same_input.items():
        state[full] = state[source]
        if source in sums:
            sums[full] = sums[source]
    if absmean:
        return {full: (h, n, sums.get(full, None) if n == 0 else sums[full] / n) for full, (h, n) in state.items()}
    return state


def block_targets(prefix: str, index: int, targets) -> dict[str, str]:
    """Targets inside block ``index``: local name -> full name."""
    block_prefix = f"{prefix}.{index}."
    return {t[len(block_prefix):]: t for t in targets if t.startswith(block_prefix)}


