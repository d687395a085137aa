"""The one training loop of the training stages (qat, distill): the student follows the float teacher.

    loss = distill_loss(student output, teacher output)            # algorithms/distill.py: kl, cosine or mse
                                                                   #   (cosine of hidden states: mean-pooled by the mask)
         + match_weight * sum over ``match`` layers of MSE(student layer output, teacher layer output)

The teacher is the model as the recipe was given (``teacher_for``: kept by the stage's check, before any stage
changes the model), so "prune, distill, qat" learns from the float model at every step. Batches are the
calibration batches in a seeded order; a held-out part (``held_out``) reports the loss before and after. A loss
that is not finite stops the run with one line, and the pipeline puts the model back as it was; the last
checkpoint (``checkpoint_every``, ``stages/checkpoints.py``) stays, for ``--resume``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bitsmith.algorithms.distill import distill_loss, loss_kind, mean_pool, output_tensor, text_loss
from bitsmith.errors import BitsmithError
from bitsmith.pipeline.blocks import find_blocks
from bitsmith.pipeline.calibration import run_batch
from bitsmith.pipeline.distributed import average_gradients_, local_part, mean_across
from bitsmith.pipeline.run import Context
from bitsmith.stages.checkpoints import Checkpoints

__all__ = ["keep_teacher", "teacher_for", "own_parameters_", "sparsity_masks", "train_to_teacher", "check_match",
           "check_text", "checkpoints_for", "checkpointed_blocks",
           "check_training"]

_TEACHER = "teacher"  # Context.shared key


def keep_teacher(model: nn.Module, context: Context) -> None:
    """From a training stage's check (the model as given, before any stage runs): keep it as the teacher, or the
    caller's unchanged copy of it (``context.original``) where there is one in eval mode (the caller's mode stays
    the caller's)."""
    if _TEACHER not in context.shared:
        original = context.original
        usable = original is not None and not original.training
        context.shared[_TEACHER] = original if usable else copy.deepcopy(model).eval()


def teacher_for(model: nn.Module, context: Context) -> nn.Module:
    teacher = context.shared.get(_TEACHER)
    return teacher if teacher is not None else copy.deepcopy(model).eval()


def own_parameters_(model: nn.Module) -> None:
    """Bind a copy of every parameter (tied ones stay tied), so that the optimizer's in-place steps never write
    into the tensors the caller holds: a failed run restores the model exactly (pipeline/transaction.py)."""
    copies: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in copies:
                    copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = copies[id(p)]


def _figure(value: float) -> float:
    return float(f"{value:.6g}")


def _split(batches: list, held_out: float, seed: int) -> tuple[list, list]:
    count = round(len(batches) * held_out) if len(batches) > 1 else 0
    count = min(max(count, 1 if held_out > 0 and len(batches) > 1 else 0), len(batches) - 1)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order[count:]], [batches[i] for i in order[:count]]


def rebatch(batches: list, size: int | None) -> list:
    """``batches`` split into batches of ``size`` samples (tensors, or dicts of tensors, along dim 0)."""
    if size is None:
        return batches
    split = []
    for batch in batches:
        if isinstance(batch, dict):
            parts = {k: v.split(size) if isinstance(v, torch.Tensor) and v.dim() else None for k, v in batch.items()}
            count = max((len(p) for p in parts.values() if p is not None), default=1)
            split += [{k: (parts[k][i] if parts[k] is not None else v) for k, v in batch.items()} for i in range(count)]
        elif isinstance(batch, torch.Tensor) and batch.dim():
            split += list(batch.split(size))
        else:
            split.append(batch)
    return split


def _curve(losses: list[float], points: int = 50) -> list[list]:
    """[step, mean training loss of the steps since the last point], at most ``points`` of them."""
    every = max(-(-len(losses) // points), 1)
    return [[min(i + every, len(losses)), _figure(sum(losses[i:i + every]) / len(losses[i:i + every]))]
            for i in range(0, len(losses), every)]


class _Taps:
    """Forward hooks keeping the outputs of the ``match`` layers of one model, by name."""

    def __init__(self, model: nn.Module, names: list[str], detach: bool):
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            def keep(module, args, output, name=name):
                tensor = output_tensor(output) if not isinstance(output, torch.Tensor) else output
                self.outputs[name] = tensor.detach() if detach else tensor

            self.handles.append(modules[name].register_forward_hook(keep))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def check_text(model: nn.Module, batch, what: str) -> None:
    """loss: text trains a language model on its input's next tokens: the batches must be token ids and the
    model's output logits over them."""
    if not (isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor)):
        raise BitsmithError(f"{what}: loss text trains on token ids; this model's calibration batches are not text")
    with torch.no_grad():
        output = run_batch(model, batch)
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[:2] == batch["input_ids"].shape):
        raise BitsmithError(f"{what}: loss text needs a language model (logits over each input token);"
                            f" {type(model).__name__} does not give them")


def check_training(model: nn.Module, options, context: Context, what: str) -> None:
    """What every training stage's check does, on the model as given: its ``match`` layers exist, it has blocks
    to recompute if ``gradient_checkpointing`` asks, and the teacher is kept (unless ``loss: text``)."""
    check_match(model, options.match, what)
    if options.gradient_checkpointing:
        find_blocks(model, None, f"{what}: gradient_checkpointing")
    if options.loss != "text":  # text: the model's own next tokens, no teacher
        keep_teacher(model, context)


def check_match(model: nn.Module, names: list[str], what: str) -> None:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise BitsmithError(f"{what}: match layer '{missing[0]}' is not a module of the model")


class _Objective:
    """The loss of one batch: output distance to the teacher plus the matched layers' MSE."""

    def __init__(self, model, teacher, options, kind: str):
        self.model, self.teacher, self.options, self.kind = model, teacher, options, kind
        match = list(getattr(options, "match", []) or [])
        self.student_taps = _Taps(model, match, detach=False)
        self.teacher_taps = _Taps(teacher, match, detach=True) if teacher is not None else _Taps(model, [], True)
        self.match = match

    def __call__(self, batch) -> torch.Tensor:
        if self.kind == "text":  # the batch's own next tokens: no teacher
            return text_loss(output_tensor(run_batch(self.model, batch)), batch["input_ids"], batch.get("attention_mask"))
        with torch.no_grad():
            target = output_tensor(run_batch(self.teacher, batch))
        student = output_tensor(run_batch(self.model, batch))
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if self.kind == "cosine" and mask is not None and student.dim() == 3 and mask.shape == student.shape[:2]:
            student, target = mean_pool(student, mask), mean_pool(target, mask)  # sentence embeddings
        loss = distill_loss(student, target, self.kind, self.options.temperature)
        for name in self.match:
            student, teacher = self.student_taps.outputs[name], self.teacher_taps.outputs[name]
            if student.shape != teacher.shape:
                raise BitsmithError(f"match layer '{name}' gives {list(student.shape)} in the student and"
                                    f" {list(teacher.shape)} in the teacher: match layers whose outputs keep their shape")
            loss = loss + self.options.match_weight * torch.nn.functional.mse_loss(student.float(), teacher.float())
        return loss

    def close(self) -> None:
        self.student_taps.close()
        self.teacher_taps.close()


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, what: str):
    """Inside: each block (the model's repeated layers, ``find_blocks``) keeps only its inputs for the backward and
    runs its forward again there (``torch.utils.checkpoint``, non-reentrant; the random state of dropout is
    replayed), so what a block computes inside is not held across the step. A model config's ``use_cache`` is
    off meanwhile: a key/value cache written in the forward would be written twice."""
    _, blocks = find_blocks(model, None, f"{what}: gradient_checkpointing")

    def recomputed(forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():  # the teacher, held-out losses: nothing to keep
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    before = [block.__dict__.get("forward") for block in blocks]
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    for block in blocks:
        block.forward = recomputed(block.forward)
    if cache:
        config.use_cache = False
    try:
        yield
    finally:
        for block, forward in zip(blocks, before):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
        if cache:
            config.use_cache = cache


def sparsity_masks(model: nn.Module, sparse: set[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, nonzero mask) of the layers an earlier stage pruned: training keeps their zeros."""
    masks = []
    for name in sorted(sparse):
        weight = getattr(model.get_submodule(name), "weight", None) if name in dict(model.named_modules()) else None
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            masks.append((weight, weight.detach() != 0))
    return masks


def train_to_teacher(model: nn.Module, teacher: nn.Module, options, batches: list, params: list[nn.Parameter],
                     what: str, progress=None, masks: list | None = None, checkpoints: Checkpoints | None = None) -> dict:
    """``options.steps`` AdamW steps (cosine decay) on ``params``, the zeros of ``masks`` (``sparsity_masks``) kept
    after every step, from and to ``checkpoints`` where given; returns the figures the report shows."""
    train, held = _split(rebatch(batches, options.batch_size), options.held_out, options.seed)
    if options.loss == "text":
        check_text(model, train[0], what)
        kind = "text"
    else:
        with torch.no_grad():
            kind = loss_kind(run_batch(teacher, train[0]), options.loss)
    objective = _Objective(model, teacher, options, kind)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    start = time.perf_counter()
    recompute = contextlib.ExitStack()
    try:
        if options.gradient_checkpointing:
            recompute.enter_context(checkpointed_blocks(model, what))
        before = _held_out_loss(objective, held)
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(options.steps, 1))))
        generator = torch.Generator().manual_seed(options.seed)
        done, losses, order = checkpoints.read(model, optimizer, schedule, generator) if checkpoints else (0, [], [])
        with torch.enable_grad():
            for step in range(done, options.steps):
                if not order:
                    order = torch.randperm(len(train), generator=generator).tolist()
                losses.append(_step(objective, train[order.pop()], optimizer, schedule, masks, what, step, options))
                if checkpoints is not None and checkpoints.due(step + 1):
                    checkpoints.write(step + 1, model, optimizer, schedule, generator, order, losses)
                if progress is not None:
                    left = (time.perf_counter() - start) / (step + 1 - done) * (options.steps - step - 1)
                    progress(f"{what} step {step + 1}/{options.steps} loss {losses[-1]:.4g}"
                             f" lr {schedule.get_last_lr()[0]:.3g} ~{left:.0f}s left")
        after = _held_out_loss(objective, held)
    finally:
        recompute.close()
        objective.close()
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
    tenth = max(len(losses) // 10, 1)
    figures = {"steps": options.steps, "loss": kind, "train_batches": len(train), "held_out_batches": len(held),
               "train_loss_first": _figure(sum(losses[:tenth]) / tenth) if losses else None,
               "train_loss_last": _figure(sum(losses[-tenth:]) / tenth) if losses else None,
               "held_out_loss_before": before, "held_out_loss_after": after, "loss_curve": _curve(losses),
               "seconds": round(time.perf_counter() - start, 1)}
    if done:
        figures["resumed_at_step"] = done
    elif checkpoints is not None and checkpoints.resume:  # --resume with nothing to resume from: said, not silent
        figures["resume"] = f"no checkpoint in {checkpoints.folder}: started from step 0"
    return figures


def _step(objective: _Objective, batch, optimizer, schedule, masks, what: str, step: int, options) -> float:
    loss = objective(local_part(batch))  # data parallel: this process's share of the batch
    value = mean_across(loss.item())  # every process sees the same loss, so all stop together
    if not math.isfinite(value):
        raise BitsmithError(f"{what}: the loss became {value} at step {step + 1}; lower lr"
                            f" (now {options.lr:g}) and run again")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients_(optimizer.param_groups[0]["params"])
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        for weight, keep in masks or ():
            weight.mul_(keep)
    return value


def checkpoints_for(context: Context, options, what: str, params: list[nn.Parameter], batches: list) -> Checkpoints | None:
    """The stage's checkpoints under the run's checkpoint folder (``--checkpoints``), if it has one."""
    if context.checkpoints is None or not options.checkpoint_every:
        return None
    settings = {"stage": what, "index": context.index, "options": options.to_dict(), "batches": len(batches),
                "parameters": sum(p.numel() for p in params)}
    return Checkpoints(Path(context.checkpoints) / f"{context.index}-{what}", options.checkpoint_every,
                       context.resume, settings)


def _held_out_loss(objective: _Objective, batches: list) -> float | None:
    if not batches:
        return None
    with torch.no_grad():
        losses = [mean_across(objective(local_part(batch)).item()) for batch in batches]
    return _figure(sum(losses) / len(losses))
