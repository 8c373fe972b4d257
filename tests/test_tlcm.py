"""TLCM on flow matching: the training math (utils/tlcm.py) and train_tlcm_flux.py on the toy FLUX teacher."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from helpers import kill_while_saving, run_script

from utils import tlcm
from utils.solvers import flow_renoise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_tlcm_flux.py")
FLUX_CONFIG = {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "base_image_seq_len": 256,
               "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}
STATIC_CONFIG = {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}


def exact_flow(x0: torch.Tensor, eps: torch.Tensor, calls: list | None = None):
    """The velocity field of the single path x_sigma = (1 - sigma) x0 + sigma eps: v = eps - x0 everywhere."""
    def v(z, sigma):
        if calls is not None:
            calls.append(sigma.clone())
        return (eps - x0).expand_as(z)
    return v


def sigma_fn(config=FLUX_CONFIG, seq_len=16):
    mu = tlcm.schedule_mu(config, seq_len)
    return lambda t: tlcm.sigma_of_t(t, config, mu)


# ----------------------------------------------------------------------------- math


def test_sigma_of_t_is_the_shifted_schedule():
    t = torch.tensor([0.0, 125.0, 500.0, 1000.0])
    mu = tlcm.schedule_mu(FLUX_CONFIG, 16)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256))
    u = t / 1000
    expected = torch.where(u > 0, torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + 1 / u - 1), 0.0)
    assert torch.allclose(tlcm.sigma_of_t(t, FLUX_CONFIG, mu), expected.float(), atol=1e-6)
    assert torch.allclose(tlcm.sigma_of_t(t, STATIC_CONFIG, None), (3 * u / (1 + 2 * u)).float(), atol=1e-6)


def test_milestones_and_the_sampler_schedules_they_contain():
    assert tlcm.milestones(1000, 8).tolist() == [125.0 * i for i in range(9)]
    fn = sigma_fn()
    milestone_sigmas = fn(tlcm.milestones(1000, 8))
    mu = tlcm.schedule_mu(FLUX_CONFIG, 16)
    for n in (2, 4, 8):  # FLUX's N-step schedules are subsets of the 8 milestones
        sig = tlcm.tlcm_sigmas(n, FLUX_CONFIG, mu)
        assert all(torch.isclose(milestone_sigmas, s, atol=1e-6).any() for s in sig)


def test_training_sampler_schedule_equals_the_tlcm_scheduler(toy_world):
    from utils.tlcm_scheduler import FlowMatchEulerTLCMScheduler

    sched = FlowMatchEulerTLCMScheduler.from_pretrained(os.path.join(toy_world, "models/flux"), subfolder="scheduler")
    mu = tlcm.schedule_mu(dict(sched.config), 16)
    for n in range(2, 9):
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / n, n).numpy(), mu=mu)
        assert torch.allclose(sched.sigmas.float(), tlcm.tlcm_sigmas(n, dict(sched.config), mu), atol=1e-6)


@pytest.mark.parametrize("segment", range(8))
def test_data_free_latent_lands_at_t_m_after_M_minus_s_teacher_steps(segment):
    g = torch.Generator().manual_seed(segment)
    x0, eps = torch.randn(5, 16, 64, generator=g), torch.randn(5, 16, 64, generator=g)
    fn = sigma_fn()
    t_m, t_n, t_low = tlcm.stage1_times(segment, 5, 20, 1000, 8, g)
    assert bool(((t_m <= 125 * (segment + 1)) & (t_n >= 125 * segment)).all())
    assert torch.allclose(t_m - t_n, torch.full_like(t_m, 20.0)) and bool((t_low == 125 * segment).all())
    calls = []
    z_m = tlcm.data_free_latents(exact_flow(x0, eps, calls), eps, t_m, 8 - segment, fn)
    assert len(calls) == 8 - segment  # the paper: 1 teacher step for the top segment, 8 for the lowest
    assert torch.allclose(calls[0], torch.ones(5))  # it starts from pure noise
    # Euler is exact on a straight path, so the solve must land exactly on x_{t_m}
    assert torch.allclose(z_m, flow_renoise(x0, eps, fn(t_m)), atol=1e-5)


def test_stage1_target_is_the_lower_milestone_and_the_boundary_in_the_lowest_segment():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 16, 64, generator=g), torch.randn(4, 16, 64, generator=g)
    fn = sigma_fn()
    for segment in range(8):
        t_m, t_n, t_low = tlcm.stage1_times(segment, 4, 20, 1000, 8, g)
        for t in (t_m, t_n):
            z = flow_renoise(x0, eps, fn(t))
            g_z = tlcm.jump(z, exact_flow(x0, eps)(z, fn(t)), fn(t), fn(t_low))
            assert torch.allclose(g_z, flow_renoise(x0, eps, fn(t_low)), atol=1e-5)
            if segment == 0:
                assert torch.allclose(g_z, x0, atol=1e-5)


def test_stage2_times_are_neighbouring_milestones_and_self_sampling_recovers_x0():
    g = torch.Generator().manual_seed(1)
    t_m, t_n = tlcm.stage2_times(64, 1000, 8, g)
    assert set(t_m.tolist()) <= {125.0 * i for i in range(1, 9)} and torch.equal(t_m - t_n, torch.full_like(t_m, 125))
    x0, eps = torch.randn(3, 16, 64, generator=g), torch.randn(3, 16, 64, generator=g)
    mu = tlcm.schedule_mu(FLUX_CONFIG, 16)
    for q in (1, 2, 4):
        def oracle(z, sigma):  # the velocity of a denoiser that always predicts x0: v = (z - x0) / sigma
            return (z - x0) / sigma[:, None, None]
        out = tlcm.self_sample(oracle, eps, tlcm.tlcm_sigmas(q, FLUX_CONFIG, mu), g)
        assert torch.allclose(out, x0, atol=1e-5)


def test_teacher_solve_takes_p_equal_substeps():
    calls = []
    x0, eps = torch.zeros(2, 4, 8), torch.ones(2, 4, 8)
    fn = sigma_fn(STATIC_CONFIG)
    z = flow_renoise(x0, eps, fn(torch.tensor([500.0, 1000.0])))
    out = tlcm.teacher_solve(exact_flow(x0, eps, calls), z, torch.tensor([500.0, 1000.0]),
                             torch.tensor([375.0, 875.0]), 3, fn)
    assert len(calls) == 3
    assert torch.allclose(calls[1], fn(torch.tensor([500 - 125 / 3, 1000 - 125 / 3])))
    assert torch.allclose(out, flow_renoise(x0, eps, fn(torch.tensor([375.0, 875.0]))), atol=1e-5)


# ----------------------------------------------------------------------------- the recipe


def base_args(world: str, out: str) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models/flux"),
            "--prompts_file", os.path.join(world, "data/train/metadata.jsonl"), "--max_train_samples", "32",
            "--output_dir", out, "--resolution", "32", "--lora_rank", "4", "--train_batch_size", "4",
            "--stage1_learning_rate", "1e-3", "--stage2_learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--validation_steps", "1000", "--report_to", "none"]


def run(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_script("train_tlcm_flux.py", args, env, check)


def adapter(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def transformer_output(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(2, 16, 64, generator=g), timestep=torch.tensor([1.0, 0.4]),
                           pooled_projections=torch.randn(2, 64, generator=g),
                           encoder_hidden_states=torch.randn(2, 16, 32, generator=g), txt_ids=torch.zeros(16, 3),
                           img_ids=torch.zeros(16, 3), return_dict=False)[0]


@pytest.fixture(scope="module")
def two_stage_run(toy_world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tlcm") / "run")
    run(base_args(toy_world, out) + ["--stage1_steps", "3", "--stage2_steps", "2", "--checkpointing_steps", "1",
                                     "--checkpoints_total_limit", "1"])
    return out


def test_two_stages_write_loras_that_load_through_peft_and_diffusers_alike(toy_world, two_stage_run):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model

    from utils import lora

    out = two_stage_run
    for stage in ("stage1", "stage2"):
        assert sorted(d for d in os.listdir(os.path.join(out, stage)) if d.startswith("checkpoint")) == \
            [f"checkpoint-{3 if stage == 'stage1' else 2}"]  # --checkpoints_total_limit 1
    s1, s2, final = adapter(os.path.join(out, "stage1/lora")), adapter(os.path.join(out, "stage2/lora")), adapter(out)
    assert any(v.abs().sum() > 0 for k, v in s1.items() if "lora_B" in k)  # stage 1 trained the LoRA
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)  # stage 2 trained on from it
    assert all(torch.equal(final[k], s2[k]) for k in s2)  # the top level holds the last stage

    path = os.path.join(toy_world, "models/flux")
    base = transformer_output(FluxTransformer2DModel.from_pretrained(path, subfolder="transformer"))
    pipe = FluxPipeline.from_pretrained(path)
    pipe.load_lora_weights(out)
    via_diffusers = transformer_output(pipe.transformer)
    assert not torch.allclose(via_diffusers, base, atol=1e-5)
    # seed 003's loading: LoraConfig(r, targets) without alpha, then load_adapter into "default"
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    peft_model = get_peft_model(transformer, LoraConfig(r=4, target_modules=lora.FLUX_LORA_TARGETS))
    peft_model.load_adapter(out, adapter_name="default", is_trainable=False)
    assert torch.allclose(transformer_output(peft_model), via_diffusers, atol=1e-5)
    kohya = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    lora.load_lora_file(os.path.join(out, "lora_kohya.safetensors"), kohya)
    assert torch.allclose(transformer_output(kohya), via_diffusers, atol=1e-5)
    assert "Training arguments" in open(os.path.join(out, "README.md")).read()


def test_tlcm_lora_samples_in_flux_pipeline_with_the_tlcm_scheduler(toy_world, two_stage_run):
    from diffusers import FluxPipeline

    from utils.tlcm_scheduler import FlowMatchEulerTLCMScheduler

    pipe = FluxPipeline.from_pretrained(os.path.join(toy_world, "models/flux"))
    pipe.scheduler = FlowMatchEulerTLCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(two_stage_run)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a large red circle on a white background"], num_inference_steps=4, height=32, width=32,
                  max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and float(images.std()) > 0.01


def test_killed_stage2_resumes_to_the_same_lora(toy_world, tmp_path):
    """SIGKILL while stage 2 writes checkpoint-4; resume skips the finished stage 1 and ends bit-identical."""
    args = ["--stage1_steps", "2", "--stage2_steps", "5", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]
    straight = str(tmp_path / "straight")
    run(base_args(toy_world, straight) + args)

    crashed = str(tmp_path / "crashed")
    kill_while_saving("train_tlcm_flux.py", base_args(toy_world, crashed) + args,
                      os.path.join(crashed, "stage2", "checkpoint-4.partial"))
    assert not os.path.exists(os.path.join(crashed, "adapter_model.safetensors"))  # no final output yet
    assert sorted(d for d in os.listdir(os.path.join(crashed, "stage2")) if "." not in d) == ["checkpoint-2"]

    run(base_args(toy_world, crashed) + args + ["--resume_from_checkpoint", "latest"])
    a, b = adapter(straight), adapter(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reward_extras_and_ema_target_run_after_the_two_stages(toy_world, tmp_path):
    out = str(tmp_path / "extras")
    proc = run(base_args(toy_world, out) + ["--stage1_steps", "1", "--stage2_steps", "1", "--extras_steps", "2",
                                            "--extras_learning_rate", "1e-3", "--ema_decay", "0.5",
                                            "--reward_model", os.path.join(toy_world, "judge"),
                                            "--checkpointing_steps", "100"])
    assert proc.returncode == 0
    s2, extras = adapter(os.path.join(out, "stage2/lora")), adapter(os.path.join(out, "stageextras/lora"))
    assert any(not torch.equal(s2[k], extras[k]) for k in s2)  # the reward stage moved the LoRA
    assert all(torch.equal(v, adapter(out)[k]) for k, v in extras.items())


def test_judge_reward_prefers_the_prompted_shape(toy_world):
    from utils.evaluate import load_real_images, read_labels
    from utils.rewards import hinge_reward_loss, load_reward_model
    from utils.toy.data import COLOUR_NAMES, SHAPES, caption

    folder = os.path.join(toy_world, "data/test")
    images, labels = load_real_images(folder, 16), read_labels(folder)[:16]
    right = [caption(SHAPES[s], COLOUR_NAMES[c], "white") for s, c in labels.tolist()]
    wrong = [caption(SHAPES[(s + 1) % len(SHAPES)], COLOUR_NAMES[c], "white") for s, c in labels.tolist()]
    score = load_reward_model(os.path.join(toy_world, "judge"))
    images.requires_grad_(True)
    pos, neg = score(images, right), score(images, wrong)
    assert bool((pos > neg).all())
    loss = hinge_reward_loss(pos, neg, 2.0)
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.mark.parametrize("extra, needle", [
    (["--pretrained_teacher_model", "MODEL/sd"], "flux"),
    (["--stage", "2"], "--init_lora"),
    (["--loss_type", "lpips"], "--latent_lpips_path"),
    (["--skip", "500"], "--skip"),
    (["--learning_rate", "1e-4"], "--stage1_learning_rate"),
    (["--prompts_file", "/nonexistent/prompts.txt"], "--prompts_file"),
])
def test_bad_input_is_one_line_error(toy_world, tmp_path, extra, needle):
    extra = [e.replace("MODEL", os.path.join(toy_world, "models")) for e in extra]
    proc = run(base_args(toy_world, str(tmp_path / "out")) + extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(str(tmp_path / "out" / "adapter_model.safetensors"))
