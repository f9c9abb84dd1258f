"""KDLoss: Hinton et al.'s distillation loss, temperature-scaled KL plus the hard-label loss."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.ops import kd_kl_div


class KDLoss(nn.Module):
    """``alpha * kd_kl_div(student, teacher, T) + (1 - alpha) * cross_entropy(student, target)``.

    ``kd_kl_div`` is the fused ``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` with
    "batchmean" reduction: the mean over rows, i.e. over all leading dims (``[B, L, C]``
    logits average over ``B * L`` rows), where ``F.kl_div``'s "batchmean" divides by ``B``
    only. With ``target=None`` only the distillation term is used (alpha is taken as 1).
    Rows whose target equals ``ignore_index`` (padding) count in neither term; both terms
    are means over the rows that count, and a mean over zero rows is 0: when every target
    is ``ignore_index`` the loss is 0 with a zero gradient (``F.cross_entropy`` alone
    would give NaN). The teacher logits are detached: they get no gradient.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, ignore_index: int = -100):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.ignore_index = int(ignore_index)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None):
        teacher_logits = teacher_logits.detach()
        if target is None or self.alpha == 1.0:
            return kd_kl_div(student_logits, teacher_logits, self.temperature, "batchmean",
                             target=target, ignore_index=self.ignore_index)
        flat_target = target.reshape(-1)
        # Sum over the rows that count, divided by their number (at least 1): F.cross_entropy's
        # "mean", except that zero valid targets give 0 instead of 0/0 = NaN.
        valid = (flat_target != self.ignore_index).sum().clamp_min(1)
        ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), flat_target,
                             ignore_index=self.ignore_index, reduction="sum") / valid
        if self.alpha == 0.0:
            return ce
        kd = kd_kl_div(student_logits, teacher_logits, self.temperature, "batchmean",
                       target=target, ignore_index=self.ignore_index)
        return self.alpha * kd + (1.0 - self.alpha) * ce

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
