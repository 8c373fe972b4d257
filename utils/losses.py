"""Consistency-distillation losses: L2 and pseudo-Huber, each reduced to a scalar mean."""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_TYPES = ("l2", "huber")


def _upcast(x: Tensor) -> Tensor:
    """x in float32 if it is a half-precision tensor (fp16/bf16), else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def l2_loss(pred: Tensor, target: Tensor) -> Tensor:
    """mean((a - b)^2)."""
    return torch.mean((_upcast(pred) - _upcast(target)) ** 2)


def pseudo_huber_loss(pred: Tensor, target: Tensor, c: float = 0.001) -> Tensor:
    """mean(sqrt((a - b)^2 + c^2) - c), evaluated as (a - b)^2 / (sqrt((a - b)^2 + c^2) + c) for stability."""
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    sq = (_upcast(pred) - _upcast(target)) ** 2
    return torch.mean(sq / (torch.sqrt(sq + c**2) + c))


def consistency_loss(pred: Tensor, target: Tensor, loss_type: str = "l2", huber_c: float = 0.001) -> Tensor:
    """loss_type "l2" -> mean((a - b)^2); "huber" -> mean(sqrt((a - b)^2 + c^2) - c) with c = huber_c."""
    if loss_type == "l2":
        return l2_loss(pred, target)
    if loss_type == "huber":
        return pseudo_huber_loss(pred, target, huber_c)
    raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
