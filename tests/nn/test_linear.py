"""Quantized linear modules: every kernel each module offers on this machine, against a float or integer
reference with measured SQNR, and proof (by counting the ops that run) that each kernel is what it claims."""

import pytest
import torch
from torch import nn

from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.errors import BitsmithError
from bitsmith.nn import cpu, dispatch, kernels, native
from bitsmith.nn.linear import HalfLinear, Int8DynamicLinear, Int8WeightOnlyLinear, IntxWeightOnlyLinear
from conftest import OpCounter, each_kernel, sqnr_db

# the op each kernel must run (None: a plain float matmul, and none of the packed/int8 ops)
PACKED_OPS = {"onednn.qlinear_pointwise", "aten._weight_int8pack_mm", "aten._weight_int4pack_mm_for_cpu"}
KERNEL_OP = {
    "onednn-u8s8": "onednn.qlinear_pointwise",
    "onednn-u8s8-split": "onednn.qlinear_pointwise",
    "int8pack-bf16": "aten._weight_int8pack_mm",
    "int4pack-bf16": "aten._weight_int4pack_mm_for_cpu",
}


@pytest.fixture
def linear():
    torch.manual_seed(0)
    layer = nn.Linear(256, 384)
    torch.manual_seed(1)  # the inputs each test draws next
    return layer


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_int8_weight_only_every_kernel_matches_float(linear, rows, monkeypatch):
    x = torch.randn(rows, 256)
    module = Int8WeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, 8, "channel", True), linear.bias)
    outputs = each_kernel(module, x, monkeypatch)
    assert set(outputs) == {"int8pack-bf16", "dequant-bf16", "dequant-fp32"}
    exact = nn.functional.linear(x, module.dequantize(), linear.bias)
    assert torch.allclose(outputs["dequant-fp32"], exact, atol=1e-5)
    for name, out in outputs.items():
        assert sqnr_db(linear(x), out) > 43.0, name  # 45.4 .. 46.0: int8 weights (+ bf16 activations)


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_int4_group_every_kernel_matches_dequantized_weight(linear, rows, monkeypatch):
    x = torch.randn(rows, 256)
    qweight = quantize_weight_rtn(linear.weight, 4, 128, symmetric=False)
    module = IntxWeightOnlyLinear.from_quantized(qweight, linear.bias)
    outputs = each_kernel(module, x, monkeypatch)
    native_rows = native.available() and rows <= native.INT4_MAX_ROWS  # decoding: bitsmith's own int4 kernel too
    assert set(outputs) == {"int4pack-bf16", "dequant-bf16", "dequant-fp32"} | ({"native-int4"} if native_rows else set())
    exact = nn.functional.linear(x, module.dequantize(), linear.bias)
    assert torch.allclose(outputs["dequant-fp32"], exact, atol=1e-5)
    if native_rows:
        assert torch.allclose(outputs["native-int4"], exact, atol=1e-5)  # fp32 throughout: sums in another order
    for name in ("int4pack-bf16", "dequant-bf16"):
        assert sqnr_db(exact, outputs[name]) > 47.0, name  # 49.6 .. 51.0: bf16 activation rounding
    assert sqnr_db(linear(x), outputs["dequant-fp32"]) > 21.0  # 23.1 .. 23.6: the int4 g128 error itself


@pytest.mark.parametrize("bits", [2, 3])
def test_narrow_codes_run_widened_on_the_int4_kernel(linear, bits, monkeypatch):
    """2- and 3-bit codes (and their zero points) fit int4 unchanged: the int4pack kernel runs them exactly."""
    module = IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, bits, 64, False), linear.bias)
    assert "widened to int4" in module.kernel_why()
    x = torch.randn(4, 256)
    outputs = each_kernel(module, x, monkeypatch)
    exact = nn.functional.linear(x, module.dequantize(), linear.bias)
    assert sqnr_db(exact, outputs["int4pack-bf16"]) > 47.0  # bf16 rounding only
    assert sqnr_db(linear(x), outputs["dequant-fp32"]) > {2: 4.0, 3: 15.5}[bits]  # 6.1 / 17.5


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_wide_codes_have_no_packed_kernel_and_say_so(linear, bits, monkeypatch):
    module = IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, bits, 128, False), linear.bias)
    assert module.kernel_names() == ["dequant-bf16", "dequant-fp32"]
    assert f"no {bits}-bit kernel: dequantized per call" in module.kernel_why()
    x = torch.randn(4, 256)
    outputs = each_kernel(module, x, monkeypatch)
    # about 6 dB per bit: measured 29.4 / 35.5 / 41.5 dB
    assert sqnr_db(linear(x), outputs["dequant-fp32"]) > {5: 27.0, 6: 33.0, 7: 39.0}[bits]


def test_partial_last_group_pads_for_the_int4_kernel(monkeypatch):
    """K = 200 with groups of 64: 64, 64, 64 and a last group of 8 (scale (N, 4)); the int4 kernel takes it
    with zero columns up to 256 and zero-padded activations, and agrees with the dequantized weight."""
    torch.manual_seed(0)
    layer = nn.Linear(200, 32)
    module = IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(layer.weight, 4, 64, False), layer.bias)
    assert module.weight_scale.shape == (32, 4)
    x = torch.randn(5, 200)
    outputs = each_kernel(module, x, monkeypatch)
    exact = nn.functional.linear(x, module.dequantize(), layer.bias)
    assert "int4pack-bf16" in outputs and sqnr_db(exact, outputs["int4pack-bf16"]) > 47.0
    assert sqnr_db(layer(x), exact) > 21.0
    if native.available():  # the vector loop takes the whole groups, plain C the last 8 columns
        assert torch.allclose(outputs["native-int4"], exact, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason="needs bitsmith's native library (a C compiler)")
@pytest.mark.parametrize("shape,group", [((48, 96), 32), ((40, 100), 50), ((16, 64), 2), ((33, 160), 16)])
def test_native_int4_kernel_equals_the_dequantized_weight_for_every_row_count(shape, group):
    """bitsmith's int4 kernel reads the packed codes: groups of a multiple of 16 take the AVX2 loop (one row: its
    own registers), others plain C; odd row counts, every row count up to 16, symmetric and asymmetric codes."""
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0])
    for symmetric in (False, True):
        module = IntxWeightOnlyLinear.from_quantized(
            quantize_weight_rtn(layer.weight, 4, group, symmetric), layer.bias)
        for rows in (1, 2, 5, 16):
            x = torch.randn(rows, shape[1])
            out = native.int4_matmul(x, module.weight_packed, shape[0], group, module.weight_scale.float(),
                                     module.weight_zero_point, module.bias)
            assert torch.allclose(out, nn.functional.linear(x, module.dequantize(), layer.bias), atol=1e-5)


def test_int4_shape_the_kernel_refuses_is_dequantized_and_said():
    torch.manual_seed(0)
    layer = nn.Linear(128, 100)  # torch's int4pack needs N divisible by 16
    module = IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(layer.weight, 4, 64, False), layer.bias)
    assert "int4pack-bf16" not in module.kernel_names()
    assert "int4pack does not take this shape (N=100" in module.kernel_why()


def _integer_reference(module, x):
    codes, token_scale = kernels.quantize_per_token(x)
    q_x = codes.to(torch.int32) - 128
    acc = (q_x @ module.weight_codes.to(torch.int32).T).double()  # exact integer sums
    return acc * token_scale.double() * module.weight_scale.T.double() + module.bias.double()


@pytest.mark.parametrize("force_exact", [False, True])
def test_w8a8_every_kernel_equals_integer_reference(linear, force_exact, monkeypatch):
    """sum(q_x * q_w) * s_x * s_w + b, exactly (up to fp32 rounding), whichever kernel runs; with
    BITSMITH_INT8=exact the no-VNNI split path runs on this machine too."""
    if force_exact:
        monkeypatch.setenv("BITSMITH_INT8", "exact")
    x = torch.randn(37, 256) * 3
    module = Int8DynamicLinear.from_quantized(quantize_weight_rtn(linear.weight, 8, "channel", True), linear.bias)
    outputs = each_kernel(module, x, monkeypatch)
    if cpu.onednn_int8_available():
        assert ("onednn-u8s8-split" if force_exact or not cpu.onednn_int8_exact() else "onednn-u8s8") in outputs
    reference = _integer_reference(module, x)
    for name, out in outputs.items():
        assert torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-5), name
    assert sqnr_db(linear(x), outputs["fp32-dequant"]) > 40.0  # 42.0


def test_w8a8_large_input_in_chunks(linear):
    x = torch.randn(2, 700, 256)  # 1400 rows: several W8A8_CHUNK_ROWS chunks on the eager path
    module = Int8DynamicLinear.from_quantized(quantize_weight_rtn(linear.weight, 8, "channel", True), linear.bias)
    assert module(x).shape == (2, 700, 384)
    assert sqnr_db(linear(x), module(x)) > 40.0  # 42.0


def test_split_codes_fit_int16_pairs_and_sum_back():
    """p = a >> 1 and q = a - p + (z & 1): both at most 129, and (p - (z+1)//2) + (q - (z+1)//2) = a - z for every a, z."""
    a = torch.arange(256, dtype=torch.uint8).repeat(256, 1)  # (256 zero points, 256 codes)
    for zero in (0, 1, 127, 128, 255):
        split = kernels.split_codes(a, zero).to(torch.int32)
        p, q = split[:, :256], split[:, 256:]
        assert int(split.max()) <= 129
        assert torch.equal(p + q - 2 * ((zero + 1) // 2), a.to(torch.int32) - zero)


def test_per_token_codes_round_to_nearest():
    x = torch.tensor([[0.5, -1.0, 0.25], [3.0, 0.0, -1.5]])
    codes, scale = kernels.quantize_per_token(x)
    assert (codes.to(torch.int32) - 128).tolist() == [[64, -127, 32], [127, 0, -64]]
    assert torch.allclose(scale[:, 0], torch.tensor([1.0, 3.0]) / 127)


# measured: bf16 51.1; fp16 weights upcast to fp32 74.8; the native fp16 GEMM (AVX512-FP16: fp16 activations
# too, an Intel Xeon with AMX) 69.3
HALF_THRESHOLDS = {"bf16": 49.0, "upcast-fp32": 72.0, "fp16": 66.0}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_linear(linear, dtype, monkeypatch):
    x = torch.randn(16, 256)
    for name, out in each_kernel(HalfLinear.from_float(linear, dtype), x, monkeypatch).items():
        threshold = HALF_THRESHOLDS["bf16" if dtype == "bf16" else name]
        assert sqnr_db(linear(x), out) > threshold, name


def test_int8_symmetric_groups_go_through_the_generic_module(linear):
    """Signed 8-bit codes are shifted to unsigned storage with the zero point moved along."""
    qweight = quantize_weight_rtn(linear.weight, 8, 64, symmetric=True)
    module = IntxWeightOnlyLinear.from_quantized(qweight, linear.bias)
    assert module.weight_zero_point.unique().tolist() == [128]
    # half a step of rounding, plus the fp16 rounding of the stored scale: measured 0.555 of a step
    error = (module.dequantize() - linear.weight).abs() / qweight.scale.repeat_interleave(64, dim=1)
    assert error.max() < 0.6  # before the shift, wrapped negative codes gave errors of ~250 steps


def _modules(linear):
    w8 = quantize_weight_rtn(linear.weight, 8, "channel", True)
    return [
        Int8WeightOnlyLinear.from_quantized(w8, linear.bias),
        Int8DynamicLinear.from_quantized(w8, linear.bias),
        IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, 4, 128, False), linear.bias),
        IntxWeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, 6, 128, False), linear.bias),
        HalfLinear.from_float(linear, "bf16"),
    ]


def test_each_kernel_runs_the_op_it_claims(linear, monkeypatch):
    """Counted at the dispatcher: a packed/int8 kernel calls its torch op, a dequantize kernel none of them."""
    monkeypatch.setenv("BITSMITH_INT8", "exact")  # so that the split path is counted on every machine
    x = torch.randn(6, 256)
    checked = set()
    for module in _modules(linear):
        variable = "BITSMITH_KERNEL_" + module.family.upper().replace("-", "_")
        for name in module.kernel_names():
            monkeypatch.setenv(variable, name)
            dispatch.reset()
            with torch.inference_mode(), OpCounter() as ops:
                module(x)
            expected = KERNEL_OP.get(name)
            if name.startswith("native-"):  # bitsmith's own C: neither a packed op nor a float matmul
                assert not (PACKED_OPS | {"aten.linear", "aten.addmm", "aten.mm"}) & set(ops.names), (name, ops.names)
            elif expected is None:
                assert not PACKED_OPS & set(ops.names), (name, ops.names)
                assert {"aten.linear", "aten.addmm", "aten.mm"} & set(ops.names), (name, ops.names)
            else:
                assert expected in ops.names, (name, ops.names)
            checked.add(name)
    assert {"int8pack-bf16", "int4pack-bf16", "dequant-fp32", "bf16"} <= checked
    if cpu.onednn_int8_available():
        assert "onednn-u8s8-split" in checked


def test_dispatch_keeps_the_fastest_and_obeys_overrides(monkeypatch):
    import time

    dispatch.reset()
    calls = []
    candidates = {
        "slow": lambda: (calls.append("slow"), time.sleep(0.006)),
        "fast": lambda: calls.append("fast"),
    }
    assert dispatch.choose("test-family", "M<=8", candidates) == "fast"
    # one warm-up and three timed rounds (6 ms a call: not cheap), three more to confirm leaving the preferred
    # kernel, then never again
    assert calls.count("slow") == 7
    assert dispatch.choose("test-family", "M<=8", candidates) == "fast" and calls.count("slow") == 7
    decision = dispatch.decisions("test-family")[0]
    assert decision.how == "measured" and decision.timings_ms["slow"] > decision.timings_ms["fast"]
    recorded = dispatch.export_decisions()  # what a checkpoint records
    assert [(d["family"], d["key"], d["chosen"]) for d in recorded["decisions"]] == [("test-family", "M<=8", "fast")]
    dispatch.reset()  # a new process that loads the checkpoint: the recorded decision, nothing timed again
    assert dispatch.seed({**recorded, "key": "another machine"}) == 0
    assert dispatch.seed(recorded) == 1
    assert dispatch.choose("test-family", "M<=8", candidates) == "fast" and calls.count("slow") == 7
    monkeypatch.setenv("BITSMITH_KERNEL_TEST_FAMILY", "slow")
    assert dispatch.choose("test-family", "M<=16", candidates) == "slow"
    monkeypatch.setenv("BITSMITH_KERNEL_TEST_FAMILY", "nonesuch")
    with pytest.raises(BitsmithError, match="BITSMITH_KERNEL_TEST_FAMILY=nonesuch is not a test-family kernel"):
        dispatch.choose("test-family", "M<=16", candidates)
    monkeypatch.delenv("BITSMITH_KERNEL_TEST_FAMILY")
    monkeypatch.setenv("BITSMITH_AUTOTUNE", "0")
    assert dispatch.choose("test-family", "M<=32", candidates) == "slow"  # the preference order, untimed
    monkeypatch.delenv("BITSMITH_AUTOTUNE")
    nearly = {"first": lambda: time.sleep(0.004), "second": lambda: time.sleep(0.0039)}
    assert dispatch.choose("test-family", "M<=64", nearly) == "first"  # 2.5% faster is within the noise margin
    dispatch.reset()


def test_modules_describe_their_kernels_and_what_ran(linear):
    module = Int8WeightOnlyLinear.from_quantized(quantize_weight_rtn(linear.weight, 8, "channel", True), linear.bias)
    assert "int8pack-bf16 | dequant-bf16 | dequant-fp32" in module.kernel()
    assert "bf16 here: " + cpu.bf16_compute() == module.kernel_why()
    module(torch.randn(3, 256))
    assert f"; ran {module.last_kernel[0]} at M=3" in module.kernel()


def test_bf16_and_fp16_layers_of_one_shape_decide_their_kernels_apart(monkeypatch):
    """An fp16 layer (one candidate on most CPUs) run first must not hand its choice to a bf16 layer of the
    same shape: the bf16 layer times its own candidates (once a shared "half" decision ran bf16 on fp32)."""
    monkeypatch.delenv("BITSMITH_AUTOTUNE", raising=False)
    dispatch.reset()
    linear = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    fp16, bf16 = HalfLinear.from_float(linear, "fp16"), HalfLinear.from_float(linear, "bf16")
    fp16(x)
    bf16(x)
    (decided,) = dispatch.decisions("bf16")
    assert set(decided.timings_ms) == {"bf16", "upcast-fp32"}  # measured, not the fp16 layer's choice
    assert [d.family for d in dispatch.decisions()] == ["fp16", "bf16"]
    dispatch.reset()


def test_a_candidate_far_slower_than_the_fastest_is_out_after_one_timed_call():
    """An emulated bf16 GEMM on an AVX2 CPU is 9x the fp32 one: one warm-up and one timed call tell it."""
    import time

    dispatch.reset()
    calls = []
    candidates = {"preferred": lambda: (calls.append("preferred"), time.sleep(0.006)),
                  "crawl": lambda: (calls.append("crawl"), time.sleep(0.06)),
                  "close": lambda: (calls.append("close"), time.sleep(0.007))}
    assert dispatch.choose("test-family", "M<=8", candidates) == "preferred"
    assert calls.count("crawl") == 2 and calls.count("preferred") == calls.count("close") == 4
    assert dispatch.decisions("test-family")[0].timings_ms["crawl"] > 50
    dispatch.reset()


def test_one_burst_of_load_does_not_move_a_layer_off_its_preferred_kernel():
    """The preferred kernel is slow only while it is first timed (another process had the cores): the switch
    is confirmed by a second measurement, which keeps it (once a burst put a MiniLM layer on a 3x slower one)."""
    import time

    dispatch.reset()
    calls = []

    def preferred():
        calls.append("preferred")
        time.sleep(0.008 if len(calls) <= 4 else 0.0)  # the warm-up and first three rounds: under load

    candidates = {"preferred": preferred, "other": lambda: time.sleep(0.002)}
    assert dispatch.choose("test-family", "M<=8", candidates) == "preferred"
    decision = dispatch.decisions("test-family")[0]
    assert decision.timings_ms["preferred"] < decision.timings_ms["other"] and len(calls) == 7
    dispatch.reset()
