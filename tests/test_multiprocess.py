"""Every recipe with 2 processes on CPU (gloo): split data, one writer, loadable outputs, exact resume.

The processes are started as a user would on a machine without a GPU: `accelerate launch --multi_gpu
--num_processes 2` (torchrun underneath; `accelerate launch --cpu --num_processes 2` would need mpirun)
or `torchrun --nproc_per_node 2` directly. Each run sets DISTILL_LOG_BATCHES, so every process
writes the captions of the batches it trained on to `<path>.<process index>` (utils/loop.py).

Per recipe, one uninterrupted 2-process run of 4 steps (checkpoints at 2 and 4) and one 2-process run
resumed from a copy of its checkpoint-2; the resumed run must end with bit-identical weights.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from helpers import assert_lora_moves_the_weights, listing
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAMPLES, BATCH = 4, 16, 2  # 2 processes x 4 steps x batch 2 = one pass over the 16 samples
DEBRIS = (".partial", ".old", ".deleting")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], batch_log: str, launcher: str = "accelerate") -> str:
    """Run `script` with 2 CPU processes; returns stdout + stderr (the run must succeed)."""
    port = str(free_port())
    if launcher == "accelerate":
        head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", "1", "--main_process_port", port]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_LOG_BATCHES": batch_log}
    proc = subprocess.run([*head, os.path.join(ROOT, script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def batches(batch_log: str) -> dict[int, list[list[str]]]:
    """Process index -> the caption lists of its batches, in order; exactly processes 0 and 1 wrote."""
    folder, name = os.path.split(batch_log)
    assert sorted(f for f in os.listdir(folder) if f.startswith(name + ".")) == [f"{name}.0", f"{name}.1"]
    return {r: [json.loads(line)["captions"] for line in open(f"{batch_log}.{r}")] for r in (0, 1)}


def check_split(per_rank: dict[int, list[list[str]]], captions: list[str]) -> None:
    """Both processes trained on STEPS batches of their own, which together are the data, each sample once."""
    assert all(len(b) == STEPS and all(len(c) == BATCH for c in b) for b in per_rank.values())
    assert per_rank[0] != per_rank[1]
    seen = [c for b in per_rank.values() for caps in b for c in caps]
    assert collections.Counter(seen) == collections.Counter(captions)


def check_one_writer(out: str, expected: set[str], output: str, checkpoints: list[str]) -> None:
    """Exactly the expected files, no debris of a second writer, each checkpoint saved (and logged) once."""
    assert set(listing(out)) == expected
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            assert not name.endswith(DEBRIS) and not name.startswith(".write_test"), os.path.join(root, name)
    for ckpt in checkpoints:
        files = set(os.listdir(os.path.join(out, ckpt)))
        # one copy of the model, optimizer and scheduler; the random states of both processes
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                "random_states_1.pkl", "training_state.json"} <= files, files
        assert not {f for f in files if f.startswith("random_states_")} - {"random_states_0.pkl",
                                                                         "random_states_1.pkl"}
        assert output.count(f"saved {os.path.join(out, ckpt)}\n") == 1, output[-3000:]


def resume_from_copy(script: str, args: list[str], straight: str, resumed: str, batch_log: str,
                     copies: list[str], launcher: str = "accelerate") -> str:
    """Copy `copies` (relative paths) of the uninterrupted run into a new folder and resume there."""
    for rel in copies:
        shutil.copytree(os.path.join(straight, rel), os.path.join(resumed, rel))
    output = launch(script, args + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"], batch_log,
                    launcher)
    assert "at step 2" in output
    return output


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def image_captions(world: str) -> list[str]:
    """Captions of the --max_train_samples subset the image recipes train on."""
    from utils import data

    ds = data.load_image_caption_dataset(train_data_dir=os.path.join(world, "data/train"),
                                         max_train_samples=SAMPLES, seed=0)
    return list(ds.table["text"])


def common(world: str) -> list[str]:
    return ["--train_data_dir", os.path.join(world, "data/train"), "--resolution", "32",
            "--train_batch_size", str(BATCH), "--max_train_samples", str(SAMPLES), "--w_min", "2", "--w_max", "6",
            "--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "0", "--validation_steps", "1000"]


@pytest.mark.xdist_group("ddp_lcm_sd")  # a unit of parallel work of its own
def test_lcm_sd_with_two_processes(toy_world, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    script = "train_lcm_distill_sd.py"
    args = ["--pretrained_teacher_model", os.path.join(toy_world, "models/sd"), *common(toy_world),
            "--learning_rate", "1e-4"]
    straight, log = str(tmp_path / "straight"), str(tmp_path / "batches")
    output = launch(script, args + ["--output_dir", straight, "--report_to", "tensorboard"], log)

    check_one_writer(straight, {"README.md", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet",
                                "vae", "validation", "logs", "checkpoint-2", "checkpoint-4"},
                     output, ["checkpoint-2", "checkpoint-4"])
    assert os.listdir(os.path.join(straight, "validation")) == ["validation-000004.png"]
    events = [f for _, _, files in os.walk(os.path.join(straight, "logs")) for f in files if "tfevents" in f]
    # events.out.tfevents.<time>.<host>.<pid>.<n>: written by one process only, the main one
    assert events and len({name.split(".")[-2] for name in events}) == 1, events
    per_rank = batches(log)
    check_split(per_rank, image_captions(toy_world))

    pipe = StableDiffusionPipeline.from_pretrained(straight)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 256
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a large red circle on a white background", num_inference_steps=2, guidance_scale=5.0,
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0.01

    resumed, log2 = str(tmp_path / "resumed"), str(tmp_path / "batches_resumed")
    resume_from_copy(script, args + ["--report_to", "none"], straight, resumed, log2, ["checkpoint-2"])
    assert batches(log2) == {r: b[2:] for r, b in per_rank.items()}  # each process goes on where it stopped
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert_same(load_file(os.path.join(straight, unet)), load_file(os.path.join(resumed, unet)))


@pytest.mark.parametrize("script", [  # each a unit of parallel work of its own
    pytest.param("train_lcm_distill_lora_sdxl.py", marks=pytest.mark.xdist_group("ddp_lcm_lora")),
    pytest.param("train_tcd_lora.py", marks=pytest.mark.xdist_group("ddp_tcd"))])
def test_lcm_lora_with_two_processes(toy_world, tmp_path, script):
    """LCM-LoRA, and TCD (its copy with another loss and sampler). The resume under two processes is LCM-LoRA's
    alone: TCD resumes through the same code (utils/lora_distill.py, the loop, the checkpoints), and its own
    kill-and-resume is tests/test_lcm_lora.py's."""
    from diffusers import StableDiffusionXLPipeline

    args = ["--pretrained_teacher_model", os.path.join(toy_world, "models/sdxl"), *common(toy_world),
            "--lora_rank", "4", "--learning_rate", "1e-3", "--report_to", "none"]
    i = args.index("--max_train_steps")  # one epoch instead: each process's half of it is STEPS batches
    args[i:i + 2] = ["--num_train_epochs", "1"]
    straight, log = str(tmp_path / "straight"), str(tmp_path / "batches")
    output = launch(script, args + ["--output_dir", straight], log)

    check_one_writer(straight, {"README.md", "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "unet", "scheduler",
                                "validation", "checkpoint-2", "checkpoint-4"}, output, ["checkpoint-2", "checkpoint-4"])
    per_rank = batches(log)
    check_split(per_rank, image_captions(toy_world))

    assert_lora_moves_the_weights(StableDiffusionXLPipeline, os.path.join(toy_world, "models/sdxl"), straight)
    if script == "train_tcd_lora.py":
        return
    resumed, log2 = str(tmp_path / "resumed"), str(tmp_path / "batches_resumed")
    resume_from_copy(script, args, straight, resumed, log2, ["checkpoint-2"])
    assert batches(log2) == {r: b[2:] for r, b in per_rank.items()}
    name = "pytorch_lora_weights.safetensors"
    assert_same(load_file(os.path.join(straight, name)), load_file(os.path.join(resumed, name)))


@pytest.mark.xdist_group("ddp_tlcm")  # a unit of parallel work of its own
def test_tlcm_with_two_processes_via_torchrun(toy_world, tmp_path):
    from diffusers import FluxPipeline

    from utils import data

    script = "train_tlcm_flux.py"
    prompts_file = os.path.join(toy_world, "data/train/metadata.jsonl")
    args = ["--pretrained_teacher_model", os.path.join(toy_world, "models/flux"), "--prompts_file", prompts_file,
            "--max_train_samples", str(SAMPLES), "--resolution", "32", "--lora_rank", "4",
            "--train_batch_size", str(BATCH), "--stage1_learning_rate", "1e-3", "--stage2_learning_rate", "1e-3",
            "--stage1_steps", "2", "--stage2_steps", str(STEPS), "--checkpointing_steps", "2",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "0", "--validation_steps", "1000", "--report_to", "none"]
    straight, log = str(tmp_path / "straight"), str(tmp_path / "batches")
    output = launch(script, args + ["--output_dir", straight], log, launcher="torchrun")

    check_one_writer(straight, {"README.md", "adapter_config.json", "adapter_model.safetensors",
                                "pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "stage1", "stage2"},
                     output, ["stage1/checkpoint-2", "stage2/checkpoint-2", "stage2/checkpoint-4"])
    logged = batches(log)
    stage2 = {r: b[2:] for r, b in logged.items()}  # each process: 2 batches of stage 1, then 4 of stage 2
    check_split(stage2, data.load_prompts(prompts_file=prompts_file, max_samples=SAMPLES))

    assert_lora_moves_the_weights(FluxPipeline, os.path.join(toy_world, "models/flux"), straight)

    resumed, log2 = str(tmp_path / "resumed"), str(tmp_path / "batches_resumed")
    output = resume_from_copy(script, args, straight, resumed, log2, ["stage1", "stage2/checkpoint-2"],
                              launcher="torchrun")
    assert "stage 1 already finished" in output
    assert batches(log2) == {r: b[2:] for r, b in stage2.items()}
    assert_same(load_file(os.path.join(straight, "adapter_model.safetensors")),
                load_file(os.path.join(resumed, "adapter_model.safetensors")))
