"""Differentiable reward models for TLCM's optional reward stage (its hinge loss is in utils/losses.py).

A reward model is any callable `score(images, prompts) -> (B,)` that is differentiable in `images`
(in [-1, 1], (B, 3, H, W)). `--reward_model` takes either a folder holding the toy world's judge
(the toy stand-in for a preference model such as MPS) or `package.module:factory`, where
`factory(device)` returns such a callable (how a user plugs in MPS, ImageReward, PickScore, ...).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import UserError

Scorer = Callable[[Tensor, Sequence[str]], Tensor]


class JudgeScorer(torch.nn.Module):
    """The toy judge as a reward: mean log-odds that the image shows the prompt's shape and colour."""

    def __init__(self, judge: torch.nn.Module) -> None:
        super().__init__()
        self.judge = judge.requires_grad_(False).eval()

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from .toy.data import parse_caption

        labels = [parse_caption(p) for p in prompts]
        if any(lab is None for lab in labels):
            bad = next(p for p, lab in zip(prompts, labels) if lab is None)
            raise UserError(f"the toy judge reward needs toy captions; cannot read {bad!r} (--reward_model)")
        shape = torch.tensor([lab[0] for lab in labels], device=images.device)
        colour = torch.tensor([lab[1] for lab in labels], device=images.device)
        shape_logits, colour_logits, _ = self.judge(images.to(self.judge.dtype))
        return (_log_odds(shape_logits.float(), shape) + _log_odds(colour_logits.float(), colour)) / 2


def _log_odds(logits: Tensor, index: Tensor) -> Tensor:
    """log p_i - log(1 - p_i) of the softmax over logits, for class i = index per row."""
    logp = torch.log_softmax(logits, dim=1)
    chosen = logp.gather(1, index[:, None])[:, 0]
    return chosen - torch.log1p(-chosen.exp().clamp(max=1 - 1e-6))


def load_reward_model(spec: str, device: torch.device | str = "cpu") -> Scorer:
    """A scorer from a toy-judge folder or a `module:factory` import path (one-line error otherwise)."""
    if os.path.isdir(spec):
        from .toy.judge import ToyJudge

        try:
            judge = ToyJudge.from_pretrained(spec)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise UserError(f"--reward_model {spec}: not a judge folder ({str(exc).splitlines()[0]})") from None
        return JudgeScorer(judge.to(device))
    if ":" not in spec:
        raise UserError(f"--reward_model {spec!r}: give a judge folder or `package.module:factory`")
    module_name, factory_name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"--reward_model {spec!r}: cannot import it ({exc})") from None
    return factory(device)
