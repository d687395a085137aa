"""One registry of stage handlers: a stage config's type -> the function that runs it.

    @register_stage(SmoothConfig)
    def smooth(model, config, context, report): ...

A handler changes ``model`` in place as its config says and records, in its ``StageReport``, what it did
per layer. ``check`` (optional) runs before any stage changes the model, on the model as it was given,
so that a recipe that cannot work fails before the slow work; ``offload`` says the handler can run on
blocks loaded from disk one at a time (``bitsmith compress --offload``); ``joins`` (optional) says, just
before the handler runs, the blocks (their ModuleList's name) of the calibrated block pass it will run, so
that an earlier stage's offered work can share it (pipeline/run.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bitsmith.errors import BitsmithError
from bitsmith.recipe.stages import StageConfig

__all__ = ["Handler", "STAGES", "register_stage", "handler_for"]


@dataclass(frozen=True)
class Handler:
    run: Callable
    check: Callable | None = None
    offload: bool = False
    why_not_offload: str = ""  # said when --offload is asked of a stage that cannot run block by block from disk
    joins: Callable | None = None  # (model, config, context) -> prefix of its calibrated block pass, or None


STAGES: dict[type[StageConfig], Handler] = {}


def register_stage(config_type: type[StageConfig], *, check: Callable | None = None, offload: bool = False,
                   why_not_offload: str = "", joins: Callable | None = None):
    def register(run: Callable) -> Callable:
        STAGES[config_type] = Handler(run, check, offload, why_not_offload, joins)
        return run

    return register


def handler_for(config: StageConfig) -> Handler:
    handler = STAGES.get(type(config))
    if handler is None:
        raise BitsmithError(f"stage '{config.stage}' has no handler registered (import bitsmith.stages)")
    return handler
