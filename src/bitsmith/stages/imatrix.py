"""The importance-matrix method inside one block (the block runner calls it): the block's float inputs give each
target the mean square of every input column (the diagonal of the same statistics GPTQ gathers), then each target
is rounded to nearest on the grid of least importance-weighted error (algorithms/imatrix.py). As llama.cpp
computes its importance matrix on the float model, every target of the block is measured on the float block
before any is quantized."""

from __future__ import annotations

from torch import nn

from bitsmith.algorithms.imatrix import importance_from_hessian, quantize_weight_imatrix
from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.pipeline.blocks import input_statistics
from bitsmith.stages.methods import BlockMethod, register_method
from bitsmith.stages.weights import fake_quantize_, group_size

__all__ = ["imatrix_block_"]


def imatrix_block_(block: nn.Module, names: dict[str, str], schemes: dict, inputs: list, config, pending: list,
                   report, context, state=None) -> None:
    """Every target of the block rounded on its importance-weighted grid; the layers stay fake-quantized
    (``pending``) until ``finish_block_``. A target no calibration batch reached is rounded on the plain MSE grid,
    and its report says so."""
    statistics = input_statistics(block, names, inputs)
    for local, full in names.items():
        linear, scheme = block.get_submodule(local), schemes[full]
        w = scheme.weights
        hessian = statistics[full][0]
        if hessian is None or not statistics[full][1]:
            qweight = quantize_weight_rtn(linear.weight.detach(), w.bits, group_size(linear, scheme), w.symmetric,
                                          clip="mse")
            report.done(full, scheme.describe("rtn"), asked=scheme.describe())
            report.note(full, "saw no calibration data: the plain MSE range search instead of imatrix")
        else:
            qweight = quantize_weight_imatrix(linear.weight.detach(), w.bits, group_size(linear, scheme), w.symmetric,
                                              importance_from_hessian(hessian))
            report.done(full, scheme.describe("imatrix"), asked=scheme.describe())
        fake_quantize_(linear, qweight, pending, local, scheme)
        if context.progress is not None:
            context.progress(full)


register_method("imatrix", BlockMethod(calibrated=True, quantize_block=imatrix_block_))
