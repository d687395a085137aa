"""Runtime modules that run quantized layers on real low-bit kernels."""

from __future__ import annotations

from torch import nn

from bitsmith.nn.embedding import HalfEmbedding, QuantizedEmbedding
from bitsmith.nn.kinds import KINDS, Field, InfoError, module_from_info, register_kind
from bitsmith.nn.linear import HalfLinear, Int8DynamicLinear, Int8WeightOnlyLinear, IntxWeightOnlyLinear
from bitsmith.nn.linear_min import IntxMinWeightOnlyLinear
from bitsmith.nn.lookup import Fp8WeightOnlyLinear, LookupWeightOnlyLinear
from bitsmith.nn.lora import LoRALinear
from bitsmith.nn.static import StaticInt8Conv2d, StaticInt8Linear

__all__ = [
    "Fp8WeightOnlyLinear",
    "LookupWeightOnlyLinear",
    "LoRALinear",
    "HalfEmbedding",
    "HalfLinear",
    "Int8DynamicLinear",
    "Int8WeightOnlyLinear",
    "IntxMinWeightOnlyLinear",
    "IntxWeightOnlyLinear",
    "QuantizedEmbedding",
    "StaticInt8Conv2d",
    "StaticInt8Linear",
    "QUANTIZED_MODULES",
    "KINDS",
    "InfoError",
    "module_from_info",
]

QUANTIZED_MODULES = (
    Fp8WeightOnlyLinear,
    LookupWeightOnlyLinear,
    HalfEmbedding,
    HalfLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    IntxMinWeightOnlyLinear,
    IntxWeightOnlyLinear,
    LoRALinear,
    QuantizedEmbedding,
    StaticInt8Conv2d,
    StaticInt8Linear,
)

_POSITIVE = Field(int, minimum=1)
_FLAG = Field(bool)
_LINEAR = {"in_features": _POSITIVE, "out_features": _POSITIVE, "has_bias": _FLAG}
_TABLE = {"num_embeddings": _POSITIVE, "embedding_dim": _POSITIVE, "padding_idx": Field(int, 0, optional=True)}


def _linear_args(info: dict) -> tuple:
    return info["in_features"], info["out_features"], info["has_bias"]


def _intx(info: dict) -> nn.Module:
    return IntxWeightOnlyLinear(*_linear_args(info), bits=info["bits"], group_size=info["group_size"])


def _grouped(info: dict, build) -> nn.Module:
    if info["in_features"] % info["group_size"]:
        raise InfoError(f"group_size {info['group_size']} does not divide in_features {info['in_features']}")
    return build()


def _conv(info: dict) -> nn.Module:
    groups = info["groups"]
    if info["in_channels"] % groups or info["out_channels"] % groups:
        raise InfoError(f"groups={groups} does not divide the channels")
    return StaticInt8Conv2d(
        info["in_channels"], info["out_channels"], info["kernel_size"], info["stride"], info["padding"],
        info["dilation"], groups, info["has_bias"], info["fused_relu"],
    )


def _table_args(info: dict) -> tuple:
    padding = info.get("padding_idx")
    if padding is not None and padding >= info["num_embeddings"]:
        raise InfoError(f"padding_idx {padding} is outside the table of {info['num_embeddings']} rows")
    group = info.get("group_size")
    if group is not None and info["embedding_dim"] % group:
        raise InfoError(f"group_size {group} does not divide embedding_dim {info['embedding_dim']}")
    return info["num_embeddings"], info["embedding_dim"]


register_kind("HalfLinear", {**_LINEAR, "dtype": Field(("bf16", "fp16"))},
              lambda i: HalfLinear(*_linear_args(i), dtype=i["dtype"]))
register_kind("Int8WeightOnlyLinear", _LINEAR, lambda i: Int8WeightOnlyLinear(*_linear_args(i)))
register_kind("Int8DynamicLinear", _LINEAR, lambda i: Int8DynamicLinear(*_linear_args(i)))
register_kind("IntxWeightOnlyLinear", {**_LINEAR, "bits": Field((2, 3, 4, 5, 6, 7, 8)), "group_size": _POSITIVE},
              _intx)
register_kind("IntxMinWeightOnlyLinear", {**_LINEAR, "bits": Field((2, 3, 4, 5, 6, 7, 8)), "group_size": _POSITIVE},
              lambda i: _grouped(i, lambda: IntxMinWeightOnlyLinear(*_linear_args(i), bits=i["bits"],
                                                                    group_size=i["group_size"])))
register_kind("Fp8WeightOnlyLinear", {**_LINEAR, "group_size": _POSITIVE}, lambda i: _grouped(
    i, lambda: Fp8WeightOnlyLinear(*_linear_args(i), group_size=i["group_size"])))
register_kind("LookupWeightOnlyLinear", {**_LINEAR, "format": Field(("nf4", "nf4-dq", "mxfp4")), "group_size": _POSITIVE},
              lambda i: _grouped(i, lambda: LookupWeightOnlyLinear(*_linear_args(i), i["format"], i["group_size"])))
register_kind("StaticInt8Linear", {**_LINEAR, "fused_relu": _FLAG, "input_smooth": Field(bool, optional=True)},
              lambda i: StaticInt8Linear(*_linear_args(i), i["fused_relu"], bool(i.get("input_smooth"))))
register_kind("StaticInt8Conv2d", {
    "in_channels": _POSITIVE, "out_channels": _POSITIVE, "kernel_size": Field(list, 1), "stride": Field(list, 1),
    "padding": Field(list, 0), "dilation": Field(list, 1), "groups": _POSITIVE, "has_bias": _FLAG,
    "fused_relu": _FLAG,
}, _conv)
register_kind("QuantizedEmbedding", {**_TABLE, "bits": Field((2, 3, 4, 5, 6, 7, 8)),
                                     "group_size": Field(int, 1, optional=True)},
              lambda i: QuantizedEmbedding(*_table_args(i), i["bits"], i.get("padding_idx"), i.get("group_size")))
register_kind("HalfEmbedding", {**_TABLE, "dtype": Field(("bf16", "fp16"))},
              lambda i: HalfEmbedding(*_table_args(i), i["dtype"], i.get("padding_idx")))
register_kind("Identity", {}, lambda i: nn.Identity())


def _lora(info: dict) -> nn.Module:
    base = info["base"]
    if base.get("module") == "LoRALinear":
        raise InfoError("a LoRALinear's base is itself a LoRALinear")
    inner = module_from_info(base)
    if (getattr(inner, "in_features", None), getattr(inner, "out_features", None)) != (
            info["in_features"], info["out_features"]):
        raise InfoError("the base layer's shape is not the adapters' shape")
    return LoRALinear(inner, info["rank"])


register_kind("LoRALinear", {"in_features": _POSITIVE, "out_features": _POSITIVE, "rank": _POSITIVE,
                             "base": Field(dict)}, _lora)
