"""The QAT primitives: straight-through rounding, LSQ's step-size gradient, and fake quantization that equals
round-to-nearest at the starting ranges."""

import torch

from bitsmith.algorithms.distill import distill_loss, loss_kind
from bitsmith.algorithms.qat import codes_of, fake_quantize_groups, fake_quantize_per_token, lsq_factor, round_ste
from bitsmith.algorithms.rtn import quantize_weight_rtn
from bitsmith.formats.affine import dequantize_affine
from bitsmith.nn import kernels


def test_round_ste_rounds_forward_and_passes_gradients_through():
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 2.0, -2.0]
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_fake_quantize_equals_round_to_nearest_at_its_ranges():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    qweight = quantize_weight_rtn(w, 4, 16, symmetric=False)
    rtn = dequantize_affine(qweight.codes, (1, 16), qweight.scale, qweight.zero_point)
    fake = fake_quantize_groups(w, qweight.scale, qweight.zero_point.float(), 0, 15, 16)
    assert torch.allclose(fake, rtn, atol=1e-6)
    assert torch.equal(codes_of(w, qweight.scale, qweight.zero_point.float(), 0, 15, 16), qweight.codes.int())


def test_lsq_scale_gradient_is_the_papers():
    # d x_hat / d s = round(x/s) - x/s inside the range, qmin or qmax outside (zero point 0)
    x = torch.tensor([[0.26, -0.74, 5.0, -9.0]])
    s = torch.tensor([[0.5]], requires_grad=True)
    fake_quantize_groups(x, s, torch.zeros(1, 1), -4, 3, 4).sum().backward()
    v = x / 0.5
    inside = (torch.round(v) - v)[0, :2].sum()
    assert torch.isclose(s.grad[0, 0], inside + 3 + (-4), atol=1e-6)
    assert abs(lsq_factor(128, 7) - 1 / (128 * 7) ** 0.5) < 1e-12


def test_per_token_fake_quantization_is_the_dynamic_kernels():
    torch.manual_seed(1)
    x = torch.randn(5, 32) * 3
    codes, scale = kernels.quantize_per_token(x)
    expected = (codes.float() - 128) * scale
    assert torch.allclose(fake_quantize_per_token(x), expected, atol=1e-6)


def test_distillation_losses():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    assert distill_loss(teacher.clone(), teacher, "kl").item() < 1e-7
    assert distill_loss(torch.zeros(1, 3), teacher, "kl").item() > 0.3
    assert distill_loss(teacher * 3, teacher, "cosine").abs().item() < 1e-6
    assert loss_kind(teacher, "auto") == "kl" and loss_kind({"last_hidden_state": teacher}, "auto") == "cosine"
    assert loss_kind({"logits": teacher}, "auto") == "kl" and loss_kind(teacher, "mse") == "mse"
