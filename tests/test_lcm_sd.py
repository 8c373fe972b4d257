"""train_lcm_distill_sd.py on the toy world: short runs, checkpoints, exact resume, the loss, bad input."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import kill_while_saving, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_lcm_distill_sd.py")


def base_args(world: str, out: str) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models/sd"),
            "--train_data_dir", os.path.join(world, "data/train"), "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "4", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
            "--w_min", "2", "--w_max", "6", "--validation_steps", "1000", "--report_to", "none",
            "--max_train_samples", "64"]


def run(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_script("train_lcm_distill_sd.py", args, env, check)


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


def test_killed_run_resumed_ends_with_the_same_weights(toy_world, tmp_path):
    """SIGKILL while writing checkpoint-4; resume from checkpoint-2; compare with an uninterrupted run."""
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


# ------------------------------------------------------------------------------ in-process checks
@pytest.fixture(scope="module")
def recipe(toy_world, tmp_path_factory):
    """The recipe's pieces, built on the toy SD teacher, plus one fixed batch."""
    sys.path.insert(0, ROOT)
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    import train_lcm_distill_sd as lcm
    from utils import data, models
    from utils.solvers import ddim_timesteps

    teacher_path = os.path.join(toy_world, "models/sd")
    args = lcm.parse_args(base_args(toy_world, str(tmp_path_factory.mktemp("lcm"))) + ["--max_train_steps", "1"])
    (tok,), (te,) = models.load_text_encoders(teacher_path, "sd")
    vae = models.load_vae(teacher_path).requires_grad_(False)
    teacher = models.load_denoiser(teacher_path).requires_grad_(False).eval()
    sched = models.load_noise_scheduler_config(teacher_path)
    ds = data.load_image_caption_dataset(train_data_dir=args.train_data_dir, transform=data.ImageTransform(32))
    batch = data.collate_image_caption([ds[i] for i in range(8)])
    accelerator = Accelerator(cpu=True)
    return dict(lcm=lcm, args=args, tok=tok, te=te, vae=vae, teacher=teacher, batch=batch, accelerator=accelerator,
                alphas=DDPMScheduler.from_config(sched).alphas_cumprod, grid=ddim_timesteps(1000, 50),
                uncond=models.encode_prompt_sd([""], tok, te))


def loss_of(r, student, target, seed=0):
    gen = torch.Generator().manual_seed(seed)  # the same t, w and noise every call: a fixed objective
    return r["lcm"].lcm_loss(r["args"], r["batch"], student, target, r["teacher"], r["vae"], r["tok"], r["te"],
                             r["uncond"], r["alphas"], r["grid"], 20, "epsilon", r["accelerator"], gen)


def test_zero_initialised_student_equals_teacher(recipe):
    student = recipe["lcm"].make_student(recipe["teacher"], 256, zero_init=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 19])
    emb = recipe["uncond"].expand(2, -1, -1)
    cond = torch.randn(2, 256)
    with torch.no_grad():
        assert torch.allclose(student(x, t, emb, timestep_cond=cond).sample, recipe["teacher"](x, t, emb).sample,
                              atol=1e-5)


def test_loss_decreases_on_a_fixed_batch(recipe):
    student = recipe["lcm"].make_student(recipe["teacher"], 256, zero_init=True).train()
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-4)
    losses = []
    for _ in range(50):
        loss = loss_of(recipe, student, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        from utils.ema import ema_update

        ema_update(target, student, 0.95)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_gradient_clipping_really_clips(recipe):
    from utils.training import apply_gradients

    student = recipe["lcm"].make_student(recipe["teacher"], 256, zero_init=True).train()
    target = copy.deepcopy(student).requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)  # the update is exactly minus the (clipped) gradient
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    # unclipped, the gradient norm of this loss is far above the limit
    loss = loss_of(recipe, student, target) * 1e3
    assert apply_gradients(recipe["accelerator"], loss, params, opt, sched, max_grad_norm=0.01)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
    assert 0.009 < step.item() <= 0.0101


def test_non_finite_loss_skips_the_update(recipe):
    from utils.training import apply_gradients

    student = recipe["lcm"].make_student(recipe["teacher"], 256, zero_init=True).train()
    params = [p for p in student.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    loss = params[0].sum() * float("nan")
    assert not apply_gradients(recipe["accelerator"], loss, params, opt, sched, max_grad_norm=1.0)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_ema_target_follows_the_formula(recipe):
    from utils.ema import ema_update

    student = recipe["lcm"].make_student(recipe["teacher"], 256, zero_init=True).train()
    target = copy.deepcopy(student).requires_grad_(False)
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
