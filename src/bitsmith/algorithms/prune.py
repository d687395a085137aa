"""Pruning: which weights of a layer to set to zero, and (SparseGPT) how to correct the others.

Pure tensor functions; collecting inputs and choosing layers lives in stages/prune.py.

    function          | takes                                | gives
      keep_mask       | scores (N, K), sparsity, N:M, per_row | bool mask (N, K), True = kept
      wanda_scores    | W (N, K), H (K, K) or diag(H) (K,)    | |W_ij| * ||x_j||  (Sun et al., 2023)
      sparsegpt_prune | W (N, K), H (K, K), sparsity, N:M     | pruned W (OBS update, Frantar & Alistarh, 2023), info

Magnitude pruning is ``keep_mask(W.abs(), ...)``. Sparsity is the fraction of weights set to zero; an N:M
pattern keeps N of every M consecutive inputs of each row (2:4: 50%), the layout sparse tensor cores and
compressed-tensors' ``sparse-24-bitmask`` expect.
"""

from __future__ import annotations

import torch

from bitsmith.algorithms.gptq import _inverse_hessian_factor
from bitsmith.errors import BitsmithError

__all__ = ["keep_mask", "wanda_scores", "sparsegpt_prune", "sparsity_of"]


def _check_nm(width: int, nm: tuple[int, int] | None) -> None:
    if nm is not None and width % nm[1]:
        raise BitsmithError(f"an {nm[0]}:{nm[1]} pattern needs the inputs in whole groups of {nm[1]}; this layer has"
                            f" {width}")


def keep_mask(scores: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
              per_row: bool = False) -> torch.Tensor:
    """True where a weight is kept: the highest ``scores``, in the whole layer (``per_row=False``), in each
    output row (Wanda's comparison group), or ``nm[0]`` of every ``nm[1]`` consecutive inputs of a row."""
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        _check_nm(cols, nm)
        grouped = scores.reshape(rows, cols // m, m)  # (N, K / M, M)
        kept = grouped.topk(n, dim=-1).indices
        return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, kept, True).reshape(rows, cols)
    if per_row:
        drop = int(cols * sparsity)
        order = scores.argsort(dim=1)[:, :drop]  # the lowest of each row
        return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)
    drop = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[scores.flatten().argsort()[:drop]] = False  # argsort, not a threshold: ties cannot overshoot
    return mask.reshape(rows, cols)


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """|W_ij| times the L2 norm of input j over the calibration rows; ``hessian`` is ``accumulate_hessian``'s
    H = 2/n X^T X (its diagonal is all that is used, and may be passed alone)."""
    diag = torch.diagonal(hessian) if hessian.dim() == 2 else hessian
    return weight.detach().abs().float() * diag.float().clamp(min=0).sqrt()[None, :]  # a common factor of sqrt(2/n)


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, block_size: int = 128,
                    damp_percent: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Prune ``weight`` (N, K) to ``sparsity`` (or the N:M pattern) and update the kept weights so the layer's
    output on the calibration inputs moves as little as possible (H from ``accumulate_hessian``).

    Columns are processed left to right in blocks of ``block_size``; in each block the weights with the
    smallest w^2 / [H^-1]_jj^2 are pruned (adaptive mask selection, over the whole block for unstructured
    sparsity, per group of M for N:M), and each pruned column's error is pushed onto the later columns through
    the inverse Hessian's Cholesky factor, as GPTQ does for rounding. Returns (float32 weight, info) with
    info "damp" (relative damping used), "fallback" (None, "magnitude" when H is all zero, "diagonal" when no
    damping made H positive definite) and "sparsity" (the fraction of zeros in the result)."""
    if not 0.0 <= sparsity < 1.0:
        raise BitsmithError(f"sparsity must be in [0, 1), got {sparsity}")
    w = weight.detach().to(torch.float32).clone()  # (N, K)
    rows, cols = w.shape
    _check_nm(cols, nm)
    h = hessian.detach().to(torch.float64).clone()  # (K, K)
    dead = torch.diagonal(h) == 0
    if dead.all():  # never saw a calibration row: magnitude pruning, as nothing better is known
        pruned = w * keep_mask(w.abs(), sparsity, nm)
        return pruned, {"damp": 0.0, "fallback": "magnitude", "sparsity": sparsity_of(pruned)}
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    upper, damp_rel, _, fallback = _inverse_hessian_factor(h, damp_percent)
    del h
    upper = upper.to(torch.float32)  # (K, K) upper factor of H^-1
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()  # (N, B)
        u = upper[start:end, start:end]  # (B, B)
        errors = torch.zeros_like(block)
        d = torch.diagonal(u)  # (B,)
        if nm is None:
            keep = keep_mask(block.pow(2) / d.pow(2)[None, :], sparsity)  # (N, B), adaptive per block
        else:
            keep = torch.ones_like(block, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                span = slice(i, i + nm[1])
                keep[:, span] = keep_mask(block[:, span].pow(2) / d[span].pow(2)[None, :], nm=nm)
            column = block[:, i]
            pruned = torch.where(keep[:, i], column, torch.zeros_like(column))
            error = (column - pruned) / d[i]  # (N,)
            block[:, i:] -= error[:, None] * u[i, i:][None, :]
            block[:, i] = pruned  # exactly zero where pruned (the update above leaves round-off)
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ upper[start:end, end:]
    return w, {"damp": damp_rel, "fallback": fallback, "sparsity": sparsity_of(w)}
