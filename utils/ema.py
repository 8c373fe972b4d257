"""Exponential moving average of parameters (the LCM target network)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def _params(x: Iterable[Tensor] | nn.Module) -> list[Tensor]:
    """The parameters of a module, or the tensors of an iterable, as a list."""
    return list(x.parameters()) if isinstance(x, nn.Module) else list(x)


@torch.no_grad()
def ema_update(target: Iterable[Tensor] | nn.Module, source: Iterable[Tensor] | nn.Module, decay: float) -> None:
    """In place, no grad: theta_ema <- decay theta_ema + (1 - decay) theta."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    tgt, src = _params(target), _params(source)
    if len(tgt) != len(src):
        raise ValueError(f"EMA target has {len(tgt)} tensors, source has {len(src)}")
    for t, s in zip(tgt, src):
        if t.shape != s.shape:
            raise ValueError(f"EMA shape mismatch: target {tuple(t.shape)} vs source {tuple(s.shape)}")
        t.mul_(decay).add_(s.to(device=t.device, dtype=t.dtype), alpha=1.0 - decay)
