"""CPU facts read from the machine, and W8A8 kept exact where oneDNN's one-pass int8 sums saturate.

A CPU without VNNI is reproduced on any x86 machine by capping oneDNN at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
which oneDNN reads at start-up, hence the subprocess): its u8 x s8 kernels then sum pairs of products in
saturating int16, exactly as on an AVX2-only EPYC.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bitsmith.nn import cpu

AVX2_CHILD = textwrap.dedent("""
    import json, torch
    from torch import nn
    from bitsmith.algorithms.rtn import quantize_weight_rtn
    from bitsmith.nn import cpu, kernels
    from bitsmith.nn.linear import Int8DynamicLinear
    from bitsmith.nn.static import StaticInt8Conv2d, StaticInt8Linear

    torch.manual_seed(0)
    result = {"exact": cpu.onednn_int8_exact("linear"), "exact_conv": cpu.onednn_int8_exact("conv"),
              "available": cpu.onednn_int8_available()}
    # the defect itself: one oneDNN pass over codes near 255 against weights near 127
    w = torch.full((8, 64), 127, dtype=torch.int8)
    x = torch.full((4, 64), 255, dtype=torch.uint8)
    one_pass = kernels.qlinear(x, 1.0, 0, kernels.prepack_int8_weight(w), torch.ones(8))
    result["one_pass_error"] = float((one_pass - 255 * 127 * 64).abs().max())

    linear = nn.Linear(256, 384)
    xs = torch.randn(37, 256) * 3
    dyn = Int8DynamicLinear.from_quantized(quantize_weight_rtn(linear.weight, 8, "channel", True), linear.bias)
    codes, token_scale = kernels.quantize_per_token(xs)
    ref = ((codes.int() - 128) @ dyn.weight_codes.int().T).double() * token_scale.double() \\
        * dyn.weight_scale.T.double() + linear.bias.double()
    result["dynamic_kernels"] = dyn.kernel_names()
    result["dynamic_error"] = float((dyn(xs).double() - ref).abs().max())
    result["why"] = dyn.kernel_why()

    st = StaticInt8Linear(256, 384, True)
    st.set_weight(dyn.weight_codes, dyn.weight_scale, linear.bias)
    st.set_input_range(8.0 / 255, 121)
    xq = (torch.clamp(torch.round(xs / st.input_scale) + 121, 0, 255) - 121) * st.input_scale
    result["static_error"] = float((st(xs) - nn.functional.linear(xq, st.dequantized_weight(), linear.bias)).abs().max())

    conv = nn.Conv2d(16, 8, 3, padding=1)
    sc = StaticInt8Conv2d.like(conv)
    q = quantize_weight_rtn(conv.weight.detach().flatten(1), 8, "channel", True)
    sc.set_weight(q.codes.reshape(conv.weight.shape), q.scale, conv.bias)
    sc.set_input_range(8.0 / 255, 128)
    xc = torch.randn(2, 16, 6, 6) * 2
    xcq = (torch.clamp(torch.round(xc / sc.input_scale) + 128, 0, 255) - 128) * sc.input_scale
    ref_c = nn.functional.conv2d(xcq, sc.dequantized_weight(), conv.bias, padding=1)
    result["conv_error"] = float((sc(xc) - ref_c).abs().max())
    result["conv_kernels"] = sc.kernel_names()
    print(json.dumps(result))
""")


def _run_capped(isa: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BITSMITH_INT8"}  # the probe's own choice, not a forced one
    env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", AVX2_CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not cpu.onednn_int8_available(), reason="no oneDNN int8 on this CPU")
def test_without_vnni_w8a8_stays_exact():
    result = _run_capped("AVX2")
    assert not result["exact"] and not result["exact_conv"]  # the probe sees the saturation
    assert result["one_pass_error"] > 1e6  # 255*127*64 = 2,072,640 came back as 1,048,544: the old bug
    assert result["dynamic_kernels"] == ["onednn-u8s8-split", "fp32-dequant"]
    assert "saturate" in result["why"] and "ONEDNN_MAX_CPU_ISA=AVX2" in result["why"]
    assert result["dynamic_error"] < 1e-4  # measured ~1e-6: fp32 rounding only
    assert result["static_error"] < 1e-4
    assert result["conv_error"] < 1e-4 and result["conv_kernels"][0] == "onednn-u8s8-split"


def test_flags_and_probe_agree_with_the_machine():
    flags = cpu.cpu_flags()
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert "avx2" in flags or "sse2" in flags
    summary = cpu.summary()
    assert summary["int8_dot_product"] == cpu.int8_dot_product() and summary["bf16"] == cpu.bf16_compute()
    has_dot = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if cpu.onednn_int8_available() and not cpu.library_caps() and not cpu.exact_int8_forced():
        # with VNNI or AMX one pass is exact; without, the probe must say it is not
        assert cpu.onednn_int8_exact("linear") == has_dot


def test_forcing_the_exact_path(monkeypatch):
    monkeypatch.setenv("BITSMITH_INT8", "exact")
    assert not cpu.onednn_int8_exact("linear") and not cpu.onednn_int8_exact("conv")
    assert cpu.exact_int8_forced()
    with pytest.raises(ValueError):
        cpu.onednn_int8_exact("matmul")


def test_machine_key_changes_with_library_caps(monkeypatch):
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(name, raising=False)
    plain = cpu.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu.machine_key() != plain and cpu.library_caps() == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert torch.__version__  # the key also holds the torch version (rebuild on upgrade)
