"""Runtime modules that run quantized layers on real low-bit kernels."""

from __future__ import annotations

from torch import nn

from bitsmith.nn.embedding import HalfEmbedding, QuantizedEmbedding
from bitsmith.nn.linear import HalfLinear, Int8DynamicLinear, Int8WeightOnlyLinear, IntxWeightOnlyLinear
from bitsmith.nn.static import StaticInt8Conv2d, StaticInt8Linear

__all__ = [
    "HalfEmbedding",
    "HalfLinear",
    "Int8DynamicLinear",
    "Int8WeightOnlyLinear",
    "IntxWeightOnlyLinear",
    "QuantizedEmbedding",
    "StaticInt8Conv2d",
    "StaticInt8Linear",
    "QUANTIZED_MODULES",
    "module_from_info",
]

QUANTIZED_MODULES = (
    HalfEmbedding,
    HalfLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    IntxWeightOnlyLinear,
    QuantizedEmbedding,
    StaticInt8Conv2d,
    StaticInt8Linear,
)


def module_from_info(info: dict) -> nn.Module:
    """An empty module of the type and shape ``layer_info()`` described (weights come from the checkpoint)."""
    kind = info["module"]
    if kind in ("HalfLinear", "Int8DynamicLinear", "Int8WeightOnlyLinear", "IntxWeightOnlyLinear"):
        args = (info["in_features"], info["out_features"], info["has_bias"])
        if kind == "HalfLinear":
            return HalfLinear(*args, dtype=info["dtype"])
        if kind == "IntxWeightOnlyLinear":
            return IntxWeightOnlyLinear(*args, bits=info["bits"], group_size=info["group_size"])
        return {"Int8DynamicLinear": Int8DynamicLinear, "Int8WeightOnlyLinear": Int8WeightOnlyLinear}[kind](*args)
    if kind == "Identity":
        return nn.Identity()
    if kind == "StaticInt8Linear":
        return StaticInt8Linear(info["in_features"], info["out_features"], info["has_bias"], info["fused_relu"],
                                info.get("input_smooth", False))
    if kind == "StaticInt8Conv2d":
        return StaticInt8Conv2d(
            info["in_channels"], info["out_channels"], info["kernel_size"], info["stride"], info["padding"],
            info["dilation"], info["groups"], info["has_bias"], info["fused_relu"],
        )
    if kind == "QuantizedEmbedding":
        return QuantizedEmbedding(info["num_embeddings"], info["embedding_dim"], info["bits"], info["padding_idx"])
    if kind == "HalfEmbedding":
        return HalfEmbedding(info["num_embeddings"], info["embedding_dim"], info["dtype"], info["padding_idx"])
    raise KeyError(kind)
