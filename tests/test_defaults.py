"""Defaults a user of another family's teacher, or of diffusers' own scripts, expects: --resolution read from the
teacher's config in every recipe, the LCM-LoRA recipe's --lora_alpha, and TLCMScheduler's zero-terminal-SNR clamp."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import import_script

RECIPES = ["train_lcm_distill_sd.py", "train_lcm_distill_lora_sdxl.py", "train_tlcm_sdxl.py", "train_tlcm_flux.py"]
# (pipeline class, denoiser config, VAE block count) of each family as its released model_index/configs hold it
FAMILIES = {
    "sd15": ("StableDiffusionPipeline", {"sample_size": 64, "cross_attention_dim": 768}, 4),
    "sd2_768": ("StableDiffusionPipeline", {"sample_size": 96, "cross_attention_dim": 1024}, 4),
    "sdxl": ("StableDiffusionXLPipeline", {"sample_size": 128, "addition_embed_type": "text_time"}, 4),
    "flux": ("FluxPipeline", {}, 4),
}
NATIVE = {"sd15": 512, "sd2_768": 768, "sdxl": 1024, "flux": 1024}
FITS = {  # which families each recipe takes
    "train_lcm_distill_sd.py": ("sd15", "sd2_768", "sdxl"),
    "train_lcm_distill_lora_sdxl.py": ("sd15", "sd2_768", "sdxl"),
    "train_tlcm_sdxl.py": ("sd15", "sd2_768", "sdxl"),
    "train_tlcm_flux.py": ("flux",),
}


def family_folder(root, name: str) -> str:
    """A pipeline folder holding only the configs of a family (model_index.json, the denoiser's and the VAE's): all
    that picking a default resolution reads."""
    pipeline, denoiser, vae_levels = FAMILIES[name]
    path = os.path.join(root, name)
    sub = "transformer" if pipeline == "FluxPipeline" else "unet"
    cls = "FluxTransformer2DModel" if sub == "transformer" else "UNet2DConditionModel"
    index = {"_class_name": pipeline, sub: ["diffusers", cls], "vae": ["diffusers", "AutoencoderKL"]}
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512][:vae_levels]}
    if name == "flux":
        vae["sample_size"] = 1024
    for folder, config in ((".", index), (sub, {"_class_name": cls, **denoiser}), ("vae", vae)):
        os.makedirs(os.path.join(path, folder), exist_ok=True)
        file = "model_index.json" if folder == "." else "config.json"
        with open(os.path.join(path, folder, file), "w") as f:
            json.dump(config, f)
    return path


def recipe_args(script: str, teacher: str, out: str, *extra: str):
    """The recipe's parse_args on a teacher folder (nothing is loaded but configs)."""
    data = ["--prompts_file", teacher] if "tlcm" in script else ["--train_data_dir", teacher]
    return import_script(script).parse_args(["--pretrained_teacher_model", teacher, "--output_dir", out, *data,
                                             "--report_to", "none", *extra])


@pytest.mark.parametrize("script", RECIPES)
def test_resolution_defaults_to_the_teachers_own_size(script: str, tmp_path) -> None:
    """SD 1.5: 512, SD 2.x-768: 768, SDXL: 1024 (UNet sample_size x VAE factor); FLUX: its VAE's sample_size."""
    for family in FITS[script]:
        teacher = family_folder(tmp_path, family)
        args = recipe_args(script, teacher, str(tmp_path / f"out_{family}"))
        assert args.resolution == NATIVE[family], (script, family)
        given = recipe_args(script, teacher, str(tmp_path / f"given_{family}"), "--resolution", "64")
        assert given.resolution == 64  # a given size is kept


@pytest.mark.parametrize("script", RECIPES)
def test_help_says_where_the_default_resolution_comes_from(script: str, capsys) -> None:
    with pytest.raises(SystemExit):
        import_script(script).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--resolution" in text and "the teacher's own size, read from its config" in text


def test_native_resolution_of_the_toy_teachers(toy_world: str) -> None:
    """The toy teachers (32 px: UNet sample_size 8 x an x4 VAE; FLUX: the VAE's sample_size) as their pipelines draw."""
    from diffusers import DiffusionPipeline

    from utils.eval_sampling import default_resolution
    from utils.models import native_resolution

    for name in ("sd", "sdxl", "flux"):
        path = os.path.join(toy_world, "models", name)
        assert native_resolution(path) == default_resolution(DiffusionPipeline.from_pretrained(path)) == 32


def test_tlcm_scheduler_clamps_a_zero_terminal_snr_schedule_as_training_does() -> None:
    """rescale_betas_zero_snr gives a_T = 0: TLCMScheduler's first step (t = 999) then divided by zero; it now holds
    the a_t the recipes train on (models.teacher_alphas_cumprod), so the step is finite."""
    from diffusers import DDPMScheduler

    from utils.models import teacher_alphas_cumprod
    from utils.scheduling_tlcm import TLCMScheduler

    config = dict(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                rescale_betas_zero_snr=True).config)
    scheduler = TLCMScheduler.from_config(config)
    assert torch.equal(scheduler.alphas_cumprod, teacher_alphas_cumprod(config).float())
    assert scheduler.alphas_cumprod[-1] > 0
    scheduler.set_timesteps(4)
    assert int(scheduler.timesteps[0]) == 999
    z, eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 4, 8, 8)
    eps[..., 0, 0] = 1.0
    out = scheduler.step(eps, scheduler.timesteps[0], z, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.denoised).all() and torch.isfinite(out.prev_sample).all()


def test_the_lora_recipes_keep_alpha_8_and_log_what_its_scale_means(toy_world: str, tmp_path) -> None:
    """The same command as diffusers' README gives alpha 8 (scale 0.125 at rank 64) where diffusers' script has 64:
    the recipes keep 8 (measured better on the toy world, docs/lcm.md) and log the scale and its effect on the
    step size at start-up; alpha = rank logs nothing."""
    from diffusers import UNet2DConditionModel

    from utils import lora, loop

    teacher = os.path.join(toy_world, "models", "sdxl")
    for script in ("train_lcm_distill_lora_sdxl.py", "train_tlcm_sdxl.py"):
        args = recipe_args(script, teacher, str(tmp_path / script))
        assert (args.lora_rank, args.lora_alpha) == (64, 8)
    for alpha in (8, 64):
        unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
        lora.add_trainable_lora(unet, 64, alpha, lora.LCM_LORA_TARGETS)
        assert set(lora.lora_scalings(unet).values()) == {alpha / 64}
    args = recipe_args("train_lcm_distill_lora_sdxl.py", teacher, str(tmp_path / "note"))
    notes = []
    for alpha in (8, 64):  # what TrainLoop logs at the first usable batch
        args.lora_alpha = alpha
        notes += loop.start_notes(args)
    assert len(notes) == 1 and "= 8 / 64 = 0.125" in notes[0] and "alpha = rank" in notes[0]
