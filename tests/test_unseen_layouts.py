"""The five recipes, unchanged, on model folders unlike the toy world's (randomly initialised): other latent
channels, VAE depths, block layouts, text-encoder widths, prediction type, noise schedule and tokenizer length.
Two steps each, in this process; the outputs load into the teacher's own diffusers pipeline and move its weights."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_lora_moves_the_weights, run_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")


def clip_encoder(tokenizer, width: int, projection: bool = False):
    """A random CLIP text encoder of `width` over the tokenizer's vocabulary and context length."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size + 8, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4, projection_dim=width,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def vae(latent_channels: int, levels: int, **extra):
    """A random VAE with 2^(levels - 1) pixels per latent."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(16, 32, 32, 32)[:levels],
                         layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels, scaling_factor=0.13,
                         **extra)


@pytest.fixture(scope="module")
def layouts(toy_world, tmp_path_factory) -> dict[str, str]:
    """{name: pipeline folder}:
    - sd2: SD 2.x-like, v-prediction with a zero-terminal-SNR schedule, 8 latent channels, an x8 VAE, three UNet
      levels (the first without attention), two layers per block, a 77-token context;
    - sdxl: SDXL-like with encoders 48 and 80 wide, three levels, a depth-2 transformer in the last, the empty
      prompt's encoding as the unconditional input (force_zeros_for_empty_prompt false);
    - flux: FLUX-like with 4 latent channels (16 packed), one double and two single blocks, other head sizes."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(toy_world, "models/sd/tokenizer"))
    t5_tokenizer = T5TokenizerFast.from_pretrained(os.path.join(toy_world, "models/flux/tokenizer_2"))
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1)
    levels = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=16,
                  use_linear_projection=True, sample_size=8)

    long_tokenizer = CLIPTokenizer.from_pretrained(os.path.join(toy_world, "models/sd/tokenizer"), model_max_length=77)
    StableDiffusionPipeline(
        vae=vae(8, 4), text_encoder=clip_encoder(long_tokenizer, 48), tokenizer=long_tokenizer,
        unet=UNet2DConditionModel(in_channels=8, out_channels=8, block_out_channels=(32, 48, 64), layers_per_block=2,
                                  cross_attention_dim=48, attention_head_dim=(4, 6, 8), **levels),
        scheduler=DDIMScheduler(**schedule, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(root / "sd2")

    StableDiffusionXLPipeline(
        vae=vae(4, 3), text_encoder=clip_encoder(tokenizer, 48), text_encoder_2=clip_encoder(tokenizer, 80, True),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
                                  transformer_layers_per_block=(1, 1, 2), cross_attention_dim=48 + 80,
                                  attention_head_dim=(4, 4, 8), addition_embed_type="text_time",
                                  addition_time_embed_dim=16, projection_class_embeddings_input_dim=16 * 6 + 80,
                                  **levels),
        scheduler=EulerDiscreteScheduler(**schedule, prediction_type="epsilon"),
        force_zeros_for_empty_prompt=False).save_pretrained(root / "sdxl")

    flux = os.path.join(toy_world, "models/flux")
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(flux, "scheduler")),
        vae=vae(4, 3, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_encoder(tokenizer, 40), tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=t5_tokenizer.vocab_size + 8, d_model=48, d_ff=96, d_kv=12,
                                               num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                                               is_encoder_decoder=False, use_cache=False)),
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                           pooled_projection_dim=40, guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
    ).save_pretrained(root / "flux")
    return {name: str(root / name) for name in ("sd2", "sdxl", "flux")}


def data_args(world: str, resolution: int) -> list[str]:
    return ["--train_data_dir", os.path.join(world, "data/train"), "--resolution", str(resolution),
            "--train_batch_size", "2", "--max_train_samples", "8", "--max_train_steps", "2", "--w_min", "2",
            "--w_max", "6", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--validation_steps", "2",
            "--validation_prompts", "a red circle", "--report_to", "none"]


def tlcm_args(world: str, resolution: int) -> list[str]:
    return ["--prompts_file", os.path.join(world, "data/train/metadata.jsonl"), "--max_train_samples", "8",
            "--resolution", str(resolution), "--train_batch_size", "2", "--lora_rank", "4", "--stage1_steps", "1",
            "--stage2_steps", "1", "--extras_steps", "1", "--stage1_learning_rate", "1e-3",
            "--stage2_learning_rate", "1e-3", "--extras_learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--dmd", "--gan", "--validation_steps", "1", "--validation_prompts", "a red circle", "--report_to", "none"]


def assert_trained_lora(out: str) -> None:
    """The diffusers file holds finite weights whose B factors moved from their zero start."""
    tensors = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert max(float(v.abs().max()) for k, v in tensors.items() if "lora_B" in k) > 0


def test_full_lcm_on_an_sd2_like_v_prediction_teacher_with_8_latent_channels(toy_world, layouts, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    out = str(tmp_path / "out")
    run_recipe("train_lcm_distill_sd.py", ["--pretrained_teacher_model", layouts["sd2"], "--output_dir", out,
                                           *data_args(toy_world, 64)])
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.in_channels == 8
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and image.std() > 0.01


def test_lcm_lora_with_text_encoder_lora_on_an_sdxl_like_teacher_of_other_widths(toy_world, layouts, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = str(tmp_path / "out")
    run_recipe("train_lcm_distill_lora_sdxl.py", ["--pretrained_teacher_model", layouts["sdxl"], "--output_dir", out,
                                                  "--lora_rank", "4", "--train_text_encoder_lora",
                                                  *data_args(toy_world, 32)])
    assert_trained_lora(out)
    assert_lora_moves_the_weights(StableDiffusionXLPipeline, layouts["sdxl"], out)


def test_tcd_on_an_sd2_like_v_prediction_zero_terminal_snr_teacher(toy_world, layouts, tmp_path):
    """alpha = 0 at the last timestep: the TCF takes the v-prediction's x0 there, no division by alpha."""
    from diffusers import StableDiffusionPipeline

    out = str(tmp_path / "out")
    run_recipe("train_tcd_lora.py", ["--pretrained_teacher_model", layouts["sd2"], "--output_dir", out,
                                     "--lora_rank", "4", *data_args(toy_world, 64)])
    assert_trained_lora(out)
    assert_lora_moves_the_weights(StableDiffusionPipeline, layouts["sd2"], out)


@pytest.mark.parametrize("recipe, layout, resolution", [("train_tlcm_sdxl.py", "sd2", 64),
                                                        ("train_tlcm_flux.py", "flux", 32)])
def test_tlcm_with_its_extras_on_other_layouts(toy_world, layouts, tmp_path, recipe, layout, resolution):
    from diffusers import FluxPipeline, StableDiffusionPipeline

    out = str(tmp_path / "out")
    run_recipe(recipe, ["--pretrained_teacher_model", layouts[layout], "--output_dir", out,
                        *tlcm_args(toy_world, resolution)])
    assert sorted(d for d in os.listdir(out) if d.startswith("stage")) == ["stage1", "stage2", "stageextras"]
    assert_trained_lora(out)
    assert_lora_moves_the_weights(FluxPipeline if layout == "flux" else StableDiffusionPipeline, layouts[layout], out)
