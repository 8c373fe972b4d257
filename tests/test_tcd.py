"""train_tcd_lora.py and the TCD sampler: the trajectory consistency function against its closed forms and against
the step TCDScheduler takes, the target times, the loss going down, a run's outputs in the teacher's pipeline with
TCDScheduler sampling what the in-memory student samples, and `--scheduler tcd --eta` in inference.py.

Runs go in-process (helpers.run_recipe); kill-and-resume, two processes and ZeRO-3 are parametrised runs of the
LCM-LoRA tests (test_lcm_lora.py, test_multiprocess.py, test_distributed.py), unseen layouts in
test_unseen_layouts.py, bad input in test_bad_input.py.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from helpers import import_script, run_recipe
from test_lcm_lora import arguments, sdxl  # noqa: F401  (sdxl: the LCM-LoRA tests' fixed batch, a fixture)

from utils.consistency import draw_target_timesteps, trajectory_consistency_fn
from utils.solvers import alpha_sigma, ddim_jump, x0_eps_from_model_output

SCRIPT = "train_tcd_lora.py"
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the math, on tiny tensors
def test_tcf_is_the_identity_at_s_equal_t_and_the_x0_prediction_at_alpha_1_sigma_0():
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    a = torch.rand(3, generator=g) * 0.9 + 0.05
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    assert torch.allclose(trajectory_consistency_fn(x, x0, alpha, sigma, alpha, sigma), x, atol=1e-6)
    assert torch.allclose(trajectory_consistency_fn(x, x0, alpha, sigma, 1.0, 0.0), x0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tcf_is_the_ddim_step_from_t_to_s(prediction_type):
    """(sigma_s/sigma_t) x + (alpha_s - alpha_t sigma_s/sigma_t) x0 = alpha_s x0 + sigma_s eps, eps the model's."""
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    alphas_cumprod = torch.linspace(0.9999, 0.005, 1000)
    t, s = torch.tensor([999, 500, 40, 19]), torch.tensor([0, 250, 39, 7])
    (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(alphas_cumprod, t), alpha_sigma(alphas_cumprod, s)
    x0 = x0_eps_from_model_output(out, x, alpha_t, sigma_t, prediction_type)[0]
    want = ddim_jump(x, out, alpha_t, sigma_t, alpha_s, sigma_s, prediction_type)
    assert torch.allclose(trajectory_consistency_fn(x, x0, alpha_t, sigma_t, alpha_s, sigma_s), want, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcf_is_what_tcdscheduler_steps_to(toy_world, eta):
    """The sampler's x_s (pred_noised_sample) at s = floor((1 - eta) t_next) is the trained f(x_t, t, s), at every
    step of a 4-step schedule on the toy SDXL teacher's noise schedule, the last step (s = 0) included."""
    from diffusers import TCDScheduler

    from utils.models import load_noise_scheduler_config

    scheduler = TCDScheduler.from_config(load_noise_scheduler_config(os.path.join(toy_world, "models/sdxl")))
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 4, 4, generator=g)
    pred = scheduler.config.prediction_type
    for i, t in enumerate(timesteps):
        out = torch.randn(x.shape, generator=g)
        step = scheduler.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(i))
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        s = torch.tensor([int((1 - eta) * t_next)])
        (alpha_t, sigma_t), (alpha_s, sigma_s) = (alpha_sigma(scheduler.alphas_cumprod, torch.tensor([t])),
                                                  alpha_sigma(scheduler.alphas_cumprod, s))
        x0 = x0_eps_from_model_output(out, x, alpha_t, sigma_t, pred)[0]
        assert torch.allclose(step.pred_noised_sample, trajectory_consistency_fn(x, x0, alpha_t, sigma_t, alpha_s,
                                                                                 sigma_s), atol=1e-5), (t, eta)
        x = step.prev_sample


def test_target_timesteps_are_uniform_over_0_to_t_prev_or_zero():
    t_prev = torch.tensor([0, 19, 979]).repeat_interleave(4000)
    s = draw_target_timesteps(t_prev, "uniform", torch.Generator().manual_seed(0))
    again = draw_target_timesteps(t_prev, "uniform", torch.Generator().manual_seed(0))
    assert torch.equal(s, again) and s.dtype == t_prev.dtype
    assert (s >= 0).all() and (s <= t_prev).all()
    at0, at19, at979 = s.view(3, -1)
    assert not at0.any()
    assert set(at19.tolist()) == set(range(20))  # every timestep 0..19, both ends included
    counts = torch.bincount(at19, minlength=20).float()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
    assert abs(at979.float().mean().item() - 979 / 2) < 15
    assert not draw_target_timesteps(t_prev, "zero", torch.Generator()).any()


# ------------------------------------------------------------------------------ the loss, called directly
def tcd_loss(r: dict, args, seed: int = 0, unet=None) -> torch.Tensor:
    """The TCD recipe's loss on the LCM-LoRA tests' fixed batch; the same seed draws the same t, s, w and noise."""
    return import_script(SCRIPT).tcd_loss(unet or r["unet"], r["latents"], r["cond"], r["uncond"], r["schedule"], args,
                                          torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tcd_args(toy_world, tmp_path_factory):
    return import_script(SCRIPT).parse_args(arguments(toy_world, "sdxl", str(tmp_path_factory.mktemp("tcd"))))


def test_loss_compares_both_sides_at_one_target_time_and_decreases(sdxl, tcd_args, monkeypatch):  # noqa: F811
    """Student and target map to the same s (<= t_prev, where the teacher's step ends); a few AdamW steps on the
    LoRA alone lower the loss of a fixed draw."""
    recipe = import_script(SCRIPT)
    seen, tcf = [], recipe.trajectory_consistency_fn
    monkeypatch.setattr(recipe, "trajectory_consistency_fn", lambda x, x0, a_t, s_t, a_s, s_s: seen.append(
        (a_t, a_s)) or tcf(x, x0, a_t, s_t, a_s, s_s))
    with torch.no_grad():
        tcd_loss(sdxl, tcd_args)
    (a_prev, a_s_target), (a_t, a_s_student) = seen
    assert torch.equal(a_s_target, a_s_student) and (a_s_student >= a_prev).all() and (a_prev > a_t).all()
    monkeypatch.undo()

    unet = copy.deepcopy(sdxl["unet"])
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(10):
        loss = tcd_loss(sdxl, tcd_args, unet=unet)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


# ------------------------------------------------------------------------------ a run, and sampling its output
def test_outputs_load_with_tcdscheduler_and_sample_what_the_in_memory_student_samples(toy_world, tmp_path,
                                                                                       monkeypatch):
    """The final validation's pipeline (the trained UNet in memory, TCDScheduler on the run's grid) and the teacher's
    pipeline with `load_lora_weights(out)` + the saved TCDScheduler draw the same images at eta 0.3; the card says
    how."""
    from diffusers import StableDiffusionXLPipeline, TCDScheduler

    recipe, samples = import_script(SCRIPT), []

    def sample(pipe, eta):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(["a red circle", "a blue square"], num_inference_steps=4, guidance_scale=1.0, generator=gens,
                    eta=eta, height=32, width=32, output_type="np").images

    monkeypatch.setattr(recipe, "validation_grid", lambda accelerator, args, pipe, prompts, step, label, text, **call:
                        samples.append((sample(pipe, call["eta"]), type(pipe.scheduler).__name__, call["eta"])))
    out = str(tmp_path / "out")
    run_recipe(SCRIPT, arguments(toy_world, "sdxl", out, "--max_train_steps", "3", "--learning_rate", "1e-2",
                                 "--num_ddim_timesteps", "25", "--validation_prompts", "a red circle"))
    in_memory, name, eta = samples[-1]
    assert name == "TCDScheduler" and eta == 0.3

    teacher = os.path.join(toy_world, "models/sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    base = sample(pipe, 0.3)
    pipe.scheduler = TCDScheduler.from_pretrained(out, subfolder="scheduler")
    assert pipe.scheduler.config.original_inference_steps == 25
    assert pipe.scheduler.config.prediction_type == json.load(open(os.path.join(
        teacher, "scheduler", "scheduler_config.json"))).get("prediction_type", "epsilon")
    pipe.load_lora_weights(out)
    loaded = sample(pipe, 0.3)
    assert abs(loaded - in_memory).max() < 1e-4 and abs(loaded - base).max() > 1e-2  # the LoRA, and trained
    card = open(os.path.join(out, "README.md")).read()
    assert 'TCDScheduler.from_pretrained("' in card and "eta=0.3" in card and "original_inference_steps=25" in card


def test_inference_samples_with_tcd_at_the_given_eta(toy_world, tmp_path):
    """inference.py --scheduler tcd: TCDScheduler, the eta in the PNG's settings (0.3 by default); eta changes the
    image (fresh noise re-enters each step) while two runs at one eta draw the same."""
    import numpy as np
    from helpers import listing, run_command
    from PIL import Image

    def draw(name, *flags):
        run = run_command(["inference.py", "--base_model_path", os.path.join(toy_world, "models/sdxl"), "--scheduler",
                           "tcd", "--infer-steps", "4", "--output_dir", str(tmp_path / name), "--quiet", *flags])
        assert run.returncode == 0, run.stderr[-2000:]
        (png,) = listing(tmp_path / name)  # the images, not the output marker
        image = Image.open(tmp_path / name / png)
        return json.loads(image.text["settings"]), np.asarray(image.convert("RGB"), dtype=np.int16)

    settings, default = draw("default")
    assert settings["scheduler_class"] == "TCDScheduler" and settings["eta"] == 0.3
    (_, again), (s0, zero) = draw("again", "--eta", "0.3"), draw("zero", "--eta", "0")
    assert s0["eta"] == 0.0 and np.array_equal(default, again) and np.abs(default - zero).max() > 8
