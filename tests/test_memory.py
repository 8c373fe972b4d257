"""Memory levers and their benchmark: frozen weights loaded in the run's dtype, 8-bit Adam on the CPU, the probe
that stamps peak memory at load / each optimizer step / exit, and bench_memory.py's side by side."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from utils import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def teacher_args(world: str) -> argparse.Namespace:
    return argparse.Namespace(pretrained_teacher_model=os.path.join(world, "models/sdxl"), revision=None, variant=None,
                              pretrained_vae_model_name_or_path=None, resolution=32)


def one_process(mixed_precision: str):
    """What load_teacher reads of an Accelerator: device, mixed precision, no DeepSpeed."""
    return types.SimpleNamespace(device=torch.device("cpu"), mixed_precision=mixed_precision,
                                 state=types.SimpleNamespace(deepspeed_plugin=None))


def test_frozen_weights_load_in_the_run_dtype_with_the_values_of_an_fp32_load_cast(toy_world):
    """A LoRA's base (frozen_denoiser) and the text encoders load straight into bf16 (no fp32 copy ever held) and
    equal the fp32 load cast to bf16; a full student's source stays fp32."""
    args = teacher_args(toy_world)
    lean = models.load_teacher(args, one_process("bf16"), "sdxl", frozen_denoiser=True)
    full = models.load_teacher(args, one_process("bf16"), "sdxl")
    fp32 = models.load_teacher(args, one_process("no"), "sdxl")
    assert {p.dtype for p in lean.denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.denoiser.parameters()} == {torch.float32}
    assert {p.dtype for e in lean.text_encoders for p in e.parameters()} == {torch.bfloat16}
    for got, want in zip(lean.denoiser.state_dict().values(), fp32.denoiser.state_dict().values()):
        assert torch.equal(got, want.to(torch.bfloat16))
    for encoder, reference in zip(lean.text_encoders, fp32.text_encoders):
        for got, want in zip(encoder.state_dict().values(), reference.state_dict().values()):
            assert torch.equal(got, want.to(got.dtype))


def test_prompt_kwargs_give_the_pipeline_the_cached_embeddings_once_the_encoders_are_freed(toy_world, tmp_path):
    """The validation pipeline samples the same image from the prompts (encoders kept) and from their cached
    embeddings (encoders freed)."""
    from diffusers import StableDiffusionXLPipeline

    from utils.cache import TextEmbeddingCache

    teacher = models.load_teacher(teacher_args(toy_world), one_process("no"), "sdxl", frozen_denoiser=True)
    prompts = ["a red circle on a white background", "a small blue cross on a gray background"]
    assert teacher.prompt_kwargs(prompts, "cpu") == {"prompt": prompts}
    embeds, pooled = teacher.encode(prompts)
    cache = TextEmbeddingCache({"out0": embeds, "out1": pooled}, prompts, teacher.encode)

    def sample():
        pipe = StableDiffusionXLPipeline(vae=teacher.vae, text_encoder=(teacher.text_encoders or [None])[0],
                                         text_encoder_2=(teacher.text_encoders or [None, None])[1],
                                         tokenizer=teacher.tokenizers[0], tokenizer_2=teacher.tokenizers[1],
                                         unet=teacher.denoiser, scheduler=_scheduler(toy_world))
        pipe.set_progress_bar_config(disable=True)
        return pipe(**teacher.prompt_kwargs(prompts, "cpu"), num_inference_steps=2, guidance_scale=1.0,
                    height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    before = sample()
    held = teacher.text_encoders  # a recipe's own name for the list (e.g. `encoders = teacher.text_encoders`)
    teacher.release_text_encoders(cache)
    assert held == [] and teacher.text_encoders == []  # emptied in place: no other holder keeps the encoders alive
    assert set(teacher.prompt_kwargs(prompts, "cpu")) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert torch.allclose(sample(), before, atol=1e-5)


def _scheduler(world: str):
    from diffusers import LCMScheduler

    return LCMScheduler.from_pretrained(os.path.join(world, "models/sdxl"), subfolder="scheduler")


def test_8bit_adam_runs_on_the_cpu_and_its_lora_loss_goes_down(toy_world):
    """--use_8bit_adam on CPU parameters: bitsandbytes' AdamW8bit (uint8 moments) fits a small regression."""
    from utils.loop import make_optimizer

    args = argparse.Namespace(learning_rate=1e-2, scale_lr=False, adam_beta1=0.9, adam_beta2=0.999,
                              adam_weight_decay=0.0, adam_epsilon=1e-8, use_8bit_adam=True, lr_scheduler="constant",
                              lr_warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 64, generator=gen), torch.randn(64, 64, generator=gen)
    model = torch.nn.Linear(64, 64, bias=False)
    optimizer, _ = make_optimizer(model.parameters(), args, max_steps=100)
    assert type(optimizer).__name__ == "AdamW8bit"
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x), x @ w)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_lora_trains_in_bf16_resumes_exactly_and_loads_into_diffusers(toy_world, tmp_path):
    """--lora_dtype bf16 (under --mixed_precision bf16): the LoRA, its gradients' optimizer moments and the saved
    files are bf16, the weights train, a run resumed from its checkpoint ends with the same LoRA, and the file
    loads into diffusers' SDXL pipeline."""
    import shutil

    from diffusers import StableDiffusionXLPipeline
    from helpers import assert_lora_moves_the_weights, run_recipe
    from safetensors.torch import load_file

    teacher = os.path.join(toy_world, "models/sdxl")
    args = ["--pretrained_teacher_model", teacher, "--train_data_dir", os.path.join(toy_world, "data/train"),
            "--resolution", "32", "--train_batch_size", "2", "--max_train_samples", "8", "--max_train_steps", "3",
            "--checkpointing_steps", "2", "--lora_rank", "4", "--learning_rate", "1e-2", "--w_min", "2", "--w_max",
            "6", "--mixed_precision", "bf16", "--lora_dtype", "bf16", "--validation_prompts", "--report_to", "none"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_recipe("train_lcm_distill_lora_sdxl.py", [*args, "--output_dir", straight])
    optimizer = torch.load(os.path.join(straight, "checkpoint-2", "optimizer.bin"), weights_only=False)
    moments = [t for state in optimizer["state"].values() for k, t in state.items() if k.startswith("exp_avg")]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    lora = load_file(os.path.join(straight, "pytorch_lora_weights.safetensors"))
    assert {t.dtype for t in lora.values()} == {torch.bfloat16}
    assert_lora_moves_the_weights(StableDiffusionXLPipeline, teacher, straight)

    shutil.copytree(os.path.join(straight, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run_recipe("train_lcm_distill_lora_sdxl.py", [*args, "--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    again = load_file(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    assert lora.keys() == again.keys() and all(torch.equal(lora[k], again[k]) for k in lora)


TINY_TRAINER = '''
import argparse, torch
p = argparse.ArgumentParser()
for flag in ("--max_train_steps", "--checkpointing_steps", "--validation_steps", "--width"):
    p.add_argument(flag, type=int, default=64)
p.add_argument("--output_dir")
args = p.parse_args()
with torch.no_grad():  # "loading": a frozen model, no gradients
    frozen = torch.nn.Linear(args.width, args.width)(torch.randn(8, args.width))
model = torch.nn.Linear(args.width, args.width)
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()  # trying an optimizer out: not a training step
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(args.max_train_steps):
    out = model(torch.randn(8, args.width))  # the first training forward: loading ends here
    big = torch.randn(4096, 4096)  # 64 MiB of "activations" while the step runs
    loss = (out ** 2).mean() + 0 * big.sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    del big
open(args.output_dir + "/done", "w").write("saved")
'''


def test_bench_memory_reads_load_step_and_end_marks_and_compares_two_scripts(tmp_path):
    """Two scripts under the probe: the marks come in order with growing peaks, the step times are one per optimizer
    step, a width 16x larger costs its weights' bytes, and the ratio line compares them."""
    script = tmp_path / "tiny_train.py"
    script.write_text(TINY_TRAINER)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks/bench_memory.py"), "--recipe", str(script),
                          "--reference", str(script), "--steps", "3", "--ours", "--width 2048", "--label", "tiny",
                          "--append", str(tmp_path / "m.jsonl"), "--", "--width", "128"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ours, theirs, ratio = (json.loads(line) for line in out.stdout.splitlines())
    assert [json.loads(line) for line in open(tmp_path / "m.jsonl")] == [ours, theirs, ratio]
    for r in (ours, theirs):
        assert r["memory"] == "peak RSS" and r["baseline_mb"] > 50
        assert r["load_peak_mb"] <= r["train_peak_mb"] <= r["end_peak_mb"]
        assert r["train_peak_mb"] - r["load_peak_mb"] > 50  # the 64 MiB a step holds
        assert len(r["step_times_s"]) == 3 and all(t > 0 for t in r["step_times_s"])
    # 2048^2 fp32 weights + gradients + SGD's copy-free step: at least 2 x 16 MiB more than width 128
    assert ours["held_after_steps_mb"] - theirs["held_after_steps_mb"] > 25
    assert ratio["train_peak_ratio"] == pytest.approx(ours["train_peak_mb"] / theirs["train_peak_mb"], abs=1e-3)


def test_probe_stop_after_ends_the_script_at_its_last_step(tmp_path):
    """--stop_after N: a "stop" stamp after step N and the process ends there (the script's save never runs)."""
    script = tmp_path / "tiny_train.py"
    script.write_text(TINY_TRAINER)
    log = tmp_path / "stamps.jsonl"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks/memory_probe.py"), "--log", str(log),
                    "--stop_after", "2", "--", str(script), "--max_train_steps", "5", "--output_dir", str(tmp_path)],
                   check=True, timeout=120)
    events = [json.loads(line)["event"] for line in open(log)]
    assert events == ["train_start", "step", "stop"]
    assert not (tmp_path / "done").exists()


def test_memory_estimate_counts_bytes_per_parameter_and_scales_measured_activations():
    """The arithmetic: an SDXL LoRA holds its base in 2 bytes a parameter, the LoRA in 16 (fp32 weight, gradient and
    two Adam moments; 10 with 8-bit moments), the encoders until they are cached; activations come from the measured
    base row and grow with the pixels."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import full_size
    import memory_estimate as est

    counts, lora = full_size.param_counts("sdxl"), est.lora_parameters("sdxl", 64)
    assert 150e6 < lora < 250e6  # rank 64 on attention, feed-forward and resnet convs of a 2.6 B UNet
    base = est.Run("base", "lora", "sdxl")
    parts = est.weights_gb(base)
    assert parts["frozen denoiser"] == pytest.approx(counts["unet"] * 2 / 2**30)
    assert parts["trained weights + grads"] + parts["Adam moments"] == pytest.approx(lora * 16 / 2**30)
    lean = est.weights_gb(est.Run("lean", "lora", "sdxl", cache=True, adam8=True))
    assert lean["text encoders"] == 0 and lean["Adam moments"] == pytest.approx(lora * 2 / 2**30)
    held = sum(parts.values())
    big = est.Run("big", "lora", "sdxl", resolution=1024, batch=2, activations_from="base")
    measured = {"base": {"train_peak_net_mb": (held + 1.5) * 1024}}  # 1.5 GB of activations at 512 px
    runs = {"base": base, "big": big}
    assert est.activations_gb(base, runs, measured) == pytest.approx(1.5)
    assert est.activations_gb(big, runs, measured) == pytest.approx(1.5 * 4 * 2)
    assert est.activations_gb(big, runs, {}) is None
    assert est.fits(10.0) == "12 GB" and est.fits(11.0) == "16 GB" and est.fits(100.0) == "> 80 GB"


def test_8bit_adam_is_refused_in_one_line_where_bitsandbytes_cannot_run_it(monkeypatch, capsys):
    """A bitsandbytes without an 8-bit AdamW for the parameters' device (older releases on a CPU): the flag named."""
    from utils import loop

    monkeypatch.setattr(loop, "eight_bit_adam_runs_on", lambda devices: False)
    args = argparse.Namespace(learning_rate=1e-3, scale_lr=False, adam_beta1=0.9, adam_beta2=0.999,
                              adam_weight_decay=0.0, adam_epsilon=1e-8, use_8bit_adam=True, lr_scheduler="constant",
                              lr_warmup_steps=0)
    with pytest.raises(SystemExit) as stop:
        loop.make_optimizer(torch.nn.Linear(4, 4).parameters(), args, max_steps=1)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --use_8bit_adam: this bitsandbytes") and "no 8-bit AdamW for cpu" in err[0]
