"""Run a recipe's stages on a model, in order, all or nothing.

    report = run_stages(model, recipe, calibration)

1. The calibration set is checked once (``calibration_batches``) and shared by every stage.
2. Every stage's handler is found in the registry and its ``check`` runs on the model as given: a recipe
   that cannot work on this model fails before anything changes.
3. Each handler runs in recipe order, filling its ``StageReport``; a failure in any stage puts the model
   back exactly as it was (``transaction.all_or_nothing``). A caller running on its own copy, which it throws
   away on a failure (``compress``), passes ``undo=False``: the record would keep every replaced float layer
   alive until the recipe ends (QLoRA's training would carry the whole float model beside its NF4 one).
4. What the stages did is recorded on the model (``bitsmith_recipe``, ``bitsmith_stages``,
   ``bitsmith_quantized`` / ``_skipped`` / ``_notes``), which ``save`` writes to ``bitsmith.json``.

With ``blocks`` given (a ``BlockSource`` reading blocks from disk), every stage must be able to run block
by block; the one block runner (``pipeline/blocks.py``) is the same in both cases.

Stages share block passes where they can: a stage may ``offer`` its per-block work to the stage after it
(prune offers Wanda or SparseGPT to the quantize stage after it); if that stage's handler ``joins`` a pass
over the same blocks with calibration, both run in that one pass (block i: pruned, then quantized on the
same inputs, before block i+1 sees its outputs); otherwise the offered work runs on its own first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.pipeline.blocks import BlockSource, Work, run_blocks
from bitsmith.pipeline.calibration import calibration_batches, run_batch
from bitsmith.pipeline.registry import handler_for
from bitsmith.pipeline.report import Report, StageReport
from bitsmith.pipeline.transaction import all_or_nothing
from bitsmith.recipe.recipe import Recipe
from bitsmith.recipe.stages import QUANTIZE, StageConfig

__all__ = ["Context", "check_stages", "run_stages"]


@dataclass
class _Offer:
    """Block work a stage left for the next stage's pass (see the module docstring)."""

    prefix: str
    blocks: nn.ModuleList
    work: Work
    finish: Callable[[bool], None]  # after its pass: True when that pass was shared with the next stage


def _both(first: Work, second: Work) -> Work:
    def work(index: int, block: nn.Module, inputs):
        follow_ups = [f for f in (first(index, block, inputs), second(index, block, inputs)) if f is not None]
        return (lambda: [f() for f in follow_ups]) if follow_ups else None

    return work


@dataclass
class Context:
    """What a handler may use besides its own config."""

    stages: list[StageConfig]  # the whole recipe, for stages that work for a later one (smooth -> quantize)
    index: int  # this stage's place in it
    calibration: list | None  # checked batches, shared by every stage
    blocks: BlockSource  # where the block runner gets blocks from
    progress: Callable[[str], None] | None = None  # called per layer or block; its ``stage(i, n, name)``, if it
    #                                               has one, before each stage
    earlier: list[StageReport] = field(default_factory=list)  # what the stages before this one did
    shared: dict = field(default_factory=dict)  # one dict for every stage of a run: the pending offer
    checkpoints: str | None = None  # where training stages keep their checkpoints (None: nowhere)
    resume: bool = False  # training stages start from their last checkpoint there
    original: nn.Module | None = None  # the model as given, held unchanged by the caller (compress's float model):
    #                                    training stages learn from it instead of copying the model

    def offer(self, prefix: str, blocks: nn.ModuleList, work: Work, finish: Callable[[bool], None]) -> bool:
        """Leave this stage's calibrated block work to the next stage's pass; False: run it yourself."""
        if self.offloaded or self.index + 1 >= len(self.stages):
            return False
        self.shared["offer"] = _Offer(prefix, blocks, work, finish)
        return True

    def run_blocks(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, batches: list | None, work: Work) -> None:
        """The block runner for this stage, with an offered earlier stage's work in the same pass where the
        blocks are the same and calibration runs."""
        offer = self.shared.pop("offer", None)
        if offer is not None and (offer.prefix != prefix or batches is None):
            _run_offer(model, offer, self)
            offer = None
        run_blocks(model, blocks, self.blocks, batches, _both(offer.work, work) if offer else work, run_batch)
        if offer is not None:
            offer.finish(True)

    @property
    def offloaded(self) -> bool:
        return self.blocks.offloaded

    def sparse_layers(self) -> set[str]:
        """Layers an earlier stage made sparse (its summary's "sparsity": layer -> fraction of zeros): a later
        stage keeps their zeros."""
        return {name for report in self.earlier for name, fraction in report.summary.get("sparsity", {}).items()
                if fraction > 0}

    def following(self, kind: type[StageConfig]) -> StageConfig | None:
        """The first stage of type ``kind`` after this one."""
        return next((s for s in self.stages[self.index + 1:] if isinstance(s, kind)), None)


def _run_offer(model: nn.Module, offer: _Offer, context: Context) -> None:
    run_blocks(model, offer.blocks, context.blocks, context.calibration, offer.work, run_batch)
    offer.finish(False)


def _settle_offer(model: nn.Module, stage: StageConfig, handler, context: Context) -> None:
    """Before a stage runs: an offered block pass it will not join runs now, on its own."""
    offer = context.shared.get("offer")
    if offer is None:
        return
    joins = handler.joins(model, stage, context) if handler.joins is not None else None
    if joins != offer.prefix:
        del context.shared["offer"]
        _run_offer(model, offer, context)


def _check_offload(recipe: Recipe, handlers: list) -> None:
    for stage, handler in zip(recipe.stages, handlers):
        if not handler.offload:
            raise BitsmithError(f"the block-by-block pipeline (--offload) cannot run stage '{stage.stage}'"
                                f" ({handler.why_not_offload}); run the recipe in memory")
    if len(recipe.stages) > 1:
        raise BitsmithError("the block-by-block pipeline (--offload) runs a recipe of one stage (each block is"
                            " written once it is done)")


def check_stages(model: nn.Module, recipe: Recipe, calibration: Iterable | None = None, *,
                 blocks: BlockSource | None = None, progress=None, checkpoints=None, resume: bool = False,
                 original: nn.Module | None = None) -> list[tuple]:
    """Steps 1 and 2 of ``run_stages``: (stage, handler, context) for every stage, all checked."""
    source = blocks if blocks is not None else BlockSource()
    if calibration is not None:
        calibration = calibration_batches(calibration)
    if recipe.needs_calibration and calibration is None:
        raise BitsmithError("this recipe calibrates (static activations, gptq, awq or smoothquant): give calibration"
                            " data (--calib)")
    handlers = [handler_for(stage) for stage in recipe.stages]
    shared: dict = {}
    folder = None if checkpoints is None else str(checkpoints)
    steps = [(stage, handler, Context(recipe.stages, index, calibration, source, progress, shared=shared,
                                      checkpoints=folder, resume=resume, original=original))
             for index, (stage, handler) in enumerate(zip(recipe.stages, handlers))]
    for stage, handler, context in steps:  # first: what each stage says of this model (the closer reason)
        if handler.check is not None:
            handler.check(model, stage, context)
    if source.offloaded:
        _check_offload(recipe, handlers)
    return steps


def run_stages(model: nn.Module, recipe: Recipe, calibration: Iterable | None = None, *,
               blocks: BlockSource | None = None, progress=None, checkpoints=None, resume: bool = False,
               undo: bool = True, original: nn.Module | None = None) -> Report:
    """Run every stage of ``recipe`` on ``model`` in place (see the module docstring); training stages keep
    checkpoints under ``checkpoints`` and, with ``resume``, start from them. ``undo=False``: a failure leaves
    ``model`` half done (for a caller that drops it then), and replaced layers are freed as the stages go.
    ``original``: an unchanged copy of ``model`` as given that the caller keeps anyway; training stages take it
    as their teacher instead of copying ``model``."""
    steps = check_stages(model, recipe, calibration, blocks=blocks, progress=progress, checkpoints=checkpoints,
                         resume=resume, original=original)
    report = Report()
    for _, _, context in steps:
        context.earlier = report.stages  # grows as the stages run: stage i sees stages 0 .. i-1
    announce = getattr(progress, "stage", None)  # a progress that shows one bar per stage (the CLI's)
    with all_or_nothing(model) if undo else contextlib.nullcontext():
        for stage, handler, context in steps:
            if announce is not None:
                announce(context.index, len(steps), stage.stage)
            _settle_offer(model, stage, handler, context)
            stage_report = StageReport(stage.stage, quantizes=stage.phase == QUANTIZE)
            handler.run(model, stage, context, stage_report)
            report.stages.append(stage_report)
        if steps and "offer" in steps[0][2].shared:  # a handler said it joins a pass, then ran none: a bug, never run late
            raise RuntimeError("a stage joined an earlier stage's block pass but ran no block pass")
        _record(model, recipe, report)
    return report


def _record(model: nn.Module, recipe: Recipe, report: Report) -> None:
    """What was done, on the model, added to what earlier runs recorded."""
    model.bitsmith_recipe = recipe.to_dict()
    model.bitsmith_stages = [*getattr(model, "bitsmith_stages", []), *report.as_list()]
    model.bitsmith_skipped = {**getattr(model, "bitsmith_skipped", {}), **report.skipped}
    model.bitsmith_notes = {**getattr(model, "bitsmith_notes", {}), **report.notes}
    model.bitsmith_quantized = {**getattr(model, "bitsmith_quantized", {}), **report.quantized}
