"""Export a bitsmith-quantized (or float) model to ONNX that ONNX Runtime's CPU provider runs.

The legacy TorchScript exporter traces the model while each bitsmith module is swapped, for the
duration of the export only, for a stand-in that holds its storage in ONNX layout and whose
``torch.autograd.Function`` emits the ONNX pattern below from a ``symbolic`` staticmethod. The
stand-in's eager forward is the bitsmith module itself, so traced shapes and values are the real ones.

    bitsmith module      | ONNX pattern (x: float activation; W: weight initializer)
    StaticInt8Linear     | QuantizeLinear(x, s, z uint8) -> DequantizeLinear -> MatMul <- DequantizeLinear(W int8
                         |   (K, N), per-channel scale, axis 1); Add(bias); [Relu]. QDQ, U8S8; ORT fuses the
                         |   pair into MatMulIntegerToFloat
    StaticInt8Conv2d     | QuantizeLinear -> DequantizeLinear(x); DequantizeLinear(W int8, axis 0);
                         |   DequantizeLinear(bias int32, scale s_in * s_w); Conv; [Relu]. ORT fuses it into
                         |   QLinearConv where the next static layer's QuantizeLinear follows
    Int8DynamicLinear    | "token" (default): amax = max(ReduceMax(x), -ReduceMin(x)) per row, scale = amax / 127,
                         |   QuantizeLinear(x, scale, 128 uint8, blocked over the row) -> MatMulInteger(W int8
                         |   (K, N), zero point 128) -> Cast -> Mul(weight scale) -> Mul(scale) -> Add(bias)
                         | "tensor": DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add: ORT fuses it
                         |   into DynamicQuantizeMatMul (per-tensor uint8 activations, as its quantize_dynamic)
                         | "block": com.microsoft.MatMulNBits bits=8, accuracy_level=4 (ORT quantizes each
                         |   block of 128 inputs of a row to int8 at run time)
    Int8WeightOnlyLinear | DequantizeLinear(W int8 (K, N), axis 1) -> MatMul -> Add(bias)
    IntxWeightOnlyLinear | com.microsoft.MatMulNBits: bits 4 (2 and 8 too; other widths widened to 8, exactly),
                         |   block_size = group size (or a power of two dividing it), packed uint8 zero points
    QuantizedEmbedding   | Gather(uint8 table) -> Cast -> Sub(Gather(zero point)) -> Mul(Gather(scale)), per group
                         | of a row through a (N, G, g) Reshape
    HalfLinear           | Cast(fp16/bf16 W (K, N)) -> MatMul -> Add(bias)
    HalfEmbedding        | Gather(fp16/bf16 table) -> Cast

Other modules go through the exporter's own symbolics (float layers, attention, LayerNorm, ...).
All measured on MiniLM in ``bench/bench_onnx.py``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from bitsmith.algorithms._modules import replace_module
from bitsmith.errors import BitsmithError
from bitsmith.io.outputs import publish, staging_file
from bitsmith.nn import (
    QUANTIZED_MODULES,
    HalfEmbedding,
    HalfLinear,
    Int8DynamicLinear,
    Int8WeightOnlyLinear,
    IntxWeightOnlyLinear,
    QuantizedEmbedding,
    StaticInt8Conv2d,
    StaticInt8Linear,
)

__all__ = ["export_onnx", "DYNAMIC_MODES"]

DYNAMIC_MODES = ("token", "tensor", "block")
_MS = "com.microsoft"
_FLOAT = 1  # onnx.TensorProto.FLOAT
_NBITS_WIDTHS = (2, 4, 8)  # weight widths ORT's MatMulNBits runs on CPU


def export_onnx(
    model: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = 21,
    dynamic_activations: str = "token",
    accuracy_level: int = 4,
    activation_type: str = "u8",
) -> dict:
    """Write ``model`` to the ONNX file ``path`` (atomically) and describe what was written.

    ``example_inputs``: a tensor, a tuple of tensors (positional) or a dict of name -> tensor (keyword
    arguments; the names become the graph's input names). Trace with a padded batch where the model
    takes an attention mask. ``output_names`` picks entries of a dict-like output (e.g.
    ``["last_hidden_state"]`` of a transformers model); by default all its tensors. ``dynamic_axes``
    defaults to:

        inputs                         | dynamic axes of every input and output
        any integer input of rank >= 2 | 0 "batch", 1 "sequence" (outputs: 1 only at rank >= 3)
        otherwise                      | 0 "batch"

    ``dynamic_activations`` picks the pattern of ``Int8DynamicLinear`` ("token", "tensor" or "block",
    see the module docstring); ``accuracy_level`` is MatMulNBits' for 2- and 4-bit weights (4: int8
    compute, 0: fp32). ``activation_type`` sets static int8 layers' QDQ activations: "u8" (U8S8, the
    faster in ONNX Runtime here) or "s8" (S8S8). Returns {"path", "bytes", "opset", "layers": {bitsmith module type: count in the
    graph}, "ops": {ONNX op type: count}, "trace_warnings": [the tracer's warnings about the model]}.
    """
    try:
        import onnx
    except ImportError:
        raise BitsmithError("ONNX export needs the onnx package (pip install onnx)") from None
    if dynamic_activations not in DYNAMIC_MODES:
        choices = ", ".join(DYNAMIC_MODES)
        raise BitsmithError(f"dynamic_activations must be one of {choices}, not {dynamic_activations!r}")
    args, kwarg_names = _positional_inputs(example_inputs, input_names)
    names = list(input_names or kwarg_names or [f"input_{i}" for i in range(len(args))])
    wrapper = _ExportWrapper(model, kwarg_names, output_names)
    modes = {m: m.training for m in model.modules()}
    if activation_type not in ("u8", "s8"):
        raise BitsmithError(f"activation_type must be 'u8' or 's8', not {activation_type!r}")
    options = {"dynamic": dynamic_activations, "accuracy_level": accuracy_level, "activation_type": activation_type}
    swapped = _swap_in_stand_ins(wrapper, options)
    try:
        if opset < 21 and any(getattr(stand_in, "mode", None) == "token" for *_, stand_in in swapped):
            raise BitsmithError("per-token activations need opset 21 (blocked QuantizeLinear): use opset=21, "
                                "or dynamic_activations='tensor'")
        wrapper.eval()
        with torch.no_grad():
            outputs = wrapper(*args)
        out_names = list(output_names or wrapper.output_keys or [f"output_{i}" for i in range(len(outputs))])
        axes = dict(dynamic_axes) if dynamic_axes is not None else _default_axes(args, names, outputs, out_names)
        contrib = any(stand_in.contrib for *_, stand_in in swapped)

        fold = not _has_half(swapped)

        def export(tmp: str) -> list[str]:
            return _torch_export(wrapper, args, tmp, names, out_names, axes, opset, contrib, fold)

        proto, layers, trace_warnings = _write_atomically(Path(path), export, lambda p: _emitted_layers(p, swapped))
    finally:
        _restore(wrapper, swapped)
        for module, training in modes.items():
            module.training = training
    return {
        "path": str(path), "bytes": Path(path).stat().st_size, "opset": opset,
        "layers": layers,
        "ops": dict(collections.Counter(n.op_type for n in proto.graph.node)), "trace_warnings": trace_warnings,
    }


def _write_atomically(path: Path, export, count_layers):
    """Export to a temporary file beside ``path``, tidy and check it, then rename it over ``path``."""
    import onnx

    tmp = str(staging_file(path))
    try:
        trace_warnings = export(tmp)
        proto = onnx.load(tmp)
        _drop_initializer_identities(proto.graph)
        layers = count_layers(proto)
        _annotate(proto, layers)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        publish(Path(tmp), path)  # 0644 less the umask: a serving process under another user can read it
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return proto, layers, trace_warnings


# ---------------------------------------------------------------------------------------------- wrapping


class _ExportWrapper(nn.Module):
    """Calls the model with keyword or positional inputs and returns a flat tuple of tensors."""

    def __init__(self, model: nn.Module, kwarg_names: list[str] | None, output_names: Sequence[str] | None):
        super().__init__()
        self.model = model
        self.kwarg_names, self.output_names = kwarg_names, output_names
        self.output_keys: list[str] | None = None

    def forward(self, *args):
        out = self.model(**dict(zip(self.kwarg_names, args))) if self.kwarg_names else self.model(*args)
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, Mapping):
            keys = list(self.output_names or [k for k, v in out.items() if isinstance(v, torch.Tensor)])
            missing = [k for k in keys if k not in out]
            if missing:
                raise BitsmithError(f"model output has no {', '.join(missing)}; it has {', '.join(out.keys())}")
            self.output_keys = keys
            return tuple(out[k] for k in keys)
        return tuple(t for t in out if isinstance(t, torch.Tensor))


def _positional_inputs(example_inputs, input_names) -> tuple[tuple, list[str] | None]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), None
    if isinstance(example_inputs, Mapping):
        keys = list(input_names or example_inputs.keys())
        return tuple(example_inputs[k] for k in keys), keys
    return tuple(example_inputs), None


def _default_axes(args, names, outputs, out_names) -> dict[str, dict[int, str]]:
    sequence = any(not a.dtype.is_floating_point and a.dim() >= 2 for a in args)
    axes = {n: {0: "batch", 1: "sequence"} if sequence and a.dim() >= 2 else {0: "batch"} for n, a in zip(names, args)}
    for n, out in zip(out_names, outputs):
        axes[n] = {0: "batch", 1: "sequence"} if sequence and out.dim() >= 3 else {0: "batch"}
    return axes


def _torch_export(wrapper, args, path, names, out_names, axes, opset, contrib: bool, fold: bool) -> list[str]:
    """Run the legacy exporter; returns the tracer's warnings (the exporter's own notices are dropped)."""
    # no_grad: the tracer keeps each stand-in's output as a constant of the Function's (unused)
    # subgraph, and refuses a constant that requires grad
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), _quiet_stderr():
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                wrapper, args, path, dynamo=False, opset_version=opset, input_names=names, output_names=out_names,
                dynamic_axes=axes, custom_opsets={_MS: 1} if contrib else None, do_constant_folding=fold,
            )
        except BitsmithError:
            raise
        except Exception as err:  # noqa: BLE001 - the exporter raises many types; the user needs one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise BitsmithError(f"ONNX export failed: {type(err).__name__}: {first}") from err
    traced = {str(w.message).splitlines()[0] for w in caught if w.category is torch.jit.TracerWarning}
    return sorted(traced)


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 into a temporary file while the exporter runs: on a failure it prints the whole traced
    graph (thousands of lines) there, and the user is to see one line. BITSMITH_DEBUG=1 keeps it."""
    if os.environ.get("BITSMITH_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _emitted_layers(proto, swapped) -> dict[str, int]:
    """Stand-ins whose weights made it into the graph (layers the outputs do not need are dropped)."""
    used = {i.name for i in proto.graph.initializer}
    counts = collections.Counter()
    for *_, stand_in in swapped:
        if any(name in used for name in stand_in.graph_names):
            counts[stand_in.label] += 1
    return dict(sorted(counts.items()))


def _drop_initializer_identities(graph) -> None:
    """The exporter shares equal initializers through Identity nodes; read the shared one directly."""
    if any(a.type in (5, 10) for node in graph.node for a in node.attribute):  # GRAPH(S): leave subgraphs be
        return
    initializers, outputs = {i.name for i in graph.initializer}, {o.name for o in graph.output}
    alias = {
        node.output[0]: node.input[0] for node in graph.node
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs
    }
    if not alias:
        return
    kept = [node for node in graph.node if not (node.op_type == "Identity" and node.output[0] in alias)]
    for node in kept:
        node.input[:] = [alias.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)


def _annotate(proto, layers: dict[str, int]) -> None:
    from bitsmith._version import __version__

    proto.producer_name, proto.producer_version = "bitsmith", __version__
    entry = proto.metadata_props.add()
    entry.key, entry.value = "bitsmith.layers", json.dumps(layers, sort_keys=True)


# ---------------------------------------------------------------------------------------------- swapping


def _swap_in_stand_ins(wrapper: nn.Module, options: dict) -> list[tuple]:
    """Replace every bitsmith module by its stand-in; returns (name, original, stand_in) to restore."""
    swapped = []
    try:
        for name, module in list(wrapper.named_modules()):
            if not (isinstance(module, QUANTIZED_MODULES) or type(module).__module__.startswith("bitsmith.nn.")):
                continue  # not a bitsmith runtime module: the exporter's own symbolics handle it
            build = _STAND_INS.get(type(module))
            if build is None:
                shown = f"layer {name.removeprefix('model.')}" if name != "model" else "the model"
                raise BitsmithError(f"{shown} is a {type(module).__name__}, which has no ONNX pattern in "
                                    f"export_onnx: quantize it with a built-in scheme or keep it in float")
            stand_in = build(module, options)
            stand_in.graph_names = [f"{name}.{key}" for key in stand_in.tensor_names]  # initializer names
            replace_module(wrapper, name, stand_in)
            swapped.append((name, module, stand_in))
    except BaseException:
        _restore(wrapper, swapped)
        raise
    return swapped


def _restore(wrapper: nn.Module, swapped: list[tuple]) -> None:
    for name, original, _ in reversed(swapped):
        replace_module(wrapper, name, original)


def _has_half(swapped) -> bool:
    # the exporter's constant folding would turn Cast(fp16 weight) into an fp32 initializer
    return any(isinstance(original, (HalfLinear, HalfEmbedding)) for _, original, _ in swapped)


class _Emit(torch.autograd.Function):
    """Eager: the bitsmith module's own forward. Export: the stand-in's ONNX pattern."""

    @staticmethod
    def forward(ctx, x, stand_in, *tensors):
        # the tracer records this Function as one node; oneDNN's opaque packed weights cannot be traced
        # inside it, so tracing pauses while the real kernel computes the traced output
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            return stand_in.original(x)
        finally:
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, x, stand_in, *tensors):
        return stand_in.emit(g, x, *tensors)


class _StandIn(nn.Module):
    """Holds ONNX-layout tensors as persistent buffers (graph initializers named after the layer)."""

    contrib = False  # whether the pattern uses ORT's com.microsoft operators

    def __init__(self, original: nn.Module, label: str, tensors: dict[str, torch.Tensor | None]):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a submodule: its buffers stay out of the graph
        self.label = label
        self.tensor_names = [k for k, v in tensors.items() if v is not None]
        for key in self.tensor_names:
            self.register_buffer(key, tensors[key].contiguous())

    def forward(self, x):
        return _Emit.apply(x, self, *(getattr(self, k) for k in self.tensor_names))

    def emit(self, g, x, *values):
        tensors = dict(zip(self.tensor_names, values))
        return self._emit(g, x, tensors)

    def _emit(self, g, x, t: dict):
        raise NotImplementedError


def _const(g, value) -> torch.Value:
    return g.op("Constant", value_t=torch.as_tensor(value))


def _with_last_dim(out, like, size: int):
    """Give a custom-domain op's output the input's type with a new last dimension (for shape inference)."""
    sizes = like.type().varyingSizes() if like.type().kind() == "TensorType" else None
    if sizes is not None:
        out.setType(like.type().with_sizes(list(sizes[:-1]) + [size]).with_dtype(torch.float32))
    return out


def _add_bias(g, out, t: dict):
    return g.op("Add", out, t["bias"]) if "bias" in t else out


# ---------------------------------------------------------------------------------------------- W8A8 static


class _StaticLinear(_StandIn):
    def __init__(self, module: StaticInt8Linear, options: dict):
        super().__init__(module, "StaticInt8Linear", {
            "weight_t": module.weight_codes.t(),  # (K, N) int8, MatMul layout
            "weight_scale": module.weight_scale[:, 0].float(),  # (N,); symmetric: no zero point
            **_static_input_qparams(module, options),
            "bias": None if module.bias is None else module.bias.float(),
            "input_smooth": None if module.input_smooth is None else module.input_smooth.float(),
        })
        self.fused_relu = module.fused_relu

    def _emit(self, g, x, t):
        if "input_smooth" in t:  # explicit SmoothQuant scale: x * (1 / s) before the quantization step
            x = g.op("Mul", x, t["input_smooth"])
        xq = _qdq_input(g, x, t)
        w = g.op("DequantizeLinear", t["weight_t"], t["weight_scale"], axis_i=1)
        out = _add_bias(g, g.op("MatMul", xq, w), t)
        return g.op("Relu", out) if self.fused_relu else out


class _StaticConv(_StandIn):
    def __init__(self, module: StaticInt8Conv2d, options: dict):
        weight_scale = module.weight_scale[:, 0].float()  # (O,)
        bias = bias_scale = None
        if module.bias is not None:  # int32 bias with scale s_in * s_w (as ORT's QDQ Conv expects)
            bias_scale = weight_scale * module.input_scale.float()
            bias = torch.round(module.bias.float() / bias_scale).clamp(-(2**31), 2**31 - 1).to(torch.int32)
        super().__init__(module, "StaticInt8Conv2d", {
            "weight": module.weight_codes,  # (O, I/groups, kh, kw) int8
            "weight_scale": weight_scale,
            **_static_input_qparams(module, options),
            "bias": bias,
            "bias_scale": None if bias is None else bias_scale,
        })
        self.fused_relu = module.fused_relu
        self.attrs = {
            "kernel_shape_i": list(module.kernel_size), "strides_i": list(module.stride),
            "pads_i": list(module.padding) * 2, "dilations_i": list(module.dilation), "group_i": module.groups,
        }

    def _emit(self, g, x, t):
        xq = _qdq_input(g, x, t)
        w = g.op("DequantizeLinear", t["weight"], t["weight_scale"], axis_i=0)
        inputs = [xq, w]
        if "bias" in t:
            inputs.append(g.op("DequantizeLinear", t["bias"], t["bias_scale"], axis_i=0))
        out = g.op("Conv", *inputs, **self.attrs)
        return g.op("Relu", out) if self.fused_relu else out


def _static_input_qparams(module, options: dict) -> dict[str, torch.Tensor]:
    # default: uint8 activations with bitsmith's own zero point, U8S8 as ORT's quantize_dynamic emits.
    # S8S8 QDQ (the same codes - 128 with the same scale; ORT's documented default) is exact too, but ran
    # 1.3x slower on MiniLM here: ORT fused only the layers whose QuantizeLinear has one consumer, so
    # q/k/v (one input, one range, merged by ORT's CSE) stayed fp32 MatMuls.
    zero = module.input_zero_point.reshape(())
    if options.get("activation_type", "u8") == "s8":
        zero = (zero.to(torch.int32) - 128).to(torch.int8)
    else:
        zero = zero.to(torch.uint8)
    return {"input_scale": module.input_scale.float().reshape(()), "input_zero": zero}  # scalar: per-tensor


def _qdq_input(g, x, t):
    q = g.op("QuantizeLinear", x, t["input_scale"], t["input_zero"])
    return g.op("DequantizeLinear", q, t["input_scale"], t["input_zero"])


# ---------------------------------------------------------------------------------------------- W8A8 dynamic


class _DynamicLinear(_StandIn):
    def __init__(self, module: Int8DynamicLinear, options: dict):
        mode, block_size = options["dynamic"], None
        if mode == "block":
            tensors = _nbits_tensors(_signed_to_offset(module.weight_codes), module.weight_scale, None, 8, None)
            block_size = tensors.pop("block_size")
        else:
            tensors = {
                "weight_t": module.weight_codes.t(),  # (K, N) int8
                "weight_scale": module.weight_scale[:, 0].float(),  # (N,)
            }
        super().__init__(module, "Int8DynamicLinear", {**tensors, "bias": module.bias})
        self.mode, self.block_size, self.contrib = mode, block_size, mode == "block"
        self.in_features, self.out_features = module.in_features, module.out_features

    def _emit(self, g, x, t):
        if self.mode == "block":
            return _add_bias(g, _matmul_nbits(g, x, t, self, bits=8, accuracy_level=4), t)
        if self.mode == "tensor":
            q, x_scale, x_zero = g.op("DynamicQuantizeLinear", x, outputs=3)
            acc = g.op("MatMulInteger", q, t["weight_t"], x_zero)
            scale = g.op("Mul", x_scale, t["weight_scale"])  # (N,)
        else:
            q, token_scale = _quantize_per_token(g, x, self.in_features)
            acc = g.op("MatMulInteger", q, t["weight_t"], _const(g, torch.tensor(128, dtype=torch.uint8)))
            # two Muls, the weight scale (an initializer) first: ORT's MatMulIntegerToFloatFusion rewrites
            # Cast -> Mul(Mul(a, b)) as if a were a per-tensor scale, which breaks a per-token (..., 1) one
            out = g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), t["weight_scale"])
            return _add_bias(g, g.op("Mul", out, token_scale), t)
        out = g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), scale)
        return _add_bias(g, out, t)


def _quantize_per_token(g, x, in_features: int):
    """Symmetric int8 per row as kernels.quantize_per_token (scale amax / 127), stored as uint8 with zero
    point 128 like bitsmith's kernels; one blocked QuantizeLinear (opset 21: a block of the whole row)."""
    last = _const(g, torch.tensor([-1]))
    high = g.op("ReduceMax", x, last, keepdims_i=1)  # (..., 1); max(max, -min) needs no |x| copy
    low = g.op("ReduceMin", x, last, keepdims_i=1)
    amax = g.op("Max", high, g.op("Neg", low), _const(g, torch.tensor(1e-12)))
    # Div, not Mul by 1/127: a Mul here would also match ORT's MatMulIntegerToFloatFusion
    token_scale = g.op("Div", amax, _const(g, torch.tensor(127.0)))  # (..., 1)
    # the zero point as an attribute, not a uint8 constant: ORT's CSE then merges the quantization
    # of an input shared by several layers (q/k/v), which it does not for separate uint8 constants
    zero = g.op("ConstantOfShape", g.op("Shape", token_scale), value_t=torch.tensor([128], dtype=torch.uint8))
    q = g.op("QuantizeLinear", x, token_scale, zero, axis_i=-1, block_size_i=in_features)
    return q, token_scale


# ---------------------------------------------------------------------------------------------- weight-only


class _Int8WeightOnly(_StandIn):
    """Standard DequantizeLinear -> MatMul. ORT rewrites it to MatMulNBits bits=8 with the session's
    ``session.qdq_matmulnbits_accuracy_level`` (default 4, int8 compute: 0.76x ORT fp32 on MiniLM here);
    an explicit MatMulNBits with accuracy level 0 (fp32 compute) ran at 1.03x to 1.26x."""

    def __init__(self, module: Int8WeightOnlyLinear, options: dict):
        super().__init__(module, "Int8WeightOnlyLinear", {
            "weight_t": module.weight_codes.t(),  # (K, N) int8
            "weight_scale": module.weight_scale[:, 0].float(),  # (N,)
            "bias": module.bias,
        })

    def _emit(self, g, x, t):
        weight = g.op("DequantizeLinear", t["weight_t"], t["weight_scale"], axis_i=1)
        return _add_bias(g, g.op("MatMul", x, weight), t)


class _IntxWeightOnly(_StandIn):
    contrib = True

    def __init__(self, module: IntxWeightOnlyLinear, options: dict):
        bits = module.bits if module.bits in _NBITS_WIDTHS else 8  # wider codes hold the same values
        tensors = _nbits_tensors(module.codes(), module.weight_scale, module.weight_zero_point, bits,
                                 module.group_size)
        block_size = tensors.pop("block_size")
        super().__init__(module, "IntxWeightOnlyLinear", {**tensors, "bias": module.bias})
        self.bits, self.block_size = bits, block_size
        self.accuracy_level = options["accuracy_level"] if bits < 8 else 0
        self.in_features, self.out_features = module.in_features, module.out_features

    def _emit(self, g, x, t):
        return _add_bias(g, _matmul_nbits(g, x, t, self, bits=self.bits, accuracy_level=self.accuracy_level), t)


def _signed_to_offset(codes_int8: torch.Tensor) -> torch.Tensor:
    """int8 codes as uint8 with zero point 128 (MatMulNBits takes unsigned codes)."""
    return (codes_int8.to(torch.int16) + 128).to(torch.uint8)


def _nbits_block(in_features: int, group_size: int | None) -> int:
    """MatMulNBits' block: a power of two >= 16. Groups that are not one are split into equal
    power-of-two blocks sharing the group's scale; a per-channel weight takes blocks of up to 128."""
    if group_size is None or group_size >= in_features:
        return 128 if in_features >= 128 else max(16, 1 << (in_features - 1).bit_length())
    block = group_size & -group_size  # largest power of two dividing the group size
    if block < 16:
        raise BitsmithError(f"group size {group_size} has no ONNX MatMulNBits block (a power of two >= 16 dividing it)")
    return min(block, 256)


def _nbits_tensors(codes, scale, zero, bits: int, group_size: int | None) -> dict:
    """MatMulNBits' B (N, k_blocks, block * bits / 8), scales (N, k_blocks) fp32 and packed zero points.

    ``codes`` (N, K) uint8 in [0, 2**bits); ``scale`` / ``zero`` (N, groups) or (N, 1) (zero None: 128)."""
    rows, in_features = codes.shape
    block = _nbits_block(in_features, group_size)
    k_blocks = -(-in_features // block)
    per_group = in_features if group_size is None or group_size >= in_features else group_size
    repeat = -(-per_group // block)  # blocks per quantization group
    scales = scale.float().repeat_interleave(repeat, dim=1)[:, :k_blocks]  # (N, k_blocks)
    if zero is None:
        zero = torch.full((rows, 1), 128, dtype=torch.uint8)
    zeros = zero.to(torch.uint8).repeat_interleave(repeat, dim=1)[:, :k_blocks]
    zeros = zeros.expand(rows, k_blocks) if zeros.shape[1] == 1 else zeros
    # pad K to whole blocks with each row's last zero point (a zero weight), then pack along K
    pad = k_blocks * block - in_features
    if pad:
        codes = torch.cat([codes, zeros[:, -1:].expand(rows, pad)], dim=1)
    packed = _pack_low_first(codes.reshape(rows, k_blocks, block), bits)  # (N, k_blocks, block * bits / 8)
    return {"weight_packed": packed, "weight_scale": scales.contiguous(),
            "weight_zero": _pack_low_first(zeros.contiguous(), bits), "block_size": block}


def _pack_low_first(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last axis, ``8 // bits`` codes per byte, first code in the lowest bits (zero-padded)."""
    per_byte = 8 // bits
    pad = -codes.shape[-1] % per_byte
    codes = nn.functional.pad(codes.to(torch.int32), (0, pad)).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (codes << shifts).sum(-1).to(torch.uint8)


def _matmul_nbits(g, x, t, stand_in, bits: int, accuracy_level: int):
    out = g.op(
        f"{_MS}::MatMulNBits", x, t["weight_packed"], t["weight_scale"], t["weight_zero"],
        K_i=stand_in.in_features, N_i=stand_in.out_features, bits_i=bits, block_size_i=stand_in.block_size,
        accuracy_level_i=accuracy_level,
    )
    return _with_last_dim(out, x, stand_in.out_features)


# ---------------------------------------------------------------------------------------------- half and embeddings


class _HalfLinear(_StandIn):
    def __init__(self, module: HalfLinear, options: dict):
        super().__init__(module, "HalfLinear", {"weight_t": module.weight.t(), "bias": module.bias})

    def _emit(self, g, x, t):
        return _add_bias(g, g.op("MatMul", x, g.op("Cast", t["weight_t"], to_i=_FLOAT)), t)


class _HalfEmbedding(_StandIn):
    def __init__(self, module: HalfEmbedding, options: dict):
        super().__init__(module, "HalfEmbedding", {"weight": module.weight})

    def _emit(self, g, ids, t):
        return g.op("Cast", g.op("Gather", t["weight"], ids, axis_i=0), to_i=_FLOAT)


class _QuantizedEmbedding(_StandIn):
    def __init__(self, module: QuantizedEmbedding, options: dict):
        super().__init__(module, "QuantizedEmbedding", {
            "weight_codes": module.codes().to(torch.uint8),  # (V, D); narrower codes are stored unpacked
            "weight_scale": module.weight_scale.float(),  # (V, G): G = 1 per row, else D / group_size
            "weight_zero": module.weight_zero_point.float(),  # (V, G)
        })
        self.groups, self.group_size = module.weight_scale.shape[1], module.group_size

    def _emit(self, g, ids, t):
        rows = g.op("Cast", g.op("Gather", t["weight_codes"], ids, axis_i=0), to_i=_FLOAT)  # (..., D)
        zero = g.op("Gather", t["weight_zero"], ids, axis_i=0)  # (..., G)
        scale = g.op("Gather", t["weight_scale"], ids, axis_i=0)  # (..., G)
        if self.groups == 1:
            return g.op("Mul", g.op("Sub", rows, zero), scale)
        # per group: (N, G, g) rows against (N, G, 1) scales, N the looked-up ids flattened, then back to (..., D)
        grouped = g.op("Reshape", rows, _const(g, [-1, self.groups, self.group_size]))
        zero = g.op("Reshape", zero, _const(g, [-1, self.groups, 1]))
        scale = g.op("Reshape", scale, _const(g, [-1, self.groups, 1]))
        values = g.op("Mul", g.op("Sub", grouped, zero), scale)
        return g.op("Reshape", values, g.op("Shape", rows))


_STAND_INS = {
    StaticInt8Linear: _StaticLinear,
    StaticInt8Conv2d: _StaticConv,
    Int8DynamicLinear: _DynamicLinear,
    Int8WeightOnlyLinear: _Int8WeightOnly,
    IntxWeightOnlyLinear: _IntxWeightOnly,
    QuantizedEmbedding: _QuantizedEmbedding,
    HalfLinear: _HalfLinear,
    HalfEmbedding: _HalfEmbedding,
}
