"""Exponential moving average of parameters (the LCM target network)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

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


class EMAParams:
    """An EMA shadow of some parameters (e.g. only the LoRA's), checkpointable, swappable into the model."""

    def __init__(self, params: Iterable[Tensor], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    def update(self) -> None:
        """shadow <- decay shadow + (1 - decay) params."""
        ema_update(self.shadow, self.params, self.decay)

    @contextmanager
    def swapped(self):
        """Inside the block the model computes with the EMA weights; the trained weights come back after.

        Copies in place, so use it before the step's student forward (autograd saves the weights).
        """
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.shadow], "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
