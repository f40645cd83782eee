"""Distillation losses of the paper.

KD (eq. 1) distils the whole oracle into the library's student. Conditional KD
(eqs. 3-5) distils only the part of the oracle's knowledge about a primitive task H_i:
the oracle's logits restricted to the classes of H_i (its *sub-logits*) are the target,
on all training images, so the expert also learns how unsure the oracle is on images
outside H_i and keeps the oracle's logit scale, which is what lets experts of different
tasks be compared by their raw logits after consolidation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 4.0
ALPHA = 0.3


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row of logits (Sun et al., CVPR 2024, "Logit Standardization in KD"):
    the student matches the teacher's ranking and relative gaps, not its logit range,
    which a small student cannot reach."""
    logits = logits.float()
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-7)


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = TEMPERATURE, standardized: bool = False,
) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (eq. 1); with
    `standardized`, on z-scored logits (only for the library: experts must keep the
    oracle's logit scale, which is what L_scale is for)."""
    if standardized:
        student, teacher = standardize(student), standardize(teacher)
    log_p_student = F.log_softmax(student.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def soft_loss(expert: torch.Tensor, sub_logits: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """L_soft (eq. 3): KD towards the oracle's sub-logits of the expert's task."""
    return kd_loss(expert, sub_logits, temperature)


def scale_loss(expert: torch.Tensor, sub_logits: torch.Tensor) -> torch.Tensor:
    """L_scale (eq. 4): mean absolute difference between the expert's logits and the
    oracle's sub-logits, over batch and classes (the scale alpha = 0.3 was tuned for)."""
    return F.l1_loss(expert.float(), sub_logits.float())


def ckd_loss(
    expert: torch.Tensor, sub_logits: torch.Tensor,
    temperature: float = TEMPERATURE, alpha: float = ALPHA,
) -> torch.Tensor:
    """L_CKD = L_soft + alpha * L_scale (eq. 5). alpha = 0 gives L_soft only; the
    ablation 'L_scale only' is `scale_loss` on its own."""
    loss = soft_loss(expert, sub_logits, temperature)
    if alpha:
        loss = loss + alpha * scale_loss(expert, sub_logits)
    return loss
