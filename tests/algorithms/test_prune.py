import pytest
import torch

from bitsmith import BitsmithError
from bitsmith.algorithms.gptq import accumulate_hessian
from bitsmith.algorithms.prune import keep_mask, sparsegpt_prune, sparsity_of, wanda_scores


def _correlated_inputs(rows=512, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width ** 0.5
    x = torch.randn(rows, width, generator=g) @ mix + 0.1 * torch.randn(rows, width, generator=g)
    x[:, :4] *= 20  # outlier input channels, as in trained transformers
    return x


def _output_error(x, weight, pruned):
    return ((x @ (weight - pruned).T).norm() / (x @ weight.T).norm()).item()


def test_keep_mask_hits_the_sparsity_and_the_pattern_exactly():
    scores = torch.rand(16, 64)
    assert sparsity_of(scores * keep_mask(scores, 0.5)) == 0.5
    assert sparsity_of(scores * keep_mask(scores, 0.3)) == pytest.approx(0.3, abs=1 / 1024)
    per_row = keep_mask(scores, 0.75, per_row=True)
    assert (per_row.sum(dim=1) == 16).all()  # every row keeps a quarter
    nm = keep_mask(scores, nm=(2, 4))
    assert (nm.reshape(16, 16, 4).sum(dim=-1) == 2).all()
    top = scores.reshape(16, 16, 4).topk(2, dim=-1).values.min(dim=-1).values
    kept_min = torch.where(nm, scores, torch.inf).reshape(16, 16, 4).min(dim=-1).values
    assert torch.equal(top, kept_min)  # the two largest of each group of four are the ones kept
    with pytest.raises(BitsmithError, match="whole groups of 4; this layer has 30"):
        keep_mask(torch.rand(4, 30), nm=(2, 4))


def test_wanda_keeps_weights_on_large_inputs():
    weight = torch.ones(4, 8)
    diag = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 0.01])
    keep = keep_mask(wanda_scores(weight, diag), 0.5, per_row=True)
    assert keep[:, 0].all() and not keep[:, 7].any()


def test_sparsegpt_beats_magnitude_and_wanda_on_the_layer_output():
    torch.manual_seed(1)
    x = _correlated_inputs()
    weight = torch.randn(48, 64)
    hessian, _ = accumulate_hessian(None, x, 0)
    errors = {}
    for nm, sparsity in ((None, 0.5), ((2, 4), 0.5)):
        magnitude = weight * keep_mask(weight.abs(), sparsity, nm)
        wanda = weight * keep_mask(wanda_scores(weight, hessian), sparsity, nm, per_row=nm is None)
        pruned, info = sparsegpt_prune(weight, hessian, sparsity, nm, block_size=16)
        assert info["fallback"] is None and sparsity_of(pruned) == pytest.approx(0.5, abs=1e-3)
        if nm is not None:
            assert ((pruned != 0).reshape(48, 16, 4).sum(dim=-1) <= 2).all()
        errors[nm] = [_output_error(x, weight, p) for p in (magnitude, wanda, pruned)]
        assert errors[nm][2] < 0.6 * errors[nm][0] and errors[nm][1] < errors[nm][0], errors
    # measured: unstructured magnitude 0.266, wanda 0.060, sparsegpt 0.046; 2:4 0.346 / 0.345 / 0.199


def test_sparsegpt_without_data_falls_back_to_magnitude_and_checks_input():
    weight = torch.randn(8, 16)
    pruned, info = sparsegpt_prune(weight, torch.zeros(16, 16), 0.5)
    assert info["fallback"] == "magnitude" and torch.equal(pruned, weight * keep_mask(weight.abs(), 0.5))
    with pytest.raises(BitsmithError, match=r"sparsity must be in \[0, 1\)"):
        sparsegpt_prune(weight, torch.eye(16), 1.0)
