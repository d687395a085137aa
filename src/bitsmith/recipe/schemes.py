"""Quantization schemes and the rules that give them to layers (pure configuration: no torch).

A rule names targets (module types such as ``Linear`` or ``Embedding``, exact module names, or
``re:<regex>`` matched against the full module name) and the scheme they get:

    targets: ["re:.*intermediate.dense", Linear]
    scheme: {weights: {dtype: int4, granularity: 128, symmetric: false}}

Every config class is strict (``extra="forbid"``): a misspelt key is an error, never ignored.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

__all__ = ["Strict", "WeightSpec", "ActivationSpec", "Scheme", "Rule", "Targeted", "check_targets", "target_matches"]

WeightDtype = Literal["fp16", "bf16", "int8", "int7", "int6", "int5", "int4", "int3", "int2",
                      "fp8_e4m3", "mxfp4", "nf4", "ternary"]

# weight-only formats that are not integer grids with a zero point: what each takes for granularity
#   fp8_e4m3 | float8 e4m3 codes, fp32 scale per channel or group (amax / 448)        | "channel" or a group
#   mxfp4    | e2m1 codes, a power-of-two (E8M0) scale per 32 inputs (OCP MX spec)       | 32
#   nf4      | QLoRA's NormalFloat levels, fp32 absmax per group                          | a group (64: QLoRA's)
#   ternary  | {-1, 0, +1} times a scale per channel or group (TWN), stored as 2-bit codes | "channel" or a group
LOOKUP_DTYPES = ("fp8_e4m3", "mxfp4", "nf4", "ternary")


class Strict(BaseModel):
    # strict: a YAML `true` or "128" is not a group size, a count is never a boolean
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class WeightSpec(Strict):
    dtype: WeightDtype
    granularity: Union[Literal["tensor", "channel"], int] = "channel"  # int = group size along inputs
    symmetric: bool = True
    clip: Literal["minmax", "mse"] = "minmax"  # how each block's range is chosen (rtn)
    # gptq and awq need calibration data; their options are QuantizeConfig.gptq / .awq. imatrix: round to
    # nearest with each block's range searched for the least error weighted by the calibration inputs' mean
    # squares (llama.cpp's importance matrix); needs clip: mse
    algorithm: Literal["rtn", "gptq", "awq", "imatrix"] = "rtn"
    double_quant: bool = False  # nf4 only: QLoRA's double quantization of the absmax values (0.127 bits a weight)

    @property
    def bits(self) -> int | None:
        """Width of an integer grid (int2-int8); None for fp16/bf16 and the LOOKUP_DTYPES."""
        return int(self.dtype[3:]) if self.dtype.startswith("int") else None

    @property
    def is_lookup(self) -> bool:
        return self.dtype in LOOKUP_DTYPES

    @property
    def is_half(self) -> bool:
        return self.dtype in ("fp16", "bf16")

    @field_validator("granularity")
    @classmethod
    def _positive_group(cls, value):
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"group size must be positive, got {value}")
        return value


ObserverName = Literal["minmax", "moving_average", "percentile", "entropy", "mse"]


class ActivationSpec(Strict):
    dtype: Literal["int8"] = "int8"
    # dynamic: one scale per token (row), chosen at run time; static: one calibrated scale per tensor
    granularity: Literal["token", "tensor"] = "token"
    dynamic: bool = True
    observer: ObserverName = "minmax"  # how a static range is chosen from the calibration data

    @model_validator(mode="after")
    def _consistent(self) -> "ActivationSpec":
        if self.dynamic and self.observer != "minmax":
            raise ValueError("an observer chooses a static range; dynamic activations are scaled per token at run time")
        if self.dynamic and self.granularity != "token":
            raise ValueError("dynamic activations are quantized per token (granularity: token)")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError("static activations use one calibrated range per tensor (granularity: tensor)")
        return self


class Scheme(Strict):
    weights: WeightSpec
    activations: ActivationSpec | None = None

    @model_validator(mode="after")
    def _supported(self) -> "Scheme":
        w = self.weights
        if w.double_quant and w.dtype != "nf4":
            raise ValueError(f"double_quant applies to nf4's absmax values, not to {w.dtype}")
        if self.activations is not None:
            if w.bits is None or not w.symmetric:
                # int2-int7 codes are held as int8 and run on the same W8A8 kernels (smaller steps, no speed-up)
                raise ValueError("int8 activations need symmetric integer weights, int2 to int8 (the W8A8 kernels"
                                 " take signed codes with no zero point)")
            if isinstance(w.granularity, int):
                raise ValueError("int8 activations need per-channel or per-tensor weights, not groups (the W8A8"
                                 " kernels take one weight scale per output channel)")
        if w.is_lookup:
            _check_lookup(self)
        elif w.bits is None:  # fp16 / bf16: nothing to choose but the dtype
            defaults = {"granularity": "channel", "symmetric": True, "clip": "minmax", "algorithm": "rtn"}
            given = sorted(key for key, default in defaults.items() if getattr(w, key) != default)
            if given:
                raise ValueError(f"{w.dtype} weights take no {', '.join(given)} (those apply to integer weights)")
        return self

    @model_validator(mode="after")
    def _gptq_weights(self) -> "Scheme":
        algorithm = self.weights.algorithm
        if self.weights.is_lookup:
            return self  # _check_lookup: round to nearest only
        if algorithm != "rtn" and (self.weights.bits is None or self.activations is not None):
            raise ValueError(f"{algorithm} applies to integer weight-only schemes (no activation quantization)")
        if algorithm != "rtn" and not isinstance(self.weights.granularity, int) and self.weights.granularity != "channel":
            raise ValueError(f"{algorithm} quantizes per channel or per group, not per tensor")
        if algorithm == "imatrix" and self.weights.clip != "mse":
            raise ValueError("imatrix weighs the range search's error by each input's importance: give clip: mse")
        if algorithm == "awq" and self.weights.clip != "minmax":
            raise ValueError("awq searches its own clipping (awq: clip_search); 'clip' applies to rtn and gptq")
        return self

    @property
    def is_static(self) -> bool:
        """Activations quantized with a calibrated, fixed range."""
        return self.activations is not None and not self.activations.dynamic

    def describe(self, algorithm: str | None = None) -> str:
        """A short label, e.g. ``w4 g128 asym a16 gptq``; ``algorithm`` overrides the recipe's (what was done)."""
        w = self.weights
        if w.is_lookup:
            gran = f"g{w.granularity}" if isinstance(w.granularity, int) else f"per-{w.granularity}"
            return f"{w.dtype.replace('_', ' ')} {gran}{' dq' if w.double_quant else ''} a16"
        if w.bits is None:
            return w.dtype
        gran = f"g{w.granularity}" if isinstance(w.granularity, int) else f"per-{w.granularity}"
        act = "a16"
        if self.activations is not None:
            act = "a8 per-token dynamic" if self.activations.dynamic else f"a8 static ({self.activations.observer})"
        done = w.algorithm if algorithm is None else algorithm
        clip = " mse" if w.clip == "mse" and done != "awq" else ""
        return f"w{w.bits} {gran} {'sym' if w.symmetric else 'asym'}{clip} {act}{'' if done == 'rtn' else ' ' + done}"


def _check_lookup(scheme: "Scheme") -> None:
    w = scheme.weights
    if scheme.activations is not None:
        raise ValueError(f"{w.dtype} is a weight-only scheme: it takes no activations")
    if w.algorithm != "rtn" or w.clip != "minmax" or not w.symmetric:
        raise ValueError(f"{w.dtype} weights are rounded to nearest with their format's own scale: they take no"
                         " algorithm, clip or symmetric: false")
    if w.dtype == "mxfp4" and w.granularity != 32:
        raise ValueError("mxfp4 shares one power-of-two scale per 32 inputs (the OCP MX block): granularity: 32")
    if w.dtype == "nf4" and not isinstance(w.granularity, int):
        raise ValueError("nf4 keeps one absmax per group of inputs: give a group size (granularity: 64 is QLoRA's)")
    if w.granularity == "tensor":
        raise ValueError(f"{w.dtype} weights take a scale per channel or per group, not per tensor")


def check_targets(targets: list[str]) -> list[str]:
    for target in targets:
        if not target:
            raise ValueError("a target is an empty string")
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except (re.error, RecursionError, OverflowError) as err:
                raise ValueError(f"bad regex {target!r}: {err}") from None
    return targets


class Targeted(Strict):
    """A rule's targets: type names, exact module names or ``re:`` regexes (at least one)."""

    targets: list[str]

    @field_validator("targets")
    @classmethod
    def _valid_targets(cls, targets: list[str]) -> list[str]:
        if not targets:
            raise ValueError("a rule needs at least one target")
        return check_targets(targets)


class Rule(Targeted):
    scheme: Scheme | None  # None keeps the matched modules in float


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)  # re's own cache holds 512: a recipe of thousands of regexes would recompile


def target_matches(target: str, name: str, module_type: str) -> bool:
    """``re:`` targets match the full module name; plain ones match the type name or the exact name."""
    if target.startswith("re:"):
        return _compiled(target[3:]).fullmatch(name) is not None
    return target in (module_type, name)


