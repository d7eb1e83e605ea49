"""Attention-map distillation: self-attention distributions rebuilt from query and key projections.

MiniLM (Wang et al., 2020) trains a student's last attention layer to reproduce the
teacher's self-attention distributions, ``softmax(Q K^T / sqrt(d))`` per head, and its
value relations, ``softmax(V V^T / sqrt(d))``, each by KL(teacher || student). The models
here run attention with SDPA, which never materialises those probabilities, so they are
rebuilt from the outputs of the attention module's query, key and value projections
(captured by forward hooks on its ``query``/``key``/``value`` Linear children, the layout
of every BERT-family encoder). The result is the same whatever attention kernel runs.

MiniLM compares heads one to one, so both layers need the same head count. MiniLMv2
(Wang et al., 2021) lifts that: the heads of each side are concatenated (the projection's
output already is that concatenation) and split again into ``relation_heads`` heads of
equal count, which any two widths divisible by it allow.

Padding is left out: padded keys get probability zero and padded query rows do not count
in the average, so the loss does not depend on what the padding positions hold.
"""

from __future__ import annotations

import torch
from torch import nn

# Attention modules expose their head count under one of these names (BERT and its
# relatives; torch's MultiheadAttention; DistilBERT).
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads")


def head_count(module: nn.Module) -> int | None:
    """The number of attention heads ``module`` declares, or None if it declares none."""
    for name in HEAD_COUNT_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[batch, seq, heads * d]`` -> ``[batch, heads, seq, d]``."""
    batch, seq, width = x.shape
    if width % heads:
        raise ValueError(f"a width of {width} does not split into {heads} heads")
    return x.reshape(batch, seq, heads, width // heads).transpose(1, 2)


def relation_log_probs(left: torch.Tensor, right: torch.Tensor, heads: int,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log softmax(left_h right_h^T / sqrt(d_h))`` per head, ``[batch, heads, seq, seq]``.

    Args:
        left: ``[batch, seq, width]``, e.g. a query projection's output.
        right: ``[batch, seq, width]``, e.g. the key projection's output.
        heads: split ``width`` into this many heads of ``d_h = width / heads``.
        mask: ``[batch, seq]``, 1 for real tokens; padded keys get probability zero.
    """
    # float32 even under bf16 autocast: the KL of two nearly equal distributions is a
    # small difference of large numbers.
    with torch.autocast(left.device.type, enabled=False):
        q, k = split_heads(left.float(), heads), split_heads(right.float(), heads)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:
            # A finite fill, not -inf: both sides' log-probabilities at padded keys are
            # then equal and finite, and their KL terms exactly zero, never inf - inf.
            scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.log_softmax(-1)


def relation_kl(student_log: torch.Tensor, teacher_log: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of each query row, averaged over heads and real query positions.

    Args:
        student_log: ``[batch, heads, seq, seq]`` log-probabilities over keys.
        teacher_log: the same for the teacher.
        mask: ``[batch, seq]``, 1 for real tokens.
    """
    kl = teacher_log.exp() * (teacher_log - student_log)
    if mask is None:
        return kl.sum(-1).mean()
    m = mask.bool()
    rows = torch.where(m[:, None, None, :], kl, 0.0).sum(-1)  # [batch, heads, seq]
    rows = rows * m[:, None, :].to(rows.dtype)
    return rows.sum() / (m.sum() * rows.shape[1]).clamp(min=1)


def attention_kl(student_query: torch.Tensor, student_key: torch.Tensor, teacher_query: torch.Tensor,
                 teacher_key: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM's self-attention distribution loss for one pair of layers.

    Args:
        student_query: the student's query projection output, ``[batch, seq, width_s]``.
        student_key: the student's key projection output.
        teacher_query: the teacher's query projection output, ``[batch, seq, width_t]``.
        teacher_key: the teacher's key projection output.
        heads: heads to compare on both sides: the layers' own (equal) head count, or
            a number of relation heads dividing both widths.
        mask: ``[batch, seq]``, 1 for real tokens.

    Returns:
        KL(teacher || student) summed over keys and averaged over heads and real query
        positions; zero when the distributions agree.
    """
    student = relation_log_probs(student_query, student_key, heads, mask)
    teacher = relation_log_probs(teacher_query, teacher_key, heads, mask)
    return relation_kl(student, teacher, mask)


def value_relation_kl(student_value: torch.Tensor, teacher_value: torch.Tensor, heads: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM's value-relation loss: :func:`attention_kl` of ``softmax(V V^T / sqrt(d))``."""
    return attention_kl(student_value, student_value, teacher_value, teacher_value, heads, mask)
