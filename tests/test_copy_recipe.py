"""The promise to users: a recipe is a script to copy and change. A copy of train_lcm_distill_sd.py under a new
name, its distance changed from L2 to L1 in one place, trains on the toy world and gives a loadable pipeline."""

from __future__ import annotations

import os
import sys

import pytest

import torch
from helpers import run_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL = "train_lcm_distill_sd.py"
COPY = "my_lcm_l1.py"
L2_LINE = "    return consistency_loss(f_student.float(), f_target.float(), args.loss_type, args.huber_c)\n"
L1_LINE = "    return (f_student.float() - f_target.float()).abs().mean()  # my change: L1 instead of L2\n"


def copy_with_l1(folder) -> str:
    """The user's copy: the original's text with its one distance line replaced; returns the copy's path."""
    text = open(os.path.join(ROOT, ORIGINAL)).read()
    assert text.count(L2_LINE) == 1, "the recipe's distance is no longer one line: update this test and the docs"
    path = os.path.join(folder, COPY)
    with open(path, "w") as f:
        f.write(text.replace(L2_LINE, L1_LINE))
    return path


def loss_inputs(world: str, module, out: str) -> dict:
    """Fixed inputs of lcm_loss on the toy SD teacher: student (teacher + guidance input), EMA target, batch."""
    import copy

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from utils.consistency import LCMSchedule
    from utils.models import Conditioning

    path = os.path.join(world, "models/sd")
    teacher = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False)
    student = module.make_student(teacher, 256, zero_init=True)
    g = torch.Generator().manual_seed(0)
    dim = teacher.config.cross_attention_dim
    args = module.parse_args(["--pretrained_teacher_model", path, "--train_data_dir", "unused", "--output_dir", out,
                              "--w_min", "2", "--w_max", "6"])
    alphas = DDPMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod
    return dict(student=student, target=copy.deepcopy(student).requires_grad_(False), teacher=teacher,
                latents=torch.randn(2, 4, 8, 8, generator=g), cond=Conditioning(torch.randn(2, 8, dim, generator=g), {}),
                uncond=Conditioning(torch.randn(1, 8, dim, generator=g), {}),
                schedule=LCMSchedule.of_teacher(alphas, args.num_ddim_timesteps, "epsilon"), args=args)


def consistency_values(module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, f_student, f_target) of module.lcm_loss on the inputs, its random draws from seed 5."""
    seen, consistency_fn = [], module.consistency_fn
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "consistency_fn", lambda *a: seen.append(consistency_fn(*a)) or seen[-1])
        loss = module.lcm_loss(gen=torch.Generator().manual_seed(5), **inputs)
    f_student, f_target = seen
    return loss, f_student.detach(), f_target


def test_a_copied_recipe_with_an_l1_distance_trains_and_samples(toy_world, tmp_path, monkeypatch):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    import train_lcm_distill_sd as original

    folder = tmp_path / "mine"
    folder.mkdir()
    copy_with_l1(str(folder))
    monkeypatch.syspath_prepend(str(folder))
    name = COPY.removesuffix(".py")
    try:
        out = str(tmp_path / "out")
        run_recipe(COPY, ["--pretrained_teacher_model", os.path.join(toy_world, "models/sd"),
                          "--train_data_dir", os.path.join(toy_world, "data/train"), "--output_dir", out,
                          "--resolution", "32", "--train_batch_size", "2", "--max_train_samples", "8",
                          "--max_train_steps", "2", "--w_min", "2", "--w_max", "6", "--learning_rate", "1e-4",
                          "--lr_warmup_steps", "0", "--validation_steps", "1000", "--validation_prompts",
                          "--report_to", "none"])
        mine = sys.modules[name]
        assert os.path.dirname(mine.__file__) == str(folder)

        # the copy's loss is the mean absolute difference of the same consistency values; the original's, L2
        inputs = loss_inputs(toy_world, original, str(tmp_path / "unused"))
        l1, f_s, f_t = consistency_values(mine, inputs)
        l2, f_s2, f_t2 = consistency_values(original, inputs)
        assert torch.equal(f_s, f_s2) and torch.equal(f_t, f_t2)  # the same draws, the same model calls
        assert torch.allclose(l1, (f_s - f_t).abs().mean()) and torch.allclose(l2, (f_s - f_t).pow(2).mean())
        assert not torch.allclose(l1, l2)
        l1.backward()  # and it trains the student
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in inputs["student"].parameters())
    finally:
        sys.modules.pop(name, None)

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a large red circle on a white background", num_inference_steps=2, guidance_scale=5.0,
                 height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0.01
