"""The stages a recipe is made of: one typed config per technique, each naming itself in a recipe.

    stage           | what it does                                              | phase
    prune           | weights set to zero: magnitude, Wanda or SparseGPT        | rewrite
    prune_structured| whole FFN channels, heads, conv channels removed: smaller | rewrite
    fold_batchnorm  | Conv2d -> BatchNorm2d pairs become one Conv2d             | rewrite (float, function-preserving)
    equalize        | cross-layer equalization of consecutive convolutions      | rewrite
    smooth          | SmoothQuant: activation outliers moved into the weights   | rewrite
    quantize        | layers replaced by quantized runtime modules (rules)      | quantize
    distill         | float parameters trained to follow the float model        | rewrite
    qat             | quantization-aware training, then the same runtime modules | quantize

Stages run in the order the recipe lists them. A stage that rewrites float layers cannot follow one that
has already replaced them by quantized modules (``phase``), and ``smooth`` smooths for the int8
activations of the ``quantize`` stage after it. A new technique adds one config class here (registered
with ``register_stage_config``), one handler in ``bitsmith.stages`` and its math in ``bitsmith.algorithms``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import field_validator, model_validator

from bitsmith.recipe.schemes import Rule, Strict, Targeted, check_targets

__all__ = [
    "StageConfig", "STAGE_CONFIGS", "register_stage_config", "REWRITE", "QUANTIZE",
    "GPTQOptions", "AWQOptions", "MappingSpec", "QuantizeConfig", "SmoothConfig", "FoldBatchNormConfig",
    "EqualizeConfig", "PruneRule", "SparseGPTOptions", "PruneConfig", "StructuredRule", "StructuredPruneConfig",
    "QATConfig", "QLoRAConfig", "DistillConfig",
]

MAX_RULES = 10_000  # a recipe is written by hand or a search; more rules than this is a mistake
REWRITE, QUANTIZE = 0, 1  # phases: rewrites of the float model come before quantization
PHASE_NAMES = {REWRITE: "changes float layers", QUANTIZE: "replaces layers by quantized modules"}


class StageConfig(Strict):
    """One step of a recipe; ``stage`` is its key in a recipe file."""

    stage: ClassVar[str]
    phase: ClassVar[int] = REWRITE

    @property
    def needs_calibration(self) -> bool:
        return False

    # the stages whose layers are chosen by rules leave out the ``ignore`` targets: one check for all of them
    @field_validator("ignore", check_fields=False)
    @classmethod
    def _valid_ignore(cls, targets: list[str]) -> list[str]:
        return check_targets(targets)

    @field_validator("rules", check_fields=False, mode="before")
    @classmethod
    def _some_rules(cls, rules):
        if isinstance(rules, list) and len(rules) > MAX_RULES:
            raise ValueError(f"{len(rules)} rules; at most {MAX_RULES} (group targets into fewer rules)")
        return rules


STAGE_CONFIGS: dict[str, type[StageConfig]] = {}


def register_stage_config(cls: type[StageConfig]) -> type[StageConfig]:
    STAGE_CONFIGS[cls.stage] = cls
    return cls


class _HessianOptions(Strict):
    """What GPTQ and SparseGPT share: a damped inverse Hessian, columns in blocks, layer groups in order."""

    damp_percent: float = 0.01  # of mean(diag H), escalated automatically when the Cholesky factorization fails
    block_size: int = 128  # columns per lazy update (GPTQ: speed only; SparseGPT: columns whose mask is chosen together)
    true_sequential: bool = True  # inside a block, treat layer groups in execution order

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


class GPTQOptions(_HessianOptions):
    act_order: bool = True  # columns by decreasing Hessian diagonal (with static groups: same layout)


class AWQOptions(Strict):
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


class MappingSpec(Strict):
    """A layer group and the operation whose output it reads, as regexes relative to one block."""

    prev: str
    layers: list[str]


_NOW_STAGES = {"smoothquant": "smooth", "fold_batchnorm": "fold_batchnorm", "cross_layer_equalization": "equalize"}


@register_stage_config
class QuantizeConfig(StageConfig):
    """Ordered rules (the first that matches a module wins); ``ignore`` keeps modules in float.

        rules:
          - targets: [Embedding]
            scheme: {weights: {dtype: int8, granularity: channel}}
          - targets: ["re:.*intermediate.dense", Linear]
            scheme: {weights: {dtype: int4, granularity: 128, symmetric: false}}
        ignore: ["re:.*pooler.*"]
    """

    stage: ClassVar[str] = "quantize"
    phase: ClassVar[int] = QUANTIZE

    rules: list[Rule]
    ignore: list[str] = []
    bias_correction: bool = False  # static layers: subtract the output mean shift caused by weight rounding
    gptq: GPTQOptions = GPTQOptions()
    awq: AWQOptions = AWQOptions()
    # where AWQ scales go: a family of algorithms/families.yaml (default: detected), or own maps
    family: str | None = None
    mappings: list[MappingSpec] | None = None

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            if data.get("version") == 1:  # a version-1 quantize section: the same keys, version aside
                del data["version"]
            for key, stage in _NOW_STAGES.items():
                if key in data:
                    raise ValueError(f"'{key}' is the stage '{stage}' since recipe version 2: list it in the"
                                     " recipe's stages before quantize (a version-1 recipe file is converted)")
        return data

    @property
    def needs_calibration(self) -> bool:
        return self.is_static or any(r.scheme and r.scheme.weights.algorithm != "rtn" for r in self.rules)

    @property
    def is_static(self) -> bool:
        return any(r.scheme and r.scheme.is_static for r in self.rules)


@register_stage_config
class SmoothConfig(StageConfig):
    """SmoothQuant: per input channel, s = max|x|^alpha / max|W|^(1-alpha) moves from the activations into
    the weights of the layers the next ``quantize`` stage gives int8 activations, folded into the operation
    that produces their input (the model family's map), or kept inside a static layer's quantization step
    where no operation can absorb it."""

    stage: ClassVar[str] = "smooth"

    alpha: float = 0.5  # migration strength: 0 leaves activations alone, 1 moves all of their range to weights
    family: str | None = None  # a family of algorithms/families.yaml (default: detected)
    mappings: list[MappingSpec] | None = None  # or the recipe's own maps

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {value}")
        return value

    @property
    def needs_calibration(self) -> bool:
        return True


@register_stage_config
class FoldBatchNormConfig(StageConfig):
    """Every Conv2d followed by a BatchNorm2d (in an nn.Sequential) absorbs it; the BatchNorm becomes Identity."""

    stage: ClassVar[str] = "fold_batchnorm"


@register_stage_config
class EqualizeConfig(StageConfig):
    """Cross-layer equalization: consecutive Conv2d layers (with a ReLU between) rescaled per channel so their
    ranges match, which keeps more precision in per-tensor int8 (Nagel et al., 2019)."""

    stage: ClassVar[str] = "equalize"


def _pattern(text: str) -> tuple[int, int] | None:
    if text == "unstructured":
        return None
    n, _, m = text.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"pattern must be 'unstructured' or N:M with 0 < N < M (e.g. 2:4), got {text!r}")
    return int(n), int(m)


class PruneRule(Targeted):
    sparsity: float | None = None  # fraction of weights set to zero, in [0, 1); None keeps the layers dense
    pattern: str = "unstructured"  # or N:M: N of every M consecutive inputs kept (2:4, 4:8)

    @model_validator(mode="after")
    def _consistent(self) -> "PruneRule":
        nm = _pattern(self.pattern)
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if nm is not None and self.sparsity is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"an {self.pattern} pattern is {1 - nm[0] / nm[1]:g} sparse; leave 'sparsity' out")
        if nm is None and self.sparsity is None and self.pattern != "unstructured":
            raise ValueError("give a sparsity or an N:M pattern")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return _pattern(self.pattern)

    @property
    def fraction(self) -> float | None:
        """The fraction of weights this rule sets to zero (None: the layers stay dense)."""
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm is not None else self.sparsity


class SparseGPTOptions(_HessianOptions):
    # every layer of a block pruned on the block's inputs as they come, as SparseGPT's reference code and
    # llm-compressor do: on smollm2 at 50% +41.5% perplexity against +42.4% true-sequential (2:4: +104.4% vs
    # +104.0%), and one Hessian pass per block instead of one per layer group
    true_sequential: bool = False


@register_stage_config
class PruneConfig(StageConfig):
    """Unstructured or N:M sparsity for Linear layers, by ordered rules (first match wins; ``ignore``).

        method     | scores                        | calibration
        magnitude  | |W| (per layer, or global)    | none
        wanda      | |W| * ||x_j||, per output row | one pass per block
        sparsegpt  | OBS update on the Hessian     | one pass per layer group, block by block
    """

    stage: ClassVar[str] = "prune"

    method: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"  # magnitude: one threshold per layer or across all targets
    rules: list[PruneRule]
    ignore: list[str] = []
    sparsegpt: SparseGPTOptions = SparseGPTOptions()

    @model_validator(mode="after")
    def _scope(self) -> "PruneConfig":
        if self.scope == "global" and (self.method != "magnitude" or any(r.nm for r in self.rules)):
            raise ValueError("a global threshold applies to unstructured magnitude pruning only")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"


class StructuredRule(Targeted):
    """``fraction`` of the units (FFN channels, heads, convolution output channels) of every matched group
    removed. Targets: the kinds ``ffn``, ``heads``, ``Conv2d``, or group names (``model.layers.3.ffn``,
    ``encoder.layer.0.heads``, a convolution's own name) and ``re:`` regexes over them."""

    fraction: float

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value < 1.0 or value != value:
            raise ValueError(f"fraction must be in [0, 1), got {value}")
        return value


@register_stage_config
class StructuredPruneConfig(StageConfig):
    """Structured pruning: channels removed from layer groups, so the saved model has smaller shapes.

        importance   | a unit's score                                              | calibration
        activations  | sum over its channels of ||x_c||^2 * ||W_consumer[:, c]||^2  | one pass per block
        weights      | sum over its channels of ||W_producer[c]||^2 * ||W_consumer[:, c]||^2 | none

    Which layers move together is data: the model family's ``structures`` (families.yaml) for FFNs and
    attention heads, and the traced graph for convolutions (BatchNorm and the next layer's inputs follow).
    """

    stage: ClassVar[str] = "prune_structured"

    importance: Literal["activations", "weights"] = "activations"
    rules: list[StructuredRule]
    ignore: list[str] = []
    family: str | None = None  # by config.model_type when not given
    multiple_of: int = 1  # kept units rounded up to a multiple of this (e.g. 8 channels for kernels)
    # what the consumers get with activations: refit (Linear: kept columns and bias by least squares on the
    # calibration inputs; Conv2d: mean), mean (the removed channels' mean contribution into the bias), none
    update: Literal["refit", "mean", "none"] = "refit"

    @field_validator("multiple_of")
    @classmethod
    def _multiple(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @property
    def needs_calibration(self) -> bool:
        return self.importance == "activations"


class _TrainingConfig(StageConfig):
    """What the training stages share (stages/training.py): AdamW steps on the calibration batches, the float
    model as teacher."""

    steps: int = 200  # optimizer steps, one calibration batch each (the batches cycle in a seeded order)
    lr: float = 1e-4  # AdamW, cosine decay to 0
    weight_decay: float = 0.0
    # on the output, against the teacher's (algorithms/distill.py); text: the next tokens of the text, no teacher
    loss: Literal["auto", "kl", "cosine", "mse", "text"] = "auto"
    temperature: float = 1.0  # kl: softmax temperature
    match: list[str] = []  # layers (by name) whose outputs also follow the teacher's, by MSE
    match_weight: float = 1.0
    held_out: float = 0.1  # fraction of the calibration batches kept out of training, to report the loss on
    batch_size: int | None = None  # samples per step: the calibration batches split into batches of this many
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (under --checkpoints; 0: none), for --resume
    # recompute each block's inside in the backward instead of keeping it (torch.utils.checkpoint): less memory,
    # about one more forward a step; needs a model of repeated blocks
    gradient_checkpointing: bool = False

    @field_validator("steps", "checkpoint_every")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"must be at least 0, got {value}")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("lr", "temperature", "match_weight")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"must be a positive number, got {value}")
        return value

    @field_validator("weight_decay", "held_out")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _text_alone(self):
        if self.loss == "text" and self.match:
            raise ValueError("match layers follow the teacher's; loss text trains on the text alone: drop match")
        return self

    @property
    def needs_calibration(self) -> bool:
        return True


@register_stage_config
class QATConfig(_TrainingConfig):
    """Quantization-aware training: the layers the rules match (Linear, Conv2d; integer schemes, weight-only or
    W8A8 static / dynamic) train with fake-quantized weights and inputs and learned ranges (LSQ / LSQ+), the
    float model as teacher (``loss``, ``match``), on the calibration data; then each becomes the runtime
    module post-training quantization builds. Embedding rules are rounded to nearest (a lookup trains nothing).

        qat:
          rules:
            - targets: [Linear]
              scheme: {weights: {dtype: int4, granularity: 128, symmetric: false, clip: mse}}
          steps: 200
          lr: 1.0e-4

    A rule's ``clip`` sets where the ranges start (the round-to-nearest result: min-max or MSE)."""

    stage: ClassVar[str] = "qat"
    phase: ClassVar[int] = QUANTIZE

    rules: list[Rule]
    ignore: list[str] = []
    trainable: Literal["all", "quantized"] = "all"  # every float parameter, or only the quantized layers'

    @field_validator("rules")
    @classmethod
    def _integer_schemes(cls, rules: list) -> list:
        for number, rule in enumerate(rules, 1):
            w = rule.scheme.weights if rule.scheme is not None else None
            if w is None:
                continue
            if w.bits is None:
                raise ValueError(f"rule {number}: qat trains integer grids (int2-int8), not {w.dtype}")
            if w.algorithm != "rtn":
                raise ValueError(f"rule {number}: qat starts from round-to-nearest ranges (clip: minmax or mse);"
                                 f" to start from {w.algorithm}'s, put a quantize stage with it before qat")
        return rules


@register_stage_config
class QLoRAConfig(_TrainingConfig):
    """QLoRA: the Linear layers the rules match get a frozen low-bit base (the rule's weight-only scheme: NF4
    with double-quantized absmax as QLoRA, int4, ...) and trainable LoRA adapters (``rank``, ``alpha``,
    ``dropout``), trained on the calibration text (``loss: text``, the next tokens; or against the float model
    as teacher with ``kl``). The adapters are written beside the model in peft's format (``adapter/``);
    ``merge`` folds them into the float weights and quantizes those again by the same rules, for deployment.

        qlora:
          rules:
            - targets: ["re:.*(q|k|v|o|gate|up|down)_proj"]
              scheme: {weights: {dtype: nf4, granularity: 64, double_quant: true}}
          rank: 16
          alpha: 32
          steps: 200
          lr: 2.0e-4"""

    stage: ClassVar[str] = "qlora"
    phase: ClassVar[int] = QUANTIZE

    rules: list[Rule]
    ignore: list[str] = []
    rank: int = 16
    alpha: float = 32.0  # the adapters' update is scaled by alpha / rank (peft's lora_alpha)
    dropout: float = 0.05  # on the adapters' input, while training
    merge: bool = False  # fold the adapters into the float weights and quantize again (compress --merge)
    loss: Literal["auto", "kl", "cosine", "mse", "text"] = "text"
    lr: float = 2e-4  # QLoRA's

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float) -> float:
        if not value > 0 or value == float("inf"):
            raise ValueError(f"must be a positive number, got {value}")
        return value

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value

    @field_validator("rules")
    @classmethod
    def _weight_only(cls, rules: list) -> list:
        for number, rule in enumerate(rules, 1):
            scheme = rule.scheme
            if scheme is None:
                continue
            if scheme.activations is not None:
                raise ValueError(f"rule {number}: a QLoRA base is weight-only (no activations)")
            if scheme.weights.algorithm != "rtn":
                raise ValueError(f"rule {number}: the QLoRA base is rounded to nearest; for a {scheme.weights.algorithm}"
                                 " base, run a quantize stage and no qlora")
        return rules


@register_stage_config
class DistillConfig(_TrainingConfig):
    """Knowledge distillation: every float parameter of the model as the earlier stages left it (pruned,
    structured-pruned, or cut to ``keep_blocks`` of its repeated blocks, DistilBERT's way: every other block,
    initialised from the teacher's) trains to follow the float model as the recipe got it (``loss`` on the
    output; ``match`` layers by MSE).

        distill:
          steps: 300
          lr: 5.0e-5
          match: [encoder.layer.5.output]"""

    stage: ClassVar[str] = "distill"

    keep_blocks: int | None = None  # cut the repeated blocks to this many, evenly spaced, before training

    @field_validator("keep_blocks")
    @classmethod
    def _blocks(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}")
        return value
