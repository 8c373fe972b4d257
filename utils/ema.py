"""Exponential moving average of parameters (the LCM target network)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .sharding import is_sharded, owner, part_copy, settle, whole_values, write_part, write_whole


def _params(x: Iterable[Tensor] | nn.Module) -> list[Tensor]:
    """The parameters of a module, or the tensors of an iterable, as a list."""
    return list(x.parameters()) if isinstance(x, nn.Module) else list(x)


@torch.no_grad()
def ema_update(target: Iterable[Tensor] | nn.Module, source: Iterable[Tensor] | nn.Module, decay: float) -> None:
    """In place, no grad: theta_ema <- decay theta_ema + (1 - decay) theta.

    The target is whole; a source sharded across processes (FSDP2, ZeRO-3) is read whole (sharding.whole_values).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    tgt, src = _params(target), _params(source)
    if len(tgt) != len(src):
        raise ValueError(f"EMA target has {len(tgt)} tensors, source has {len(src)}")
    for t, shard in zip(tgt, src):  # before any collective, so that every process raises alike
        shape = getattr(shard, "ds_shape", shard.shape)  # a ZeRO-3 part is empty; its whole shape is ds_shape
        if t.shape != shape:
            raise ValueError(f"EMA shape mismatch: target {tuple(t.shape)} vs source {tuple(shape)}")
    for t, s in zip(tgt, whole_values(src)):
        t.mul_(decay).add_(s.to(device=t.device, dtype=t.dtype), alpha=1.0 - decay)


class EMAParams:
    """An EMA shadow of some parameters (e.g. only the LoRA's), checkpointable, swappable into the model.

    The shadow is whole on every process, also when the parameters are sharded (FSDP2, ZeRO-3): then
    building, updating and swapping are collectives, called by every process. Swapping into sharded
    parameters needs `model`, the module holding them: FSDP2 computes with gathered copies it keeps on
    the model between forwards (the root module's), so a swap writes what the model holds at that moment.
    """

    def __init__(self, params: Iterable[Tensor], decay: float, model: nn.Module | None = None) -> None:
        self.decay = decay
        self.model = model
        self.reset(params)

    def reset(self, params: Iterable[Tensor] | None = None) -> None:
        """shadow <- params (a new start, e.g. of a training stage); `params` replaces the followed parameters
        (FSDP2 puts new, sharded, objects in a prepared model: give them while the model holds them)."""
        if params is not None:
            self.params = list(params)
            names = {}
            if self.model is not None:
                settle(self.model)  # the names of the kept (sharded) parameters, not of gathered copies
                names = {id(p): name for name, p in self.model.named_parameters()}
            self.names = [names.get(id(p)) for p in self.params]
        self.shadow = [full.clone() for full in whole_values(self.params)]

    def update(self) -> None:
        """shadow <- decay shadow + (1 - decay) params."""
        ema_update(self.shadow, self.params, self.decay)

    def _held(self) -> list[Tensor]:
        """The tensors the model computes with now: the parameters, or FSDP2's gathered copies of them."""
        if self.model is None:
            if any(is_sharded(p) for p in self.params):
                raise ValueError("swapping EMA weights into sharded parameters needs EMAParams(..., model)")
            return self.params
        return [getattr(*owner(self.model, name)) if name else p for p, name in zip(self.params, self.names)]

    @contextmanager
    def swapped(self):
        """Inside the block the model computes with the EMA weights; the trained weights come back after.

        Copies in place, so use it before the step's student forward (autograd saves the weights).
        """
        held, saved = self._held(), []
        for p, s in zip(held, self.shadow):
            saved.append(part_copy(p))  # an FSDP2 shard's own part: nothing to gather for the way back
            write_whole(p, s)
        try:
            yield
        finally:
            for p, s in zip(held, saved):
                write_part(p, s)

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.shadow], "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
