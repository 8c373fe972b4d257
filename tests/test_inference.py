"""inference.py / paras.py on the toy pipelines: defaults, LoRA formats, schedulers, metadata, file names, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import listing, run_command
from PIL import Image
from safetensors.torch import save_file

import inference
import paras
from utils import lora, lora_files

RANK = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(toy_world: str, name: str) -> str:
    return os.path.join(toy_world, "models", name)


def _run(out: str, *flags: str) -> list[str]:
    """inference.main in this process (quiet); returns the written PNG paths."""
    return inference.main(["--output_dir", out, "--quiet", *flags])


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _cli(*flags: str):
    """`python inference.py FLAGS` from the repository root, run in this process (helpers.run_command)."""
    return run_command(["inference.py", *flags])


def _error_line(err: str) -> str:
    """The single `error:` line of stderr (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _save_three_formats(model: torch.nn.Module, out: str, component: str) -> dict[str, str]:
    """The model's adapter as a diffusers file, a PEFT folder and a kohya file; format -> path."""
    paths = {"diffusers": lora_files.save_diffusers_lora(model, os.path.join(out, "diffusers"), component)}
    paths["peft"] = os.path.join(out, "peft")
    lora_files.save_peft_adapter(model, paths["peft"])
    prefix = "lora_unet" if component == "unet" else "lora_transformer"
    kohya = lora_files.to_kohya(lora.lora_state_dict(model), float(lora.DEFAULT_LORA_ALPHA), prefix)
    paths["kohya"] = os.path.join(out, "lora_kohya.safetensors")
    save_file({k: v.contiguous() for k, v in kohya.items()}, paths["kohya"])
    return paths


@pytest.fixture(scope="module")
def unet_loras(toy_world: str, tmp_path_factory) -> dict[str, dict[str, str]]:
    """A rank-4 LoRA with random lora_B on each toy UNet (sd, sdxl), saved in all three formats."""
    from diffusers import UNet2DConditionModel

    out = {}
    for name in ("sd", "sdxl"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_pretrained(_model(toy_world, name), subfolder="unet")
        lora.add_lora(unet, RANK, lora.DEFAULT_LORA_ALPHA, lora.LCM_LORA_TARGETS, init=False)
        out[name] = _save_three_formats(unet, str(tmp_path_factory.mktemp(f"lora_{name}")), "unet")
    return out


@pytest.fixture(scope="module")
def flux_lora(toy_world: str, tmp_path_factory) -> dict[str, str]:
    """A rank-4 LoRA with random lora_B on the toy FLUX transformer, saved in all three formats."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_pretrained(_model(toy_world, "flux"), subfolder="transformer")
    lora.add_lora(transformer, RANK, lora.DEFAULT_LORA_ALPHA, lora.FLUX_LORA_TARGETS, init=False)
    return _save_three_formats(transformer, str(tmp_path_factory.mktemp("lora_flux")), "transformer")


# ----------------------------------------------------------------------------- defaults and metadata


def test_default_command_writes_png_with_metadata(toy_world: str, tmp_path) -> None:
    out = tmp_path / "out"
    result = _cli("--infer-steps", "4", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    (name,) = listing(out)
    assert name.endswith(".png")
    image = Image.open(out / name)
    assert image.size == (32, 32)  # the toy pipeline's own size, read from its VAE config
    assert image.text["prompt"] == paras.DEFAULT_PROMPT
    assert image.text["steps"] == "4"
    settings = json.loads(image.text["settings"])
    assert settings["scheduler"] == "tlcm" and settings["scheduler_class"] == "FlowMatchEulerTLCMScheduler"
    assert settings["architecture"] == "flux" and settings["base_model"].endswith(os.path.join("models", "flux"))
    assert settings["lora"] == "none" and settings["seed"] == 0 and settings["guidance_scale"] == 5.0
    assert "Steps: 4" in image.text["parameters"]
    assert str(out / name) in result.stdout


def test_second_run_does_not_overwrite(toy_world: str, tmp_path) -> None:
    flags = ["--base_model_path", _model(toy_world, "sd"), "--prompt", "a small blue square on a black background"]
    (first,) = _run(str(tmp_path), *flags)
    with open(first, "rb") as f:
        before = f.read()
    (second,) = _run(str(tmp_path), *flags)
    assert first != second and os.path.basename(second) == os.path.basename(first)[:-4] + "-1.png"
    with open(first, "rb") as f:
        assert f.read() == before
    assert np.array_equal(_pixels(first), _pixels(second))  # same seed, same image
    assert listing(tmp_path) == sorted(os.path.basename(p) for p in (first, second))  # no temporaries
    text = Image.open(first).text
    assert text["prompt"] == "a small blue square on a black background"
    assert text["scheduler"] == "lcm" and text["guidance_scale"] == "0.0" and text["guidance"] == "none"


# ----------------------------------------------------------------------------- LoRA formats


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_unet_lora_formats_give_identical_images(toy_world: str, unet_loras, tmp_path, name: str) -> None:
    base = _model(toy_world, name)
    (plain,) = _run(str(tmp_path / "base"), "--base_model_path", base, "--seed", "3")
    images = {}
    for fmt, path in unet_loras[name].items():
        (png,) = _run(str(tmp_path / fmt), "--base_model_path", base, "--lora_path", path, "--seed", "3")
        images[fmt] = _pixels(png)
        assert Image.open(png).text["lora_format"] == fmt
    assert np.array_equal(images["diffusers"], images["peft"])
    assert np.array_equal(images["diffusers"], images["kohya"])
    assert not np.array_equal(images["diffusers"], _pixels(plain))  # the LoRA is really applied


def test_lora_folder_of_a_recipe_output_is_found(unet_loras, tmp_path) -> None:
    folder = os.path.dirname(unet_loras["sd"]["diffusers"])
    assert inference.resolve_lora_file(folder) == unet_loras["sd"]["diffusers"]
    assert inference.resolve_lora_file(unet_loras["sd"]["peft"]).endswith("adapter_model.safetensors")


def test_lora_scale_zero_gives_the_base_model(toy_world: str, unet_loras, tmp_path) -> None:
    base = _model(toy_world, "sd")
    (plain,) = _run(str(tmp_path), "--base_model_path", base)
    (scaled,) = _run(str(tmp_path), "--base_model_path", base, "--lora_path", unet_loras["sd"]["kohya"],
                     "--lora_scale", "0")
    assert np.array_equal(_pixels(plain), _pixels(scaled))


def test_flux_peft_folder_lora(toy_world: str, flux_lora, tmp_path) -> None:
    base = _model(toy_world, "flux")
    (plain,) = _run(str(tmp_path / "base"), "--base_model_path", base)
    (peft,) = _run(str(tmp_path / "peft"), "--base_model_path", base, "--lora_path", flux_lora["peft"])
    (diffusers,) = _run(str(tmp_path / "diffusers"), "--base_model_path", base, "--lora_path", flux_lora["diffusers"])
    assert np.array_equal(_pixels(peft), _pixels(diffusers))
    assert not np.array_equal(_pixels(peft), _pixels(plain))
    settings = json.loads(Image.open(peft).text["settings"])
    assert settings["lora_format"] == "peft" and settings["scheduler"] == "tlcm" and settings["renoise"] == "fresh"
    assert settings["guidance_scale"] == 1.0 and settings["guidance"] == "none"  # a LoRA student: no CFG


def test_images_do_not_depend_on_batch_size(toy_world: str, tmp_path) -> None:
    """Fresh TLCM re-noising draws from each image's own generator: image i depends on seed + i only."""
    base = _model(toy_world, "flux")
    one = _run(str(tmp_path / "one"), "--base_model_path", base, "--num_images", "2", "--batch_size", "1")
    two = _run(str(tmp_path / "two"), "--base_model_path", base, "--num_images", "2", "--batch_size", "2")
    for a, b in zip(one, two):
        assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(one[0]), _pixels(one[1]))
    assert [Image.open(p).text["seed"] for p in two] == ["0", "1"]


@pytest.mark.parametrize("scheduler,renoise", [("tlcm-sdxl", "fresh"), ("tlcm", "fresh"), ("tlcm-implied", "implied")])
def test_sdxl_milestone_schedulers(toy_world: str, tmp_path, scheduler: str, renoise: str) -> None:
    """On SDXL every TLCM name is the released sampler, TLCMScheduler, on the published milestones."""
    (png,) = _run(str(tmp_path), "--base_model_path", _model(toy_world, "sdxl"), "--scheduler", scheduler)
    settings = json.loads(Image.open(png).text["settings"])
    assert settings["scheduler_class"] == "TLCMScheduler" and settings["timesteps"] == [999, 749, 499, 124]
    assert settings["renoise"] == renoise


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("steps", ["0", "51"])
def test_infer_steps_out_of_range_is_one_line(tmp_path, steps: str) -> None:
    result = _cli("--infer-steps", steps, "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and "--infer-steps" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["flux", "sdxl"])
def test_lora_of_another_architecture_is_one_line(toy_world: str, unet_loras, tmp_path, capsys, model: str) -> None:
    with pytest.raises(SystemExit) as exc:
        _run(str(tmp_path / "out"), "--base_model_path", _model(toy_world, model),
             "--lora_path", unet_loras["sd"]["kohya" if model == "flux" else "diffusers"])
    assert exc.value.code == 2
    line = _error_line(capsys.readouterr().err)
    assert "--lora_path" in line and ("architecture" in line or "does not fit" in line)
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_corrupt_lora_file_is_one_line(toy_world: str, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        _run(str(tmp_path / "out"), "--base_model_path", _model(toy_world, "sd"), "--lora_path", str(bad))
    assert "--lora_path" in _error_line(capsys.readouterr().err)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("flags,needle", [
    (["--base_model_path", "no/such/folder"], "--base_model_path"),
    (["--resolution", "36"], "multiple of 8"),
    (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16"),
    (["--scheduler", "nope"], "--scheduler"),
    (["--scheduler", "lcm"], "--scheduler lcm does not fit a flux model"),
    (["--renoise", "implied", "--scheduler", "euler"], "--renoise"),
    (["--lora_path", "no_such_lora.safetensors"], "--lora_path"),
    (["--device", "cuda:99"], "--device"),
])
def test_bad_input_is_one_line(toy_world: str, tmp_path, capsys, flags: list[str], needle: str) -> None:
    if flags == ["--device", "cuda:99"] and not torch.cuda.is_available():
        flags = ["--device", "cuda"]
    with pytest.raises(SystemExit) as exc:
        _run(str(tmp_path / "out"), "--base_model_path", _model(toy_world, "flux"), *flags)
    assert exc.value.code == 2
    assert needle in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_is_one_line(toy_world: str, tmp_path, capsys) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(SystemExit):
        _run(str(target), "--base_model_path", _model(toy_world, "sd"))
    assert "--output_dir" in _error_line(capsys.readouterr().err)
    assert target.read_text() == "x"
