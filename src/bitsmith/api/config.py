"""Typed, versioned quantization configs that round-trip to YAML/JSON and reject unknown keys.

A config is an ordered list of rules; each rule names targets (module types such as ``Linear`` or
``Embedding``, exact module names, or ``re:<regex>`` matched against the full module name) and the
scheme they get. The first rule that matches a module wins; ``ignore`` keeps modules in float.

    version: 1
    rules:
      - targets: [Embedding]
        scheme: {weights: {dtype: int8, granularity: channel}}
      - targets: ["re:.*intermediate.dense", Linear]
        scheme: {weights: {dtype: int4, granularity: 128, symmetric: false}}
    ignore: ["re:.*pooler.*"]
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from bitsmith.errors import BitsmithError

__all__ = [
    "WeightSpec",
    "ActivationSpec",
    "Scheme",
    "Rule",
    "GPTQOptions",
    "AWQOptions",
    "SmoothQuantOptions",
    "MappingSpec",
    "QuantizeConfig",
    "Recipe",
    "config_from_dict",
    "config_from_yaml",
    "target_matches",
]

CONFIG_VERSION = 1
MAX_RULES = 10_000  # a recipe is written by hand or a search; more rules than this is a mistake
MAX_RECIPE_BYTES = 4 << 20
WeightDtype = Literal["fp16", "bf16", "int8", "int7", "int6", "int5", "int4", "int3", "int2"]


class _Strict(BaseModel):
    # strict: a YAML `true` or "128" is not a group size, a count is never a boolean
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class WeightSpec(_Strict):
    dtype: WeightDtype
    granularity: Union[Literal["tensor", "channel"], int] = "channel"  # int = group size along inputs
    symmetric: bool = True
    clip: Literal["minmax", "mse"] = "minmax"  # how each block's range is chosen (rtn)
    # gptq and awq need calibration data; their options are QuantizeConfig.gptq / .awq
    algorithm: Literal["rtn", "gptq", "awq"] = "rtn"

    @property
    def bits(self) -> int | None:
        return int(self.dtype[3:]) if self.dtype.startswith("int") else None

    @field_validator("granularity")
    @classmethod
    def _positive_group(cls, value):
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"group size must be positive, got {value}")
        return value


ObserverName = Literal["minmax", "moving_average", "percentile", "entropy", "mse"]


class ActivationSpec(_Strict):
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


class Scheme(_Strict):
    weights: WeightSpec
    activations: ActivationSpec | None = None

    @model_validator(mode="after")
    def _supported(self) -> "Scheme":
        w = self.weights
        if self.activations is not None:
            if not (w.dtype == "int8" and w.symmetric):
                raise ValueError("int8 activations need symmetric int8 weights (the W8A8 kernels take nothing else)")
            if isinstance(w.granularity, int):
                raise ValueError("int8 activations need per-channel or per-tensor weights, not groups (the W8A8"
                                 " kernels take one weight scale per output channel)")
        if w.bits is None:  # fp16 / bf16: nothing to choose but the dtype
            defaults = {"granularity": "channel", "symmetric": True, "clip": "minmax", "algorithm": "rtn"}
            given = sorted(key for key, default in defaults.items() if getattr(w, key) != default)
            if given:
                raise ValueError(f"{w.dtype} weights take no {', '.join(given)} (those apply to integer weights)")
        return self

    @model_validator(mode="after")
    def _gptq_weights(self) -> "Scheme":
        algorithm = self.weights.algorithm
        if algorithm != "rtn" and (self.weights.bits is None or self.activations is not None):
            raise ValueError(f"{algorithm} applies to integer weight-only schemes (no activation quantization)")
        if algorithm != "rtn" and not isinstance(self.weights.granularity, int) and self.weights.granularity != "channel":
            raise ValueError(f"{algorithm} quantizes per channel or per group, not per tensor")
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
        if w.bits is None:
            return w.dtype
        gran = f"g{w.granularity}" if isinstance(w.granularity, int) else f"per-{w.granularity}"
        act = "a16"
        if self.activations is not None:
            act = "a8 per-token dynamic" if self.activations.dynamic else f"a8 static ({self.activations.observer})"
        done = w.algorithm if algorithm is None else algorithm
        clip = " mse" if w.clip == "mse" and done != "awq" else ""
        return f"w{w.bits} {gran} {'sym' if w.symmetric else 'asym'}{clip} {act}{'' if done == 'rtn' else ' ' + done}"


class GPTQOptions(_Strict):
    act_order: bool = True  # columns by decreasing Hessian diagonal (with static groups: same layout)
    damp_percent: float = 0.01  # escalated automatically when the Cholesky factorization fails
    block_size: int = 128  # columns per lazy update (speed only)
    true_sequential: bool = True  # inside a block, quantize layer groups in execution order

    @field_validator("damp_percent")
    @classmethod
    def _damp(cls, value: float) -> float:
        if not 0.0 <= value < 1.0 or value != value:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value

    @field_validator("block_size")
    @classmethod
    def _block(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value


class AWQOptions(_Strict):
    grid: int = 20  # candidate scale exponents r = 0, 1/grid, ..., (grid-1)/grid
    duo_scaling: bool = True  # s = mean|x|^r / mean|w|^(1-r) (False: mean|x|^r alone)
    clip_search: bool = True  # then shrink each group's range where that lowers the output error
    clip_grid: int = 20
    max_shrink: float = 0.5  # the narrowest range tried is (1 - max_shrink) of min-max

    @field_validator("grid", "clip_grid")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("max_shrink")
    @classmethod
    def _shrink(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value


class SmoothQuantOptions(_Strict):
    alpha: float = 0.5  # migration strength: 0 leaves activations alone, 1 moves all of their range to weights

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {value}")
        return value


class MappingSpec(_Strict):
    """A layer group and the operation whose output it reads, as regexes relative to one block."""

    prev: str
    layers: list[str]


def _check_targets(targets: list[str]) -> list[str]:
    for target in targets:
        if not target:
            raise ValueError("a target is an empty string")
        if target.startswith("re:"):
            try:
                re.compile(target[3:])
            except (re.error, RecursionError, OverflowError) as err:
                raise ValueError(f"bad regex {target!r}: {err}") from None
    return targets


class Rule(_Strict):
    targets: list[str]
    scheme: Scheme | None  # None keeps the matched modules in float

    @field_validator("targets")
    @classmethod
    def _valid_targets(cls, targets: list[str]) -> list[str]:
        if not targets:
            raise ValueError("a rule needs at least one target")
        return _check_targets(targets)


class QuantizeConfig(_Strict):
    version: Literal[1] = CONFIG_VERSION
    rules: list[Rule]
    ignore: list[str] = []
    # preparation before static quantization (on float weights, function-preserving)
    fold_batchnorm: bool = True  # Conv2d -> BatchNorm2d pairs become one Conv2d
    cross_layer_equalization: bool = False  # rescale channels of consecutive convolutions
    bias_correction: bool = False  # subtract the output mean shift caused by weight rounding
    gptq: GPTQOptions = GPTQOptions()
    awq: AWQOptions = AWQOptions()
    smoothquant: SmoothQuantOptions | None = None  # set: smooth W8A8 layers' inputs before quantizing
    # where SmoothQuant/AWQ scales go: a family of algorithms/families.yaml (default: detected), or own maps
    family: str | None = None
    mappings: list[MappingSpec] | None = None

    @field_validator("ignore")
    @classmethod
    def _valid_ignore(cls, targets: list[str]) -> list[str]:
        return _check_targets(targets)

    @field_validator("rules")
    @classmethod
    def _some_rules(cls, rules: list) -> list:
        if len(rules) > MAX_RULES:
            raise ValueError(f"{len(rules)} rules; at most {MAX_RULES} (group targets into fewer rules)")
        return rules

    @property
    def needs_calibration(self) -> bool:
        calibrated = any(r.scheme and r.scheme.weights.algorithm != "rtn" for r in self.rules)
        return self.is_static or calibrated or self.smoothquant is not None

    @property
    def is_static(self) -> bool:
        return any(r.scheme and r.scheme.is_static for r in self.rules)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class Recipe(_Strict):
    """A named, saved config: what `bitsmith compress --recipe` reads."""

    version: Literal[1] = CONFIG_VERSION
    name: str
    description: str = ""
    quantize: QuantizeConfig


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)  # re's own cache holds 512: a recipe of thousands of regexes would recompile


def target_matches(target: str, name: str, module_type: str) -> bool:
    """``re:`` targets match the full module name; plain ones match the type name or the exact name."""
    if target.startswith("re:"):
        return _compiled(target[3:]).fullmatch(name) is not None
    return target in (module_type, name)


_UNION_TAG = re.compile(r"^(literal\[.*\]|int|str|float|bool|function-after\[.*\]|[A-Z]\w*)$")


def _first_error(err: ValidationError) -> str:
    # a misspelt key also leaves its intended key "missing": name the misspelling first
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    if first["type"] == "extra_forbidden":
        return f"unknown key '{'.'.join(str(p) for p in first['loc'])}'"
    # a union (granularity: "tensor" | "channel" | int) reports one error per branch: say them together
    def place(error):
        return [p for p in error["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))]

    where = place(first)
    branches = [e for e in errors if place(e) == where]
    where_text = ".".join(str(p) for p in where) or "top level"
    if len(branches) > 1:
        wanted = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in branches))
        return f"{where_text}: got {first.get('input')!r}, expected {wanted}"
    return f"{where_text}: {first['msg']}"


def config_from_dict(data: dict, model=QuantizeConfig, source: str = "config"):
    """Validate ``data`` as ``model``; a problem is one BitsmithError line naming the key."""
    if not isinstance(data, dict):
        raise BitsmithError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise BitsmithError(f"{source}: {_first_error(err)}") from None


def _yaml_loader():
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser: a large recipe in a second, not minutes


def config_from_yaml(path: str | Path, model=Recipe):
    path = Path(path)
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise BitsmithError(f"recipe {path} is larger than {MAX_RECIPE_BYTES >> 20} MB; is it a recipe?")
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise BitsmithError(f"cannot read recipe {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise BitsmithError(f"recipe {path} is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a safe loader, C or Python
    except yaml.YAMLError as err:
        raise BitsmithError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise BitsmithError(f"recipe {path} is nested too deeply to be a recipe") from None
    try:
        return config_from_dict(data, model, source=f"recipe {path}")
    except RecursionError:
        raise BitsmithError(f"recipe {path} is nested too deeply to be a recipe") from None
