"""TLCM on flow matching: the training math (utils/tlcm.py) and train_tlcm_flux.py on the toy FLUX teacher."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import Spy, assert_one_line_error, capture_distance, kill_while_saving, run_recipe

from utils import tlcm
from utils.solvers import flow_renoise

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
    assert tlcm.flux_milestones(1000, 8).tolist() == [125.0 * i for i in range(9)]
    fn = sigma_fn()
    milestone_sigmas = fn(tlcm.flux_milestones(1000, 8))
    mu = tlcm.schedule_mu(FLUX_CONFIG, 16)
    for n in (2, 4, 8):  # FLUX's N-step schedules are subsets of the 8 milestones
        sig = tlcm.tlcm_sigmas(n, FLUX_CONFIG, mu)
        assert all(torch.isclose(milestone_sigmas, s, atol=1e-6).any() for s in sig)
    for n in range(1, 9):  # sigma(t) at N equal steps down from T, then 0
        sig = tlcm.tlcm_sigmas(n, FLUX_CONFIG, mu)
        assert sig.dtype == torch.float32 and sig.shape == (n + 1,) and sig[-1] == 0.0
        assert torch.allclose(sig[:-1], fn(torch.linspace(1000.0, 1000.0 / n, n)), atol=1e-6)


def test_sampler_step_closed_forms_and_no_noise_on_the_last_step():
    g = torch.Generator().manual_seed(2)
    x0, eps, fresh = (torch.randn(2, 16, 64, generator=g) for _ in range(3))
    z = flow_renoise(x0, eps, 0.8)
    z_next, x0_hat = tlcm.sampler_step(z, eps - x0, 0.8, 0.3, lambda: fresh)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(z_next, 0.7 * x0 + 0.3 * fresh, atol=1e-5)

    def no_noise():
        raise AssertionError("the last step must not draw noise")
    z_next, x0_hat = tlcm.sampler_step(z, eps - x0, 0.8, 0.0, no_noise)
    assert torch.equal(z_next, x0_hat) and torch.allclose(x0_hat, x0, atol=1e-5)


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


# ----------------------------------------------------------------------------- the recipe's losses, called directly


def student_grads(flow) -> tuple[list, list]:
    """(gradients of the LoRA's parameters, gradients of the frozen base's), None where there is none."""
    named = list(flow.base.named_parameters())
    return [p.grad for n, p in named if "lora_" in n], [p.grad for n, p in named if "lora_" not in n]


def test_stage1_loss_jumps_both_ends_to_the_lower_milestone(toy_world, tmp_path, monkeypatch):
    """The recipe's stage-1 loss: the data-free latent takes M - s teacher steps, then both the student's
    prediction and the (no-grad) target jump to the segment's lower milestone: x0 itself in the lowest one."""
    import train_tlcm_flux as recipe
    from helpers import toy_flux_flow

    M = 4
    flow, cond, uncond = toy_flux_flow(toy_world, str(tmp_path / "out"), ["--num_segments", str(M)])
    times, solves, jumps = Spy(tlcm.stage1_times), Spy(tlcm.data_free_latents), Spy(tlcm.jump)
    for name, spy in (("stage1_times", times), ("data_free_latents", solves), ("jump", jumps)):
        monkeypatch.setattr(tlcm, name, spy)
    milestone_sigmas = flow.sigma(tlcm.flux_milestones(flow.T, M))
    segments = set()
    for seed in range(12):
        pairs = []
        gen = torch.Generator().manual_seed(seed)
        loss = recipe.stage1_loss(flow, flow.base, cond, uncond, capture_distance(pairs), gen)
        segment, n, skip, T, m = times.calls[-1][:5]
        segments.add(segment)
        assert (n, skip, T, m) == (2, flow.args.skip, 1000, M)
        assert solves.calls[-1][3] == M - segment  # equal teacher steps from pure noise down to t_m
        (_, _, s_n, target_sigma), (_, _, s_m, pred_sigma) = jumps.calls[-2:]  # the target's jump comes first
        assert torch.equal(target_sigma, pred_sigma)
        assert torch.allclose(pred_sigma, milestone_sigmas[segment].float().expand(2))
        assert bool((s_m > pred_sigma).all() and (s_n >= pred_sigma).all() and (s_m > s_n).all())
        (pred, target), = pairs
        assert pred.requires_grad and not target.requires_grad and loss.requires_grad
        if segment == 0:  # the boundary: both ends are x0 predictions
            assert float(pred_sigma.abs().max()) == 0.0
    assert 0 in segments and len(segments) > 1, segments
    loss.backward()
    lora_grads, base_grads = student_grads(flow)
    assert all(g is None for g in base_grads) and any(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_stage1_target_uses_the_ema_weights_and_the_prediction_does_not(toy_world, tmp_path):
    import train_tlcm_flux as recipe
    from helpers import toy_flux_flow

    from utils.ema import EMAParams

    flow, cond, uncond = toy_flux_flow(toy_world, str(tmp_path / "out"))
    params = [p for p in flow.base.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]
    ema = EMAParams(params, 0.5)
    ema.shadow = [torch.zeros_like(s) for s in ema.shadow]  # an EMA LoRA that adds nothing

    def pair(e):
        calls = []
        recipe.stage1_loss(flow, flow.base, cond, uncond, capture_distance(calls), torch.Generator().manual_seed(3), e)
        return calls[0]
    (pred, target), (pred_ema, target_ema) = pair(None), pair(ema)
    assert torch.equal(pred, pred_ema) and not torch.allclose(target, target_ema, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(params, trained))  # the trained weights are back


def test_stage2_loss_draws_milestones_and_takes_p_teacher_substeps(toy_world, tmp_path, monkeypatch):
    """The recipe's stage-2 loss: the student's own q-step sample, noised to a milestone t_m; the teacher takes
    p sub-steps to the milestone below; x0 predictions at both ends, the target without grad."""
    import train_tlcm_flux as recipe
    from helpers import toy_flux_flow

    flow, cond, uncond = toy_flux_flow(toy_world, str(tmp_path / "out"), ["--stage2_student_steps", "3",
                                                                         "--stage2_teacher_substeps", "2"])
    samples, solves = Spy(tlcm.self_sample), Spy(tlcm.teacher_solve)
    monkeypatch.setattr(tlcm, "self_sample", samples)
    monkeypatch.setattr(tlcm, "teacher_solve", solves)
    milestones = set(tlcm.flux_milestones(1000, 8).tolist()[1:])
    seen = set()
    for seed in range(4):
        pairs = []
        gen = torch.Generator().manual_seed(seed)
        loss = recipe.stage2_loss(flow, flow.base, cond, uncond, capture_distance(pairs), gen)
        assert torch.equal(samples.calls[-1][2], flow.sampler_sigmas(3))  # q = 3 steps of the released sampler
        t_m, t_n, substeps = solves.calls[-1][2:5]
        assert substeps == 2 and set(t_m.tolist()) <= milestones and torch.equal(t_m - t_n, torch.full_like(t_m, 125))
        seen |= set(t_m.tolist())
        (pred, target), = pairs
        assert pred.requires_grad and not target.requires_grad
    assert len(seen) > 1
    loss.backward()
    lora_grads, base_grads = student_grads(flow)
    assert all(g is None for g in base_grads) and any(g is not None and g.abs().sum() > 0 for g in lora_grads)


# ----------------------------------------------------------------------------- the recipe, run


def base_args(world: str, out: str) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models/flux"),
            "--prompts_file", os.path.join(world, "data/train/metadata.jsonl"), "--max_train_samples", "32",
            "--output_dir", out, "--resolution", "32", "--lora_rank", "4", "--train_batch_size", "4",
            "--stage1_learning_rate", "1e-3", "--stage2_learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--validation_steps", "1000", "--report_to", "none"]


def run(args: list[str], check: bool = True):
    """train_tlcm_flux.py in this process."""
    return run_recipe("train_tlcm_flux.py", args, check=check)


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

    from utils import lora, lora_files

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
    # PEFT's loading as users write it: LoraConfig(r, targets) without alpha, then load_adapter into "default"
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    peft_model = get_peft_model(transformer, LoraConfig(r=4, target_modules=lora.FLUX_LORA_TARGETS))
    peft_model.load_adapter(out, adapter_name="default", is_trainable=False)
    assert torch.allclose(transformer_output(peft_model), via_diffusers, atol=1e-5)
    kohya = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")
    lora_files.load_lora_file(os.path.join(out, "lora_kohya.safetensors"), kohya)
    assert torch.allclose(transformer_output(kohya), via_diffusers, atol=1e-5)


def test_model_card_snippet_loads_the_lora_with_the_tlcm_scheduler(two_stage_run):
    """The card's Python snippet, up to the sampling call (at the model's full default size), runs as written."""
    card = open(os.path.join(two_stage_run, "README.md")).read()
    assert "Training arguments" in card
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "from utils.scheduling_flow_match_euler_tlcm import FlowMatchEulerTLCMScheduler" in snippet
    setup = "\n".join(line for line in snippet.splitlines() if not line.startswith("image = "))
    scope: dict = {}
    exec(setup, scope)
    assert type(scope["pipe"].scheduler).__name__ == "FlowMatchEulerTLCMScheduler"
    assert "transformer" in scope["pipe"].get_list_adapters()


def test_tlcm_lora_samples_in_flux_pipeline_with_the_tlcm_scheduler(toy_world, two_stage_run):
    from diffusers import FluxPipeline

    from utils.scheduling_flow_match_euler_tlcm import FlowMatchEulerTLCMScheduler

    pipe = FluxPipeline.from_pretrained(os.path.join(toy_world, "models/flux"))
    pipe.scheduler = FlowMatchEulerTLCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(two_stage_run)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a large red circle on a white background"], num_inference_steps=4, height=32, width=32,
                  max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and float(images.std()) > 0.01


@pytest.mark.slow
def test_killed_stage2_resumes_to_the_same_lora(toy_world, tmp_path, monkeypatch):
    """SIGKILL (a real process, launched as a user would) while stage 2 writes checkpoint-4; the resume skips
    the finished stage 1 and ends bit-identical."""
    args = ["--stage1_steps", "2", "--stage2_steps", "5", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]
    straight = str(tmp_path / "straight")
    run(base_args(toy_world, straight) + args)

    crashed = str(tmp_path / "crashed")
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the same float sums as this process
    kill_while_saving("train_tlcm_flux.py", base_args(toy_world, crashed) + args,
                      os.path.join(crashed, "stage2", "checkpoint-4.partial"))
    assert not os.path.exists(os.path.join(crashed, "adapter_model.safetensors"))  # no final output yet
    assert sorted(d for d in os.listdir(os.path.join(crashed, "stage2")) if "." not in d) == ["checkpoint-2"]

    resumed = run(base_args(toy_world, crashed) + args + ["--resume_from_checkpoint", "latest"])
    assert "stage 1 already finished" in resumed.stderr
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
    from utils.losses import hinge_reward_loss
    from utils.rewards import load_reward_model
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
    assert_one_line_error(proc, needle, str(tmp_path / "out" / "adapter_model.safetensors"))
