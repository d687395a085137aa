"""Weight methods of the quantize stage that work block by block, by the name a scheme gives them
(``weights.algorithm``): one registry, so the quantize stage never branches on a method.

    method | calibrated | per block
    rtn    | no         | each layer rounded to nearest, replaced at once
    gptq   | yes        | Hessian per input group (true-sequential), GPTQ's error feedback (stages/gptq.py)
    awq    | yes        | scale search and fold per mapping, clipping search, rounding (stages/awq.py)
    imatrix| yes        | input mean squares on the float block, importance-weighted range search (stages/imatrix.py)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BlockMethod", "METHODS", "register_method"]


@dataclass(frozen=True)
class BlockMethod:
    calibrated: bool  # needs the block's calibration inputs
    # (block, names: local -> full, schemes: full -> Scheme, inputs, config, pending, report, context, state)
    quantize_block: Callable
    # (model, first block, config) -> state shared by every block (e.g. AWQ's model family); also the check
    start: Callable | None = None


METHODS: dict[str, BlockMethod] = {}


def register_method(name: str, method: BlockMethod) -> None:
    METHODS[name] = method
