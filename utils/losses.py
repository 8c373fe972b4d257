"""Consistency-distillation losses: L2 and pseudo-Huber, each reduced to a scalar mean, and the distance
the TLCM recipes pick by --loss_type (these two or latent LPIPS)."""

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


def latent_distance(loss_type: str, huber_c: float, device: torch.device | str, lpips_path: str | None = None,
                    in_channels: int = 4, augmentations: int = 0, to_latents=None):
    """d(a, b, gen=None) on latents: L2, pseudo-Huber, or (ensembled) latent LPIPS of `to_latents(a)`, `to_latents(b)`
    (e.g. unpacking FLUX's packed tokens; default: the tensors as they are)."""
    if loss_type != "lpips":
        return lambda a, b, gen=None: consistency_loss(a, b, loss_type, huber_c)
    from .latent_lpips import EnsembledLatentLPIPS, LatentLPIPS

    net = LatentLPIPS.from_pretrained(lpips_path, in_channels=in_channels, flag="--latent_lpips_path")
    net = net.to(device).requires_grad_(False)
    metric = EnsembledLatentLPIPS(net, augmentations) if augmentations > 0 else net
    to_latents = to_latents or (lambda x: x)

    def d(a: Tensor, b: Tensor, gen: torch.Generator | None = None) -> Tensor:
        a, b = to_latents(a.float()), to_latents(b.float())
        if augmentations > 0:  # the augmentations draw on the CPU
            return metric(a, b, generator=gen if gen is not None and gen.device.type == "cpu" else None).mean()
        return metric(a, b).mean()
    return d
