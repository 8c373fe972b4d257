"""inference.py with several LoRAs (an acceleration LoRA and a style LoRA of one base, each with its own scale), and
with none after a demo run (the demo's distilled LoRA of the toy FLUX)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import random_lora, unet_output
from PIL import Image

import inference
import paras
from utils import lora, lora_files

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(toy_world: str, name: str) -> str:
    return os.path.join(toy_world, "models", name)


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _settings(path: str) -> dict:
    return json.loads(Image.open(path).text["settings"])


@pytest.fixture(scope="module")
def two_loras(toy_world: str, tmp_path_factory) -> dict[str, str]:
    """Two rank-4 LoRAs of the toy SDXL UNet (random B, so both act), on different modules: "accel" (the recipes'
    LCM list) and "style" (attention only, as diffusers' style-LoRA scripts), each as recipe output folders."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("two_loras")
    out = {}
    for seed, (name, targets) in enumerate((("accel", lora.LCM_LORA_TARGETS), ("style", lora.DIFFUSERS_LORA_TARGETS))):
        unet = UNet2DConditionModel.from_pretrained(_model(toy_world, "sdxl"), subfolder="unet")
        random_lora(unet, targets, seed=seed)
        with torch.no_grad():  # larger B than random_lora's, so that a wrong scale shows well above rounding
            for p in (p for n, p in unet.named_parameters() if "lora_B" in n):
                p.mul_(10)
        out[name] = str(root / name)
        lora_files.save_lora_outputs(unet, out[name], "unet")
    return out


def _sdxl(toy_world: str):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(_model(toy_world, "sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_several_loras_match_diffusers_named_adapters(toy_world: str, two_loras) -> None:
    """load_loras = diffusers' load_lora_weights(..., adapter_name=) for each + set_adapters(names, weights), fused or
    not, from diffusers files or the kohya/PEFT files of the same LoRAs."""
    scales = [1.0, 0.6]
    reference = _sdxl(toy_world)
    base = unet_output(reference.unet)
    for name in ("accel", "style"):
        reference.load_lora_weights(two_loras[name], adapter_name=name)
    reference.set_adapters(["accel", "style"], adapter_weights=scales)
    want = unet_output(reference.unet)
    reference.set_adapters(["accel"], adapter_weights=[1.0])
    accel_only = unet_output(reference.unet)
    assert (want - base).abs().max() > 1e-2 and (want - accel_only).abs().max() > 1e-2  # both LoRAs act
    files = {"diffusers": [inference.resolve_lora_file(two_loras[n]) for n in ("accel", "style")],
             "kohya+peft": [os.path.join(two_loras["accel"], "lora_kohya.safetensors"),
                            os.path.join(two_loras["style"], "unet", "adapter_model.safetensors")]}
    for kind, paths in files.items():
        for fuse in (True, False):
            pipe = _sdxl(toy_world)
            formats = inference.load_loras(pipe, pipe.unet, list(zip(paths, scales)), fuse)
            assert formats == (["diffusers"] * 2 if kind == "diffusers" else ["kohya", "peft"])
            assert lora.has_lora(pipe.unet) != fuse  # fused: the LoRA layers are gone
            if not fuse:
                assert set(pipe.unet.peft_config) == {"accel", "style"}  # named adapters, after their folders
            assert torch.allclose(unet_output(pipe.unet), want, atol=1e-5), (kind, fuse)


def test_several_loras_on_the_command_line(toy_world: str, two_loras, tmp_path) -> None:
    """`--lora_path A --lora_path B --lora_scale 1 --lora_scale 0.6` = `--lora_path A --lora_path B:0.6`, fused or not;
    every LoRA, its file, format, scale and adapter name in the PNG's metadata."""
    a, b = two_loras["accel"], two_loras["style"]
    common = ["--base_model_path", _model(toy_world, "sdxl"), "--quiet"]
    (listed,) = inference.main([*common, "--output_dir", str(tmp_path / "listed"), "--lora_path", a, "--lora_path", b,
                                "--lora_scale", "1", "--lora_scale", "0.6"])
    (inline,) = inference.main([*common, "--output_dir", str(tmp_path / "inline"), "--lora_path", a,
                                "--lora_path", f"{b}:0.6"])
    (unfused,) = inference.main([*common, "--output_dir", str(tmp_path / "unfused"), "--lora_path", a,
                                 "--lora_path", f"{b}:0.6", "--no-fuse_lora"])
    (alone,) = inference.main([*common, "--output_dir", str(tmp_path / "alone"), "--lora_path", a])
    assert np.array_equal(_pixels(listed), _pixels(inline))
    assert np.abs(_pixels(listed) - _pixels(unfused)).max() <= 1  # the same up to float rounding
    assert np.abs(_pixels(listed) - _pixels(alone)).max() > 1  # the second LoRA acts
    settings = _settings(inline)
    assert settings["loras"] == [
        {"path": a, "file": os.path.join(a, "pytorch_lora_weights.safetensors"), "format": "diffusers", "scale": 1.0,
         "adapter": "accel"},
        {"path": b, "file": os.path.join(b, "pytorch_lora_weights.safetensors"), "format": "diffusers", "scale": 0.6,
         "adapter": "style"}]
    assert settings["lora_scale"] == [1.0, 0.6] and settings["lora_fused"] is True
    assert _settings(unfused)["lora_fused"] is False
    assert f"Lora: {a}, {b}" in Image.open(inline).text["parameters"]
    one = _settings(alone)  # one LoRA: the flat keys hold values, as before
    assert one["lora"] == a and one["lora_scale"] == 1.0 and one["lora_format"] == "diffusers"


def test_adapter_names_are_distinct_and_readable() -> None:
    names = inference.adapter_names(["results/demo/lcm-lora-sdxl", "style/pytorch_lora_weights.safetensors",
                                     "x/unet/adapter_model.safetensors", "style.safetensors", "a b.safetensors"])
    assert names == ["lcm_lora_sdxl", "style", "x", "style_2", "a_b"]


@pytest.mark.parametrize("flags,needle", [
    (["--lora_path", "a", "--lora_scale", "1", "--lora_scale", "0.5"], "2 --lora_scale for 1 --lora_path"),
    (["--lora_path", "a", "--lora_path", "b", "--lora_scale", "0.5"], "1 --lora_scale for 2 --lora_path"),
    (["--lora_path", "no_such.safetensors:strong"], "after the last ':' is not a scale"),
    (["--lora_path", "no_such.safetensors:"], "after the last ':' is not a scale"),
    (["--lora_path", "no_such.safetensors:inf"], "finite scale"),
    (["--lora_path", "a:0.5", "--lora_scale", "1"], "either as PATH:SCALE or with --lora_scale"),
    (["--lora_scale", "0.5"], "--lora_scale given without --lora_path"),
])
def test_bad_lora_combinations_are_one_line(flags: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        paras.parse_args(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and needle in err, err


def test_a_path_holding_a_colon_is_a_path(tmp_path) -> None:
    odd = tmp_path / "v1:2.safetensors"
    odd.write_bytes(b"")
    assert paras.parse_args(["--lora_path", str(odd)]).loras == [(str(odd), 1.0)]
    assert paras.parse_args(["--lora_path", f"{odd}:0.5"]).loras == [(str(odd), 0.5)]


def test_no_lora_path_after_a_demo_run_loads_the_demos_lora(toy_world: str, tmp_path, monkeypatch, capsys) -> None:
    """No --lora_path, no --base_model_path: with the demo's finished TLCM LoRA of the toy FLUX where demo.py writes it,
    that LoRA is loaded and named; without it, the base model alone, as before. --base_model_path opts out."""
    from diffusers import FluxTransformer2DModel

    demo_dir = tmp_path / "results" / "demo" / "tlcm-flux"
    monkeypatch.setattr(inference, "DEMO_LORA_DIR", str(demo_dir))
    (before,) = inference.main(["--output_dir", str(tmp_path / "before")])
    assert "no --lora_path: sampling the base model alone" in capsys.readouterr().err
    assert _settings(before)["lora"] == "none"

    model = FluxTransformer2DModel.from_pretrained(_model(toy_world, "flux"), subfolder="transformer")
    random_lora(model, lora.FLUX_LORA_TARGETS)
    os.makedirs(demo_dir)
    lora_files.save_lora_outputs(model, str(demo_dir), "transformer", peft_dir=str(demo_dir))  # as the recipe does
    (after,) = inference.main(["--output_dir", str(tmp_path / "after")])
    file = os.path.join(demo_dir, "pytorch_lora_weights.safetensors")
    err = capsys.readouterr().err
    assert f"loading the LoRA the demo distilled for this base, {file}" in err
    settings = _settings(after)
    assert settings["lora_file"] == file and settings["guidance_scale"] == 1.0  # a distilled student: no CFG
    assert not np.array_equal(_pixels(before), _pixels(after))

    (explicit,) = inference.main(["--output_dir", str(tmp_path / "explicit"), "--base_model_path",
                                  _model(toy_world, "flux")])
    assert _settings(explicit)["lora"] == "none" and np.array_equal(_pixels(before), _pixels(explicit))
