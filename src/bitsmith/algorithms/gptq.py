"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time and push each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs, so that the layer's output ``X W^T`` moves as little as possible.

Pure tensor functions; collecting a layer's inputs (hooks, devices, offloading) lives elsewhere.

    function             |  takes                          |  gives
      accumulate_hessian |  H (K, K) or None, x (..., K)   |  H = 2/n * sum x x^T, row count n
      gptq_quantize      |  W (N, K), H (K, K)             |  QuantizedWeight (RTN's layout), info
      dequantize_weight  |  QuantizedWeight, g_idx or None |  float32 weight (N, K)
      quantization_error |  W, H, W_hat                    |  trace((W - W_hat) H (W - W_hat)^T)
"""

from __future__ import annotations

import torch

from bitsmith.algorithms.rtn import QuantizedWeight, quantize_weight_rtn, weight_format
from bitsmith.errors import BitsmithError
from bitsmith.formats.affine import IntFormat, block_size_for, choose_qparams_affine, dequantize_affine

__all__ = ["accumulate_hessian", "gptq_quantize", "dequantize_weight", "quantization_error"]

_DAMP_STEPS = 8  # x10 each: the default 1% of mean(diag H) escalates to at most 1e5 x mean(diag H)


def accumulate_hessian(
    hessian: torch.Tensor | None, inputs: torch.Tensor, count: int
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running ``H = 2/n * sum_rows x x^T``; returns (H, n).

    ``inputs`` (..., K) is read as (-1, K): every token row counts once (for equal-length sequences
    this is the same mean as GPTQ's per-sequence count). ``count`` is the number of rows already in
    ``hessian`` (0 with ``hessian=None``). The old mean is re-weighted by ``count / (count + rows)`` rather than
    summing raw outer products, so the entries stay O(x^2) however many batches come in.

    H is float32 (or the dtype of the ``hessian`` passed in), as in GPTQ: half the memory of float64
    (a 14336-wide layer's H is 0.8 GB), and float32 rounding (~1e-7 relative) sits far below the
    1% damping GPTQ adds later; ``gptq_quantize`` factorizes in float64 anyway. The input tensor is
    not modified.
    """
    width = inputs.shape[-1]
    dtype = torch.float32 if hessian is None else hessian.dtype
    device = inputs.device if hessian is None else hessian.device
    x = inputs.detach().reshape(-1, width).to(device=device, dtype=dtype)  # (rows, K)
    if hessian is None:
        hessian = torch.zeros(width, width, dtype=dtype, device=device)
    if tuple(hessian.shape) != (width, width):
        raise BitsmithError(f"Hessian of shape {list(hessian.shape)} does not match inputs {width} wide")
    if x.shape[0] == 0:
        return hessian, count
    total = count + x.shape[0]
    # (count/total) * H_old + (2/total) * x^T x, in one call
    return torch.addmm(hessian, x.T, x, beta=count / total, alpha=2.0 / total), total


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,  # None: one scale per output channel
    symmetric: bool = False,
    act_order: bool = False,  # quantize columns by decreasing H_ii (most-used inputs first)
    static_groups: bool = False,  # group scales from the un-updated weight, before any column moves
    damp_percent: float = 0.01,  # added to diag(H), as a fraction of mean(diag(H))
    block_size: int = 128,  # columns per lazy batch update; speed only, not the result
    clip: str = "minmax",  # range of the up-front (static) groups: "minmax" or "mse" (see choose_qparams_affine)
    keep: torch.Tensor | None = None,  # (N, K) bool: False where a weight is pruned and must stay exactly 0
) -> tuple[QuantizedWeight, dict]:
    """Quantize ``weight`` (N, K) against ``hessian`` (K, K) from ``accumulate_hessian``.

    The result uses ``quantize_weight_rtn``'s layout: codes (N, K) in the original column order, in
    ``weight_format(bits, symmetric)`` (unsigned with a zero point, or signed int8 for 8-bit
    symmetric); scale and zero_point (N, ceil(K / group_size)), group g holding the contiguous input
    columns [g * group_size, (g + 1) * group_size) (the last group shorter where group_size does not divide K).

    Act-order: with ``static_groups=True`` every group's scale is fixed up front from its original
    columns, so the layout above holds and the runtime modules can take it. Without it, each group is
    the next ``group_size`` columns *in processing order*, and ``info["g_idx"]`` (K,) gives the group
    of each original column: dequantize with ``dequantize_weight(q, info["g_idx"])``. bitsmith's
    runtime modules do not read a g_idx, so use ``static_groups=True`` for act-order there.

    info: "damp_percent" and "damp" (the damping actually added, after any escalation when
    ``H + damp I`` was not positive definite), "loss" (the GPTQ objective of the result against the
    damped Hessian, = ``quantization_error(W, H + damp I, W_hat)`` with dead columns of W zeroed),
    "dead_columns" (inputs that were always 0, whose weights GPTQ sets to 0), "g_idx" (or None when
    column c is in group c // group_size), "fallback" (None, "rtn" when H is all zero: the layer saw
    no calibration rows, so it is rounded rather than zeroed; "diagonal" when even the largest
    damping failed, which quantizes with no error feedback).

    ``keep`` is SparseGPT's joint sparsify-then-quantize form for an already pruned weight: a pruned weight
    gets the zero point's code (exactly 0 after dequantization) and its whole value becomes error, spread
    over the later columns like a rounding error, so the kept weights compensate and the mask survives.
    """
    fmt = weight_format(bits, symmetric)
    group = _check_inputs(weight, hessian, group_size, damp_percent, block_size)
    w = weight.detach().to(torch.float32).clone()  # (N, K)
    h = hessian.detach().to(device=w.device, dtype=torch.float64)  # (K, K)
    h = h.clone() if h.data_ptr() == hessian.data_ptr() else h  # a copy of our own, changed in place
    dead = torch.diagonal(h) == 0
    if dead.all():
        rtn = quantize_weight_rtn(weight, bits, "channel" if group_size is None else group_size, symmetric)
        info = {"damp_percent": 0.0, "damp": 0.0, "loss": float("nan"), "dead_columns": weight.shape[1]}
        return rtn, {**info, "g_idx": None, "fallback": "rtn"}
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(w.shape[1])
    order = order.to(w.device)
    # the factor depends on the column order: factorize H permuted into processing order
    h = h.index_select(0, order).index_select(1, order)
    upper, damp_rel, damp, fallback = _inverse_hessian_factor(h, damp_percent)
    del h  # (K, K) float64: 254 MB for a 5632-wide layer; peak memory matters block by block

    fixed_groups = group_size is None or static_groups
    n_groups = -(-w.shape[1] // group)  # a last, shorter group where group does not divide K
    if fixed_groups:  # original column layout: column c uses group c // group
        scale, zero = choose_qparams_affine(w, (1, group), fmt, symmetric=symmetric, clip=clip)  # (N, n_groups)
        group_of = order // group  # group of each column, in processing order
    else:  # group j // group collects processed columns j, in processing order
        scale = w.new_zeros(w.shape[0], n_groups)
        zero = torch.zeros(w.shape[0], n_groups, dtype=torch.int32, device=w.device)
        group_of = torch.arange(w.shape[1], device=w.device) // group
    # a group must not straddle two lazy blocks, so its columns are up to date when its scale is chosen
    step = block_size if fixed_groups else group * max(1, block_size // group)
    upper = upper.to(torch.float32)  # the float64 factor is dropped before the column loop
    if keep is not None and tuple(keep.shape) != tuple(w.shape):
        raise BitsmithError(f"keep mask of shape {list(keep.shape)} does not match the weight {list(w.shape)}")
    codes, loss = _quantize_columns(
        w[:, order], upper, scale, zero, group_of, fmt, symmetric, group, not fixed_groups, step,
        None if keep is None else keep.to(w.device)[:, order],
    )
    original = torch.empty_like(codes)
    original[:, order] = codes  # back to the original column order
    g_idx = None
    if act_order and not fixed_groups:
        g_idx = torch.empty_like(order)
        g_idx[order] = group_of
    info = {"damp_percent": damp_rel, "damp": damp, "loss": loss, "dead_columns": int(dead.sum())}
    info.update(g_idx=g_idx, fallback=fallback)
    return QuantizedWeight(original.to(fmt.storage_dtype), scale, zero, fmt, group), info


def dequantize_weight(quantized: QuantizedWeight, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 weight (N, K) from codes; ``g_idx`` (K,) maps each column to its group (act-order)."""
    if g_idx is None:
        block = (1, quantized.group_size)
        return dequantize_affine(quantized.codes, block, quantized.scale, quantized.zero_point)
    # same arithmetic as dequantize_affine, with the group of each column looked up
    return (quantized.codes.to(torch.float32) - quantized.zero_point[:, g_idx]) * quantized.scale[:, g_idx]


def quantization_error(weight: torch.Tensor, hessian: torch.Tensor, dequantized: torch.Tensor) -> float:
    """``trace((W - W_hat) H (W - W_hat)^T)``, in float64: with H = 2/n X^T X this is
    2/n * ||X W^T - X W_hat^T||^2, the output error GPTQ minimises."""
    delta = weight.detach().to(torch.float64) - dequantized.detach().to(torch.float64)  # (N, K)
    return float(((delta @ hessian.detach().to(torch.float64)) * delta).sum())


def _check_inputs(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int | None, damp_percent: float, block_size: int
) -> int:
    """Validate the arguments; return the group size (K for per-channel)."""
    if weight.dim() != 2:
        raise BitsmithError(f"GPTQ quantizes a 2-D weight (out, in), got shape {list(weight.shape)}")
    width = weight.shape[1]
    if tuple(hessian.shape) != (width, width):
        raise BitsmithError(f"Hessian of shape {list(hessian.shape)} does not match a weight {width} inputs wide")
    if not torch.isfinite(weight).all():
        raise BitsmithError("weight holds NaN or infinite values; cannot run GPTQ on it")
    if not torch.isfinite(hessian).all():
        raise BitsmithError("Hessian holds NaN or infinite values (calibration inputs overflowed?); collect it again")
    if damp_percent < 0 or block_size <= 0:
        raise BitsmithError(f"damp_percent must be >= 0 and block_size > 0, got {damp_percent} and {block_size}")
    return block_size_for(tuple(weight.shape), "channel" if group_size is None else group_size)[-1]


def _inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float, float, str | None]:
    """Upper Cholesky factor U of (H + damp I)^-1 = U^T U in float64, the relative and absolute
    damping used, and the fallback taken (None or "diagonal").

    A Hessian that is not positive definite (fewer calibration rows than inputs, float32 round-off
    giving a slightly negative eigenvalue, a hand-made H) gets 10x the damping until the
    factorization succeeds with finite values.
    """
    diag_mean = float(torch.diagonal(h).abs().mean())
    damp_rel = damp_percent
    for step in range(_DAMP_STEPS):
        if step:
            damp_rel = damp_rel * 10 if damp_rel > 0 else 0.01
        damp = damp_rel * diag_mean
        # with J the order reversal and J H J = L L^T, H^-1 = U^T U for U = J L^-1 J (upper): one
        # Cholesky and one triangular inverse, 8x faster on CPU than cholesky_inverse + a second Cholesky.
        # (K, K) temporaries are made one at a time and dropped early: three live at most.
        damped = h.flip(0, 1)
        damped.diagonal().add_(damp)  # the reversal maps the diagonal onto itself
        lower, status = torch.linalg.cholesky_ex(damped)
        del damped
        if int(status) == 0 and torch.isfinite(lower).all():
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            upper = torch.linalg.solve_triangular(lower, eye, upper=False)
            del lower, eye
            upper = upper.flip(0, 1)
            if torch.isfinite(upper).all():
                return upper, damp_rel, damp, None
        del lower
    # no damping in reach made it positive definite: keep only the diagonal, i.e. round each column
    # with no error feedback (RTN with GPTQ's group scales) rather than fail
    return torch.diag((torch.diagonal(h).abs() + damp).rsqrt()), damp_rel, damp, "diagonal"


def _quantize_columns(
    w: torch.Tensor,
    upper: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_of: torch.Tensor,
    fmt: IntFormat,
    symmetric: bool,
    group: int,
    choose_groups: bool,
    step: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """GPTQ's column loop on ``w`` (N, K) float32, columns already in processing order.

    ``upper`` (K, K) float32 is the Cholesky factor of the inverse Hessian in the same order.
    Quantizes column j with group ``group_of[j]``'s parameters (chosen here, from the updated columns,
    when ``choose_groups``; ``scale``/``zero`` are filled in place), spreads the scaled error
    ``e_j = (w_j - q_j) / U_jj`` over the later columns of the block at once and over the remaining
    columns once per block of ``step`` columns. Returns float codes (N, K) and sum(e^2).
    """
    # work on W^T (K, N): a column of W is a contiguous row, and the rank-1 update is an in-place
    # addr_ (12x faster on CPU than the strided update of W's columns with a temporary)
    rows = w.T.contiguous()  # (K, N)
    keep_rows = None if keep is None else keep.T.contiguous()  # (K, N), as rows
    codes = torch.empty_like(rows)
    loss = 0.0
    width = rows.shape[0]
    group_list = group_of.tolist()  # python ints: no device sync per column on a GPU
    for start in range(0, width, step):
        stop = min(start + step, width)
        block = rows[start:stop].clone()  # (B, N), kept up to date column by column
        errors = torch.zeros_like(block)  # (B, N) scaled errors e_j
        u_block = upper[start:stop, start:stop]
        for i in range(stop - start):
            j = start + i
            g = group_list[j]
            if choose_groups and j % group == 0:  # first column of a group; the whole group is in this block
                s, z = choose_qparams_affine(block[i : i + group].T, (1, group), fmt, symmetric=symmetric)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            column, s, z = block[i], scale[:, g], zero[:, g]
            q = (torch.round(column / s) + z).clamp(fmt.qmin, fmt.qmax)  # as quantize_affine
            if keep_rows is not None:
                q = torch.where(keep_rows[j], q, z.to(q.dtype))  # a pruned weight: the code of exactly 0
            codes[j] = q
            errors[i] = (column - (q - z) * s) / u_block[i, i]  # (N,)
            block[i:].addr_(u_block[i, i:], errors[i], alpha=-1.0)  # (B - i, N)
        loss += float((errors.double() ** 2).sum())
        rows[stop:].addmm_(upper[start:stop, stop:].T, errors, alpha=-1.0)  # (K - stop, N)
    return codes.T, loss
