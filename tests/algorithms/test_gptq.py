import pytest
import torch

from bitsmith import BitsmithError
from bitsmith.algorithms.gptq import accumulate_hessian, dequantize_weight, gptq_quantize, quantization_error
from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.formats.affine import dequantize_affine, quantize_affine

N, K = 128, 256  # out, in features of the synthetic layer


@pytest.fixture(scope="module")
def layer():
    """(X (2048, K) correlated inputs with 4 large channels, W (N, K), H from accumulate_hessian)."""
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(K, K, generator=gen) / K**0.5  # correlates the input channels
    x = torch.randn(2048, K, generator=gen) @ mixing
    x[:, :4] *= 10.0  # a few large-magnitude input channels, as in LLM activations
    weight = torch.randn(N, K, generator=gen)
    hessian, count = accumulate_hessian(None, x[:1000], 0)
    hessian, count = accumulate_hessian(hessian, x[1000:].reshape(8, 131, K), count)  # (batch, tokens, K)
    assert count == 2048
    return x, weight, hessian


def _output_error(x, weight, dequantized):
    return (x @ weight.T - x @ dequantized.T).norm().item()


def _damped(hessian, info):
    return hessian.double() + info["damp"] * torch.eye(hessian.shape[0], dtype=torch.float64)


def test_accumulate_hessian_is_the_running_mean(layer):
    x, _, hessian = layer
    reference = 2.0 / x.shape[0] * x.double().T @ x.double()
    assert hessian.dtype == torch.float32
    assert ((hessian - reference).abs().max() / reference.abs().max()).item() < 1e-6  # 7.2e-08
    same, count = accumulate_hessian(hessian, x[:0], 2048)  # an empty batch changes nothing
    assert same is hessian and count == 2048
    # the objective in H units equals the output error: trace(D H D^T) = 2/n ||X D^T||^2
    wq = quantize_weight_rtn(layer[1], 4, 128, False)
    error = quantization_error(layer[1], hessian, dequantize_weight(wq))
    assert error == pytest.approx(2.0 / 2048 * _output_error(x, layer[1], dequantize_weight(wq)) ** 2, rel=1e-5)


@pytest.mark.parametrize(
    "bits, group_size, max_ratio, max_ratio_act_order",
    [
        (4, 128, 0.6, 0.6),  # 0.4955, act-order + static groups 0.4903
        (3, 128, 0.6, 0.55),  # 0.5342, 0.5072
        (3, None, 0.6, 0.55),  # 0.5022, 0.4928
    ],
)
def test_gptq_halves_the_output_error_of_rtn(layer, bits, group_size, max_ratio, max_ratio_act_order):
    x, weight, hessian = layer
    rtn = quantize_weight_rtn(weight, bits, "channel" if group_size is None else group_size, symmetric=False)
    rtn_error = _output_error(x, weight, dequantize_weight(rtn))
    plain, _ = gptq_quantize(weight, hessian, bits, group_size)
    ordered, info = gptq_quantize(weight, hessian, bits, group_size, act_order=True, static_groups=True)
    assert info["g_idx"] is None  # static groups keep the original group layout
    ratio = _output_error(x, weight, dequantize_weight(plain)) / rtn_error
    ratio_act_order = _output_error(x, weight, dequantize_weight(ordered)) / rtn_error
    assert ratio < max_ratio
    assert ratio_act_order < max_ratio_act_order
    assert ratio_act_order <= ratio * 1.01  # act-order improves by 1-5% here; never worse by more than 1%


@pytest.mark.parametrize(
    "bits, group_size, symmetric, act_order, static_groups",
    [
        (4, 128, False, False, False),
        (3, None, True, False, False),
        (4, 64, False, True, True),
        (8, None, True, True, False),  # per-channel: act-order needs no g_idx
    ],
)
def test_codes_reproduce_the_weight_gptq_optimized(layer, bits, group_size, symmetric, act_order, static_groups):
    _, weight, hessian = layer
    quantized, info = gptq_quantize(weight, hessian, bits, group_size, symmetric, act_order, static_groups)
    rtn = quantize_weight_rtn(weight, bits, "channel" if group_size is None else group_size, symmetric)
    assert quantized.fmt == rtn.fmt and quantized.group_size == rtn.group_size
    assert quantized.codes.dtype == rtn.codes.dtype and quantized.codes.shape == weight.shape
    assert quantized.scale.shape == rtn.scale.shape and quantized.scale.dtype == rtn.scale.dtype
    assert quantized.zero_point.shape == rtn.zero_point.shape and quantized.zero_point.dtype == torch.int32
    codes = quantized.codes.int()
    assert quantized.fmt.qmin <= codes.min() and codes.max() <= quantized.fmt.qmax
    assert info["g_idx"] is None and info["fallback"] is None and info["damp_percent"] == 0.01
    block = (1, quantized.group_size)
    dequantized = dequantize_affine(quantized.codes, block, quantized.scale, quantized.zero_point)
    # the loop's own objective, sum of squared scaled errors, is the objective of these codes
    assert quantization_error(weight, _damped(hessian, info), dequantized) == pytest.approx(info["loss"], rel=1e-4)
    requantized = quantize_affine(dequantized, block, quantized.scale, quantized.zero_point, quantized.fmt)
    assert torch.equal(requantized, quantized.codes)


def test_act_order_without_static_groups_returns_g_idx(layer):
    x, weight, hessian = layer
    quantized, info = gptq_quantize(weight, hessian, 4, 32, act_order=True)
    g_idx = info["g_idx"]
    assert g_idx.shape == (K,) and torch.equal(torch.bincount(g_idx), torch.full((K // 32,), 32))
    assert not torch.equal(g_idx, torch.arange(K) // 32)  # groups follow the processing order
    dequantized = dequantize_weight(quantized, g_idx)
    assert quantization_error(weight, _damped(hessian, info), dequantized) == pytest.approx(info["loss"], rel=1e-4)
    wrong = dequantize_weight(quantized)  # ignoring g_idx decodes with the wrong groups' scales
    rtn_error = _output_error(x, weight, dequantize_weight(quantize_weight_rtn(weight, 4, 32, False)))
    assert _output_error(x, weight, dequantized) / rtn_error < 0.6  # 0.4904
    assert _output_error(x, weight, wrong) / rtn_error > 2.0  # 4.196


@pytest.mark.parametrize("bits, symmetric", [(3, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("group_size", [128, None])
def test_diagonal_hessian_is_exactly_rtn(layer, bits, symmetric, group_size):
    # uncorrelated inputs: no error to push onto other columns, so GPTQ must round to nearest
    _, weight, _ = layer
    hessian = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(1)) + 0.1)
    quantized, _ = gptq_quantize(weight, hessian, bits, group_size, symmetric)
    rtn = quantize_weight_rtn(weight, bits, "channel" if group_size is None else group_size, symmetric)
    assert torch.equal(quantized.codes, rtn.codes)
    assert torch.equal(quantized.scale, rtn.scale) and torch.equal(quantized.zero_point, rtn.zero_point)


def test_8bit_symmetric_per_channel_gives_signed_codes_like_rtn(layer):
    x, weight, hessian = layer
    quantized, _ = gptq_quantize(weight, hessian, 8, None, symmetric=True)
    rtn = quantize_weight_rtn(weight, 8, "channel", symmetric=True)
    # -128 is reachable (measured min -128, max 127): error feedback can push a weight past the row's
    # original amax, which RTN maps to 127; -128 is a valid int8 code and quantize_affine clamps there too
    assert quantized.codes.dtype == torch.int8 and quantized.codes.min() < 0
    assert quantized.scale.shape == (N, 1) and torch.equal(quantized.scale, rtn.scale)  # from the un-updated W
    assert not quantized.zero_point.any() and quantized.group_size == K
    ratio = _output_error(x, weight, dequantize_weight(quantized)) / _output_error(x, weight, dequantize_weight(rtn))
    assert ratio < 0.6  # 0.4907


def test_block_size_changes_speed_only(layer):
    _, weight, hessian = layer
    for group_size, kwargs in [(32, {}), (None, {"act_order": True, "static_groups": True})]:
        big, _ = gptq_quantize(weight, hessian, 4, group_size, block_size=128, **kwargs)
        small, _ = gptq_quantize(weight, hessian, 4, group_size, block_size=7, **kwargs)
        assert (big.codes != small.codes).sum().item() <= N * K // 1000  # 0 and 0: only round-off differs


def test_hessians_that_are_not_positive_definite(layer):
    _, weight, hessian = layer
    few_rows, _ = accumulate_hessian(None, torch.randn(8, K, generator=torch.Generator().manual_seed(2)), 0)
    assert torch.linalg.cholesky_ex(few_rows.double())[1] != 0  # rank 8 of 256
    quantized, info = gptq_quantize(weight, few_rows, 4, 128)
    assert info["damp_percent"] == 0.01 and info["fallback"] is None  # 1% damping already makes it definite
    _, info = gptq_quantize(weight, few_rows, 4, 128, damp_percent=0.0)
    assert info["damp_percent"] == 0.01 and info["damp"] > 0  # escalated from 0

    eigenvalues, eigenvectors = torch.linalg.eigh(hessian.double())
    lowest = eigenvectors[:, 0]
    indefinite = hessian.double() - 1.5 * hessian.diagonal().mean() * torch.outer(lowest, lowest)
    assert torch.linalg.eigvalsh(indefinite).min() < -7.0  # -7.62 against a mean diagonal of 5.08
    quantized, info = gptq_quantize(weight, indefinite.float(), 4, 128)
    assert info["damp_percent"] == pytest.approx(10.0) and info["fallback"] is None  # 0.01 -> 0.1 -> 1 -> 10
    assert 0 <= quantized.codes.min() and quantized.codes.max() <= 15
    assert torch.isfinite(dequantize_weight(quantized)).all() and torch.isfinite(torch.tensor(info["loss"]))

    garbage = torch.eye(K) + 1e9 * (torch.eye(K).roll(1, 0) + torch.eye(K).roll(-1, 0))  # beyond any damping
    quantized, info = gptq_quantize(weight, garbage, 4, 128)
    assert info["fallback"] == "diagonal" and info["damp_percent"] == pytest.approx(1e5)
    assert torch.equal(quantized.codes, quantize_weight_rtn(weight, 4, 128, False).codes)


def test_dead_columns_and_a_layer_with_no_calibration_rows(layer):
    x, weight, _ = layer
    x = x.clone()
    x[:, [3, 100]] = 0.0  # two inputs that are always zero
    hessian, _ = accumulate_hessian(None, x, 0)
    quantized, info = gptq_quantize(weight, hessian, 4, 128)
    assert info["dead_columns"] == 2
    dequantized = dequantize_weight(quantized)
    assert not dequantized[:, [3, 100]].any() and dequantized[:, 4].abs().mean() > 0.5  # 0.81

    quantized, info = gptq_quantize(weight, torch.zeros(K, K), 4, 128)  # e.g. an MoE expert no token reached
    assert info["fallback"] == "rtn" and info["dead_columns"] == K
    assert torch.equal(quantized.codes, quantize_weight_rtn(weight, 4, 128, False).codes)  # rounded, not zeroed


def test_bad_inputs_raise_one_line_errors(layer):
    _, weight, hessian = layer
    with pytest.raises(BitsmithError, match="group size must be positive, got 0") as error:
        gptq_quantize(weight, hessian, 4, 0)
    assert "\n" not in str(error.value)
    nan_weight = weight.clone()
    nan_weight[5, 7] = float("nan")
    with pytest.raises(BitsmithError, match="weight holds NaN"):
        gptq_quantize(nan_weight, hessian, 4, 128)
    with pytest.raises(BitsmithError, match="does not match"):
        gptq_quantize(weight, hessian[:128, :128], 4, 128)
    with pytest.raises(BitsmithError, match="NaN or infinite"):
        gptq_quantize(weight, hessian * float("inf"), 4, 128)
