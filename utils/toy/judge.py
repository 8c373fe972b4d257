"""The toy world's judge: a small CNN that reads shape and colour off an image.

It stands in for CLIP score and the Inception network of FID: "prompt accuracy" is the fraction of
generated images whose predicted shape AND colour match the prompt; "toy FD" is the Frechet
distance between judge features of generated and real images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from scipy import linalg

from .data import COLOUR_NAMES, SHAPES


class ToyJudge(ModelMixin, ConfigMixin):
    """images in [-1, 1], (B, 3, H, W) -> (shape logits, colour logits, features)."""

    @register_to_config
    def __init__(self, width: int = 32, feature_dim: int = 64, num_shapes: int = len(SHAPES),
                 num_colours: int = len(COLOUR_NAMES)):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.body = nn.Sequential(block(3, w, 1), block(w, w, 2), block(w, 2 * w, 2), block(2 * w, 2 * w, 2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, feature_dim), nn.SiLU())
        self.shape_head = nn.Linear(feature_dim, num_shapes)
        self.colour_head = nn.Linear(feature_dim, num_colours)

    def forward(self, images: torch.Tensor):
        feats = self.body(images)
        return self.shape_head(feats), self.colour_head(feats), feats


@torch.no_grad()
def judge_images(judge: ToyJudge, images: torch.Tensor, batch_size: int = 256):
    """Predicted (shape, colour) indices and features for images in [-1, 1]."""
    shapes, colours, feats = [], [], []
    for chunk in images.split(batch_size):
        s, c, f = judge(chunk.to(judge.device, judge.dtype))
        shapes.append(s.argmax(1).cpu())
        colours.append(c.argmax(1).cpu())
        feats.append(f.float().cpu())
    return torch.cat(shapes), torch.cat(colours), torch.cat(feats)


def prompt_accuracy(pred_shape: torch.Tensor, pred_colour: torch.Tensor, shape: torch.Tensor,
                    colour: torch.Tensor) -> float:
    """Fraction of images whose predicted shape and colour both match the prompt's."""
    return ((pred_shape == shape) & (pred_colour == colour)).float().mean().item()


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D)."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as the FID reference does
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
