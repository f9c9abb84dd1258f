"""KDLoss: Hinton et al.'s distillation loss, temperature-scaled KL plus the hard-label loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.ops import kd_kl_div


class KDLoss(nn.Module):
    """``alpha * kd_kl_div(student, teacher, T) + (1 - alpha) * cross_entropy(student, target)``.

    With ``target=None`` only the distillation term is used (alpha is taken as 1). The
    teacher logits get no gradient.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if not (temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None):
        kd = kd_kl_div(student_logits, teacher_logits.detach(), self.temperature, "batchmean")
        if target is None or self.alpha == 1.0:
            return kd
        ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), target.reshape(-1))
        return self.alpha * kd + (1.0 - self.alpha) * ce

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
