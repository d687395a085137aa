"""A recipe: a named, ordered list of stages, read from YAML or JSON and checked before any model is loaded.

    version: 2
    name: smoothquant-w8a8
    stages:
      - smooth: {alpha: 0.8}
      - quantize:
          rules:
            - targets: [Linear]
              scheme:
                weights: {dtype: int8, granularity: channel, symmetric: true}
                activations: {dtype: int8, granularity: tensor, dynamic: false}

Each stage is a mapping with one key, the stage's name (``recipe.stages.STAGE_CONFIGS``); a stage without
options may be written as its bare name (``- fold_batchnorm``). A version-1 recipe (one ``quantize:``
section whose ``smoothquant``, ``fold_batchnorm`` and ``cross_layer_equalization`` keys prepared the model)
is converted to the same stages, in the order version 1 ran them: smooth, fold_batchnorm (static schemes
only, as version 1 did), equalize, quantize.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import SerializeAsAny, ValidationError, field_serializer, field_validator, model_validator

from bitsmith.errors import BitsmithError
from bitsmith.recipe.schemes import Strict
from bitsmith.recipe.stages import PHASE_NAMES, STAGE_CONFIGS, QuantizeConfig, SmoothConfig, StageConfig

__all__ = ["Recipe", "config_from_dict", "config_from_yaml", "upgrade_v1", "RECIPE_VERSION"]

RECIPE_VERSION = 2
MAX_RECIPE_BYTES = 4 << 20


class _V1Preparation(Strict):
    """The version-1 quantize keys that are stages now."""

    fold_batchnorm: bool = True
    cross_layer_equalization: bool = False
    smoothquant: dict | None = None


def upgrade_v1(data: dict) -> dict:
    """A version-1 recipe as a version-2 one: the same work, as stages."""
    quantize = data.get("quantize")
    if not isinstance(quantize, dict):
        raise BitsmithError(f"quantize: expected a mapping, got {type(quantize).__name__}")
    quantize = {k: v for k, v in quantize.items() if k != "version"}
    moved = {k: quantize.pop(k) for k in ("fold_batchnorm", "cross_layer_equalization", "smoothquant") if k in quantize}
    preparation = config_from_dict(moved, _V1Preparation, source=None, within="quantize")
    static = config_from_dict(quantize, QuantizeConfig, source=None, within="quantize").is_static
    stages = []
    if preparation.smoothquant is not None:
        maps = {k: quantize[k] for k in ("family", "mappings") if quantize.get(k) is not None}
        stages.append({"smooth": {**preparation.smoothquant, **maps}})
    if static and preparation.fold_batchnorm:
        stages.append({"fold_batchnorm": {}})
    if static and preparation.cross_layer_equalization:
        stages.append({"equalize": {}})
    stages.append({"quantize": quantize})
    rest = {k: v for k, v in data.items() if k not in ("version", "quantize")}
    return {**rest, "version": RECIPE_VERSION, "stages": stages}


def _stage(index: int, item) -> StageConfig:
    """One stage item (``{name: options}`` or a bare name) as its config."""
    where = f"stages[{index}]"
    if isinstance(item, StageConfig):
        return item
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise BitsmithError(f"{where}: a stage is a mapping with one key, its name (e.g. '- quantize: {{...}}')")
    (name, options), = item.items()
    cls = STAGE_CONFIGS.get(name)
    if cls is None:
        raise BitsmithError(f"{where}: unknown stage '{name}'; stages: {', '.join(STAGE_CONFIGS)}")
    return config_from_dict({} if options is None else options, cls, source=None, within=f"{where}.{name}")


def _check_order(stages: list[StageConfig]) -> None:
    """Stages in an order that can work: rewrites of float layers before they are quantized, and a smooth
    stage followed by the quantize stage it smooths for."""
    for index, stage in enumerate(stages):
        later = [s for s in stages[:index] if s.phase > stage.phase]
        if later:
            raise BitsmithError(
                f"stages[{index}] ({stage.stage}) comes after {later[0].stage}: {stage.stage} {PHASE_NAMES[stage.phase]},"
                f" which {later[0].stage} has already replaced; list {stage.stage} first")
        if isinstance(stage, SmoothConfig) and not any(isinstance(s, QuantizeConfig) for s in stages[index:]):
            raise BitsmithError(f"stages[{index}] (smooth) needs a quantize stage after it: it smooths the inputs of"
                                " the layers that stage gives int8 activations")


class Recipe(Strict):
    """A named list of stages: what ``bitsmith compress --recipe`` reads."""

    version: Literal[2] = RECIPE_VERSION
    name: str
    description: str = ""
    stages: list[SerializeAsAny[StageConfig]]

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data):
        if not isinstance(data, dict):
            return data
        if "quantize" in data and "stages" not in data and data.get("version", 1) == 1:
            data = upgrade_v1(data)
        if isinstance(data.get("stages"), list):
            data = {**data, "stages": [_stage(i, item) for i, item in enumerate(data["stages"])]}
        return data

    def with_options(self, stage: str, **options) -> "Recipe":
        """This recipe with ``options`` set on every stage named ``stage`` (compress --merge: qlora's merge);
        a ValueError when it has no such stage."""
        if not any(config.stage == stage for config in self.stages):
            raise ValueError(f"the recipe {self.name!r} has no {stage} stage")
        stages = [config.model_copy(update=options) if config.stage == stage else config for config in self.stages]
        return self.model_copy(update={"stages": stages})

    @field_validator("stages")
    @classmethod
    def _ordered(cls, stages: list) -> list:
        if not stages:
            raise ValueError("a recipe needs at least one stage")
        _check_order(stages)
        return stages

    @field_serializer("stages")
    def _dump_stages(self, stages: list) -> list[dict]:
        return [{stage.stage: stage.model_dump(mode="json")} for stage in stages]

    @classmethod
    def of(cls, config: "Recipe | StageConfig", name: str) -> "Recipe":
        """``config`` itself, or a one-stage recipe called ``name`` around it (``quantize_(model, QuantizeConfig)``)."""
        return config if isinstance(config, Recipe) else cls(name=name, stages=[config])

    @property
    def needs_calibration(self) -> bool:
        return any(stage.needs_calibration for stage in self.stages)

    def stages_of(self, kind: type[StageConfig]) -> list[StageConfig]:
        return [stage for stage in self.stages if isinstance(stage, kind)]


_UNION_TAG = re.compile(r"^(literal\[.*\]|int|str|float|bool|function-after\[.*\]|[A-Z]\w*)$")
def _first_error(err: ValidationError, within: str = "") -> str:
    """The first problem as one phrase; ``within`` is the dotted place of the validated mapping in its file."""
    # a misspelt key also leaves its intended key "missing": name the misspelling first
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    if first["type"] == "extra_forbidden":
        return f"unknown key '{'.'.join([within] * bool(within) + [str(p) for p in first['loc']])}'"
    # a union (granularity: "tensor" | "channel" | int) reports one error per branch: say them together
    def place(error):
        return [p for p in error["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))]

    where = place(first)
    branches = [e for e in errors if place(e) == where]
    where_text = ".".join([within] * bool(within) + [str(p) for p in where]) or "top level"
    if len(branches) > 1:
        wanted = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in branches))
        return f"{where_text}: got {first.get('input')!r}, expected {wanted}"
    return f"{where_text}: {first['msg']}"


def config_from_dict(data: dict, model=QuantizeConfig, source: str | None = "config", within: str = ""):
    """Validate ``data`` as ``model``; a problem is one BitsmithError line naming the key (``source: ...``, or
    without a source the bare problem, for a part of a recipe that its caller names)."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        where = f"{within}: expected a mapping" if within else "expected a mapping at the top level"
        raise BitsmithError(f"{prefix}{where}, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise BitsmithError(f"{prefix}{_first_error(err, within)}") from None
    except BitsmithError as err:  # raised for a part of a recipe (a stage): named here by the file
        if not prefix:
            raise
        raise BitsmithError(f"{prefix}{err}") from None


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
