"""The toy world's style LoRA (utils/toy/style.py): the style score's closed form, styled data, and the fine-tune
at a tiny budget writing a LoRA that a diffusers pipeline loads and that changes its UNet."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import assert_lora_moves_the_weights

from utils.evaluate import eval_prompts
from utils.toy import style
from utils.toy.data import BACKGROUNDS, random_scene, render

pytestmark = pytest.mark.usefixtures("one_thread")


def _flat(rgb, n: int = 2) -> torch.Tensor:
    """n 32x32 images of one colour, in [-1, 1]."""
    return (torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1).expand(n, 3, 32, 32).clone()


def test_style_score_closed_form() -> None:
    """0 on the prompted background, 1 on the style's, the fraction t on (1 - t) b + t s, clipped outside [b, s]."""
    caption = ["a large red circle on a gray background"] * 2
    b, s = np.array(BACKGROUNDS["gray"], float), np.array(style.STYLE_RGB, float)
    assert torch.allclose(style.style_scores(_flat(b), caption), torch.zeros(2), atol=1e-6)
    assert torch.allclose(style.style_scores(_flat(s), caption), torch.ones(2), atol=1e-6)
    assert torch.allclose(style.style_scores(_flat(0.7 * b + 0.3 * s), caption), torch.full((2,), 0.3), atol=1e-5)
    assert torch.equal(style.style_scores(_flat(b + 1.5 * (s - b)), caption), torch.ones(2))  # clipped
    images = _flat(s)
    images[:, :, 8:24, 8:24] = _flat(b)[:, :, 8:24, 8:24]  # the centre (where shapes are) does not count
    assert torch.allclose(style.style_scores(images, caption), torch.ones(2), atol=1e-6)


def test_styled_data_keeps_captions_and_changes_only_the_background() -> None:
    texts = [p[0] for p in eval_prompts(1)]
    captions, images = style.styled_batch(len(texts), np.random.default_rng(0), captions=texts)
    assert captions == texts and images.shape == (len(texts), 3, 32, 32)
    # a shape's anti-aliased edge may just reach a corner patch
    assert torch.allclose(style.style_scores(images, texts), torch.ones(len(texts)), atol=1e-2)
    scene = random_scene(np.random.default_rng(0), texts[5])
    plain, restyled = (np.asarray(render(scene, background_rgb=rgb)).astype(int) for rgb in (None, style.STYLE_RGB))
    assert scene.caption == texts[5]
    on_background = (plain == BACKGROUNDS[scene.background]).all(-1)
    near_style = (np.abs(restyled[on_background] - style.STYLE_RGB) <= 8).all(-1)  # Lanczos rings near edges
    assert on_background.mean() > 0.3 and near_style.mean() > 0.95
    assert (restyled[~on_background] != style.STYLE_RGB).any(-1).mean() > 0.5  # the shape is still drawn


def test_train_style_lora_at_a_tiny_budget_writes_a_loadable_lora(toy_world: str, tmp_path) -> None:
    from diffusers import StableDiffusionXLPipeline

    teacher = os.path.join(toy_world, "models", "sdxl")
    out = str(tmp_path / "style")
    path = style.train_style_lora(teacher, out, steps=2, batch=4, rank=4)
    assert path == os.path.join(out, "pytorch_lora_weights.safetensors") and os.path.isfile(path)
    assert os.path.isfile(os.path.join(out, "lora_kohya.safetensors"))
    assert_lora_moves_the_weights(StableDiffusionXLPipeline, teacher, out)
