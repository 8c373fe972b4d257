"""The speed flags change how a step is computed, never what it computes."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from helpers import run_recipe
from safetensors.torch import load_file

from utils import loop, models

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_run(world: str, out: str, *extra: str) -> dict:
    run_recipe("train_lcm_distill_lora_sdxl.py", [
        "--pretrained_teacher_model", os.path.join(world, "models/sdxl"), "--train_data_dir",
        os.path.join(world, "data/train"), "--output_dir", out, "--resolution", "32", "--train_batch_size", "4",
        "--max_train_samples", "16", "--lora_rank", "4", "--max_train_steps", "2", "--validation_steps", "1000",
        "--report_to", "none", "--learning_rate", "1e-3",
        "--adam_epsilon", "1e-3", *extra])  # Adam ~ scaled SGD: rounding cannot flip an update's sign
    return load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))


def sd_run(world: str, out: str, *extra: str) -> dict:
    run_recipe("train_lcm_distill_sd.py", [
        "--pretrained_teacher_model", os.path.join(world, "models/sd"), "--train_data_dir",
        os.path.join(world, "data/train"), "--output_dir", out, "--resolution", "32", "--train_batch_size", "4",
        "--max_train_samples", "16", "--max_train_steps", "2", "--validation_steps", "1000", "--report_to", "none",
        "--learning_rate", "1e-3", "--adam_epsilon", "1e-3", *extra])
    return load_file(os.path.join(out, "unet/diffusion_pytorch_model.safetensors"))


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), (k, (a[k] - b[k]).abs().max())


def test_lora_recipe_separate_teacher_passes_and_channels_last_train_the_same_lora(toy_world, tmp_path):
    base = lora_run(toy_world, str(tmp_path / "batched"))
    assert max(float(v.abs().max()) for k, v in base.items() if "lora_B" in k) > 1e-3  # it trained
    assert_close(base, lora_run(toy_world, str(tmp_path / "two"), "--no-batched_teacher_cfg"))
    assert_close(base, lora_run(toy_world, str(tmp_path / "cl"), "--channels_last"))
    assert_close(base, lora_run(toy_world, str(tmp_path / "peft"), "--no-merged_lora_forward", "--no-fused_adamw"))


def test_sd_recipe_separate_teacher_passes_train_the_same_student(toy_world, tmp_path):
    base = sd_run(toy_world, str(tmp_path / "batched"))
    teacher = load_file(os.path.join(toy_world, "models/sd/unet/diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], teacher[k]) for k in teacher)  # it trained
    assert_close(base, sd_run(toy_world, str(tmp_path / "two"), "--no-batched_teacher_cfg", "--channels_last"))


def test_compile_keeps_the_state_dict_names_and_channels_last_the_values():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(x, 10).sample
    models.prepare_denoiser(model, argparse.Namespace(channels_last=True, torch_compile=True,
                                                     enable_xformers_memory_efficient_attention=False))
    state = model.state_dict()
    assert state.keys() == before.keys()  # checkpoints and LoRA files keep their keys (no "_orig_mod.")
    assert all(torch.equal(state[k], before[k]) for k in before)
    conv = model.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model._compiled_call_impl is not None  # Module.compile: compiled on the first call
    model._compiled_call_impl = None  # back to the eager call: compiling here would take minutes on 2 cores
    with torch.no_grad():
        assert torch.allclose(model(x, 10).sample, reference, atol=1e-5)


@pytest.mark.parametrize("flag, expected", [(None, True), (True, True), (False, False)])
def test_fused_adamw_flag(flag, expected):
    args = argparse.Namespace(learning_rate=1e-3, scale_lr=False, adam_beta1=0.9, adam_beta2=0.999,
                              adam_weight_decay=0.0, adam_epsilon=1e-8, use_8bit_adam=False, fused_adamw=flag,
                              lr_scheduler="constant", lr_warmup_steps=0)
    optimizer, _ = loop.make_optimizer([torch.nn.Parameter(torch.zeros(3))], args, max_steps=1)
    assert bool(optimizer.defaults["fused"]) is expected


def test_tlcm_with_cached_prompt_embeddings_trains_the_same_lora(toy_world, tmp_path):
    def tlcm_run(out: str, *extra: str) -> dict:
        run_recipe("train_tlcm_flux.py", [
            "--pretrained_teacher_model", os.path.join(toy_world, "models/flux"), "--prompts_file",
            os.path.join(toy_world, "data/train/metadata.jsonl"), "--max_train_samples", "16", "--output_dir", out,
            "--resolution", "32", "--lora_rank", "4", "--train_batch_size", "4", "--stage", "1", "--stage1_steps", "2",
            "--stage1_learning_rate", "1e-3", "--adam_epsilon", "1e-3", "--lr_warmup_steps", "0",
            "--validation_steps", "1000", "--report_to", "none", "--feature_cache_dir", str(tmp_path / "c"), *extra])
        return load_file(os.path.join(out, "adapter_model.safetensors"))

    plain = tlcm_run(str(tmp_path / "plain"))
    assert max(float(v.abs().max()) for k, v in plain.items() if "lora_B" in k) > 2e-4  # it trained
    assert_close(plain, tlcm_run(str(tmp_path / "cached"), "--cache_text_embeddings"))
    assert [f.split("-")[0] for f in os.listdir(tmp_path / "c")] == ["text"]
