"""The losses, each reduced to a scalar mean: the consistency distances (L2, pseudo-Huber, and the distance the TLCM
recipes pick by --loss_type: these two or latent LPIPS), and the losses of TLCM's extras (reward hinge, DMD, GAN).

DMD (docs/tlcm.md, the extras): a fake score model (a second LoRA on the same denoiser) learns the student's
samples with the ordinary diffusion (flow-matching) loss; the student's gradient at its sample x is the difference
of the fake and the real (teacher) x0 predictions at a re-noised copy of x, applied through a surrogate loss whose
gradient in x is exactly that direction. The per-sample normalisation by mean|x - real x0| is DMD's (Yin et al.
2024); its use here is our choice. GAN: non-saturating logistic losses on a small head's logits (ours).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def hinge_reward_loss(score_pos: Tensor, score_neg: Tensor, s0: float) -> Tensor:
    """mean(max(s0 - s(x0, c), 0) + max(s(x0, c_neg), 0)) (the TLCM reward extra, docs/tlcm.md)."""
    return (torch.relu(s0 - score_pos) + torch.relu(score_neg)).mean()


def dmd_grad(x: Tensor, real_x0: Tensor, fake_x0: Tensor, eps: float = 1e-6) -> Tensor:
    """g = (fake_x0 - real_x0) / mean_per_sample|x - real_x0| (DMD's direction with its normalisation)."""
    scale = (x - real_x0).abs().flatten(1).mean(1).clamp_min(eps)
    return (fake_x0 - real_x0) / scale.view(-1, *[1] * (x.ndim - 1))


def dmd_surrogate(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 mean((x - stopgrad(x - g))^2): a loss whose gradient in x is g / x.numel()."""
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad.detach().float()))


def flow_matching_loss(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """mean((v_pred - (noise - x0))^2): the ordinary flow-matching loss of a model at (1 - s) x0 + s noise."""
    return F.mse_loss(v_pred.float(), (noise - x0).float())


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """mean(softplus(-D(real))) + mean(softplus(D(fake))): the non-saturating logistic loss of D."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """mean(softplus(-D(fake))): the non-saturating generator loss."""
    return F.softplus(-fake_logits.float()).mean()
