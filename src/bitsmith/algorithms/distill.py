"""Knowledge distillation losses: the student's output against the float teacher's on the same inputs.

    loss    | for                                    | value
    kl      | logits (language models, classifiers)  | KL(softmax(t / T) || softmax(s / T)) * T^2, mean over positions
    cosine  | hidden states, embeddings              | 1 - cos(s, t) along the last dimension, mean
    mse     | anything                               | mean squared difference
    text    | language models, no teacher            | cross-entropy of each next token of the batch's text

``auto`` reads the output: a ``logits`` field or a plain tensor (a classifier's) takes ``kl``; a
``last_hidden_state`` (an encoder's) takes ``cosine``, on the mean over each sequence's real tokens (the
sentence embedding, as sentence-transformers pools it) when the batch has an attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["output_tensor", "loss_kind", "distill_loss", "mean_pool", "text_loss"]


def output_tensor(output) -> torch.Tensor:
    """The tensor a model's output is judged by: logits, else the last hidden state, else the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, dict) else output
    return next(v for v in values if isinstance(v, torch.Tensor))


def loss_kind(output, asked: str) -> str:
    if asked != "auto":
        return asked
    if isinstance(output, torch.Tensor):
        return "kl"
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    return "kl" if isinstance(logits, torch.Tensor) else "cosine"


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Scalar loss of ``student`` against ``teacher`` (same shape, classes or features last)."""
    student, teacher = student.float(), teacher.detach().float()
    if kind == "kl":
        log_p = F.log_softmax(student / temperature, dim=-1).reshape(-1, student.shape[-1])  # (positions, classes)
        log_q = F.log_softmax(teacher / temperature, dim=-1).reshape(-1, teacher.shape[-1])
        return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states averaged over the tokens ``mask`` (B, T) keeps: (B, H)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def text_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each next token (B, T-1 predictions from (B, T, V) logits), padding left out."""
    predicted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = input_ids[:, 1:].reshape(-1)
    if attention_mask is not None:
        keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).reshape(-1).bool()
        predicted, target = predicted[keep], target[keep]
    return F.cross_entropy(predicted, target)
