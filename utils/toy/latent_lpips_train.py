"""Training a latent LPIPS (utils/latent_lpips.py) in the toy world, from synthetic 2AFC judgments.

The committed toy nets: `python -m utils.toy.train latent_lpips_sd` / `latent_lpips_flux`, about 4
minutes each on one CPU thread. For any VAE and imagefolder:

    python -m utils.toy.latent_lpips_train train --vae toy_world/models/sd --data toy_world/data/train \\
        --val_data toy_world/data/test --judge toy_world/judge --out out/latent_lpips_sd [--steps 2000]
    python -m utils.toy.latent_lpips_train eval --net toy_world/latent_lpips/sd --vae toy_world/models/sd \\
        --data toy_world/data/test --judge toy_world/judge

`--vae` takes a pipeline folder (its vae/) or a VAE folder; `--data` an imagefolder. Both print the
held-out 2AFC agreement of the net, of latent L2 and of pixel MSE between the decodes.

How the synthetic 2AFC judgments are made (`make_judgments`):
  1. Take a real image x and make K = 6 distorted copies. Each copy gets, independently, either
     1-2 pixel-space distortions (70%) or one latent-space distortion (30%), each of a random
     strength in [0, 1]. Pixel distortions: Gaussian noise, Gaussian blur, a translation,
     per-channel colour gain/offset, a hue rotation, JPEG-like 4x4 block quantisation with
     posterisation, a fade to grey, and shape edits: erasing a square to the background colour,
     painting a square of a random colour, zooming (the shape grows or shrinks). Latent
     distortions (what a few-step student's errors look like: off-manifold latents): latent noise,
     latent blur, shrinking towards the mean latent.
  2. Encode x and the copies with the VAE (posterior mean, on the scale `vae_latents` gives): these latents are all
     the network ever sees. Decode them: the decoded images are what the latents actually depict,
     so every judgment can in principle be made from the latents alone (pixel noise a 4-channel
     latent cannot hold does not count).
  3. Any two copies (x0, x1) of one reference make a triplet (15 per reference). The "human" says
     which copy is closer to the reference by the reference distance r on the decoded images
     (`ReferenceDistance`: judge term + SSIM term), as a soft vote P(x1 closer) =
     sigmoid((r0 - r1) / (0.1 (r0 + r1))): near ties are split as a panel of graders would split
     them (BAPPS, LPIPS's data set, stores the fraction of graders too).
  The network is trained on latents only with the LPIPS 2AFC ranking loss: a small net G on
  (d0, d1, d0 - d1, d0 / d1, d1 / d0) predicts the vote, with binary cross-entropy; heads are
  clamped to >= 0 after every step. Held-out agreement is measured on other images and fresh
  distortions, and also on "matched" triplets whose two copies are within 1.5x of each other in
  pixel MSE, where the kind of distortion decides rather than its amount.

Why the reference distance is a justified proxy for human perception IN THE TOY WORLD. A viewer
of this world cares about what captions and prompts name: shape, colour, size, background; then
where the shape is and how clean the image looks. The toy judge (utils/toy/judge.py) is this
world's ImageNet classifier: trained to read shape and colour, with blur, noise, contrast and
shift augmentation and VAE round trips so that it ignores nuisance. Its unit-normalised
intermediate features compared with uniform weights is the construction that Zhang et al. 2018
found to agree with human 2AFC judgments better than L2, SSIM and the other classic metrics even
without learned weights ("deep features as a perceptual metric"); its early full-resolution
layers also respond to position and background. But a judge trained to ignore nuisance
under-counts the degradations people also see (blur, noise, blockiness, faded contrast), so the
reference adds 1 - SSIM (Wang et al. 2004: local luminance, contrast and structure, the classic
model of what the visual system is sensitive to). The two terms are weighted to count equally
(each divided by its median over the training distortions: REFERENCE_WEIGHTS). What this buys and
what it does not: the latent net learns a distance that ranks like this pixel-space reference
while reading latents only; it can be no better a proxy for human perception than the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError, user_errors
from ..latent_lpips import DEFAULT_CONFIG, EnsembledLatentLPIPS, LatentLPIPS, translate, vae_latents

# ============================================================================ VAE decodes


def vae_decode(vae: Any, latents: Tensor, batch_size: int = 256) -> Tensor:
    """Images in [-1, 1] from latents on the latent LPIPS scale."""
    from ..models import decode_latents

    return torch.cat([decode_latents(vae, chunk) for chunk in latents.split(batch_size)])


# ============================================================================ the reference distance

# Weights of the judge term and the SSIM term: 0.5 / their medians over the training distortions
# (0.035 and 0.117, measured on the toy world's SD VAE decodes: 2000 references x 6 copies), so
# each term counts equally and a typical distortion is at reference distance ~1.
REFERENCE_WEIGHTS = dict(judge=0.5 / 0.035, ssim=0.5 / 0.117)


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    t = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, size: int = 7, sigma: float = 1.5) -> Tensor:
    """(B,) mean SSIM (Wang et al. 2004) of images in [-1, 1], per RGB channel, Gaussian window, no padding."""
    a, b = (a + 1) / 2, (b + 1) / 2
    c = a.shape[1]
    g = gaussian_window(size, sigma, a.dtype).to(a.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean((1, 2, 3))


class ReferenceDistance(nn.Module):
    """The toy world's trusted pixel-space distance: w_j * judge term + w_s * (1 - SSIM).

    Judge term: for the outputs of the toy judge's four conv blocks and its final feature vector,
    the mean over positions of the squared difference of channel-unit-normalised features,
    averaged over the five layers (LPIPS with uniform weights on the judge). Images in [-1, 1].
    """

    def __init__(self, judge: nn.Module, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.judge = judge.requires_grad_(False).eval()
        self.weights = dict(REFERENCE_WEIGHTS if weights is None else weights)

    def judge_features(self, x: Tensor) -> list[Tensor]:
        feats, body = [], self.judge.body
        for i, layer in enumerate(body):
            x = layer(x)
            if i < 4:  # the four conv blocks
                feats.append(x)
        feats.append(x[:, :, None, None])  # the final feature vector, as a 1x1 map
        return feats

    def terms(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(judge term, 1 - SSIM), each (B,), unweighted."""
        fa = self.judge_features(a)
        fb = self.judge_features(b)
        unit = lambda f: f * torch.rsqrt(f.pow(2).sum(1, keepdim=True) + 1e-10)  # noqa: E731
        judge = torch.stack([(unit(x) - unit(y)).pow(2).sum(1).mean((1, 2)) for x, y in zip(fa, fb)]).mean(0)
        return judge, 1 - ssim(a, b)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        judge, structure = self.terms(a, b)
        return self.weights["judge"] * judge + self.weights["ssim"] * structure


# ============================================================================ distortions


def _rect_mask(b: int, h: int, w: int, side: Tensor, gen: torch.Generator) -> Tensor:
    """(B, 1, H, W) masks of one axis-aligned square per item, sides `side` (B,) in pixels, random place."""
    y0 = (torch.rand(b, generator=gen) * (h - side + 1)).floor()
    x0 = (torch.rand(b, generator=gen) * (w - side + 1)).floor()
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    s = side.view(b, 1, 1)
    m = (ys >= y0.view(b, 1, 1)) & (ys < y0.view(b, 1, 1) + s) & (xs >= x0.view(b, 1, 1)) & (xs < x0.view(b, 1, 1) + s)
    return m[:, None].float()


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 4) -> Tensor:
    """Per-item Gaussian blur of x (B, C, H, W) with std `sigma` (B,) pixels, reflect padding."""
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def _noise(x, s, g):
    return x + 0.4 * s * torch.randn(x.shape, generator=g)


def _blur(x, s, g):
    return gaussian_blur(x, 0.3 + 1.7 * s.flatten())


def _shift(x, s, g):
    b = x.shape[0]
    mag = 1 + (5 * s.flatten()).round()
    angle = torch.rand(b, generator=g) * 2 * math.pi
    dy, dx = (mag * torch.sin(angle)).round().long(), (mag * torch.cos(angle)).round().long()
    return translate(x, dy, dx, "replicate")


def _colour(x, s, g):
    b, c = x.shape[:2]
    gain = torch.exp(0.5 * s * (torch.rand(b, c, 1, 1, generator=g) * 2 - 1))
    return x * gain + 0.4 * s * (torch.rand(b, c, 1, 1, generator=g) * 2 - 1)


def _hue(x, s, g):
    perm = [1, 2, 0] if torch.rand(1, generator=g).item() < 0.5 else [2, 0, 1]
    return (1 - s) * x + s * x[:, perm]


def _jpeg(x, s, g):
    block = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")
    y = block + (1 - s) * (x - block)
    levels = 3 + (29 * (1 - s)).round()
    return ((y + 1) / 2 * (levels - 1)).round() / (levels - 1) * 2 - 1


def _fade(x, s, g):
    return x * (1 - 0.8 * s)


def _erase(x, s, g):
    b, _, h, w = x.shape
    m = _rect_mask(b, h, w, (4 + 12 * s.flatten()).round(), g)
    return x * (1 - m) + x[:, :, :1, :1] * m  # the corner pixel is background in this world


def _paint(x, s, g):
    b, c, h, w = x.shape
    m = _rect_mask(b, h, w, (4 + 12 * s.flatten()).round(), g)
    colour = torch.rand(b, c, 1, 1, generator=g) * 2 - 1
    return x * (1 - m) + colour * m


def _zoom(x, s, g):
    b = x.shape[0]
    sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    scale = 1 + 0.35 * s.flatten() * sign  # > 1: the content grows
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


PIXEL_DISTORTIONS = dict(noise=_noise, blur=_blur, shift=_shift, colour=_colour, hue=_hue, jpeg=_jpeg, fade=_fade,
                         erase=_erase, paint=_paint, zoom=_zoom)


def _latent_noise(z, s, g):
    return z + 0.6 * s * torch.randn(z.shape, generator=g)


def _latent_blur(z, s, g):
    return (1 - s) * z + s * F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, 1)


def _latent_shrink(z, s, g):
    return z * (1 - 0.6 * s)


LATENT_DISTORTIONS = dict(latent_noise=_latent_noise, latent_blur=_latent_blur, latent_shrink=_latent_shrink)


def _apply_random(x: Tensor, ops: dict, choice: Tensor, gen: torch.Generator) -> Tensor:
    """x[i] <- ops[choice[i]](x[i], strength U(0, 1)); each op runs once on the items that chose it."""
    out = x.clone()
    strength = torch.rand(x.shape[0], 1, 1, 1, generator=gen)
    for k, op in enumerate(ops.values()):
        idx = (choice == k).nonzero().flatten()
        if len(idx):
            out[idx] = op(x[idx], strength[idx], gen)
    return out


@torch.no_grad()
def distort(vae: Any, images: Tensor, gen: torch.Generator, p_latent: float = 0.3,
            latents: Tensor | None = None) -> Tensor:
    """Scaled latents of randomly distorted copies of images (B, 3, H, W) in [-1, 1] (module docstring);
    `latents`: the images' own latents, if already computed."""
    b = images.shape[0]
    x = images
    for second in (False, True):  # one or two pixel distortions
        choice = torch.randint(len(PIXEL_DISTORTIONS), (b,), generator=gen)
        if second:
            choice[torch.rand(b, generator=gen) < 0.5] = -1  # half of the images get only one
        x = _apply_random(x, PIXEL_DISTORTIONS, choice, gen)
    z_pixel = vae_latents(vae, x.clamp(-1, 1))
    z = vae_latents(vae, images) if latents is None else latents
    z_latent = _apply_random(z, LATENT_DISTORTIONS, torch.randint(len(LATENT_DISTORTIONS), (b,), generator=gen), gen)
    latent = (torch.rand(b, generator=gen) < p_latent).view(b, 1, 1, 1)
    return torch.where(latent, z_latent, z_pixel)


@torch.no_grad()
def make_judgments(vae: Any, reference: ReferenceDistance, images: Tensor, num_references: int, seed: int,
                   candidates: int = 6, batch_size: int = 200, progress: bool = False) -> dict[str, Tensor]:
    """Synthetic 2AFC material (module docstring): for each of `num_references` random images x,
    `candidates` distorted copies. Returns latents `z` (N, C, h, w) and `zk` (N, K, C, h, w), and per
    copy (N, K): the reference distance `r` = r(decode(z), decode(zk)), its judge term `j` and SSIM
    term `s`, and the pixel MSE `m` of the decodes. Any two copies of one reference make a triplet,
    judged by `vote(r[:, a], r[:, b])`: K (K - 1) / 2 triplets per reference for K + 1 decodes."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[Tensor]] = {k: [] for k in ("z", "zk", "r", "j", "s", "m")}
    w = reference.weights
    for start in tqdm(range(0, num_references, batch_size), desc="2AFC judgments", disable=not progress,
                      leave=False):
        n = min(batch_size, num_references - start)
        x = images[torch.randint(len(images), (n,), generator=gen)]
        z = vae_latents(vae, x)
        ref = vae_decode(vae, z)
        zk, rk, jk, sk, mk = [], [], [], [], []
        for _ in range(candidates):
            zc = distort(vae, x, gen, latents=z)
            img = vae_decode(vae, zc)
            j, s = reference.terms(ref, img)
            zk.append(zc)
            jk.append(j)
            sk.append(s)
            rk.append(w["judge"] * j + w["ssim"] * s)
            mk.append((img - ref).pow(2).mean((1, 2, 3)))
        for key, val in dict(z=z, zk=torch.stack(zk, 1), r=torch.stack(rk, 1), j=torch.stack(jk, 1),
                             s=torch.stack(sk, 1), m=torch.stack(mk, 1)).items():
            out[key].append(val)
    return {k: torch.cat(v) for k, v in out.items()}


def triplets(bank: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Every triplet of a judgment bank: (reference index, copy a, copy b) with a < b."""
    n, k = bank["r"].shape
    a, b = torch.triu_indices(k, k, 1)
    ref = torch.arange(n).repeat_interleave(len(a))
    return ref, a.repeat(n), b.repeat(n)


def vote(r0: Tensor, r1: Tensor, temperature: float = 0.1) -> Tensor:
    """Soft 2AFC vote P(x1 is closer than x0) from reference distances: near ties split like a panel's."""
    return torch.sigmoid((r0 - r1) / (temperature * (r0 + r1) + 1e-8))


def agreement(d0: Tensor, d1: Tensor, r0: Tensor, r1: Tensor) -> dict[str, float]:
    """2AFC agreement of distances (d0, d1) with the reference (r0, r1): `hard`, the fraction of
    triplets ranked the same way (ties count half); `score`, BAPPS's 2AFC score against the soft vote."""
    d0, d1, r0, r1 = (t.double().flatten() for t in (d0, d1, r0, r1))
    pred = torch.where(d1 < d0, 1.0, torch.where(d1 > d0, 0.0, 0.5)).double()
    truth = torch.where(r1 < r0, 1.0, torch.where(r1 > r0, 0.0, 0.5)).double()
    p = vote(r0, r1)
    hard = 1 - (pred - truth).abs()
    return dict(hard=hard.mean().item(), score=(pred * p + (1 - pred) * (1 - p)).mean().item())


# ============================================================================ training


class RankNet(nn.Module):
    """LPIPS's 2AFC head: P(x1 closer) from (d0, d1, d0 - d1, d0 / d1, d1 / d0) via a small MLP."""

    def __init__(self, hidden: int = 32, eps: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.mlp = nn.Sequential(nn.Linear(5, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, 1))

    def forward(self, d0: Tensor, d1: Tensor) -> Tensor:
        """Logits of P(x1 is closer)."""
        e = self.eps
        x = torch.stack([d0, d1, d0 - d1, d0 / (d1 + e), d1 / (d0 + e)], -1)
        return self.mlp(x).squeeze(-1)


def latent_l2(z0: Tensor, z1: Tensor) -> Tensor:
    """(B,) mean squared difference of latents: the baseline distance."""
    return (z0 - z1).pow(2).flatten(1).mean(1)


@torch.no_grad()
def evaluate(net: Callable[[Tensor, Tensor], Tensor], bank: dict[str, Tensor], batch_size: int = 500,
             matched_ratio: float = 1.5) -> dict[str, float]:
    """2AFC agreement with the reference, over every triplet of a judgment bank, of net and, for
    comparison, of latent L2 and of pixel MSE between the decodes; also on the "matched" triplets
    whose two copies are within `matched_ratio` of each other in pixel MSE (there the kind of
    distortion decides, not its amount)."""
    n, k = bank["r"].shape
    z = bank["z"][:, None].expand_as(bank["zk"]).flatten(0, 1)
    zk = bank["zk"].flatten(0, 1)
    d_net = torch.cat([net(x, y) for x, y in zip(z.split(batch_size), zk.split(batch_size))]).view(n, k)
    d_l2 = latent_l2(z, zk).view(n, k)
    ref, a, b = triplets(bank)
    r0, r1 = bank["r"][ref, a], bank["r"][ref, b]
    m0, m1 = bank["m"][ref, a], bank["m"][ref, b]
    matched = (m0.clamp_min(1e-12).log() - m1.clamp_min(1e-12).log()).abs() < math.log(matched_ratio)
    report: dict[str, float] = dict(triplets=len(ref), matched_triplets=int(matched.sum()))
    for name, d in dict(net=d_net, l2=d_l2, pixel_mse=bank["m"]).items():
        prefix = "" if name == "net" else name + "_"
        d0, d1 = d[ref, a], d[ref, b]
        report[prefix + "agreement"] = agreement(d0, d1, r0, r1)["hard"]
        report[prefix + "matched_agreement"] = agreement(d0[matched], d1[matched], r0[matched], r1[matched])["hard"]
    return {key: round(v, 4) if isinstance(v, float) else v for key, v in report.items()}


def fit(net: LatentLPIPS, bank: dict[str, Tensor], steps: int = 2000, batch_size: int = 64, lr: float = 1e-2,
        seed: int = 0, progress: bool = True) -> LatentLPIPS:
    """Train net (and a RankNet, discarded) on a judgment bank with the LPIPS 2AFC loss: BCE of the
    RankNet's P(x1 closer) against the soft vote; heads clamped to >= 0 after every step."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    rank = RankNet()
    opt = torch.optim.Adam(list(net.parameters()) + list(rank.parameters()), lr=lr)
    r = bank["r"]
    num_refs, k = r.shape
    bar = tqdm(range(steps), desc="latent LPIPS", disable=not progress)
    for step in bar:
        for group in opt.param_groups:  # linear warm-up, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(num_refs, (batch_size,), generator=gen)  # a reference and two of its copies
        a = torch.randint(k, (batch_size,), generator=gen)
        b = (a + torch.randint(1, k, (batch_size,), generator=gen)) % k
        z, z0, z1 = bank["z"][idx], bank["zk"][idx, a], bank["zk"][idx, b]
        t = vote(r[idx, a], r[idx, b])
        feats = [f.chunk(3) for f in net.normalised_features(torch.cat([z, z0, z1]))]
        d0 = net.compare([f[0] for f in feats], [f[1] for f in feats])
        d1 = net.compare([f[0] for f in feats], [f[2] for f in feats])
        loss = F.binary_cross_entropy_with_logits(rank(d0, d1), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        net.clamp_heads_()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def train_latent_lpips(vae: Any, judge: nn.Module, train_images: Tensor, val_images: Tensor,
                       config: dict | None = None, steps: int = 2000, batch_size: int = 64, lr: float = 1e-2,
                       num_references: int = 2000, val_references: int = 300, candidates: int = 6, seed: int = 0,
                       progress: bool = True) -> tuple[LatentLPIPS, dict[str, Any]]:
    """Train a LatentLPIPS for `vae` from synthetic 2AFC judgments (module docstring); returns the net
    (eval mode) and a report with the held-out agreement of the net and of latent L2."""
    torch.manual_seed(seed)
    start = time.time()
    vae = vae.eval().requires_grad_(False)
    reference = ReferenceDistance(judge)
    bank = make_judgments(vae, reference, train_images, num_references, seed, candidates, progress=progress)
    val = make_judgments(vae, reference, val_images, val_references, seed + 1, candidates, progress=progress)
    made = time.time() - start
    net = LatentLPIPS(**{**DEFAULT_CONFIG, **(config or {}), "in_channels": bank["z"].shape[1]})
    fit(net, bank, steps, batch_size, lr, seed, progress)
    report = dict(evaluate(net, val), references=num_references, candidates=candidates, steps=steps,
                  batch_size=batch_size, lr=lr, seed=seed, judgment_seconds=round(made, 1), total_seconds=round(time.time() - start, 1))
    report["train_agreement"] = evaluate(net, {k: v[:val_references] for k, v in bank.items()})["agreement"]
    return net, report


# ============================================================================ command line


def load_imagefolder(folder: str, flag: str, limit: int | None = None, resolution: int | None = None) -> Tensor:
    """Images of an imagefolder (metadata.jsonl order, else sorted image files), in [-1, 1]."""
    from PIL import Image, ImageOps

    if not os.path.isdir(folder):
        raise UserError(f"{folder} does not exist ({flag})")
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        with open(meta) as f:
            names = [json.loads(line)["file_name"] for line in f if line.strip()]
    else:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    names = names[:limit] if limit else names
    if not names:
        raise UserError(f"{folder} holds no images ({flag})")
    images = []
    for name in names:
        img = Image.open(os.path.join(folder, name)).convert("RGB")
        side = resolution or (images[0].shape[0] if images else min(img.size))
        img = ImageOps.fit(img, (side, side), Image.LANCZOS) if img.size != (side, side) else img
        images.append(np.asarray(img))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_any_vae(path: str) -> Any:
    """The AutoencoderKL of a pipeline folder (its vae/) or a VAE folder."""
    from ..models import load_vae

    if os.path.isfile(os.path.join(path, "model_index.json")):
        return load_vae(path)
    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist (--vae)")
    return load_vae(path, vae_path=path)


def load_judge(path: str) -> nn.Module:
    from .judge import ToyJudge

    if not os.path.isdir(path):
        raise UserError(f"{path} does not exist: the toy judge folder the reference distance uses (--judge)")
    return ToyJudge.from_pretrained(path, torch_dtype=torch.float32).eval()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m utils.toy.latent_lpips_train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a latent LPIPS from synthetic 2AFC judgments (toy world)")
    t.add_argument("--vae", required=True, help="pipeline folder (its vae/ is used) or VAE folder")
    t.add_argument("--data", required=True, help="imagefolder of reference images (e.g. toy_world/data/train)")
    t.add_argument("--val_data", default=None, help="imagefolder for held-out pairs (default: last 20%% of --data)")
    t.add_argument("--judge", default="toy_world/judge", help="toy judge folder of the reference distance")
    t.add_argument("--out", required=True, help="folder to write config.json + model.safetensors to")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-2)
    t.add_argument("--references", type=int, default=2000,
                   help="reference images drawn for training; each gets --candidates distorted copies")
    t.add_argument("--candidates", type=int, default=6, help="distorted copies per reference (any two: a triplet)")
    t.add_argument("--val_references", type=int, default=300)
    t.add_argument("--channels", type=int, nargs="+", default=None, help="width of each stage")
    t.add_argument("--convs", type=int, nargs="+", default=None, help="3x3 convs per stage")
    t.add_argument("--pool", type=int, nargs="+", default=None, help="1 = 2x2 max-pool before the stage")
    t.add_argument("--fp16", action="store_true", help="save the weights in float16")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps runs reproducible)")
    e = sub.add_parser("eval", help="2AFC agreement of a latent LPIPS (and of latent L2) with the reference")
    e.add_argument("--net", required=True, help="latent LPIPS folder")
    e.add_argument("--vae", required=True)
    e.add_argument("--data", required=True, help="imagefolder of held-out reference images")
    e.add_argument("--judge", default="toy_world/judge")
    e.add_argument("--references", type=int, default=300, help="held-out references (x 15 triplets each)")
    e.add_argument("--ensemble", type=int, default=0,
                   help="also report EnsembledLatentLPIPS with this many augmentations (0: skip)")
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with user_errors():
        vae = load_any_vae(args.vae)
        judge = load_judge(args.judge)
        if args.command == "eval":
            net = LatentLPIPS.from_pretrained(args.net, in_channels=vae.config.latent_channels, flag="--net")
            bank = make_judgments(vae, ReferenceDistance(judge), load_imagefolder(args.data, "--data"), args.references,
                                  args.seed, progress=True)
            report = evaluate(net, bank)
            if args.ensemble:
                ens, gen = EnsembledLatentLPIPS(net, num_augmentations=args.ensemble), torch.Generator().manual_seed(0)
                report["ensembled_agreement"] = evaluate(lambda a, b: ens(a, b, generator=gen), bank)["agreement"]
            print(json.dumps(report, indent=2))
            return
        images = load_imagefolder(args.data, "--data")
        if args.val_data:
            val = load_imagefolder(args.val_data, "--val_data", resolution=images.shape[-1])
        else:
            cut = max(1, len(images) // 5)
            images, val = images[:-cut], images[-cut:]
        config = {k: v for k, v in dict(channels=args.channels, convs=args.convs, pool=args.pool).items() if v}
        net, report = train_latent_lpips(vae, judge, images, val, config, args.steps, args.batch, args.lr,
                                         args.references, args.val_references, args.candidates, args.seed)
        net.metadata = dict(report, vae=args.vae, data=args.data)
        net.save_pretrained(args.out, dtype=torch.float16 if args.fp16 else None)
    print(json.dumps(report, indent=2))
    print(f"latent LPIPS written to {args.out}/ ({report['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
