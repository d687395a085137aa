"""Number formats as pure tensor functions: integer affine, floats (fp16/bf16, fp8, MXFP4, NF4),
binary/ternary, and packing of low-bit codes. Nothing here knows about ``nn.Module``."""

from bitsmith.formats.affine import (
    IntFormat,
    block_size_for,
    choose_qparams_affine,
    dequantize_affine,
    fake_quantize_affine,
    quantize_affine,
)
from bitsmith.formats.floats import (
    FP4_E2M1_GRID,
    NF4_LEVELS,
    cast_float,
    dequantize_fp8,
    dequantize_mxfp4,
    dequantize_absmax_double,
    dequantize_nf4,
    fp8_max,
    quantize_fp8,
    quantize_mxfp4,
    quantize_absmax_double,
    quantize_nf4,
    quantize_nf4_double,
)
from bitsmith.formats.packing import pack_codes, pack_int32, unpack_codes, unpack_int32
from bitsmith.formats.ternary import dequantize_binary, dequantize_ternary, quantize_binary, quantize_ternary

__all__ = [
    # affine integers
    "IntFormat",
    "block_size_for",
    "choose_qparams_affine",
    "quantize_affine",
    "dequantize_affine",
    "fake_quantize_affine",
    # floats
    "cast_float",
    "fp8_max",
    "quantize_fp8",
    "dequantize_fp8",
    "FP4_E2M1_GRID",
    "quantize_mxfp4",
    "dequantize_mxfp4",
    "NF4_LEVELS",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_nf4_double",
    "quantize_absmax_double",
    "dequantize_absmax_double",
    # binary / ternary
    "quantize_binary",
    "dequantize_binary",
    "quantize_ternary",
    "dequantize_ternary",
    # packing
    "pack_codes",
    "unpack_codes",
    "pack_int32",
    "unpack_int32",
]
