"""Distillation losses; each is zero when the student matches the teacher.

Soft targets follow Hinton, Vinyals and Dean (2015): KL divergence between the
temperature-softened distributions, scaled by T^2 so that its gradients keep the same
magnitude as the hard-label loss's whatever the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2, averaged over the batch."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits.float(), labels)


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, over the positions where ``mask`` (``[batch, seq]``) is 1."""
    err = (student.float() - teacher.float()) ** 2
    if mask is None or err.dim() < 3:
        return err.mean()
    m = mask.to(err.dtype).unsqueeze(-1)
    return (err * m).sum() / (m.sum() * err.shape[-1]).clamp(min=1.0)


def cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - cosine similarity along the feature dimension (the last one; the channels of a
    ``[batch, channels, height, width]`` feature map), averaged over (unmasked) positions."""
    dim = 1 if student.dim() == 4 else -1
    dist = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=dim)
    if mask is None or dist.dim() < 2:
        return dist.mean()
    m = mask.to(dist.dtype)
    return (dist * m).sum() / m.sum().clamp(min=1.0)
