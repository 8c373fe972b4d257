"""The schedulers: FlowMatchEulerTLCMScheduler (schedule, step closed forms, FluxPipeline), the SDXL
milestone subsets, LCMScheduler from a teacher config and with TLCM timesteps, and TLCMScheduler."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    LCMScheduler,
    StableDiffusionXLPipeline,
)
from PIL import Image

from utils.scheduling_flow_match_euler_tlcm import FlowMatchEulerTLCMScheduler, FlowMatchEulerTLCMSchedulerOutput
from utils.scheduling_lcm import lcm_scheduler
from utils.scheduling_tlcm import (
    TLCMScheduler,
    TLCMSchedulerOutput,
    ddpm_milestones,
    lcm_original_inference_steps,
    tlcm_lcm_scheduler,
    tlcm_timesteps,
)

PROMPT = "a large red circle on a white background"
FLUX_KW = {"height": 32, "width": 32, "max_sequence_length": 16, "output_type": "latent"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(toy_world: str, name: str) -> str:
    return os.path.join(toy_world, "models", name)


def _flux_scheduler(**kw) -> FlowMatchEulerTLCMScheduler:
    """A FLUX-like config: dynamic shifting, base/max shift 0.5/1.15."""
    return FlowMatchEulerTLCMScheduler(use_dynamic_shifting=True, shift=3.0, **kw)


def _pair(shape=(2, 16, 64), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("n", range(2, 9))
def test_sigmas_match_shifted_formula(n: int) -> None:
    """Given FluxPipeline's sigmas linspace(1, 1/n, n): the exponential shift of each, then 0."""
    for mu in (0.5, 0.8, 1.15):
        sched = _flux_scheduler()
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
        want = []
        for i in range(n):
            s = 1.0 - i * (1.0 - 1.0 / n) / (n - 1)  # linspace(1, 1/n, n)
            want.append(math.exp(mu) / (math.exp(mu) + 1.0 / s - 1.0))
        want.append(0.0)
        assert sched.sigmas.dtype == torch.float32 and len(sched) == 1000
        assert np.allclose(sched.sigmas.numpy(), want, rtol=1e-6, atol=1e-7)
        assert np.allclose(sched.timesteps.numpy(), np.array(want[:-1]) * 1000, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_without_sigmas_the_schedule_is_diffusers_flow_match_eulers(n: int) -> None:
    """set_timesteps(n[, mu]) alone: linspace(1, 1/T, n) shifted (dynamic), or diffusers' static-shift
    schedule, exactly as FlowMatchEulerDiscreteScheduler gives them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for config, kw in (({"use_dynamic_shifting": True}, {"mu": 0.8}), ({"shift": 3.0}, {}), ({}, {})):
        ours, theirs = FlowMatchEulerTLCMScheduler(**config), FlowMatchEulerDiscreteScheduler(**config)
        ours.set_timesteps(n, **kw)
        theirs.set_timesteps(n, **kw)
        assert torch.allclose(ours.sigmas, theirs.sigmas, atol=1e-6), (config, ours.sigmas, theirs.sigmas)
        assert torch.allclose(ours.timesteps, theirs.timesteps, atol=1e-3)
    dynamic = FlowMatchEulerTLCMScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(n, mu=0.0)  # mu = 0 shifts nothing: the unshifted linspace(1, 1/T, n)
    assert np.allclose(dynamic.sigmas[:-1].numpy(), np.linspace(1.0, 1e-3, n), atol=1e-6)


def test_dynamic_shifting_needs_mu_and_unsupported_options_are_refused() -> None:
    with pytest.raises(ValueError, match="mu"):
        _flux_scheduler().set_timesteps(4)
    with pytest.raises(ValueError, match="renoise"):
        FlowMatchEulerTLCMScheduler(renoise="ddim")
    with pytest.raises(ValueError, match="karras"):
        FlowMatchEulerTLCMScheduler(use_karras_sigmas=True)


@pytest.mark.parametrize("name", ["flux", "flux-guidance"])
def test_from_config_of_toy_flux_pipelines(toy_world: str, name: str, tmp_path) -> None:
    base = FlowMatchEulerDiscreteScheduler.from_pretrained(_model(toy_world, name), subfolder="scheduler")
    sched = FlowMatchEulerTLCMScheduler.from_config(base.config)
    assert isinstance(sched, FlowMatchEulerTLCMScheduler) and sched.config.renoise == "fresh"
    for key in ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                "base_image_seq_len", "max_image_seq_len"):
        assert sched.config[key] == base.config[key]
    implied = FlowMatchEulerTLCMScheduler.from_config({**base.config, "an_unknown_key": 1}, renoise="implied")
    assert implied.config.renoise == "implied"
    implied.save_config(str(tmp_path))
    assert FlowMatchEulerTLCMScheduler.from_pretrained(str(tmp_path)).config.renoise == "implied"
    # same schedule as diffusers' scheduler for FluxPipeline's inputs
    for n in (1, 4):
        sig = np.linspace(1.0, 1.0 / n, n)
        base.set_timesteps(sigmas=sig, mu=0.7)
        sched.set_timesteps(sigmas=sig, mu=0.7)
        assert torch.allclose(sched.sigmas, base.sigmas, atol=1e-6)
        assert torch.allclose(sched.timesteps, base.timesteps, atol=1e-3)


# ----------------------------------------------------------------------------- FLUX step


def test_fresh_step_is_the_closed_form_with_generator_draws() -> None:
    sched = _flux_scheduler()
    sched.set_timesteps(4, mu=0.6)
    x0, eps = _pair()
    for i in range(3):
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        x_t = (1 - s) * x0 + s * eps
        v = eps - x0
        out = sched.step(v, sched.timesteps[i], x_t, generator=torch.Generator().manual_seed(10 + i))
        eps_new = torch.randn(x0.shape, generator=torch.Generator().manual_seed(10 + i))
        assert sched.step_index == i + 1
        assert torch.allclose(out.denoised, x0, atol=1e-5)
        assert torch.allclose(out.prev_sample, (1 - s_next) * x0 + s_next * eps_new, atol=1e-5)
    # a list of generators, one per batch item (as diffusers' randn_tensor)
    sched.set_timesteps(4, mu=0.6)
    s, s_next = float(sched.sigmas[0]), float(sched.sigmas[1])
    gens = [torch.Generator().manual_seed(k) for k in (3, 4)]
    out = sched.step(eps - x0, sched.timesteps[0], (1 - s) * x0 + s * eps, generator=gens)
    eps_new = torch.cat([torch.randn((1,) + x0.shape[1:], generator=torch.Generator().manual_seed(k)) for k in (3, 4)])
    assert torch.allclose(out.prev_sample, (1 - s_next) * x0 + s_next * eps_new, atol=1e-5)


def test_fresh_step_matches_diffusers_stochastic_sampling() -> None:
    ours, ref = _flux_scheduler(), FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, stochastic_sampling=True)
    x, v = _pair(seed=1)
    for sched in (ours, ref):
        sched.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.9)
    for i in range(4):
        a = ours.step(v, ours.timesteps[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
        b = ref.step(v, ref.timesteps[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
        assert torch.allclose(a, b, atol=1e-5)


def test_implied_renoise_is_deterministic_euler() -> None:
    sched = _flux_scheduler(renoise="implied")
    sched.set_timesteps(4, mu=0.6)
    x, v = _pair(seed=2)
    outs = []
    for seed in (0, 1):
        sched.set_timesteps(4, mu=0.6)
        out = sched.step(v, sched.timesteps[0], x, generator=torch.Generator().manual_seed(seed))
        outs.append(out.prev_sample)
    assert torch.equal(outs[0], outs[1])
    s, s_next = float(sched.sigmas[0]), float(sched.sigmas[1])
    assert torch.allclose(outs[0], x + (s_next - s) * v, atol=1e-5)  # Euler
    x0, eps = x - s * v, x + (1 - s) * v
    assert torch.allclose(outs[0], (1 - s_next) * x0 + s_next * eps, atol=1e-5)


def test_return_dict_both_ways_and_dtype() -> None:
    x, v = _pair(seed=3)
    sched = _flux_scheduler()
    sched.set_timesteps(2, mu=0.5)
    out = sched.step(v, sched.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, FlowMatchEulerTLCMSchedulerOutput) and out[0] is out.prev_sample
    sched.set_timesteps(2, mu=0.5)
    tup = sched.step(v, sched.timesteps[0], x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2
    assert torch.equal(tup[0], out.prev_sample) and torch.equal(tup[1], out.denoised)
    sched.set_timesteps(2, mu=0.5)
    half = sched.step(v.bfloat16(), sched.timesteps[0], x.bfloat16(), return_dict=False)
    assert half[0].dtype == torch.bfloat16 and half[1].dtype == torch.bfloat16


def test_last_and_single_step_return_x0_exactly() -> None:
    x, v = _pair(seed=4)
    sched = _flux_scheduler()
    sched.set_timesteps(1, mu=0.5)
    assert sched.sigmas.tolist() == [1.0, 0.0]
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    prev, x0 = sched.step(v, sched.timesteps[0], x, generator=g, return_dict=False)
    assert torch.equal(prev, x0) and torch.equal(x0, x - v)
    assert torch.equal(g.get_state(), state)  # no noise drawn on the last step


def test_scale_noise_is_the_forward_process() -> None:
    x0, eps = _pair(seed=5)
    sched = _flux_scheduler()
    sched.set_timesteps(4, mu=0.5)
    s = float(sched.sigmas[2])
    assert torch.allclose(sched.scale_noise(x0, sched.timesteps[2:3].expand(2), eps), (1 - s) * x0 + s * eps)
    sched.set_begin_index(2)
    assert torch.allclose(sched.scale_noise(x0, sched.timesteps[2:3], eps), (1 - s) * x0 + s * eps)


# ----------------------------------------------------------------------------- FluxPipeline


def _flux_run(pipe: FluxPipeline, steps: int, noise_seed: int, **kw) -> torch.Tensor:
    pipe.scheduler.set_noise_generator(torch.Generator().manual_seed(noise_seed))
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **FLUX_KW, **kw).images


def test_drives_flux_pipeline_reproducibly(toy_world: str) -> None:
    pipe = FluxPipeline.from_pretrained(_model(toy_world, "flux"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerTLCMScheduler.from_config(pipe.scheduler.config)
    a, b, c = (_flux_run(pipe, 4, seed) for seed in (1, 1, 2))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.allclose(a, c)  # the fresh noise comes from the scheduler's generator
    assert pipe.scheduler.step_index == 4
    one_fresh = _flux_run(pipe, 1, 1)
    pipe.scheduler = FlowMatchEulerTLCMScheduler.from_config(pipe.scheduler.config, renoise="implied")
    d, e = _flux_run(pipe, 4, 1), _flux_run(pipe, 4, 2)
    assert torch.equal(d, e) and not torch.allclose(a, d)
    assert torch.equal(_flux_run(pipe, 1, 2), one_fresh)  # one step = x0 from pure noise, no re-noising
    guided = FluxPipeline.from_pretrained(_model(toy_world, "flux-guidance"))
    guided.set_progress_bar_config(disable=True)
    guided.scheduler = FlowMatchEulerTLCMScheduler.from_config(guided.scheduler.config)
    f, g = (_flux_run(guided, 2, 1, guidance_scale=3.5) for _ in range(2))
    assert torch.isfinite(f).all() and torch.equal(f, g)


def test_drives_flux_img2img(toy_world: str) -> None:
    pipe = FluxImg2ImgPipeline.from_pretrained(_model(toy_world, "flux"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerTLCMScheduler.from_config(pipe.scheduler.config)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    a, b = (_flux_run(pipe, 4, 1, image=image, strength=0.6) for _ in range(2))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert pipe.scheduler.begin_index == 1 and pipe.scheduler.step_index == 4  # scale_noise at sigma_1, 3 steps


# ----------------------------------------------------------------------------- SDXL timesteps


def test_milestones_and_published_subsets() -> None:
    assert ddpm_milestones(1000, 8) == [0, 124, 249, 374, 499, 624, 749, 874, 999]
    assert ddpm_milestones(1000, 4) == [0, 249, 499, 749, 999]
    assert ddpm_milestones(100, 3) == [0, 33, 66, 99]
    published = {1: [999], 2: [999, 499], 3: [999, 499, 124], 4: [999, 749, 499, 124],
                 5: [999, 749, 499, 249, 124], 6: [999, 749, 499, 374, 249, 124],
                 7: [999, 749, 624, 499, 374, 249, 124], 8: [999, 874, 749, 624, 499, 374, 249, 124]}
    subsets = {1: [0, 8], 2: [0, 4, 8], 3: [0, 4, 7, 8], 4: [0, 2, 4, 7, 8], 5: [0, 2, 4, 6, 7, 8],
               6: [0, 2, 4, 5, 6, 7, 8], 7: [0, 2, 3, 4, 5, 6, 7, 8], 8: list(range(9))}
    desc = ddpm_milestones(1000, 8)[::-1]
    for n, want in published.items():
        assert tlcm_timesteps(n) == want == [desc[i] for i in subsets[n]][:-1]
    assert tlcm_timesteps(4, 1000, 4) == [999, 749, 499, 249] and tlcm_timesteps(1, 1000, 4) == [999]
    for bad in ((0,), (9,), (2, 1000, 4)):
        with pytest.raises(ValueError):
            tlcm_timesteps(*bad)


def test_lcm_grid_contains_the_milestones() -> None:
    assert lcm_original_inference_steps(1000, 8) == 8
    for T, M in ((1000, 8), (1000, 4), (1000, 3), (500, 8)):
        n = lcm_original_inference_steps(T, M)
        k = T // n
        assert set(ddpm_milestones(T, M)[1:]) <= {j * k - 1 for j in range(1, n + 1)}


def test_lcm_scheduler_from_a_teacher_config(toy_world: str) -> None:
    with open(os.path.join(_model(toy_world, "sdxl"), "scheduler", "scheduler_config.json")) as f:
        teacher = json.load(f)
    sched = lcm_scheduler(teacher, 50, 10.0)
    assert isinstance(sched, LCMScheduler)
    assert sched.config.original_inference_steps == 50 and sched.config.timestep_scaling == 10.0
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert sched.config[key] == teacher[key]
    assert "interpolation_type" not in sched.config  # the Euler teacher's own options are not carried over
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 759, 499, 259]  # on the 50-step skip grid (k = 20)
    kept = lcm_scheduler({**teacher, "timestep_scaling": 5.0}, 8)
    assert kept.config.timestep_scaling == 5.0 and kept.config.original_inference_steps == 8
    assert tlcm_lcm_scheduler(teacher).config.original_inference_steps == lcm_original_inference_steps(1000, 8)


def test_sdxl_lcm_and_tlcm_schedulers_sample_the_milestones(toy_world: str) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(_model(toy_world, "sdxl"))
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    # diffusers' default LCMScheduler (50-step grid) also takes them, warning that 749 and 124 are off its grid
    default = LCMScheduler.from_config(config)
    default.set_timesteps(timesteps=tlcm_timesteps(4))
    assert default.timesteps.tolist() == [999, 749, 499, 124]

    def run(scheduler, **kw) -> torch.Tensor:
        pipe.scheduler = scheduler
        return pipe(PROMPT, height=32, width=32, guidance_scale=0.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kw).images

    lcm = tlcm_lcm_scheduler(config)
    assert lcm.config.original_inference_steps == 8 and lcm.config.prediction_type == config.prediction_type
    via_lcm = run(lcm, timesteps=tlcm_timesteps(4))
    assert lcm.timesteps.tolist() == [999, 749, 499, 124] and torch.isfinite(via_lcm).all()
    # the released rule (no c_skip/c_out) draws the same noise; LCM's boundary scalings differ by ~1e-7 at t >= 124
    tlcm = TLCMScheduler.from_config(config)
    via_tlcm = run(tlcm, num_inference_steps=4)
    assert tlcm.timesteps.tolist() == [999, 749, 499, 124]
    assert torch.allclose(via_tlcm, via_lcm, atol=1e-4)
    implied = run(TLCMScheduler.from_config(config, renoise="implied"), num_inference_steps=4)
    assert torch.isfinite(implied).all() and not torch.allclose(implied, via_tlcm)


def test_tlcm_scheduler_step_closed_form() -> None:
    sched = TLCMScheduler()
    sched.set_timesteps(timesteps=[999, 499, 124])
    a = sched.alphas_cumprod
    x0, eps = _pair((2, 4, 8, 8), seed=6)
    z = a[999].sqrt() * x0 + (1 - a[999]).sqrt() * eps
    out = sched.step(eps, torch.tensor(999), z, generator=torch.Generator().manual_seed(5))
    eps_new = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    assert isinstance(out, TLCMSchedulerOutput) and torch.allclose(out.denoised, x0, atol=1e-4)
    assert torch.allclose(out.prev_sample, a[499].sqrt() * x0 + (1 - a[499]).sqrt() * eps_new, atol=1e-4)
    z = a[499].sqrt() * x0 + (1 - a[499]).sqrt() * eps
    ddim = TLCMScheduler(renoise="implied")
    ddim.set_timesteps(timesteps=[999, 499, 124])
    ddim.set_begin_index(1)
    prev, den = ddim.step(eps, 499, z, return_dict=False)
    assert torch.allclose(prev, a[124].sqrt() * x0 + (1 - a[124]).sqrt() * eps, atol=1e-4)
    prev, den = ddim.step(eps, 124, prev, return_dict=False)
    assert torch.equal(prev, den) and torch.allclose(den, x0, atol=1e-4)
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=[124, 499])
