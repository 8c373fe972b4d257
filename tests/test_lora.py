"""utils.lora and utils.lora_files on the toy SD / SDXL UNets and FLUX transformer: adapters, the three file
formats, errors, merging."""

from __future__ import annotations

import os
import re

import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from utils import lora, lora_files
from utils.errors import UserError

RANK = 4


pytestmark = pytest.mark.usefixtures("one_thread")
PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def _path(toy_world: str, name: str) -> str:
    """Folder of one toy pipeline."""
    return os.path.join(toy_world, "models", name)


def _unet(toy_world: str, name: str) -> UNet2DConditionModel:
    """A fresh toy UNet in eval mode."""
    return UNet2DConditionModel.from_pretrained(_path(toy_world, name), subfolder="unet").eval()


def _inputs(unet: torch.nn.Module) -> dict:
    """A fixed UNet input (SDXL's added conditioning when the config asks for it)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    kwargs = {"sample": torch.randn(1, cfg.in_channels, 8, 8, generator=g), "timestep": torch.tensor([10]),
              "encoder_hidden_states": torch.randn(1, 5, cfg.cross_attention_dim, generator=g)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]])}
    return kwargs


@torch.no_grad()
def _out(model: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """The model's output tensor on the given input."""
    return model(**kwargs, return_dict=False)[0]


def _adapted(toy_world: str, name: str, alpha: float = lora.DEFAULT_LORA_ALPHA) -> UNet2DConditionModel:
    """A toy UNet with a non-zero (randomly initialised) LoRA on the LCM-LoRA targets."""
    torch.manual_seed(0)
    unet = _unet(toy_world, name)
    lora.add_lora(unet, RANK, alpha, lora.LCM_LORA_TARGETS, init=False)
    return unet


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_add_lora_changes_output_and_disable_restores_base(toy_world: str, name: str) -> None:
    base = _unet(toy_world, name)
    x = _inputs(base)
    ref = _out(base, x)
    unet = _adapted(toy_world, name)
    assert not torch.allclose(_out(unet, x), ref, atol=1e-4)
    assert any("conv_shortcut" in k or "time_emb_proj" in k for k in lora.lora_state_dict(unet))
    unet.disable_adapters()
    assert torch.equal(_out(unet, x), ref)


def test_adapter_switches_leave_the_flags_of_the_tensors_held_at_the_start(toy_world: str) -> None:
    """FSDP2 swaps a module's sharded and gathered weight between the two ends of a switch: the LoRA weight held
    at the start keeps its flag (it is the one FSDP2 copies onto the gathered weight), and the teacher still
    runs without LoRA inside the block."""
    from utils import tlcm_extras

    unet = _adapted(toy_world, "sd")
    tlcm_extras.add_fake_score(unet, RANK, 8, lora.LCM_LORA_TARGETS)  # a second adapter to switch to
    x = _inputs(unet)
    held = unet.get_submodule("mid_block.attentions.0.proj_in.lora_A.default")
    sharded = held.weight
    lora_out = _out(unet, x)
    for switch in (lambda: lora.adapters_disabled(unet), lambda: tlcm_extras.adapter_active(unet)):
        with switch():
            gathered = torch.nn.Parameter(sharded.detach().clone())
            held.weight = gathered  # as FSDP2 registers its gathered copy for a forward
        assert sharded.requires_grad and held.weight is gathered
        held.weight = sharded
    with lora.adapters_disabled(unet):
        assert not torch.allclose(_out(unet, x), lora_out, atol=1e-4)
        held.weight = torch.nn.Parameter(sharded.detach().clone())
    held.weight = sharded
    assert sharded.requires_grad and torch.equal(_out(unet, x), lora_out)


def test_add_lora_returns_config_with_targets(toy_world: str) -> None:
    unet = _unet(toy_world, "sd")
    cfg = lora.add_lora(unet, 8, 8, lora.DIFFUSERS_LORA_TARGETS)
    assert cfg.r == 8 and cfg.lora_alpha == 8
    keys = lora.lora_state_dict(unet)
    assert keys and all(re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight$", k) for k in keys)


# ----------------------------------------------------------------------------- diffusers and PEFT folders


@pytest.mark.parametrize("name, alpha", [("sd", 8), ("sdxl", 6)])
def test_diffusers_lora_loads_in_a_fresh_pipeline(toy_world: str, tmp_path, name: str, alpha: float) -> None:
    unet = _adapted(toy_world, name, alpha)
    x = _inputs(unet)
    path = lora_files.save_diffusers_lora(unet, str(tmp_path))
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    pipe = PIPELINES[name].from_pretrained(_path(toy_world, name))
    pipe.load_lora_weights(str(tmp_path))
    assert torch.allclose(_out(pipe.unet.eval(), x), _out(unet, x), atol=1e-5)


@pytest.mark.parametrize("alpha", [8, 4])
def test_peft_adapter_loads_the_seed003_way_and_with_from_pretrained(toy_world: str, tmp_path, alpha: float) -> None:
    unet = _adapted(toy_world, "sd", alpha)
    x = _inputs(unet)
    want = _out(unet, x)
    lora_files.save_peft_adapter(unet, str(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    snippet = get_peft_model(_unet(toy_world, "sd"), LoraConfig(r=RANK, target_modules=lora.LCM_LORA_TARGETS))
    snippet.load_adapter(str(tmp_path), adapter_name="default")
    assert torch.allclose(_out(snippet, x), want, atol=1e-5)
    loaded = PeftModel.from_pretrained(_unet(toy_world, "sd"), str(tmp_path))
    assert torch.allclose(_out(loaded, x), want, atol=1e-5)
    fresh = _unet(toy_world, "sd")
    lora_files.load_lora_file(str(tmp_path / "adapter_model.safetensors"), fresh)
    assert torch.allclose(_out(fresh, x), want, atol=1e-5)


# ----------------------------------------------------------------------------- kohya


def _alphas(unet: torch.nn.Module) -> dict[str, float]:
    """Per-module alpha = scale * rank of an adapted model."""
    return {m: s * RANK for m, s in lora.lora_scalings(unet).items()}


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_kohya_round_trip_and_load(toy_world: str, tmp_path, name: str) -> None:
    unet = _adapted(toy_world, name, alpha=2)
    x = _inputs(unet)
    sd = lora.lora_state_dict(unet)
    kohya = lora_files.to_kohya(sd, _alphas(unet))
    pattern = re.compile(r"^lora_unet_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in kohya)
    assert len(kohya) == len(sd) * 3 // 2
    assert all(v.ndim == 0 for k, v in kohya.items() if k.endswith(".alpha"))
    back, alphas = lora_files.from_kohya(kohya, _unet(toy_world, name))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert alphas == _alphas(unet)
    again = lora_files.to_kohya(back, alphas)
    assert again.keys() == kohya.keys() and all(torch.equal(again[k], kohya[k]) for k in kohya)
    save_file(kohya, str(tmp_path / "k.safetensors"))
    fresh = _unet(toy_world, name)
    lora_files.load_lora_file(str(tmp_path / "k.safetensors"), fresh)
    assert torch.allclose(_out(fresh, x), _out(unet, x), atol=1e-5)


def test_diffusers_file_loads_through_load_lora_file(toy_world: str, tmp_path) -> None:
    unet = _adapted(toy_world, "sd", alpha=6)
    x = _inputs(unet)
    lora_files.save_diffusers_lora(unet, str(tmp_path))
    fresh = _unet(toy_world, "sd")
    lora_files.load_lora_file(str(tmp_path / "pytorch_lora_weights.safetensors"), fresh)
    assert torch.allclose(_out(fresh, x), _out(unet, x), atol=1e-5)


# ----------------------------------------------------------------------------- errors


def _one_line_error(path: str, model: torch.nn.Module, match: str) -> None:
    """load_lora_file raises a one-line UserError matching `match`."""
    with pytest.raises(UserError, match=match) as info:
        lora_files.load_lora_file(path, model)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".txt"])
def test_non_safetensors_files_are_user_errors(toy_world: str, tmp_path, suffix: str) -> None:
    path = tmp_path / f"lora{suffix}"
    torch.save({"a": torch.zeros(1)}, str(path))
    _one_line_error(str(path), _unet(toy_world, "sd"), "not a .safetensors")


def test_missing_file_is_a_user_error(toy_world: str, tmp_path) -> None:
    _one_line_error(str(tmp_path / "nope.safetensors"), _unet(toy_world, "sd"), "does not exist")


def test_truncated_safetensors_is_a_user_error(toy_world: str, tmp_path) -> None:
    unet = _adapted(toy_world, "sd")
    path = lora_files.save_diffusers_lora(unet, str(tmp_path))
    data = open(path, "rb").read()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    _one_line_error(str(bad), _unet(toy_world, "sd"), "truncated or corrupt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02junk")
    _one_line_error(str(tmp_path / "junk.safetensors"), _unet(toy_world, "sd"), "truncated or corrupt")


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sdxl_lora_into_sd_unet_is_a_user_error(toy_world: str, tmp_path, fmt: str) -> None:
    unet = _adapted(toy_world, "sdxl")
    if fmt == "diffusers":
        path = lora_files.save_diffusers_lora(unet, str(tmp_path))
    else:
        path = str(tmp_path / "k.safetensors")
        save_file(lora_files.to_kohya(lora.lora_state_dict(unet), _alphas(unet)), path)
    _one_line_error(path, _unet(toy_world, "sd"), "another architecture|does not fit")


def test_shape_mismatch_reports_dims(toy_world: str, tmp_path) -> None:
    unet = _adapted(toy_world, "sd")
    sd = lora.lora_state_dict(unet)
    key = next(k for k in sd if k.endswith("attn2.to_k.lora_A.weight"))
    sd[key] = torch.zeros(RANK, sd[key].shape[1] + 3)
    path = str(tmp_path / "bad.safetensors")
    save_file(lora_files.to_kohya(sd, 8.0), path)
    _one_line_error(path, _unet(toy_world, "sd"), "does not fit in-dim")


def test_other_rank_that_fits_loads(toy_world: str, tmp_path) -> None:
    torch.manual_seed(1)
    unet = _unet(toy_world, "sd")
    lora.add_lora(unet, 2, 8, lora.DIFFUSERS_LORA_TARGETS, init=False)
    path = lora_files.save_diffusers_lora(unet, str(tmp_path))
    fresh = _unet(toy_world, "sd")
    cfg = lora_files.load_lora_file(path, fresh)
    assert cfg.r == 2
    x = _inputs(unet)
    assert torch.allclose(_out(fresh, x), _out(unet, x), atol=1e-5)


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("wrap", [False, True])
def test_merge_lora_matches_adapted_output_and_drops_lora(toy_world: str, tmp_path, wrap: bool) -> None:
    unet = _adapted(toy_world, "sd", alpha=3)
    x = _inputs(unet)
    want = _out(unet, x)
    if wrap:
        lora_files.save_peft_adapter(unet, str(tmp_path / "a"))
        unet = PeftModel.from_pretrained(_unet(toy_world, "sd"), str(tmp_path / "a"))
    merged = lora.merge_lora(unet)
    assert isinstance(merged, UNet2DConditionModel)
    assert not lora.has_lora(merged)
    assert torch.allclose(_out(merged, x), want, atol=1e-5)
    merged.save_pretrained(str(tmp_path / "unet"))
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    assert not any("lora" in k for k in load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")))
    assert torch.allclose(_out(reloaded, x), want, atol=1e-5)


# ----------------------------------------------------------------------------- FLUX


def _flux_inputs(model: FluxTransformer2DModel) -> dict:
    """A fixed FLUX transformer input: 4 image tokens, 3 text tokens."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 4, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(1, 3, cfg.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(4, 3), "txt_ids": torch.zeros(3, 3)}


def test_flux_lora_diffusers_and_peft_paths(toy_world: str, tmp_path) -> None:
    folder = _path(toy_world, "flux")
    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    x = _flux_inputs(model)
    ref = _out(model, x)
    lora.add_lora(model, RANK, 8, lora.FLUX_LORA_TARGETS, init=False)
    want = _out(model, x)
    assert not torch.allclose(want, ref, atol=1e-4)
    lora_files.save_diffusers_lora(model, str(tmp_path / "d"), component="transformer")
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(tmp_path / "d"))
    assert torch.allclose(_out(pipe.transformer.eval(), x), want, atol=1e-5)
    lora_files.save_peft_adapter(model, str(tmp_path / "p"))
    fresh = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    snippet = get_peft_model(fresh, LoraConfig(r=RANK, target_modules=lora.FLUX_LORA_TARGETS))
    snippet.load_adapter(str(tmp_path / "p"), adapter_name="default", is_trainable=False)
    assert torch.allclose(_out(snippet, x), want, atol=1e-5)
