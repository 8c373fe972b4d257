"""TLCM on a DDPM teacher: the DDPM-form math (utils/tlcm.py) and train_tlcm_sdxl.py on the toy SDXL teacher."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from helpers import Spy, assert_one_line_error, capture_distance, kill_while_saving, random_lora, run_recipe

from utils import lora, tlcm
from utils.scheduling_tlcm import ddpm_milestones, tlcm_timesteps
from utils.solvers import alpha_sigma, ddim_step, model_output_from_x0_eps

pytestmark = pytest.mark.usefixtures("one_thread")
MILESTONES = torch.tensor(ddpm_milestones(1000, 8), dtype=torch.float64)  # 0, 124, 249, ..., 874, 999


def alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def exact_denoiser(x0: torch.Tensor, eps: torch.Tensor, ac: torch.Tensor, prediction_type: str,
                   calls: list | None = None):
    """The model output of the single path x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, at any (z, t) on it."""
    def out(z, t):
        if calls is not None:
            calls.append(t.clone())
        return model_output_from_x0_eps(x0, eps, *alpha_sigma(ac, t), prediction_type)
    return out


def on_path(x0, eps, ac, t):
    return ddim_step(x0, eps, *alpha_sigma(ac, t.long()))


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stage1_jump_lands_on_the_lower_milestone(prediction_type):
    ac, g = alphas_cumprod(), torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    denoise = exact_denoiser(x0, eps, ac, prediction_type)
    for segment in range(8):
        t_m, t_n, t_low = (t.long() for t in tlcm.stage1_times(segment, 6, 20, 1000, 8, g, milestones=MILESTONES))
        assert bool((t_low == int(MILESTONES[segment])).all() and (t_m <= int(MILESTONES[segment + 1])).all())
        assert bool((t_n >= t_low).all()) and torch.equal(t_m - t_n, torch.full_like(t_m, 20))
        for t in (t_m, t_n):
            z = on_path(x0, eps, ac, t)
            g_z = tlcm.ddpm_jump(z, denoise(z, t), t, t_low, ac, prediction_type)
            assert torch.allclose(g_z, on_path(x0, eps, ac, t_low), atol=1e-4)
            assert torch.allclose(tlcm.ddpm_x0(z, denoise(z, t), t, ac, prediction_type), x0, atol=1e-3)


@pytest.mark.parametrize("segment", [0, 3, 7])
def test_data_free_latents_take_M_minus_s_equal_ddim_steps_from_the_top(segment):
    ac, g = alphas_cumprod(), torch.Generator().manual_seed(segment)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t_m = torch.tensor([int(MILESTONES[segment + 1]) - 20 * j for j in range(4)])
    calls = []
    top = torch.full_like(t_m, 999)
    z_m = tlcm.ddpm_data_free_latents(exact_denoiser(x0, eps, ac, "epsilon", calls), on_path(x0, eps, ac, top),
                                      t_m, 8 - segment, ac, "epsilon")
    assert len(calls) == 8 - segment  # the paper: 1 teacher step for the top segment, 8 for the lowest
    assert torch.equal(calls[0], top)  # from pure noise, taken as z at T - 1
    gaps = (lambda ts: ts[:-1] - ts[1:])(torch.stack(calls + [t_m]))  # per sample, from 999 down to t_m
    assert bool((gaps >= 0).all()) and bool((gaps.amax(0) - gaps.amin(0) <= 1).all())  # equal steps, rounded
    assert torch.allclose(z_m, on_path(x0, eps, ac, t_m), atol=1e-4)  # DDIM is exact on a single path


def test_ddpm_solve_takes_p_rounded_substeps_to_the_milestone_below():
    ac = alphas_cumprod()
    x0, eps, calls = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8), []
    t_m, t_n = torch.tensor([124, 999]), torch.tensor([0, 874])
    z = tlcm.ddpm_solve(exact_denoiser(x0, eps, ac, "epsilon", calls), on_path(x0, eps, ac, t_m), t_m, t_n, 3, ac,
                        "epsilon")
    assert [c.tolist() for c in calls] == [[124, 999], [83, 957], [41, 916]]
    assert torch.allclose(z, on_path(x0, eps, ac, t_n), atol=1e-4)


# ----------------------------------------------------------------------------- the recipe's losses, called directly


def toy_diffusion(world: str, out: str, extra: list[str] = (), batch: int = 2, seed: int = 0):
    """(recipe, diff, cond, uncond): train_tlcm_sdxl.UNetDiffusion on the toy SDXL UNet (fp32, CPU, 32 px) with a
    rank-4 LoRA whose lora_B is random (a trained student), and random prompt conditions of `batch` prompts."""
    from diffusers import UNet2DConditionModel
    from helpers import import_script

    from utils import models

    recipe = import_script("train_tlcm_sdxl.py")
    path = os.path.join(world, "models/sdxl")
    args = recipe.parse_args(["--pretrained_teacher_model", path, "--prompts_file", "unused.txt", "--output_dir", out,
                              "--resolution", "32", "--lora_rank", "4", "--guidance_scale", "5", *extra])
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    g = random_lora(unet, lora.LCM_LORA_TARGETS, seed)
    config = models.load_noise_scheduler_config(path)
    teacher = models.Teacher("sdxl", config, None, [], [], unet, torch.float32, alphas_cumprod(), "epsilon")
    diff = recipe.UNetDiffusion(unet, teacher, 8, args, torch.device("cpu"))

    def condition(n: int) -> dict:
        return {"embeds": torch.randn(n, 8, 64, generator=g), "pooled": torch.randn(n, 32, generator=g)}
    return recipe, diff, condition(batch), condition(1)


def unet_calls(unet) -> list:
    """(batch size, timesteps, LoRA enabled) of every UNet forward from now on."""
    seen = []

    def hook(module, args, kwargs):
        enabled = not any(getattr(m, "disable_adapters", False) for m in module.modules() if hasattr(m, "lora_A"))
        seen.append((args[0].shape[0], args[1].clone(), enabled))
    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def grads(unet) -> tuple[list, list]:
    named = list(unet.named_parameters())
    return [p.grad for n, p in named if "lora_" in n], [p.grad for n, p in named if "lora_" not in n]


def test_stage1_loss_counts_teacher_steps_and_jumps_to_the_lower_milestone(toy_world, tmp_path, monkeypatch):
    """Data-free z_{t_m}: M - s batched (cond + uncond) base-UNet calls from t = 999, then one teacher step of
    --skip from t_m; the target (no grad) and the prediction both jump to the segment's lower milestone."""
    recipe, diff, cond, uncond = toy_diffusion(toy_world, str(tmp_path / "out"))
    times, jumps = Spy(tlcm.stage1_times), Spy(tlcm.ddpm_jump)
    monkeypatch.setattr(tlcm, "stage1_times", times)
    monkeypatch.setattr(tlcm, "ddpm_jump", jumps)
    calls, segments = unet_calls(diff.base), set()
    for seed in range(8):  # segments 4, 5, 0, 2, 2, 3, 2, 7: the lowest and the top one among them
        calls.clear()
        pairs = []
        loss = recipe.stage1_loss(diff, diff.base, cond, uncond, capture_distance(pairs),
                                  torch.Generator().manual_seed(seed))
        segment = times.calls[-1][0]
        segments.add(segment)
        (z_n, _, t_n, low_n, *_), (z_m, _, t_m, low_m, *_) = jumps.calls[-2:]  # the target first, no grad
        teacher = [(n, t) for n, t, enabled in calls if not enabled]
        solves = teacher[:-1]
        expected = 0 if bool((t_m == 999).all()) else 8 - segment
        assert len(solves) == expected and len(teacher) == expected + 1
        assert all(n == 4 for n, _ in teacher)  # cond + uncond of 2 prompts in one pass
        if solves:
            assert torch.equal(solves[0][1], torch.full((4,), 999))  # from pure noise
        assert torch.equal(teacher[-1][1], torch.cat([t_m, t_m]))  # the skip step starts at t_m
        assert torch.equal(t_m - t_n, torch.full_like(t_m, 20))
        assert torch.equal(low_m, low_n) and bool((low_m == int(MILESTONES[segment])).all())
        assert [(n, enabled) for n, _, enabled in calls[-2:]] == [(2, True), (2, True)]  # target, prediction
        (pred, target), = pairs
        assert pred.requires_grad and not target.requires_grad
    assert {0, 7} <= segments, segments
    loss.backward()
    lora_grads, base_grads = grads(diff.base)
    assert all(g is None for g in base_grads) and any(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_stage2_loss_draws_milestones_and_runs_q_student_and_p_teacher_steps(toy_world, tmp_path, monkeypatch):
    recipe, diff, cond, uncond = toy_diffusion(toy_world, str(tmp_path / "out"), ["--stage2_student_steps", "3",
                                                                                 "--stage2_teacher_substeps", "2"])
    solves = Spy(tlcm.ddpm_solve)
    monkeypatch.setattr(tlcm, "ddpm_solve", solves)
    calls, seen = unet_calls(diff.base), set()
    for seed in range(6):
        calls.clear()
        pairs = []
        recipe.stage2_loss(diff, diff.base, cond, uncond, capture_distance(pairs), torch.Generator().manual_seed(seed))
        student = [t.tolist() for n, t, enabled in calls[:3]]
        assert student == [[t] * 2 for t in tlcm_timesteps(3)]  # q = 3 released-sampler steps: 999, 499, 124
        (_, _, t_m, t_n, substeps, *_), = solves.calls[-1:]
        assert substeps == 2 and set(t_m.tolist()) <= set(ddpm_milestones()[1:])
        assert all(ddpm_milestones().index(a) == ddpm_milestones().index(b) + 1 for a, b in zip(t_m.tolist(),
                                                                                                t_n.tolist()))
        assert [(n, enabled) for n, _, enabled in calls[3:]] == [(4, False)] * 2 + [(2, True)] * 2
        seen |= set(t_m.tolist())
        (pred, target), = pairs
        assert pred.requires_grad and not target.requires_grad
    assert len(seen) > 2


def test_extras_losses_train_the_student_the_fake_score_and_the_head_apart(toy_world, tmp_path):
    from utils import tlcm_extras

    recipe, diff, cond, uncond = toy_diffusion(toy_world, str(tmp_path / "out"), ["--dmd", "--gan"])
    fake = list(tlcm_extras.add_fake_score(diff.base, 4, 8, lora.LCM_LORA_TARGETS).values())
    head = tlcm_extras.DiscriminatorHead(diff.base.config.block_out_channels[-1], ("mid_block", "output"),
                                           hidden=16, seed=0)
    gen = torch.Generator().manual_seed(0)
    loss, x = recipe.extras_loss(diff, diff.base, cond, uncond, ["a", "b"], gen, head=head)
    loss.backward()
    student = [p for n, p in diff.base.named_parameters() if ".default." in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
    assert all(p.grad is None for p in fake)  # the fake score's x0 is read without grad
    assert x.shape == (2, 4, 8, 8) and not x.requires_grad
    for p in [*student, *head.parameters()]:  # what the recipe's optimizers (AuxOptimizer.step) clear
        p.grad = None
    with tlcm_extras.adapter_active(diff.base):  # as the recipe calls it: the fake score's weights require grad only there
        recipe.fake_score_loss(diff, cond, x, gen).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake) and all(p.grad is None for p in student)
    recipe.disc_loss(diff, head, cond, x, gen).backward()
    assert all(p.grad is not None for p in head.parameters()) and all(p.grad is None for p in student)


def test_latent_lpips_distance_on_unet_latents(toy_world, tmp_path):
    recipe, diff, _, _ = toy_diffusion(toy_world, str(tmp_path / "out"), [
        "--loss_type", "lpips", "--latent_lpips_path", os.path.join(toy_world, "latent_lpips/sd")])
    from utils.losses import latent_distance

    a = diff.args
    d = latent_distance(a.loss_type, a.huber_c, "cpu", a.latent_lpips_path, 4, a.lpips_augmentations)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True), torch.randn(2, 4, 8, 8, generator=g)
    same = d(b, b, torch.Generator().manual_seed(1))
    loss = d(a, b, torch.Generator().manual_seed(1))
    loss.backward()
    assert same.item() == 0.0 and loss.item() > 0 and a.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- saving and loading


def pipeline_images(world: str, unet=None, lora_dir: str | None = None) -> torch.Tensor:
    """The toy SDXL pipeline (its UNet replaced by `unet`, or with `lora_dir` loaded) sampled with the TLCM
    sampler at 4 steps, no CFG, from fixed seeds."""
    from diffusers import StableDiffusionXLPipeline

    from utils.scheduling_tlcm import TLCMScheduler

    path = os.path.join(world, "models/sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path, **({"unet": unet} if unet is not None else {}))
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    pipe.scheduler = TLCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():
        return pipe(["a large red circle on a white background", "a small blue square on a black background"],
                    num_inference_steps=4, guidance_scale=0.0, generator=gens, output_type="pt").images


def test_peft_and_diffusers_loading_give_the_in_memory_students_images(toy_world, tmp_path):
    """The saved LoRA loaded as the released snippet does (get_peft_model(LoraConfig(r)) + load_adapter, PEFT's
    default alpha), with load_lora_weights, and from the kohya file: the same images / outputs as in memory."""
    from diffusers import UNet2DConditionModel
    from helpers import unet_output
    from peft import LoraConfig, get_peft_model

    from utils import lora_files

    recipe, diff, _, _ = toy_diffusion(toy_world, str(tmp_path / "unused"))
    out = str(tmp_path / "lora")
    one_process = SimpleNamespace(wait_for_everyone=lambda: None, is_main_process=True)
    lora_files.save_trained_lora(one_process, diff.base, out, "unet", staged=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "lora_kohya.safetensors",
                                       "pytorch_lora_weights.safetensors"]
    in_memory = pipeline_images(toy_world, unet=diff.base.eval())
    path = os.path.join(toy_world, "models/sdxl")
    base = pipeline_images(toy_world)
    assert not torch.allclose(in_memory, base, atol=1e-3)  # the LoRA changes the images
    assert torch.allclose(pipeline_images(toy_world, lora_dir=out), in_memory, atol=1e-5)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    peft_model = get_peft_model(unet, LoraConfig(r=4, target_modules=lora.LCM_LORA_TARGETS))
    peft_model.load_adapter(out, adapter_name="default", is_trainable=False)
    assert torch.allclose(pipeline_images(toy_world, unet=peft_model.base_model.model), in_memory, atol=1e-5)
    kohya = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    lora_files.load_lora_file(os.path.join(out, "lora_kohya.safetensors"), kohya)
    assert torch.allclose(unet_output(kohya), unet_output(diff.base), atol=1e-5)


# ----------------------------------------------------------------------------- the recipe, run


def base_args(world: str, out: str) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models/sdxl"),
            "--prompts_file", os.path.join(world, "data/train/metadata.jsonl"), "--max_train_samples", "32",
            "--output_dir", out, "--resolution", "32", "--lora_rank", "4", "--train_batch_size", "4",
            "--guidance_scale", "5", "--stage1_learning_rate", "1e-3", "--stage2_learning_rate", "1e-3",
            "--lr_warmup_steps", "0", "--validation_steps", "1000", "--report_to", "none"]


def run(args: list[str], check: bool = True):
    """train_tlcm_sdxl.py in this process."""
    return run_recipe("train_tlcm_sdxl.py", args, check=check)


def adapter(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def full_run(toy_world, tmp_path_factory):
    """Both stages and the three extras, one or two steps each."""
    out = str(tmp_path_factory.mktemp("tlcm_sdxl") / "run")
    run(base_args(toy_world, out) + ["--stage1_steps", "2", "--stage2_steps", "1", "--extras_steps", "1",
                                     "--extras_learning_rate", "1e-3", "--reward_model",
                                     os.path.join(toy_world, "judge"), "--dmd", "--gan", "--checkpointing_steps", "100",
                                     "--checkpoint_at_end"])
    return out


def test_stages_write_their_loras_and_the_last_one_on_top(full_run):
    s1, s2, extras = (adapter(os.path.join(full_run, f"stage{s}/lora")) for s in ("1", "2", "extras"))
    assert any(v.abs().sum() > 0 for k, v in s1.items() if "lora_B" in k)  # stage 1 trained the LoRA
    assert any(not torch.equal(s1[k], s2[k]) for k in s1) and any(not torch.equal(s2[k], extras[k]) for k in s2)
    top = adapter(full_run)
    assert top.keys() == extras.keys() and all(torch.equal(top[k], v) for k, v in extras.items())
    assert not any("fake_score" in k for k in top)  # the DMD fake score is never saved with the LoRA
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "README.md"):
        assert os.path.isfile(os.path.join(full_run, name))
    from utils import checkpoint

    state = checkpoint.read_model_state(os.path.join(full_run, "stageextras", "checkpoint-1"))
    fake_b = [v for k, v in state.items() if "lora_B.fake_score" in k]
    assert fake_b and any(v.abs().sum() > 0 for v in fake_b)  # the fake score took its step (zero-initialised B)


def test_model_card_snippet_runs_as_written(full_run):
    """The card's Python snippet, sampling included (the toy's default size), with both schedulers."""
    snippet = open(os.path.join(full_run, "README.md")).read().split("```python\n")[1].split("```")[0]
    assert "StableDiffusionXLPipeline" in snippet and "TLCMScheduler" in snippet and "LCMScheduler" in snippet
    scope: dict = {}
    exec(snippet, scope)
    assert type(scope["pipe"].scheduler).__name__ == "LCMScheduler"
    assert scope["pipe"].scheduler.timesteps.tolist() == [999, 749, 499, 124]
    assert "unet" in scope["pipe"].get_list_adapters()


@pytest.mark.parametrize("extra, needle", [
    (["--pretrained_teacher_model", "MODEL/flux"], "sdxl or sd"),
    (["--skip", "12.5"], "--skip"),
    (["--stage2_student_steps", "9"], "--stage2_student_steps"),
    (["--stage", "2"], "--init_lora"),
    (["--uncond", "noise"], "--uncond"),
])
def test_bad_input_is_one_line_error(toy_world, tmp_path, extra, needle):
    extra = [e.replace("MODEL", os.path.join(toy_world, "models")) for e in extra]
    proc = run(base_args(toy_world, str(tmp_path / "out")) + extra, check=False)
    assert_one_line_error(proc, needle, str(tmp_path / "out" / "adapter_model.safetensors"))


RESUME_ARGS = ["--stage1_steps", "3", "--stage2_steps", "3", "--checkpointing_steps", "2", "--checkpoint_at_end",
               "--lr_scheduler", "cosine", "--ema_decay", "0.9"]


@pytest.fixture(scope="module")
def straight_run(toy_world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tlcm_sdxl_straight") / "run")
    run(base_args(toy_world, out) + RESUME_ARGS)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["1", "2"])
def test_killed_stage_resumes_to_the_same_lora(toy_world, straight_run, tmp_path, monkeypatch, stage):
    """SIGKILL (a real process, launched as a user would) while stage `stage` writes its last checkpoint; the
    resume restores checkpoint-2 of that stage (skipping a finished stage 1) and ends bit-identical."""
    crashed = str(tmp_path / "crashed")
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the same float sums as this process
    kill_while_saving("train_tlcm_sdxl.py", base_args(toy_world, crashed) + RESUME_ARGS,
                      os.path.join(crashed, f"stage{stage}", "checkpoint-3.partial"))
    assert not os.path.exists(os.path.join(crashed, "adapter_model.safetensors"))  # no final output yet
    assert sorted(d for d in os.listdir(os.path.join(crashed, f"stage{stage}")) if "." not in d) == ["checkpoint-2"]

    resumed = run(base_args(toy_world, crashed) + RESUME_ARGS + ["--resume_from_checkpoint", "latest"])
    assert ("stage 1 already finished" in resumed.stderr) == (stage == "2")
    a, b = adapter(straight_run), adapter(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
