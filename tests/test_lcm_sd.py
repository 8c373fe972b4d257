"""train_lcm_distill_sd.py on the toy world: short runs, checkpoints, exact resume, the loss, bad input.

Runs go in-process (helpers.run_recipe); the kill-and-resume test is the one real `python ...` command line.
The loss is checked by direct calls of the recipe's lcm_loss on the toy SD teacher.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import import_script, kill_while_saving, run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def base_args(world: str, out: str) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models/sd"),
            "--train_data_dir", os.path.join(world, "data/train"), "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "4", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
            "--w_min", "2", "--w_max", "6", "--validation_steps", "1000", "--report_to", "none",
            "--max_train_samples", "64"]


def run(args: list[str], env: dict | None = None, check: bool = True):
    return run_recipe("train_lcm_distill_sd.py", args, env, check)


def unet_state(folder: str) -> dict:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def test_short_run_saves_a_pipeline_that_samples_and_checkpoints_obey_the_limit(toy_world, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    out = str(tmp_path / "run")
    run(base_args(toy_world, out) + ["--max_train_steps", "4", "--checkpointing_steps", "1",
                                     "--checkpoints_total_limit", "2"])
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a large red circle on a white background", num_inference_steps=4, guidance_scale=5.0,
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0.01
    assert "Training arguments" in open(os.path.join(out, "README.md")).read()

    # resume "latest" continues from step 4, not from scratch
    proc = run(base_args(toy_world, out) + ["--max_train_steps", "6", "--checkpointing_steps", "1",
                                            "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest"])
    assert "at step 4" in proc.stdout + proc.stderr
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-5", "checkpoint-6"]

    # LCF: fine-tune the LCM just written, with no teacher
    lcf = str(tmp_path / "lcf")
    args = base_args(toy_world, lcf)
    args[args.index("--pretrained_teacher_model") + 1] = out
    run(args + ["--lcf", "--max_train_steps", "2"])
    tuned, start = unet_state(lcf), unet_state(out)
    assert any(not torch.equal(tuned[k], start[k]) for k in start)


@pytest.mark.slow
def test_killed_run_resumed_ends_with_the_same_weights(toy_world, tmp_path, monkeypatch):
    """SIGKILL (a real process) while writing checkpoint-4; resume from checkpoint-2; compare with an
    uninterrupted run (the straight and resumed runs in-process: they must also match the real one)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the killed process computes on one thread, as this one does
    args = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]
    straight = str(tmp_path / "straight")
    run(base_args(toy_world, straight) + args)

    crashed = str(tmp_path / "crashed")
    kill_while_saving("train_lcm_distill_sd.py", base_args(toy_world, crashed) + args,
                      os.path.join(crashed, "checkpoint-4.partial"))
    assert sorted(d for d in os.listdir(crashed) if d.startswith("checkpoint-") and "." not in d) == ["checkpoint-2"]

    run(base_args(toy_world, crashed) + args + ["--resume_from_checkpoint", "latest"])
    a, b = unet_state(straight), unet_state(crashed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, needle", [
    (["--pretrained_teacher_model", "/nonexistent/teacher"], "/nonexistent/teacher"),
    (["--resolution", "30"], "--resolution"),
    (["--w_min", "8", "--w_max", "4"], "--w_min"),
    (["--loss_type", "l1"], "--loss_type"),
    (["--resume_from_checkpoint", "checkpoint-77"], "--resume_from_checkpoint"),
])
def test_bad_input_is_one_line_error(toy_world, tmp_path, extra, needle):
    args = base_args(toy_world, str(tmp_path / "bad")) + ["--max_train_steps", "1"]
    for i in range(0, len(extra), 2):  # replace a flag already in the base args, or add it
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    proc = run(args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ the loss, called directly
@pytest.fixture(scope="module")
def recipe(toy_world, tmp_path_factory):
    """The recipe's pieces on the toy SD teacher, and one fixed batch: its image latents and prompt embeddings."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from utils import data, models
    from utils.consistency import LCMSchedule

    lcm = import_script("train_lcm_distill_sd.py")
    path = os.path.join(toy_world, "models/sd")
    args = lcm.parse_args(base_args(toy_world, str(tmp_path_factory.mktemp("lcm"))) + ["--max_train_steps", "1"])
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").requires_grad_(False)
    teacher = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False).eval()
    ds = data.load_image_caption_dataset(train_data_dir=args.train_data_dir, transform=data.ImageTransform(32))
    batch = data.collate_image_caption([ds[i] for i in range(8)])
    with torch.no_grad():
        latents = models.encode_latents(vae, batch["pixel_values"], 8, torch.Generator().manual_seed(0))
        embeds = models.Conditioning(models.encode_prompt_sd(batch["captions"], tokenizer, encoder), {})
        uncond = models.Conditioning(models.encode_prompt_sd([""], tokenizer, encoder), {})
    noise_schedule = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    schedule = LCMSchedule.of_teacher(noise_schedule.alphas_cumprod, args.num_ddim_timesteps,
                                      noise_schedule.config.prediction_type)
    return dict(lcm=lcm, args=args, teacher=teacher, latents=latents, embeds=embeds, uncond=uncond, schedule=schedule)


def student_and_target(r):
    student = r["lcm"].make_student(r["teacher"], 256, zero_init=True).train()
    return student, copy.deepcopy(student).requires_grad_(False)


def loss_of(r, student, target, seed=0, teacher="teacher", args=None):
    """The recipe's loss on the fixed batch; the same seed draws the same t, w and noise (a fixed objective)."""
    gen = torch.Generator().manual_seed(seed)
    return r["lcm"].lcm_loss(student, target, r[teacher] if teacher else None, r["latents"], r["embeds"], r["uncond"],
                             r["schedule"], args or r["args"], gen)


def test_zero_initialised_student_equals_teacher(recipe):
    student = recipe["lcm"].make_student(recipe["teacher"], 256, zero_init=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 19])
    emb = recipe["uncond"].embeds.expand(2, -1, -1)
    cond = torch.randn(2, 256)
    with torch.no_grad():
        assert torch.allclose(student(x, t, emb, timestep_cond=cond).sample, recipe["teacher"](x, t, emb).sample,
                              atol=1e-5)


def test_loss_decreases_on_a_fixed_batch(recipe):
    from utils.ema import ema_update

    student, target = student_and_target(recipe)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-4)
    losses = []
    for _ in range(20):
        loss = loss_of(recipe, student, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(target, student, 0.95)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_batched_and_two_pass_teacher_cfg_give_the_same_loss(recipe):
    """--no-batched_teacher_cfg (cond and uncond as two teacher passes) computes the same loss, at every seed."""
    student, target = student_and_target(recipe)
    two_pass = copy.copy(recipe["args"])
    two_pass.batched_teacher_cfg = False
    for seed in range(3):
        with torch.no_grad():
            batched, separate = loss_of(recipe, student, target, seed), loss_of(recipe, student, target, seed,
                                                                               args=two_pass)
        assert torch.allclose(batched, separate, rtol=1e-5, atol=1e-7), (seed, batched, separate)


def record_first_call(model, name: str, calls: dict, monkeypatch) -> None:
    """calls[name] = (x, t) of the model's first forward (later ones pass through unrecorded)."""
    forward = model.forward

    def recording(x, t, *args, **kwargs):
        calls.setdefault(name, (x.detach().clone(), t.clone()))
        return forward(x, t, *args, **kwargs)
    monkeypatch.setattr(model, "forward", recording)


def test_the_teacher_steps_x_t_to_x_s_and_lcf_has_no_teacher(recipe, monkeypatch):
    """The teacher sees x_t at t (cond and uncond in one pass), the target x_s at s = t - k; with LCF (no
    teacher) x_s is the same latent noised with the same noise at s."""
    from utils.solvers import alpha_sigma, ddim_step

    student, target = student_and_target(recipe)
    calls = {}
    for name, model in (("student", student), ("teacher", recipe["teacher"]), ("target", target)):
        record_first_call(model, name, calls, monkeypatch)
    with torch.no_grad():
        loss_of(recipe, student, target, seed=5)
    (x_t, t), (x_teacher, t_teacher), (x_s, s) = calls["student"], calls["teacher"], calls["target"]
    assert torch.equal(t_teacher, torch.cat([t, t])) and torch.equal(x_teacher, torch.cat([x_t, x_t]))
    assert torch.equal(s, (t - recipe["schedule"].k).clamp(min=0)) and not torch.allclose(x_s, x_t)

    calls.clear()
    with torch.no_grad():
        loss_of(recipe, student, target, seed=5, teacher=None)  # LCF, with the same draws of t, w and noise
    assert "teacher" not in calls and torch.equal(calls["student"][0], x_t)
    latents, alphas = recipe["latents"], recipe["schedule"].alphas_cumprod
    (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(alphas, t), alpha_sigma(alphas, s)
    noise = (x_t - alpha_t.view(-1, 1, 1, 1) * latents) / sigma_t.view(-1, 1, 1, 1)
    assert torch.allclose(calls["target"][0], ddim_step(latents, noise, alpha_s, sigma_s), atol=1e-4)


def test_gradient_clipping_really_clips(recipe):
    from accelerate import Accelerator

    from utils.loop import apply_gradients

    student, target = student_and_target(recipe)
    params = [p for p in student.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)  # the update is exactly minus the (clipped) gradient
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    # unclipped, the gradient norm of this loss is far above the limit
    loss = loss_of(recipe, student, target) * 1e3
    assert apply_gradients(Accelerator(cpu=True), loss, params, opt, sched, max_grad_norm=0.01)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert 0.009 < step.item() <= 0.0101


def test_non_finite_loss_skips_the_update(recipe):
    from accelerate import Accelerator

    from utils.loop import apply_gradients

    student, _ = student_and_target(recipe)
    params = [p for p in student.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    loss = params[0].sum() * float("nan")
    assert not apply_gradients(Accelerator(cpu=True), loss, params, opt, sched, max_grad_norm=1.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert sched.last_epoch == 0  # the LR schedule did not advance either


def test_ema_target_follows_the_formula(recipe):
    from utils.ema import ema_update

    student, target = student_and_target(recipe)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    loss_of(recipe, student, target).backward()
    opt.step()
    old = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(target, student, 0.95)
    new, online = target.state_dict(), student.state_dict()
    changed = [k for k in new if not torch.equal(new[k], online[k])]
    assert changed, "EMA target equals the online student after an update"
    for k in new:
        assert torch.allclose(new[k], 0.95 * old[k] + 0.05 * online[k], atol=1e-7)


def test_v_prediction_teacher_from_webdataset_shards(toy_world, tmp_path):
    """The v-prediction code path and the webdataset source (the toy teacher's config is edited to v)."""
    import json
    import shutil

    teacher = str(tmp_path / "v_teacher")
    shutil.copytree(os.path.join(toy_world, "models/sd"), teacher)
    config_path = os.path.join(teacher, "scheduler/scheduler_config.json")
    config = json.load(open(config_path))
    json.dump(dict(config, prediction_type="v_prediction"), open(config_path, "w"))
    out = str(tmp_path / "out")
    args = base_args(toy_world, out)
    args[args.index("--pretrained_teacher_model") + 1] = teacher
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--train_shards_path_or_url", os.path.join(toy_world, "data/shards/shard-*.tar")]
    i = args.index("--max_train_samples")
    del args[i:i + 2]
    run(args + ["--max_train_steps", "2"])
    saved = json.load(open(os.path.join(out, "scheduler/scheduler_config.json")))
    assert saved["_class_name"] == "LCMScheduler" and saved["prediction_type"] == "v_prediction"
