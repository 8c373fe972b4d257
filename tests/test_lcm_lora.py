"""train_lcm_distill_lora_sdxl.py on the toy SDXL and SD teachers: outputs load everywhere, teacher = base UNet."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import kill_while_saving, unet_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_lcm_distill_lora_sdxl.py")


def command(world: str, teacher: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, SCRIPT, "--pretrained_teacher_model", os.path.join(world, "models", teacher),
           "--train_data_dir", os.path.join(world, "data/train"), "--output_dir", out, "--resolution", "32",
           "--train_batch_size", "4", "--max_train_samples", "32", "--lora_rank", "4", "--w_min", "2",
           "--w_max", "6", "--validation_steps", "1000", "--report_to", "none", *extra]


def run(world: str, teacher: str, out: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(world, teacher, out, *extra), capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def sdxl_run(toy_world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "sdxl")
    run(toy_world, "sdxl", out, "--max_train_steps", "3", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2", "--learning_rate", "1e-2")
    return out


def test_outputs_load_through_diffusers_peft_and_kohya_with_equal_results(toy_world, sdxl_run):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import PeftModel

    from utils import lora

    assert sorted(d for d in os.listdir(sdxl_run) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    base_path = os.path.join(toy_world, "models/sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(sdxl_run)
    via_diffusers = unet_output(pipe.unet)
    assert not torch.allclose(via_diffusers, base, atol=1e-4)  # the trained LoRA changes the UNet

    peft_unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(base_path, subfolder="unet"),
                                          os.path.join(sdxl_run, "unet"))
    assert torch.allclose(unet_output(peft_unet), via_diffusers, atol=1e-5)

    kohya_unet = UNet2DConditionModel.from_pretrained(base_path, subfolder="unet")
    lora.load_lora_file(os.path.join(sdxl_run, "lora_kohya.safetensors"), kohya_unet)
    assert torch.allclose(unet_output(kohya_unet), via_diffusers, atol=1e-5)
    assert "Training arguments" in open(os.path.join(sdxl_run, "README.md")).read()


def test_teacher_pass_is_the_base_unet(toy_world):
    """Inside the recipes' adapters_disabled block the LoRA UNet computes exactly the base UNet."""
    from diffusers import UNet2DConditionModel

    from utils import lora

    path = os.path.join(toy_world, "models/sdxl")
    base = unet_output(UNet2DConditionModel.from_pretrained(path, subfolder="unet"))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    lora.add_lora(unet, rank=4, targets=lora.LCM_LORA_TARGETS)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert not torch.allclose(unet_output(unet), base, atol=1e-4)
    with lora.adapters_disabled(unet):
        assert torch.equal(unet_output(unet), base)
    assert not torch.allclose(unet_output(unet), base, atol=1e-4)  # switched back on afterwards


def test_time_ids_carry_height_then_width(toy_world, tmp_path):
    sys.path.insert(0, ROOT)
    import train_lcm_distill_lora_sdxl as recipe
    from utils import models

    args = recipe.parse_args(["--pretrained_teacher_model", "x", "--output_dir", str(tmp_path),
                              "--resolution", "32"])
    tokenizers, encoders = models.load_text_encoders(os.path.join(toy_world, "models/sdxl"), "sdxl")
    batch = {"captions": ["a red circle"], "original_sizes": [(48, 32)], "crop_top_lefts": [(8, 0)]}
    _, added = recipe.conditioning(args, "sdxl", batch, tokenizers, encoders, "cpu")
    assert added["time_ids"].tolist() == [[48.0, 32.0, 8.0, 0.0, 32.0, 32.0]]


def test_same_script_trains_an_sd1_teacher(toy_world, tmp_path):
    out = str(tmp_path / "sd")
    run(toy_world, "sd", out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(toy_world, "models/sd"))
    pipe.load_lora_weights(out)
    assert os.path.exists(os.path.join(out, "unet/adapter_config.json"))


@pytest.mark.parametrize("extra, needle", [
    (["--pretrained_vae_model_name_or_path", "/nonexistent/vae"], "--pretrained_vae_model_name_or_path"),
    (["--lora_rank", "0"], "--lora_rank"),
    (["--w_min", "9", "--w_max", "3"], "--w_min"),
])
def test_bad_input_is_one_line_error(toy_world, tmp_path, extra, needle):
    proc = run(toy_world, "sdxl", str(tmp_path / "bad"), "--max_train_steps", "1", *extra, check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], \
        proc.stderr[-2000:]


def test_flux_folder_is_refused(toy_world, tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--pretrained_teacher_model", os.path.join(toy_world, "models/flux"),
                           "--train_data_dir", os.path.join(toy_world, "data/train"), "--output_dir",
                           str(tmp_path / "o"), "--max_train_steps", "1", "--report_to", "none"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--pretrained_teacher_model" in proc.stderr and "Traceback" not in proc.stderr


def test_killed_run_with_ema_target_resumes_to_the_same_lora(toy_world, tmp_path):
    """SIGKILL while writing checkpoint-4 (EMA target on); resume from checkpoint-2; equal to an uninterrupted run."""
    from safetensors.torch import load_file

    args = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--ema_decay", "0.9", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "0", "--learning_rate", "1e-3"]
    straight = str(tmp_path / "straight")
    run(toy_world, "sd", straight, *args)
    crashed = str(tmp_path / "crashed")
    kill_while_saving("train_lcm_distill_lora_sdxl.py", command(toy_world, "sd", crashed, *args)[2:],
                      os.path.join(crashed, "checkpoint-4.partial"))
    assert sorted(d for d in os.listdir(crashed) if d.startswith("checkpoint-") and "." not in d) == ["checkpoint-2"]
    run(toy_world, "sd", crashed, *args, "--resume_from_checkpoint", "latest")
    a = load_file(os.path.join(straight, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(crashed, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



def encoder_output(encoder) -> torch.Tensor:
    """A text encoder's hidden states (every layer) and its pooled / projected output at fixed token ids."""
    ids = torch.randint(0, encoder.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return torch.cat([*(h.flatten() for h in out.hidden_states), pooled.flatten()])


@pytest.fixture(scope="module")
def sdxl_encoder_run(toy_world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora_te") / "sdxl")
    run(toy_world, "sdxl", out, "--max_train_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "1e-2",
        "--train_text_encoder_lora", "--text_encoder_lora_rank", "2")
    return out


def test_text_encoder_lora_loads_through_diffusers_peft_and_kohya(toy_world, sdxl_encoder_run):
    from diffusers import StableDiffusionXLPipeline
    from peft import PeftModel
    from safetensors.torch import load_file

    out = sdxl_encoder_run
    base_path = os.path.join(toy_world, "models/sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
    names = ["text_encoder", "text_encoder_2"]
    base = [encoder_output(getattr(pipe, n)) for n in names]
    pipe.load_lora_weights(out)
    via_diffusers = [encoder_output(getattr(pipe, n)) for n in names]
    for a, b in zip(via_diffusers, base):
        assert not torch.allclose(a, b, atol=1e-4)  # both encoder LoRAs trained
    for name, want in zip(names, via_diffusers):
        fresh = type(getattr(pipe, name)).from_pretrained(base_path, subfolder=name)
        assert torch.allclose(encoder_output(PeftModel.from_pretrained(fresh, os.path.join(out, name))), want,
                              atol=1e-5)
    kohya = load_file(os.path.join(out, "lora_kohya.safetensors"))
    prefixes = {k.split("_text_model")[0] for k in kohya if "_text_model" in k}
    assert prefixes == {"lora_te1", "lora_te2"} and any(k.startswith("lora_unet_") for k in kohya)
    # encoder 1's last layer feeds no conditioning (SDXL takes its penultimate states): it gets no LoRA
    last = pipe.text_encoder.config.num_hidden_layers - 1
    assert not any(k.startswith(f"lora_te1_text_model_encoder_layers_{last}_") for k in kohya)
    kohya_pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
    kohya_pipe.load_lora_weights(os.path.join(out, "lora_kohya.safetensors"))
    for name, want in zip(names, via_diffusers):
        assert torch.allclose(encoder_output(getattr(kohya_pipe, name)), want, atol=1e-5)
    assert "text encoders carry a LoRA" in open(os.path.join(out, "README.md")).read()
    from utils import lora
    from utils.errors import UserError

    for path in (out, os.path.join(out, "lora_kohya.safetensors")):  # convert_lora.py: UNet LoRAs only, one line
        with pytest.raises(UserError, match="text-encoder LoRA"):
            lora.read_lora(path, pipe.unet)


def test_teacher_conditioning_is_the_base_encoders(toy_world, tmp_path):
    """With encoder LoRAs present the teacher's (and the unconditional) embeddings are exactly the base encoders'."""
    sys.path.insert(0, ROOT)
    import train_lcm_distill_lora_sdxl as recipe
    from utils import models

    args = recipe.parse_args(["--pretrained_teacher_model", "x", "--output_dir", str(tmp_path), "--resolution", "32",
                              "--train_text_encoder_lora", "--lora_rank", "4"])
    path = os.path.join(toy_world, "models/sdxl")
    tokenizers, encoders = models.load_text_encoders(path, "sdxl")
    batch = {"captions": ["a red circle", ""], "original_sizes": [(32, 32)] * 2, "crop_top_lefts": [(0, 0)] * 2}
    with torch.no_grad():
        want_embeds, want_added = recipe.conditioning(args, "sdxl", batch, tokenizers, encoders, "cpu")
    recipe.add_text_encoder_lora(args, "sdxl", encoders)
    for enc in encoders:
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    embeds, added = recipe.conditioning(args, "sdxl", batch, tokenizers, encoders, "cpu")
    assert embeds.requires_grad and not torch.allclose(embeds, want_embeds, atol=1e-4)
    assert not torch.allclose(added["text_embeds"], want_added["text_embeds"], atol=1e-4)
    teacher_embeds, teacher_added = recipe.teacher_conditioning(args, "sdxl", batch, tokenizers, encoders, "cpu")
    assert not teacher_embeds.requires_grad and torch.equal(teacher_embeds, want_embeds)
    assert all(torch.equal(teacher_added[k], want_added[k]) for k in want_added)
    again, _ = recipe.conditioning(args, "sdxl", batch, tokenizers, encoders, "cpu")
    assert torch.equal(again, embeds)  # the adapters are back on afterwards


def test_sd1_teacher_trains_a_text_encoder_lora(toy_world, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = str(tmp_path / "sd_te")
    run(toy_world, "sd", out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--learning_rate", "1e-2",
        "--train_text_encoder_lora")
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(toy_world, "models/sd"))
    base = encoder_output(pipe.text_encoder)
    pipe.load_lora_weights(out)
    assert not torch.allclose(encoder_output(pipe.text_encoder), base, atol=1e-4)
    assert os.path.exists(os.path.join(out, "text_encoder/adapter_config.json"))
    assert any(k.startswith("lora_te_text_model_") for k in load_file(os.path.join(out, "lora_kohya.safetensors")))
    assert os.listdir(os.path.join(out, "checkpoint-2"))  # the encoder is saved with the UNet in each checkpoint
