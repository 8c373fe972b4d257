"""utils.models against the toy world: architecture detection, clear errors, and prompt encoding and
FLUX latent packing that match the diffusers pipelines' own code exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from utils import models
from utils.errors import UserError

# The toy tokenizers hold 16 tokens, so the long prompt exercises truncation.
PROMPTS = ["a small red circle on a blue background", "",
           "a big green square on a yellow background next to a small red circle on a blue background"]


def _model(toy_world: str, name: str) -> str:
    """Path of one toy pipeline folder."""
    return os.path.join(toy_world, "models", name)


# ----------------------------------------------------------------------------- detection and errors


@pytest.mark.parametrize("name, arch", [("sd", "sd"), ("sdxl", "sdxl"), ("flux", "flux"), ("flux-guidance", "flux")])
def test_detect_architecture(toy_world: str, name: str, arch: str) -> None:
    assert models.detect_architecture(_model(toy_world, name)) == arch


def test_missing_path_is_a_user_error(tmp_path) -> None:
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(UserError, match="does not exist"):
        models.detect_architecture(missing)
    with pytest.raises(UserError, match="does not exist"):
        models.load_vae(missing)


def test_non_pipeline_folder_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="is not a diffusers pipeline folder"):
        models.detect_architecture(str(tmp_path))
    with open(tmp_path / "model_index.json", "w") as f:
        json.dump({"_class_name": "SomePipeline", "vae": ["diffusers", "AutoencoderKL"]}, f)
    with pytest.raises(UserError, match="is not a diffusers pipeline folder"):
        models.detect_architecture(str(tmp_path))


@pytest.mark.parametrize("entry", [("unet", "UNet2DModel"), ("transformer", "SD3Transformer2DModel")])
def test_unknown_denoiser_is_a_user_error(tmp_path, entry: tuple[str, str]) -> None:
    with open(tmp_path / "model_index.json", "w") as f:
        json.dump({"_class_name": "SomePipeline", entry[0]: ["diffusers", entry[1]]}, f)
    with pytest.raises(UserError, match=f"unsupported denoiser {entry[1]}"):
        models.detect_architecture(str(tmp_path))


def test_unloadable_hub_id_is_a_user_error(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    # The real call would spend ~20 s retrying the network; the failure it ends in is what matters here.
    monkeypatch.setattr(DiffusionPipeline, "load_config", offline)
    with pytest.raises(UserError, match="someone/some-model .*could not be loaded") as info:
        models.detect_architecture("someone/some-model")
    assert "\n" not in str(info.value)


def test_require_architecture(toy_world: str) -> None:
    sd = _model(toy_world, "sd")
    assert models.require_architecture(sd, ("sd", "sdxl")) == "sd"
    with pytest.raises(UserError, match="--pretrained_teacher_model") as info:
        models.require_architecture(sd, "sdxl")
    assert "sdxl" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="--base_model_path"):
        models.require_architecture(_model(toy_world, "flux"), ("sd", "sdxl"), flag="--base_model_path")


# ----------------------------------------------------------------------------- components


def test_load_denoiser_and_scheduler_config(toy_world: str) -> None:
    assert isinstance(models.load_denoiser(_model(toy_world, "sd")), UNet2DConditionModel)
    flux = models.load_denoiser(_model(toy_world, "flux"), dtype=torch.bfloat16)
    assert isinstance(flux, FluxTransformer2DModel) and flux.dtype == torch.bfloat16
    config = models.load_noise_scheduler_config(_model(toy_world, "flux"))
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["num_train_timesteps"] == 1000
    assert models.load_noise_scheduler_config(_model(toy_world, "sd"))["_class_name"] == "DDIMScheduler"


def test_load_vae_uses_vae_path(toy_world: str, tmp_path) -> None:
    sd = _model(toy_world, "sd")
    own = models.load_vae(sd)
    other = AutoencoderKL.from_pretrained(sd, subfolder="vae")
    other.register_to_config(scaling_factor=0.123)
    other.save_pretrained(tmp_path / "vae-fix")
    loaded = models.load_vae(sd, vae_path=str(tmp_path / "vae-fix"))
    assert own.config.scaling_factor != 0.123 and loaded.config.scaling_factor == 0.123
    with pytest.raises(UserError, match="--pretrained_vae_model_name_or_path"):
        models.load_vae(sd, vae_path=str(tmp_path / "missing-vae"))
    with pytest.raises(UserError, match="whole pipeline"):
        models.load_vae(sd, vae_path=sd)


def test_load_text_encoders_are_frozen(toy_world: str) -> None:
    tokenizers, encoders = models.load_text_encoders(_model(toy_world, "flux"))
    assert [type(t).__name__ for t in tokenizers][0] == "CLIPTokenizer" and len(tokenizers) == 2
    assert [type(e).__name__ for e in encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert all(not e.training and not any(p.requires_grad for p in e.parameters()) for e in encoders)


# ----------------------------------------------------------------------------- prompt encoding


def test_encode_prompt_sd_matches_pipeline(toy_world: str) -> None:
    path = _model(toy_world, "sd")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    tokenizers, encoders = models.load_text_encoders(path)
    with torch.no_grad():
        ours = models.encode_prompt_sd(PROMPTS, tokenizers[0], encoders[0])
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
        named = models.encode_prompts("sd", PROMPTS, tokenizers, encoders)
    assert ours.shape == (len(PROMPTS), tokenizers[0].model_max_length, encoders[0].config.hidden_size)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert set(named) == {"prompt_embeds"} and torch.equal(named["prompt_embeds"], ours)


def test_encode_prompt_sdxl_matches_pipeline(toy_world: str) -> None:
    path = _model(toy_world, "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    tokenizers, encoders = models.load_text_encoders(path)
    with torch.no_grad():
        embeds, pooled = models.encode_prompt_sdxl(PROMPTS, tokenizers, encoders)
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
        named = models.encode_prompts("sdxl", PROMPTS, tokenizers, encoders)
    width = encoders[0].config.hidden_size + encoders[1].config.hidden_size
    assert embeds.shape == (len(PROMPTS), tokenizers[0].model_max_length, width)
    torch.testing.assert_close(embeds, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, theirs_pooled, atol=1e-6, rtol=0)
    assert set(named) == {"prompt_embeds", "pooled_prompt_embeds"}


def test_sdxl_time_ids_are_height_first(toy_world: str) -> None:
    ids = models.sdxl_time_ids((48, 32), (0, 0), (48, 32), batch_size=2)
    assert ids.shape == (2, 6) and ids[0].tolist() == [48, 32, 0, 0, 48, 32]
    ids = models.sdxl_time_ids((48, 32), (4, 2), (40, 24))
    assert ids[0].tolist() == [48, 32, 4, 2, 40, 24]
    pipe = StableDiffusionXLPipeline.from_pretrained(_model(toy_world, "sdxl"))
    theirs = pipe._get_add_time_ids((48, 32), (0, 0), (48, 32), dtype=torch.float32,
                                    text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(models.sdxl_time_ids((48, 32), (0, 0), (48, 32)), theirs)


def test_encode_prompt_flux_matches_pipeline(toy_world: str) -> None:
    path = _model(toy_world, "flux")
    pipe = FluxPipeline.from_pretrained(path)
    tokenizers, encoders = models.load_text_encoders(path)
    assert models.flux_max_sequence_length(tokenizers[1]) == min(512, tokenizers[1].model_max_length)
    with torch.no_grad():
        embeds, pooled, text_ids = models.encode_prompt_flux(PROMPTS, tokenizers, encoders)
        theirs = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=16)
        named = models.encode_prompts("flux", PROMPTS, tokenizers, encoders, max_sequence_length=16)
    assert embeds.shape[:2] == (len(PROMPTS), 16) and text_ids.shape == (16, 3)
    for ours, ref in zip((embeds, pooled, text_ids), theirs):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert set(named) == {"prompt_embeds", "pooled_prompt_embeds", "text_ids"}
    torch.testing.assert_close(named["prompt_embeds"], embeds, atol=0, rtol=0)


# ----------------------------------------------------------------------------- FLUX latent packing


@pytest.mark.parametrize("channels, height, width", [(16, 8, 8), (4, 6, 10)])
def test_pack_unpack_match_flux_pipeline(channels: int, height: int, width: int) -> None:
    latents = torch.randn(2, channels, height, width)
    packed = models.pack_latents(latents)
    assert packed.shape == (2, height // 2 * width // 2, 4 * channels)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, channels, height, width))
    assert torch.equal(models.unpack_latents(packed, height, width), latents)
    # The pipeline's unpack takes pixel sizes and the VAE scale factor.
    vae_scale = 8
    theirs = FluxPipeline._unpack_latents(packed, height * vae_scale, width * vae_scale, vae_scale)
    assert torch.equal(models.unpack_latents(packed, height, width), theirs)
    # The pipeline's ids take the packed grid size (latent size / 2).
    ids = models.latent_image_ids(height, width, dtype=torch.bfloat16)
    ref = FluxPipeline._prepare_latent_image_ids(2, height // 2, width // 2, "cpu", torch.bfloat16)
    assert ids.shape == (height // 2 * width // 2, 3) and torch.equal(ids, ref)


def test_pack_rejects_odd_latents() -> None:
    with pytest.raises(ValueError, match="even"):
        models.pack_latents(torch.zeros(1, 4, 7, 8))


def test_scale_latents_is_the_inverse_of_decode_latents_transform(toy_world):
    """FLUX's VAE has a shift_factor: encode must subtract it where decode adds it back."""
    vae = models.load_vae(os.path.join(toy_world, "models/flux")).eval()
    assert vae.config.get("shift_factor")  # the case that matters
    raw = torch.randn(2, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(models.decode_latents(vae, models.scale_latents(vae, raw)),
                              vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)


def test_the_teachers_uncond_follows_its_pipeline_unless_uncond_says_otherwise(toy_world, tmp_path) -> None:
    """--uncond auto is what the pipeline feeds for an empty negative prompt: SD its encoding, SDXL zeros unless its
    model_index.json sets force_zeros_for_empty_prompt false; zeros and empty force either."""
    import shutil
    from types import SimpleNamespace

    plain = str(tmp_path / "sdxl-no-zeros")  # an SDXL pipeline that encodes the empty negative prompt
    shutil.copytree(_model(toy_world, "sdxl"), plain)
    index = json.load(open(os.path.join(plain, "model_index.json")))
    json.dump({**index, "force_zeros_for_empty_prompt": False}, open(os.path.join(plain, "model_index.json"), "w"))
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no",
                                  state=SimpleNamespace(deepspeed_plugin=None))
    for path, zeros_by_default in ((_model(toy_world, "sd"), False), (_model(toy_world, "sdxl"), True), (plain, False)):
        args = SimpleNamespace(pretrained_teacher_model=path, pretrained_vae_model_name_or_path=None, revision=None,
                               variant=None, resolution=32)
        teacher = models.load_teacher(args, accelerator, ("sd", "sdxl"))
        assert teacher.zeros_for_empty_prompt == zeros_by_default, path
        with torch.no_grad():
            empty = teacher.encode([""])
        assert len(empty) == (1 if teacher.arch == "sd" else 2) and all(x.abs().sum() > 0 for x in empty)
        for mode, zeros in (("auto", zeros_by_default), ("zeros", True), ("empty", False)):
            uncond = teacher.uncond_text(empty, mode)
            assert len(uncond) == len(empty) and all(u.shape == e.shape for u, e in zip(uncond, empty))
            assert all(torch.equal(u, torch.zeros_like(e) if zeros else e) for u, e in zip(uncond, empty)), (path, mode)
