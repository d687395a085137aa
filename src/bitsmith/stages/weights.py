"""Runtime modules for quantized weights: what a layer becomes once its weights are chosen.

Round-to-nearest builds the module directly (``quantize_linear``, ``quantize_embedding``). Calibrated
methods working block by block (GPTQ, AWQ) first give the float layer its quantized weight, dequantized
(``fake_quantize_``), so the rest of the block's calibration runs see it at fp32 speed, and swap in the
runtime module once the block has given the next block its inputs (``finish_block_``).
"""

from __future__ import annotations

from torch import nn

from bitsmith.algorithms._modules import assign_, replace_module
from bitsmith.algorithms.gptq import dequantize_weight
from bitsmith.algorithms.rtn import QuantizedWeight, quantize_weight_rtn, quantize_weight_signed, quantize_weight_ternary
from bitsmith.errors import BitsmithError
from bitsmith.nn import (
    Fp8WeightOnlyLinear,
    LookupWeightOnlyLinear,
    HalfEmbedding,
    HalfLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    IntxWeightOnlyLinear,
    QuantizedEmbedding,
)
from bitsmith.recipe.schemes import Scheme

__all__ = ["quantize_linear", "quantize_embedding", "fake_quantize_", "finish_block_", "group_size", "module_for",
           "LOOKUP_BUILDERS"]


def _group(linear: nn.Linear, granularity: str | int) -> int:
    return granularity if isinstance(granularity, int) else linear.in_features


# the weight-only formats that are no integer grid (schemes.LOOKUP_DTYPES): dtype -> (linear, spec) -> module
LOOKUP_BUILDERS = {
    "fp8_e4m3": lambda linear, w: Fp8WeightOnlyLinear.from_float(linear, _group(linear, w.granularity)),
    "nf4": lambda linear, w: LookupWeightOnlyLinear.from_float(linear, "nf4-dq" if w.double_quant else "nf4",
                                                               w.granularity),
    "mxfp4": lambda linear, w: LookupWeightOnlyLinear.from_float(linear, "mxfp4", w.granularity),
    "ternary": lambda linear, w: IntxWeightOnlyLinear.from_quantized(
        quantize_weight_ternary(linear.weight.detach(), w.granularity), linear.bias),
}


def quantize_linear(linear: nn.Linear, scheme: Scheme) -> nn.Module:
    """The runtime module for ``linear`` under a round-to-nearest ``scheme``."""
    w = scheme.weights
    if w.is_lookup:
        return LOOKUP_BUILDERS[w.dtype](linear, w)
    if w.bits is None:
        return HalfLinear.from_float(linear, w.dtype)
    if scheme.activations is not None:  # W8A8 dynamic: signed codes of any width, held as int8
        qweight = quantize_weight_signed(linear.weight.detach(), w.bits, w.granularity, w.clip)
        return Int8DynamicLinear.from_quantized(qweight, linear.bias)  # a per-tensor scale is repeated on every row
    qweight = quantize_weight_rtn(linear.weight.detach(), w.bits, w.granularity, w.symmetric, w.clip)
    if w.bits == 8 and w.symmetric and w.granularity in ("channel", "tensor"):
        return Int8WeightOnlyLinear.from_quantized(qweight, linear.bias)  # a per-tensor scale on every row
    if w.granularity == "tensor":  # stored as one group spanning each row, with the shared scale repeated
        qweight.group_size = linear.in_features
    return IntxWeightOnlyLinear.from_quantized(qweight, linear.bias)


def quantize_embedding(embedding: nn.Embedding, scheme: Scheme) -> nn.Module:
    w = scheme.weights
    if w.bits is None:
        return HalfEmbedding.from_float(embedding, w.dtype)
    qweight = quantize_weight_rtn(embedding.weight.detach(), w.bits, w.granularity, w.symmetric, w.clip)
    return QuantizedEmbedding.from_quantized(qweight, embedding.padding_idx)


def fake_quantize_(linear: nn.Linear, qweight: QuantizedWeight, pending: list, local: str, scheme: Scheme) -> None:
    """Give ``linear`` its quantized weight, dequantized, for the rest of the block's calibration runs
    (fp32 math, as fast as the float layer); ``finish_block_`` swaps in the runtime module after."""
    assign_(linear, "weight", dequantize_weight(qweight))  # a new tensor: the caller's weight is untouched
    pending.append((local, qweight, linear.bias, scheme))


def module_for(qweight: QuantizedWeight, bias, scheme: Scheme) -> nn.Module:
    """The weight-only runtime module holding a calibrated method's codes (GPTQ, AWQ)."""
    w = scheme.weights
    if w.bits == 8 and w.symmetric and qweight.group_size == qweight.codes.shape[1]:
        return Int8WeightOnlyLinear.from_quantized(qweight, bias)
    return IntxWeightOnlyLinear.from_quantized(qweight, bias)


def finish_block_(block: nn.Module, pending: list) -> None:
    """Replace the block's fake-quantized Linears by their runtime modules."""
    for local, qweight, bias, scheme in pending:
        replace_module(block, local, module_for(qweight, bias, scheme))
    pending.clear()


def group_size(linear: nn.Linear, scheme: Scheme) -> int:
    w = scheme.weights
    if w.granularity == "tensor":
        raise BitsmithError(f"{w.algorithm} quantizes per channel or per group, not per tensor")
    return w.granularity if isinstance(w.granularity, int) else linear.in_features
