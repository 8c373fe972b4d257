"""Latent LPIPS: a learned perceptual distance between VAE latents, and its ensembled variant.

    from utils.latent_lpips import LatentLPIPS, EnsembledLatentLPIPS
    net = LatentLPIPS.from_pretrained("toy_world/latent_lpips/sd", in_channels=4)
    loss_fn = EnsembledLatentLPIPS(net, num_augmentations=4)
    loss = loss_fn(student_latents, target_latents).mean()      # one distance per batch item

**Inputs are latents as the diffusion model sees them**: `(z - shift_factor) * scaling_factor` of
the VAE's `latent_dist` (SD/SDXL have no shift; FLUX has one), i.e. roughly zero-mean, unit
variance. `vae_latents(vae, images)` computes them. The network was trained on exactly that scale
and is NOT invariant to it: raw unscaled latents give wrong distances.

The network (`LatentLPIPS`) is LPIPS (Zhang et al. 2018) moved into latent space as Kang et al.
2024 did for their latent LPIPS: a VGG-style stack of 3x3 conv + ReLU stages whose first conv
takes the VAE's latent channels (4 for SD/SDXL, 16 for FLUX) and whose early max-pools are gone
(latents are already 8x downsampled). For each stage output: unit-normalise the features along
channels, take the squared difference, weight the channels with a non-negative 1x1 linear head,
average over space; sum over stages. So d(x, x) = 0, d(x, y) = d(y, x) >= 0, and d is
differentiable in both inputs. Widths, convs per stage and where to pool are a config dict;
the defaults are small (for the toy world's 8x8 latents). A net of VGG16's shape for 64x64+
latents is e.g. `LatentLPIPS(channels=(64, 128, 256, 512, 512), convs=(2, 2, 3, 3, 3),
pool=(False, False, True, True, True))`.

`EnsembledLatentLPIPS` is the "ensembled" variant (E-LatentLPIPS of Kang et al. 2024): it applies
the SAME random augmentation to both inputs (flips, integer translations with reflect or circular
padding, per-channel gain/offset, cutout) and averages the distance over several draws, so a
generator cannot exploit one fixed network's blind spots when the distance is a training loss.

How the committed toy nets were trained (synthetic 2AFC judgments against a trusted pixel-space
distance of the toy world) is in utils/toy/latent_lpips_train.py.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DEFAULT_CONFIG = dict(in_channels=4, channels=(32, 32, 32), convs=(1, 1, 1), pool=(False, False, False))
CHANNEL_HINT = "4 for SD/SDXL VAEs, 16 for FLUX"


# ============================================================================ the network


class LatentLPIPS(nn.Module):
    """LPIPS on VAE latents: (B, C, H, W) x (B, C, H, W) -> (B,) distances (see the module docstring).

    Config: `in_channels` (the VAE's latent channels), per stage `channels` (width), `convs` (3x3
    conv + ReLU layers) and `pool` (a 2x2 max-pool before the stage). Latents are scaled as the
    diffusion model sees them (after the VAE's shift_factor/scaling_factor).
    """

    def __init__(self, in_channels: int = 4, channels: Sequence[int] = DEFAULT_CONFIG["channels"],
                 convs: Sequence[int] = DEFAULT_CONFIG["convs"], pool: Sequence[bool] = DEFAULT_CONFIG["pool"],
                 eps: float = 1e-10) -> None:
        super().__init__()
        channels, convs, pool = [int(c) for c in channels], [int(n) for n in convs], [bool(p) for p in pool]
        if not (len(channels) == len(convs) == len(pool)) or not channels:
            raise ValueError(f"channels, convs and pool need one entry per stage: {channels}, {convs}, {pool}")
        if int(in_channels) < 1 or min(channels) < 1 or min(convs) < 1:
            raise ValueError(f"bad LatentLPIPS config: in_channels={in_channels}, channels={channels}, convs={convs}")
        self.config: dict[str, Any] = dict(in_channels=int(in_channels), channels=channels, convs=convs, pool=pool)
        self.eps = eps
        self.metadata: dict[str, Any] = {}  # free-form, saved under "_metadata" in config.json
        stages, cin = [], int(in_channels)
        for width, n, down in zip(channels, convs, pool):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if down else []
            for _ in range(n):
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        for head in self.heads:
            nn.init.constant_(head.weight, 1.0 / head.in_channels)

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    def check_input(self, x: Tensor, name: str = "input") -> None:
        """UserError (one line) unless x is a (B, in_channels, H, W) latent batch."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise UserError(f"latent LPIPS {name} has shape {tuple(x.shape)}, expected (B, {self.in_channels}, H, W)"
                            f" latents ({CHANNEL_HINT})")

    def features(self, x: Tensor) -> list[Tensor]:
        """Each stage's output (after its last ReLU)."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def head_weights(self) -> list[Tensor]:
        """The non-negative channel weights of each stage's 1x1 head, (C_l,) each."""
        return [head.weight.clamp(min=0).flatten() for head in self.heads]

    @torch.no_grad()
    def clamp_heads_(self) -> None:
        """Project the heads back onto weights >= 0 (call after each optimizer step, as LPIPS does)."""
        for head in self.heads:
            head.weight.clamp_(min=0)

    def _normalise(self, f: Tensor) -> Tensor:
        # the norm in float32: eps underflows in fp16, and an all-zero ReLU column must give 0, not NaN
        return f * torch.rsqrt(f.float().pow(2).sum(1, keepdim=True) + self.eps).to(f.dtype)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        self.check_input(x0, "first input")
        self.check_input(x1, "second input")
        if x0.shape != x1.shape:
            raise UserError(f"latent LPIPS inputs differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        feats = [f.chunk(2) for f in self.normalised_features(torch.cat([x0, x1]))]
        return self.compare([f0 for f0, _ in feats], [f1 for _, f1 in feats])

    def compare(self, feats0: list[Tensor], feats1: list[Tensor]) -> Tensor:
        """(B,) distance between two lists of channel-normalised stage features."""
        total = 0
        for f0, f1, w in zip(feats0, feats1, self.head_weights()):
            total = total + ((f0 - f1).pow(2) * w[None, :, None, None]).sum(1).mean((1, 2))
        return total

    def normalised_features(self, x: Tensor) -> list[Tensor]:
        """Each stage's features, unit-normalised along channels (what `compare` takes)."""
        return [self._normalise(f) for f in self.features(x.to(next(self.parameters()).dtype))]

    # ------------------------------------------------------------------ files

    def save_pretrained(self, folder: str, dtype: torch.dtype | None = None) -> None:
        """Write `config.json` + `model.safetensors` (in `dtype`, default the current one) to folder."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        config = {"_class_name": type(self).__name__, **self.config,
                  "input": "VAE latents scaled as the diffusion model sees them: (z - shift_factor) * scaling_factor"}
        if self.metadata:
            config["_metadata"] = self.metadata
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, folder: str, in_channels: int | None = None, torch_dtype: torch.dtype = torch.float32,
                        flag: str | None = None) -> LatentLPIPS:
        """Load a folder written by save_pretrained. UserError (one line) for a missing or broken folder,
        or when `in_channels` is given and the net was made for another latent channel count."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        where = f" ({flag})" if flag else ""
        if not os.path.isdir(folder):
            raise UserError(f"latent LPIPS folder {folder} does not exist{where}")
        config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise UserError(f"{folder} is not a latent LPIPS folder (no {os.path.basename(path)}){where}")
        try:
            with open(config_path) as f:
                config = json.load(f)
            kwargs = {k: config[k] for k in ("in_channels", "channels", "convs", "pool") if k in config}
            net = cls(**kwargs)
        except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
            raise UserError(f"{config_path}: not a valid latent LPIPS config{where}: {exc}") from exc
        if in_channels is not None and net.in_channels != int(in_channels):
            raise UserError(f"latent LPIPS {folder} takes {net.in_channels}-channel latents but the VAE has"
                            f" {in_channels} ({CHANNEL_HINT}){where}")
        try:
            state = load_file(weights_path)
            net.load_state_dict({k: v.float() for k, v in state.items()})
        except (SafetensorError, RuntimeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{weights_path}: weights do not match the config{where}: {first}") from exc
        net.metadata = dict(config.get("_metadata", {}))
        return net.to(torch_dtype).eval()


# ============================================================================ the ensembled variant


def shift_indices(n: int, shift: Tensor, mode: str) -> Tensor:
    """(N, n) source indices of an integer translation by `shift` (N,): output i reads input i - shift.

    mode: "circular" (wrap around), "reflect" (mirror at the border, |shift| < n) or "replicate".
    """
    i = torch.arange(n, device=shift.device)[None, :] - shift[:, None]
    if mode == "circular":
        return i.remainder(n)
    if mode == "replicate":
        return i.clamp(0, n - 1)
    if mode == "reflect":
        i = i.abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)
    raise ValueError(f"unknown padding mode {mode!r}: use 'reflect', 'circular' or 'replicate'")


def translate(x: Tensor, dy: Tensor, dx: Tensor, mode: str = "reflect") -> Tensor:
    """Shift each x[i] (N, ..., H, W) by integers (dy[i], dx[i]) pixels; differentiable in x."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    lead = (1,) * (x.dim() - 3)
    iy = shift_indices(h, dy.to(x.device), mode).view(n, *lead, h, 1).expand(x.shape)
    x = x.gather(-2, iy)
    ix = shift_indices(w, dx.to(x.device), mode).view(n, *lead, 1, w).expand(x.shape)
    return x.gather(-1, ix)


class EnsembledLatentLPIPS(nn.Module):
    """E-LatentLPIPS: the mean of `net` over `num_augmentations` random augmentations, each applied
    identically to both inputs (per batch item, drawn from `generator`).

    Augmentations (latents scaled to ~N(0, 1), so 0 is the "mean latent"): horizontal (and, with
    vflip=True, vertical) flips; integer translations by up to `max_shift` of the side with
    `padding` "reflect" or "circular"; per-channel gain exp(U(-a, a)) and offset U(-a, a) with
    a = `channel_jitter`; cutout of a square of `cutout` x the side, set to 0. All cost a gather or
    an elementwise op; the K draws run as one batch of size K*B.

    The wrapped net is frozen (no parameters are trained; gradients flow to the inputs). In train
    mode (the default, and what a distillation loss uses) it augments; after `.eval()` it is the
    plain deterministic distance unless `augment_in_eval=True`; `forward(..., augment=...)`
    overrides both.
    """

    def __init__(self, net: LatentLPIPS, num_augmentations: int = 4, hflip: bool = True, vflip: bool = False,
                 max_shift: float = 0.125, padding: str = "reflect", channel_jitter: float = 0.1,
                 cutout: float = 0.25, augment_in_eval: bool = False) -> None:
        super().__init__()
        if num_augmentations < 1:
            raise ValueError(f"num_augmentations must be >= 1, got {num_augmentations}")
        if padding not in ("reflect", "circular"):
            raise ValueError(f"padding must be 'reflect' or 'circular', got {padding!r}")
        self.net = net.requires_grad_(False).eval()
        self.num_augmentations = int(num_augmentations)
        self.hflip, self.vflip, self.max_shift, self.padding = hflip, vflip, max_shift, padding
        self.channel_jitter, self.cutout, self.augment_in_eval = channel_jitter, cutout, augment_in_eval

    def train(self, mode: bool = True) -> EnsembledLatentLPIPS:
        super().train(mode)
        self.net.eval()  # the wrapped net never trains
        return self

    def augment(self, pair: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random augmentation per row of pair (N, 2, C, H, W), the same for both members."""
        n, _, c, h, w = pair.shape
        dev = pair.device
        gen_dev = generator.device if generator is not None else torch.device("cpu")  # a CUDA generator works too

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=gen_dev).to(dev)

        def bcast(t: Tensor) -> Tensor:
            return t.view(n, 1, 1, 1, 1)

        if self.hflip:
            pair = torch.where(bcast(rand(n) < 0.5), pair.flip(-1), pair)
        if self.vflip:
            pair = torch.where(bcast(rand(n) < 0.5), pair.flip(-2), pair)
        my, mx = min(round(self.max_shift * h), h - 1), min(round(self.max_shift * w), w - 1)
        if my or mx:
            dy = torch.randint(-my, my + 1, (n,), generator=generator, device=gen_dev)
            dx = torch.randint(-mx, mx + 1, (n,), generator=generator, device=gen_dev)
            pair = translate(pair, dy, dx, self.padding)
        if self.channel_jitter:
            a = self.channel_jitter
            gain = torch.exp((rand(n, 1, c, 1, 1) * 2 - 1) * a)
            pair = pair * gain.to(pair.dtype) + ((rand(n, 1, c, 1, 1) * 2 - 1) * a).to(pair.dtype)
        if self.cutout:
            sy, sx = max(1, round(self.cutout * h)), max(1, round(self.cutout * w))
            y0 = (rand(n) * (h - sy + 1)).floor().view(n, 1, 1)
            x0 = (rand(n) * (w - sx + 1)).floor().view(n, 1, 1)
            ys = torch.arange(h, device=dev).view(1, h, 1)
            xs = torch.arange(w, device=dev).view(1, 1, w)
            hole = (ys >= y0) & (ys < y0 + sy) & (xs >= x0) & (xs < x0 + sx)
            pair = pair * (~hole).view(n, 1, 1, h, w).to(pair.dtype)
        return pair

    def forward(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None,
                augment: bool | None = None) -> Tensor:
        """(B,) distances: the mean over num_augmentations draws (augmented) or net(x0, x1) (not)."""
        if augment is None:
            augment = self.training or self.augment_in_eval
        if not augment:
            return self.net(x0, x1)
        self.net.check_input(x0, "first input")
        self.net.check_input(x1, "second input")
        if x0.shape != x1.shape:
            raise UserError(f"latent LPIPS inputs differ in shape: {tuple(x0.shape)} vs {tuple(x1.shape)}")
        k, b = self.num_augmentations, x0.shape[0]
        pair = torch.stack([x0, x1], 1).repeat(k, 1, 1, 1, 1)  # (K*B, 2, C, H, W), draw-major
        pair = self.augment(pair, generator)
        return self.net(pair[:, 0], pair[:, 1]).view(k, b).mean(0)


# ============================================================================ VAE latents


def vae_latents(vae: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """(posterior mean - shift_factor) * scaling_factor of images in [-1, 1]: the latent LPIPS input scale."""
    shift = vae.config.get("shift_factor") or 0.0
    out = [(vae.encode(chunk).latent_dist.mode() - shift) * vae.config.scaling_factor
           for chunk in images.split(batch_size)]
    return torch.cat(out)
