"""train_lcm_distill_sd.py on SDXL-family teachers: the toy SDXL and an SSD-1B-like layout (other transformer
depths), the guidance input, the micro-conditioning, the teacher's unconditional branch, the output pipeline
and its loading snippets, conversion of a checkpoint, exact resume."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from helpers import import_script, kill_while_saving, run_recipe, unet_output

SCRIPT = "train_lcm_distill_sd.py"
pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs on one thread, as the killed process


def run_args(world: str, out: str, teacher: str | None = None) -> list[str]:
    return ["--pretrained_teacher_model", teacher or os.path.join(world, "models/sdxl"),
            "--train_data_dir", os.path.join(world, "data/train"), "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "4", "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--w_min", "2",
            "--w_max", "6", "--validation_steps", "1000", "--report_to", "none", "--max_train_samples", "32"]


@pytest.fixture(scope="module")
def ssd1b_like(toy_world, tmp_path_factory) -> str:
    """The toy SDXL pipeline with another UNet layout: two layers per block and depth-2 transformers in the
    lower block (as SSD-1B and other SDXL variants differ from SDXL), randomly initialised."""
    from diffusers import UNet2DConditionModel

    folder = str(tmp_path_factory.mktemp("ssd1b_like") / "pipe")
    shutil.copytree(os.path.join(toy_world, "models/sdxl"), folder)
    config = dict(UNet2DConditionModel.load_config(os.path.join(folder, "unet")))
    config.update(layers_per_block=2, transformer_layers_per_block=[1, 2])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    shutil.rmtree(os.path.join(folder, "unet"))
    unet.save_pretrained(os.path.join(folder, "unet"))
    return folder


@pytest.fixture(scope="module")
def sdxl_run(toy_world, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("lcm_sdxl") / "run")
    run_recipe(SCRIPT, run_args(toy_world, out) + ["--max_train_steps", "3", "--checkpointing_steps", "2",
                                                   "--checkpoint_at_end"])  # checkpoint-2 and checkpoint-3
    return out


def test_output_is_an_sdxl_pipeline_with_the_training_grid_that_samples(sdxl_run):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_run)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
    assert pipe.scheduler.config.original_inference_steps == 50 and pipe.scheduler.config.timestep_scaling == 10.0
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a large red circle on a white background", num_inference_steps=4, guidance_scale=5.0,
                 height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0.01
    card = open(os.path.join(sdxl_run, "README.md")).read()
    assert "guidance_scale=5.0" in card and "use 3-7" in card and "subfolder=\"unet\"" in card


def test_the_published_loading_snippet_unet_into_the_teachers_pipeline(toy_world, sdxl_run):
    """UNet from `subfolder="unet"`, a separately loaded VAE, LCMScheduler from the base, 4 steps: the same
    images as the saved pipeline."""
    from diffusers import AutoencoderKL, DiffusionPipeline, LCMScheduler, UNet2DConditionModel

    base = os.path.join(toy_world, "models/sdxl")
    unet = UNet2DConditionModel.from_pretrained(sdxl_run, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    pipe = DiffusionPipeline.from_pretrained(base, unet=unet, vae=vae,
                                             scheduler=LCMScheduler.from_pretrained(base, subfolder="scheduler"))
    saved = DiffusionPipeline.from_pretrained(sdxl_run)
    images = []
    for p in (pipe, saved):
        p.set_progress_bar_config(disable=True)
        images.append(p("a small blue square", num_inference_steps=4, height=32, width=32, guidance_scale=1.0,
                        output_type="pt", generator=torch.Generator().manual_seed(1)).images)
    assert torch.allclose(images[0], images[1], atol=1e-5)


def test_zero_initialised_guidance_input_leaves_the_sdxl_student_equal_to_its_teacher(toy_world, ssd1b_like):
    from diffusers import UNet2DConditionModel

    recipe = import_script(SCRIPT)
    for path in (os.path.join(toy_world, "models/sdxl"), ssd1b_like):
        teacher = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        student = recipe.make_student(teacher, 256, zero_init=True)
        assert torch.allclose(unet_output(student), unet_output(teacher, zero_cond=True), atol=1e-5)
        assert not torch.allclose(unet_output(recipe.make_student(teacher, 256, zero_init=False)),
                                  unet_output(teacher, zero_cond=True), atol=1e-3)


def test_time_ids_are_each_images_own_or_fixed(toy_world):
    from utils import models

    text = (torch.zeros(2, 16, 64), torch.zeros(2, 32))
    batch = {"original_sizes": [(48, 32), (40, 64)], "crop_top_lefts": [(8, 0), (0, 16)]}
    own = models.unet_conditioning(text, batch, 32)
    assert own.added["time_ids"].tolist() == [[48, 32, 8, 0, 32, 32], [40, 64, 0, 16, 32, 32]]
    fixed = models.unet_conditioning(text, batch, 32, fixed_size=True)  # --use_fix_crop_and_size
    assert fixed.added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2


def test_teacher_uncond_branch_is_zeroed_text_with_the_images_own_time_ids(toy_world, tmp_path, monkeypatch):
    """The loss's teacher pass: cond rows = the prompts, uncond rows = zero embeddings and zero pooled embeddings,
    both with the image's own time ids (the SDXL pipelines' CFG); the same run's main builds that uncond."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from utils import models
    from utils.consistency import LCMSchedule

    recipe = import_script(SCRIPT)
    path = os.path.join(toy_world, "models/sdxl")
    args = recipe.parse_args(run_args(toy_world, str(tmp_path / "o")))
    assert args.w_min == 2 and args.resolution == 32
    teacher = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False)
    student = recipe.make_student(teacher, 256, zero_init=True)
    g = torch.Generator().manual_seed(0)
    text = (torch.randn(2, 16, 64, generator=g), torch.randn(2, 32, generator=g))
    cond = models.unet_conditioning(text, {"original_sizes": [(48, 32)] * 2, "crop_top_lefts": [(8, 0)] * 2}, 32)
    # as main builds it: --uncond auto on an SDXL pipeline that feeds zeros for an empty negative prompt
    sdxl = models.Teacher("sdxl", {}, None, [], [], None, torch.float32, zeros_for_empty_prompt=True)
    uncond = models.unet_conditioning(sdxl.uncond_text((text[0][:1], text[1][:1]), args.uncond))
    seen = []
    forward = teacher.forward

    def recording(x, t, encoder_hidden_states=None, added_cond_kwargs=None, **kw):
        seen.append((encoder_hidden_states.clone(), {k: v.clone() for k, v in added_cond_kwargs.items()}))
        return forward(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kw)
    monkeypatch.setattr(teacher, "forward", recording)
    alphas = DDPMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod
    schedule = LCMSchedule.of_teacher(alphas, 50, "epsilon")
    with torch.no_grad():
        recipe.lcm_loss(student, copy.deepcopy(student), teacher, torch.randn(2, 4, 8, 8, generator=g), cond, uncond,
                        schedule, args, torch.Generator().manual_seed(3))
    (embeds, added), = seen
    assert torch.equal(embeds[:2], text[0]) and not embeds[2:].any()
    assert torch.equal(added["text_embeds"][:2], text[1]) and not added["text_embeds"][2:].any()
    assert added["time_ids"].tolist() == [[48, 32, 8, 0, 32, 32]] * 4


def test_an_ssd1b_like_layout_trains_and_loads(toy_world, ssd1b_like, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = str(tmp_path / "run")
    run_recipe(SCRIPT, run_args(toy_world, out, ssd1b_like) + ["--max_train_steps", "2", "--ema_target_on_cpu"])
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.unet.config.transformer_layers_per_block == [1, 2] and pipe.unet.config.layers_per_block == 2
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small green cross", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_checkpoint_converts_to_the_same_pipeline(toy_world, sdxl_run, tmp_path):
    """convert_lora.py from-checkpoint turns the last training checkpoint into the folder the run saved."""
    from diffusers import UNet2DConditionModel

    convert = import_script("convert_lora.py")
    out = str(tmp_path / "converted")
    convert.main(["from-checkpoint", os.path.join(sdxl_run, "checkpoint-3"), "--base_model",
                  os.path.join(toy_world, "models/sdxl"), "--output_dir", out])
    a = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(sdxl_run, subfolder="unet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(os.path.join(out, "model_index.json")))["_class_name"] == "StableDiffusionXLPipeline"


def test_a_flux_teacher_is_one_line_exit_2(toy_world, tmp_path):
    run = run_recipe(SCRIPT, run_args(toy_world, str(tmp_path / "o"), os.path.join(toy_world, "models/flux"))
                     + ["--max_train_steps", "1"], check=False)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--pretrained_teacher_model" in run.stderr


@pytest.mark.slow
def test_killed_sdxl_run_resumes_to_the_same_student(toy_world, tmp_path, monkeypatch):
    """SIGKILL while writing checkpoint-4; resume from checkpoint-2; the student equals an uninterrupted run's."""
    from diffusers import UNet2DConditionModel

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the killed process computes on one thread, as this one does
    args = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    run_recipe(SCRIPT, run_args(toy_world, straight) + args)
    kill_while_saving(SCRIPT, run_args(toy_world, crashed) + args, os.path.join(crashed, "checkpoint-4.partial"))
    run_recipe(SCRIPT, run_args(toy_world, crashed) + args + ["--resume_from_checkpoint", "latest"])
    a, b = (UNet2DConditionModel.from_pretrained(d, subfolder="unet").state_dict() for d in (straight, crashed))
    assert all(torch.equal(a[k], b[k]) for k in a)
