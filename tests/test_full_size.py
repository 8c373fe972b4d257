"""benchmarks/full_size.py: published parameter counts, loadable scaled-down pipelines, refusal to overwrite."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from helpers import listing

from utils.errors import UserError

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "full_size.py")
pytestmark = pytest.mark.usefixtures("one_thread")
SCALE = "0.05"  # UNet widths 32/32/64, text widths 64: the smallest valid, with the full layout


def load():
    spec = importlib.util.spec_from_file_location("full_size", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def full_size():
    return load()


@pytest.fixture(autouse=True)
def released():
    """What the interpreter's exit does after each in-process main(): signal handlers restored (utils.outputs)."""
    from utils.outputs import release

    yield
    release()


# published parameter counts of the released checkpoints
PUBLISHED = {("sd15", "unet"): 859_520_964, ("sdxl", "unet"): 2_567_463_684, ("sdxl", "text_encoder"): 123_060_480,
             ("sdxl", "text_encoder_2"): 694_659_840, ("sdxl", "vae"): 83_653_863, ("sd15", "text_encoder"): 123_060_480,
             ("sd15", "vae"): 83_653_863}


def test_param_counts_match_the_published_models(full_size):
    counts = {name: full_size.param_counts(name) for name in full_size.MODELS}
    for (model, component), published in PUBLISHED.items():
        assert counts[model][component] == pytest.approx(published, rel=0.005), (model, component)
    assert 1.2e9 < counts["ssd1b"]["unet"] < 1.4e9
    assert {k: v for k, v in counts["ssd1b"].items() if k != "unet"} == \
        {k: v for k, v in counts["sdxl"].items() if k != "unet"}  # SSD-1B keeps SDXL's encoders and VAE


def _weights_dtypes(folder: str) -> set[torch.dtype]:
    from safetensors import safe_open

    dtypes = set()
    for root, _dirs, names in os.walk(folder):
        for name in names:
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(root, name), "pt") as f:
                    dtypes.update(f.get_slice(key).get_dtype() for key in f.keys())
    return dtypes


@pytest.mark.parametrize("model", ["sdxl", "sd15"])
def test_scaled_pipeline_loads_keeps_the_layout_and_runs(full_size, tmp_path, capsys, model):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out = tmp_path / model
    counts = full_size.main(["--model", model, "--output_dir", str(out), "--width_scale", SCALE])
    printed = capsys.readouterr().out
    assert all(f"{name}: " in printed for name in counts)  # one progress line per component
    assert counts == full_size.param_counts(model, float(SCALE))
    assert _weights_dtypes(str(out)) == {"F16"}
    assert not [n for n in os.listdir(tmp_path) if n != model]  # no temporary sibling left behind

    cls = StableDiffusionXLPipeline if model == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(out), torch_dtype=torch.float32)
    unet, vae, sched = pipe.unet.config, pipe.vae.config, pipe.scheduler.config
    assert pipe.tokenizer.model_max_length == 77 and pipe.text_encoder.config.max_position_embeddings == 77
    assert sched.steps_offset == 1 and sched.beta_schedule == "scaled_linear" and sched.beta_end == 0.012
    if model == "sdxl":
        assert list(unet.transformer_layers_per_block) == [1, 2, 10] and unet.addition_embed_type == "text_time"
        assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert unet.projection_class_embeddings_input_dim == 6 * 256 + pipe.text_encoder_2.config.projection_dim
        assert vae.scaling_factor == 0.13025 and vae.force_upcast
        assert sched.timestep_spacing == "leading" and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert pipe.tokenizer_2.model_max_length == 77 and pipe.text_encoder_2.config.num_hidden_layers == 32
        assert json.loads((out / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    else:
        assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        assert len(unet.block_out_channels) == 4 and vae.scaling_factor == 0.18215
        assert type(pipe.scheduler).__name__ == "PNDMScheduler" and sched.skip_prk_steps
    assert pipe.text_encoder.config.num_hidden_layers == 12 and unet.layers_per_block == 2

    latents = pipe("a red circle", num_inference_steps=1, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


# FLUX.1-dev's released components, as counted from their safetensors headers (CLIP-L as above)
FLUX_PUBLISHED = {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480,
                  "vae": 83_819_683}


def test_flux_param_counts_match_the_published_model(full_size):
    counts = full_size.param_counts("flux")
    assert counts.keys() == FLUX_PUBLISHED.keys()
    for component, published in FLUX_PUBLISHED.items():
        assert counts[component] == pytest.approx(published, rel=0.005), component


def test_scaled_flux_pipeline_loads_through_the_project_and_runs(full_size, tmp_path, capsys):
    from diffusers import FluxPipeline

    from utils import models

    out = tmp_path / "flux"
    counts = full_size.main(["--model", "flux", "--output_dir", str(out), "--width_scale", SCALE])
    printed = capsys.readouterr().out
    assert all(f"{name}: " in printed for name in counts) and "tokenizer_2: toy T5" in printed
    assert counts == full_size.param_counts("flux", float(SCALE))
    assert _weights_dtypes(str(out)) == {"F16"}
    assert listing(out) == ["model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer",
                                       "tokenizer_2", "transformer", "vae"]

    # the project's own readers see a FLUX pipeline with FLUX-dev's 512 T5 tokens
    assert models.detect_architecture(str(out)) == "flux"
    tokenizers, encoders = models.load_text_encoders(str(out))
    assert [type(e).__name__ for e in encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert models.flux_max_sequence_length(tokenizers[1]) == 512 and tokenizers[0].model_max_length == 77
    assert encoders[1].shared.weight is encoders[1].encoder.embed_tokens.weight  # one token table, as released
    assert models.load_vae(str(out)).config.latent_channels == 16 and models.native_resolution(str(out)) == 1024

    pipe = FluxPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    transformer, vae, sched = pipe.transformer.config, pipe.vae.config, pipe.scheduler.config
    assert (transformer.num_layers, transformer.num_single_layers, transformer.attention_head_dim) == (19, 38, 128)
    assert transformer.guidance_embeds and transformer.in_channels == 64 and list(transformer.axes_dims_rope) == [16, 56, 56]
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.projection_dim
    assert vae.latent_channels == 16 and vae.scaling_factor == 0.3611 and vae.shift_factor == 0.1159
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and sched.use_dynamic_shifting
    assert (sched.shift, sched.base_shift, sched.max_shift, sched.max_image_seq_len) == (3.0, 0.5, 1.15, 4096)
    t5 = pipe.text_encoder_2.config
    assert (t5.num_layers, t5.d_kv, t5.feed_forward_proj, t5.vocab_size) == (24, 64, "gated-gelu", 32128)

    # 32 px: 4x4 latents, packed into 2x2 tokens of 64 channels
    latents = pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="latent",
                   max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 64) and torch.isfinite(latents).all()


def test_refuses_a_folder_that_holds_files(full_size, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        full_size.main(["--model", "sd15", "--output_dir", str(out), "--width_scale", SCALE])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--output_dir" in err and len(err.splitlines()) == 1
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["mine"]
    with pytest.raises(UserError):  # the check itself, before the one-line exit
        full_size.configs("sdxl", 0.0)


def test_overwrite_writes_among_the_users_files_and_keeps_them(full_size, tmp_path, capsys):
    """--overwrite into a folder holding a user's file: the pipeline goes in beside it, the file is kept."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    full_size.main(["--model", "sd15", "--output_dir", str(out), "--width_scale", SCALE, "--overwrite"])
    assert (out / "notes.txt").read_text() == "keep me"
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(os.listdir(out))
    assert not [n for n in os.listdir(out) if n.startswith(".partial")]
    StableDiffusionPipeline.from_pretrained(str(out))
