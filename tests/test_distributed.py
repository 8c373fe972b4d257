"""The recipes under sharding engines (accelerate's FSDP2, DeepSpeed ZeRO) with 2 CPU processes over gloo.

`pytest -k fsdp` / `-k deepspeed` selects an engine's tests. The multi-process ones launch the
shipped configs (configs/accelerate/) as a user would, with the CPU changes on the command line
(2 processes, no mixed precision). FSDP on CPU goes through tests/fsdp_on_cpu.py, which selects the
FSDP that accelerate 1.15 only selects on GPUs; DeepSpeed runs on CPU as it is (its CPU accelerator,
gloo). Each multi-process test checks: disjoint data per process, a random stream per process, the
checkpoint layout of the engine, a run resumed from a copy of a mid-run checkpoint ending bit-identical,
the outputs loading into a diffusers pipeline, and the EMA being right while the weights are split
(from the checkpoints, or against the same run under DDP).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_lora_moves_the_weights, run_recipe, write_flux_start_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "accelerate")
SAMPLES, BATCH = 16, 2  # 2 processes x 4 batches of 2: no sample seen twice in 3 steps
UNET_BLOCKS = "BasicTransformerBlock,ResnetBlock2D"  # the toy UNets lack some of UNet2DConditionModel's block kinds
FLUX_BLOCKS = "FluxTransformerBlock,FluxSingleTransformerBlock"

deepspeed_installed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                         reason="needs `pip install deepspeed`")


# ----------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str | None, script: str, args: list[str], batch_log: str, blocks: str | None = None) -> str:
    """Run `script` with 2 CPU processes under configs/accelerate/<config>.yaml (None: DDP); stdout + stderr."""
    head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
            "--main_process_port", str(free_port())]
    if config is None:
        head += ["--multi_gpu"]
    else:
        head += ["--config_file", os.path.join(CONFIGS, f"{config}.yaml")]
    if blocks:
        head += ["--fsdp_transformer_layer_cls_to_wrap", blocks]
    wrapper = [os.path.join(ROOT, "tests", "fsdp_on_cpu.py")] if config == "fsdp" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILL_LOG_BATCHES": batch_log}
    proc = subprocess.run([*head, *wrapper, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def batches(batch_log: str) -> dict[int, list[list[str]]]:
    """Process index -> the caption lists of its batches, in order."""
    return {r: [json.loads(line)["captions"] for line in open(f"{batch_log}.{r}")] for r in (0, 1)}


def check_disjoint(per_rank: dict[int, list[list[str]]], steps: int) -> None:
    """Each process trained `steps` batches of its own: no caption seen by both."""
    assert all(len(b) == steps for b in per_rank.values())
    seen = [collections.Counter(c for caps in per_rank[r] for c in caps) for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1])


def check_streams(ckpt: str, index: int) -> None:
    """The loss's random stream (TrainingRNG, registered object `index`) is a different one on each process."""
    states = torch.load(os.path.join(ckpt, f"custom_checkpoint_{index}.pkl"), weights_only=False)["states"]
    assert len(states) == 2 and not torch.equal(states[0], states[1])


def resume_from_copy(config, script, args, straight, resumed, copies, batch_log, blocks=None) -> str:
    for rel in copies:
        shutil.copytree(os.path.join(straight, rel), os.path.join(resumed, rel))
    output = launch(config, script, args + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"],
                    batch_log, blocks)
    assert "resumed from" in output
    return output


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ----------------------------------------------------------------------------- what needs no process


@pytest.mark.parametrize("name, engine", [("fsdp", "FSDP"), ("multinode", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                          ("deepspeed_zero3", "DEEPSPEED")])
def test_fsdp_and_deepspeed_configs_parse_and_say_how_to_launch(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(CONFIGS, f"{name}.yaml")
    config = load_config_from_file(path)
    assert str(config.distributed_type).endswith(engine) and not config.use_cpu
    if engine == "FSDP":  # FSDP2, the model's own blocks, shards in the checkpoints, every process loading
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and not fsdp["fsdp_cpu_ram_efficient_loading"]
    else:
        stage = config.deepspeed_config["zero_stage"]
        assert stage == int(name[-1]) and not config.deepspeed_config["zero3_init_flag"]
        assert stage < 3 or config.deepspeed_config["zero3_save_16bit_model"]  # the final outputs are gathered
    header = [line for line in open(path) if line.startswith("#")]
    assert len(header) >= 5 and any(f"--config_file configs/accelerate/{name}.yaml" in line for line in header)
    if name == "multinode":
        assert config.num_machines == 2 and any("--machine_rank 1" in line for line in header)


def test_fsdp_and_deepspeed_code_paths_follow_accelerates_choice():
    """sharding.engine names what accelerate set up; only split weights (FSDP, ZeRO-3) make every process sample."""
    from utils import sharding
    from utils.loop import TrainLoop

    def accelerator(kind, processes=2, fsdp_version=2, zero_stage=2, main=True):
        return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=processes,
                               is_main_process=main,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
                                                     deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)))

    cases = {"single": ("NO", 1, 2, 2), "ddp": ("MULTI_GPU", 2, 2, 2), "fsdp2": ("FSDP", 2, 2, 2),
             "fsdp1": ("FSDP", 2, 1, 2), "zero2": ("DEEPSPEED", 2, 2, 2), "zero3": ("DEEPSPEED", 2, 2, 3)}
    for name, setting in cases.items():
        assert sharding.engine(accelerator(*setting)) == name
        split = sharding.splits_weights(accelerator(*setting))
        assert split == (name in ("fsdp1", "fsdp2", "zero3"))
        # a process other than the main one samples validation images only when a forward is a collective
        assert TrainLoop.samples_here.fget(SimpleNamespace(accelerator=accelerator(*setting, main=False))) == split


def engine_accelerator(kind: str, processes: int = 2, zero_stage: int = 2) -> SimpleNamespace:
    """What loop.check_engine reads of an Accelerator set up as `kind` (accelerate's DistributedType name)."""
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=processes,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2),
                                                 deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage,
                                                                                  deepspeed_config={})))


def run_flags(**set_flags) -> SimpleNamespace:
    """Training flags check_engine reads, with the recipe's defaults."""
    return SimpleNamespace(**{"train_batch_size": 2, "gradient_accumulation_steps": 1, "max_grad_norm": 1.0,
                              **set_flags})


def refusal(capsys, accelerator, args) -> str:
    """The one line check_engine ends the run with (exit code 2)."""
    from utils.loop import check_engine

    with pytest.raises(SystemExit) as stopped:
        check_engine(accelerator, args)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("extra", ["dmd", "gan"])
def test_deepspeed_zero3_refuses_the_tlcm_extras_in_one_line(extra, capsys):
    from utils.loop import check_engine

    args = run_flags(dmd=extra == "dmd", gan=extra == "gan")
    check_engine(engine_accelerator("DEEPSPEED", zero_stage=2), args)  # ZeRO-2 runs them
    check_engine(engine_accelerator("DEEPSPEED", zero_stage=3), run_flags(dmd=False, gan=False))
    err = refusal(capsys, engine_accelerator("DEEPSPEED", zero_stage=3), args)
    assert err.startswith("error: --dmd and --gan do not run under DeepSpeed ZeRO-3")


def test_a_text_encoder_lora_runs_only_where_accelerate_prepares_several_models(capsys):
    """--train_text_encoder_lora prepares the UNet and both text encoders: FSDP and DeepSpeed take one model a run."""
    from utils.loop import check_engine

    for kind, processes in (("NO", 1), ("MULTI_GPU", 2)):
        check_engine(engine_accelerator(kind, processes), run_flags(train_text_encoder_lora=True))
    check_engine(engine_accelerator("FSDP"), run_flags(train_text_encoder_lora=False))
    for kind, stage, engine in (("FSDP", 2, "fsdp2"), ("DEEPSPEED", 2, "zero2"), ("DEEPSPEED", 3, "zero3")):
        err = refusal(capsys, engine_accelerator(kind, zero_stage=stage), run_flags(train_text_encoder_lora=True))
        assert err.startswith("error: --train_text_encoder_lora trains the UNet and the text encoders") and engine in err


def test_deepspeed_settings_come_from_the_recipe_flags():
    from utils.loop import deepspeed_settings

    args = SimpleNamespace(train_batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5)
    assert deepspeed_settings(args, 8) == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 4,
                                           "train_batch_size": 96, "gradient_clipping": 0.5}


def test_fsdp_config_that_accelerate_turns_into_ddp_is_refused(toy_world, tmp_path):
    """On CPU accelerate builds the FSDP plugin but sets up no FSDP: the run says so instead of training unsharded."""
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SYNC_MODULE_STATES": "false",
           "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}  # as `accelerate launch --config_file fsdp.yaml` sets them
    run = run_recipe("train_lcm_distill_sd.py", [
        "--pretrained_teacher_model", os.path.join(toy_world, "models/sd"),
        "--train_data_dir", os.path.join(toy_world, "data/train"), "--output_dir", str(tmp_path / "out"),
        "--max_train_steps", "1", "--report_to", "none"], env=env, check=False)
    assert run.returncode == 2
    assert "asks for FSDP but accelerate set up single: it runs FSDP on GPUs only" in run.stderr


def test_sharding_helpers_leave_plain_tensors_as_they_are():
    """One process / DDP / ZeRO-1-2: whole() is the tensor, write_whole copies, whole_parameters changes nothing."""
    from utils import sharding

    t = torch.arange(6.0).reshape(2, 3)
    with sharding.whole(t) as full:
        assert full.data_ptr() == t.data_ptr()
    sharding.write_whole(t, torch.ones(2, 3, dtype=torch.float64))
    assert torch.equal(t, torch.ones(2, 3)) and t.dtype == torch.float32
    assert not sharding.is_sharded(t) and sharding.shard_like(t, t) is t and sharding.same_everywhere(7) == 7
    model = torch.nn.Linear(2, 2)
    before = dict(model.named_parameters())
    with sharding.whole_parameters(model):
        assert dict(model.named_parameters()) == before
    sharding.settle(model)
    assert dict(model.named_parameters()) == before


# ----------------------------------------------------------------------------- FSDP2, 2 CPU processes


@pytest.mark.slow
def test_bucketed_gather_of_fsdp2_shards_equals_full_tensor():
    """sharding.whole_values (one collective per bucket of FSDP2 shards) gives each tensor's full_tensor(), for parts
    of unequal and empty sizes, two dtypes, a replicated DTensor and a plain tensor among them (tests/gather_check.py,
    2 processes over gloo)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), os.path.join(ROOT, "tests", "gather_check.py")], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OK") == 2


def image_args(world: str, teacher: str, steps: int) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models", teacher),
            "--train_data_dir", os.path.join(world, "data/train"), "--resolution", "32",
            "--train_batch_size", str(BATCH), "--max_train_samples", str(SAMPLES), "--w_min", "2", "--w_max", "6",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--checkpoint_at_end",
            "--lr_scheduler", "constant",
            "--validation_steps", "1000", "--validation_prompts", "a red circle", "--report_to", "none"]


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp_lcm_sd")  # a unit of parallel work of its own
def test_fsdp_lcm_sd_shards_the_student_keeps_the_ema_right_and_resumes_exactly(toy_world, tmp_path):
    from diffusers import StableDiffusionPipeline

    from utils.checkpoint import read_model_state

    script, mu = "train_lcm_distill_sd.py", 0.5
    args = image_args(toy_world, "sd", 3) + ["--learning_rate", "1e-3", "--ema_decay", str(mu)]
    straight, log = str(tmp_path / "straight"), str(tmp_path / "batches")
    launch("fsdp", script, args + ["--output_dir", straight], log, UNET_BLOCKS)

    # FSDP's layout: the student (model 0) and its Adam state as per-process shards (torch.distributed.checkpoint);
    # the whole EMA target (registered object 0) and the loss's random streams (object 1) from the main process
    # at the multiple of --checkpointing_steps and, with --checkpoint_at_end, at the last step
    assert sorted(d for d in os.listdir(straight) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-3"]
    ckpt = os.path.join(straight, "checkpoint-2")
    files = set(os.listdir(ckpt))
    assert {"pytorch_model_fsdp_0", "optimizer_0", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl",
            "random_states_0.pkl", "random_states_1.pkl", "training_state.json"} <= files, files
    assert not {f for f in files if f.endswith(".safetensors")}
    assert sorted(f for f in os.listdir(os.path.join(ckpt, "pytorch_model_fsdp_0")) if f.endswith(".distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    check_streams(ckpt, 1)
    per_rank = batches(log)
    check_disjoint(per_rank, 3)

    # the target followed the sharded student: target_3 = mu target_2 + (1 - mu) student_3, in every tensor
    student = {k: read_model_state(os.path.join(straight, f"checkpoint-{k}")) for k in (2, 3)}
    target = {k: torch.load(os.path.join(straight, f"checkpoint-{k}", "custom_checkpoint_0.pkl"), weights_only=True)
              for k in (2, 3)}
    assert target[3].keys() == student[3].keys()
    for name, value in target[3].items():
        torch.testing.assert_close(value, mu * target[2][name] + (1 - mu) * student[3][name], rtol=0, atol=1e-6)
    assert max_diff(target[3], target[2]) > 1e-5  # it moved
    # the saved UNet is the whole student of the last step
    unet = load_file(os.path.join(straight, "unet", "diffusion_pytorch_model.safetensors"))
    assert_equal(unet, student[3])
    assert os.listdir(os.path.join(straight, "validation")) == ["validation-000003.png"]  # one writer
    pipe = StableDiffusionPipeline.from_pretrained(straight)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and image.std() > 0.01

    resumed, log2 = str(tmp_path / "resumed"), str(tmp_path / "batches_resumed")
    resume_from_copy("fsdp", script, args, straight, resumed, ["checkpoint-2"], log2, UNET_BLOCKS)
    assert batches(log2) == {r: b[2:] for r, b in per_rank.items()}
    assert_equal(unet, load_file(os.path.join(resumed, "unet", "diffusion_pytorch_model.safetensors")))


@pytest.fixture(scope="module")
def start_lora(toy_world, tmp_path_factory):
    """A rank-4 FLUX LoRA standing in for stage 2's output."""
    return write_flux_start_lora(toy_world, str(tmp_path_factory.mktemp("distributed") / "start"))


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp_tlcm_extras")  # a unit of parallel work of its own
def test_fsdp_tlcm_extras_match_ddp_and_resume_exactly(toy_world, start_lora, tmp_path):
    """TLCM's extras stage (EMA target swapped into the split LoRA, DMD fake score in the same split model with
    its own optimizer, GAN head) under FSDP2 trains what DDP trains, and resumes bit-identical."""
    from diffusers import FluxPipeline

    from utils.checkpoint import read_registered_states

    script = "train_tlcm_flux.py"
    args = ["--pretrained_teacher_model", os.path.join(toy_world, "models/flux"),
            "--prompts_file", os.path.join(toy_world, "data/train/metadata.jsonl"), "--max_train_samples", "16",
            "--resolution", "32", "--lora_rank", "4", "--train_batch_size", str(BATCH), "--stage", "extras",
            "--init_lora", start_lora, "--dmd", "--gan", "--ema_decay", "0.9", "--extras_steps", "3",
            "--extras_learning_rate", "1e-3", "--dmd_learning_rate", "1e-3", "--gan_learning_rate", "1e-3",
            "--checkpointing_steps", "2", "--checkpoint_at_end", "--validation_steps", "2",
            "--validation_prompts", "a red circle",
            "--report_to", "none"]
    straight, ddp, log = str(tmp_path / "straight"), str(tmp_path / "ddp"), str(tmp_path / "batches")
    launch("fsdp", script, args + ["--output_dir", straight], log, FLUX_BLOCKS)
    launch(None, script, args + ["--output_dir", ddp], str(tmp_path / "batches_ddp"))
    check_disjoint(batches(log), 3)
    ckpt = os.path.join(straight, "stageextras", "checkpoint-2")
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= set(os.listdir(ckpt))
    check_streams(ckpt, 0)
    assert os.listdir(os.path.join(straight, "validation")) == ["stageextras-000002.png"]  # all sampled, one wrote

    name = "adapter_model.safetensors"
    lora_fsdp, lora_ddp = load_file(os.path.join(straight, name)), load_file(os.path.join(ddp, name))
    start = load_file(os.path.join(start_lora, name))
    assert max_diff(lora_ddp, start) > 1e-3  # trained
    assert max_diff(lora_fsdp, lora_ddp) < 1e-5  # the same training, up to the order of float sums
    last = [read_registered_states(os.path.join(run, "stageextras", "checkpoint-3")) for run in (straight, ddp)]
    # the EMA shadow, the fake score's weights and the head's weights (registered objects 1, 2, 3)
    for i, key, tol in ((1, "shadow", 1e-5), (2, "params", 1e-4), (3, "params", 1e-3)):
        assert len(last[0][i][key]) == len(last[1][i][key])
        assert max(float((a - b).abs().max()) for a, b in zip(last[0][i][key], last[1][i][key])) < tol, i

    resumed = str(tmp_path / "resumed")
    resume_from_copy("fsdp", script, args, straight, resumed, ["stageextras/checkpoint-2"],
                     str(tmp_path / "batches_resumed"), FLUX_BLOCKS)
    assert_equal(lora_fsdp, load_file(os.path.join(resumed, name)))
    again = read_registered_states(os.path.join(resumed, "stageextras", "checkpoint-3"))
    for i, key in ((1, "shadow"), (2, "params"), (3, "params")):
        assert all(torch.equal(a, b) for a, b in zip(last[0][i][key], again[i][key]))

    assert_lora_moves_the_weights(FluxPipeline, os.path.join(toy_world, "models/flux"), straight)


# ----------------------------------------------------------------------------- DeepSpeed, 2 CPU processes


@pytest.mark.slow
@deepspeed_installed
@pytest.mark.parametrize("script", [  # each a unit of parallel work of its own
    pytest.param("train_lcm_distill_lora_sdxl.py", marks=pytest.mark.xdist_group("zero3_lcm_lora")),
    pytest.param("train_tcd_lora.py", marks=pytest.mark.xdist_group("zero3_tcd"))])
def test_deepspeed_zero3_lcm_lora_matches_ddp_and_resumes_exactly(toy_world, tmp_path, script):
    """ZeRO-3 splits the whole SDXL UNet (frozen base and LoRA); the EMA target is swapped into the split LoRA,
    the frozen text encoders stay whole; the run trains what DDP trains and resumes bit-identical. LCM-LoRA, and
    TCD (its copy with another loss and sampler)."""
    from diffusers import StableDiffusionXLPipeline

    from utils.checkpoint import read_model_state

    args = image_args(toy_world, "sdxl", 3) + ["--lora_rank", "4", "--learning_rate", "1e-3", "--ema_decay", "0.9"]
    straight, ddp, log = str(tmp_path / "straight"), str(tmp_path / "ddp"), str(tmp_path / "batches")
    launch("deepspeed_zero3", script, args + ["--output_dir", straight], log)
    launch(None, script, args + ["--output_dir", ddp], str(tmp_path / "batches_ddp"))
    per_rank = batches(log)
    check_disjoint(per_rank, 3)
    assert batches(str(tmp_path / "batches_ddp")) == per_rank  # the same data order as under DDP

    # DeepSpeed's layout: its own folder of per-process partitions (read back whole with zero_to_fp32)
    ckpt = os.path.join(straight, "checkpoint-2")
    partitions = sorted(os.listdir(os.path.join(ckpt, "pytorch_model")))
    assert [f for f in partitions if f.startswith("zero_pp_rank_")] == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    check_streams(ckpt, 0)
    name = "pytorch_lora_weights.safetensors"
    lora_zero3, lora_ddp = load_file(os.path.join(straight, name)), load_file(os.path.join(ddp, name))
    assert max(float(v.abs().max()) for k, v in lora_ddp.items() if "lora_B" in k or "lora.up" in k) > 1e-3
    # the same training: ZeRO-3 sums the gradients in another order, and Adam makes that visible in the few
    # tensors with near-zero gradients (a wrong EMA target would move nearly all of them)
    diffs = sorted(float((lora_zero3[k] - lora_ddp[k]).abs().max()) for k in lora_ddp)
    assert diffs[int(0.9 * len(diffs))] < 1e-5 and diffs[-1] < 3e-3, diffs[-5:]
    weights = read_model_state(os.path.join(straight, "checkpoint-3"))
    assert sum("lora_B" in k for k in weights) == sum("lora_B" in k or "lora.up" in k for k in lora_zero3)

    resumed = str(tmp_path / "resumed")
    resume_from_copy("deepspeed_zero3", script, args, straight, resumed, ["checkpoint-2"],
                     str(tmp_path / "batches_resumed"))
    assert_equal(lora_zero3, load_file(os.path.join(resumed, name)))

    assert_lora_moves_the_weights(StableDiffusionXLPipeline, os.path.join(toy_world, "models/sdxl"), straight)


# ----------------------------------------------------------------------------- TLCM on SDXL, both stages


def tlcm_sdxl_args(world: str, extra: list[str] = ()) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models/sdxl"),
            "--prompts_file", os.path.join(world, "data/train/metadata.jsonl"), "--max_train_samples", "16",
            "--resolution", "32", "--lora_rank", "4", "--train_batch_size", str(BATCH), "--guidance_scale", "5",
            "--stage1_steps", "1", "--stage2_steps", "3", "--stage1_learning_rate", "1e-4",
            "--stage2_learning_rate", "1e-4", "--ema_decay", "0.9", "--checkpointing_steps", "2",
            "--validation_steps", "2", "--validation_prompts", "a red circle", "--report_to", "none", *extra]


EXTRAS = ["--dmd", "--gan", "--extras_steps", "3", "--extras_learning_rate", "1e-4", "--dmd_learning_rate", "1e-4",
          "--gan_learning_rate", "1e-4"]


def split_tlcm_sdxl_run(world: str, config: str, extra: list[str], blocks: str | None, out: str) -> str:
    """`train_tlcm_sdxl.py --stage all` (+ `extra`) under `config` into out/straight, checked: its stages, one
    validation writer, disjoint prompts per stage and process, a random stream per process."""
    straight, log = os.path.join(out, "straight"), os.path.join(out, "batches")
    launch(config, "train_tlcm_sdxl.py", tlcm_sdxl_args(world, extra) + ["--output_dir", straight], log, blocks)
    stages = sorted(d for d in os.listdir(straight) if d.startswith("stage"))
    assert stages == ["stage1", "stage2"] + (["stageextras"] if "--dmd" in extra else [])
    assert sorted(os.listdir(os.path.join(straight, "validation")))[-1] == f"{stages[-1]}-000002.png"
    per_rank, begin = batches(log), 0
    for steps in (1, 3, 3)[:len(stages)]:  # each stage's batches: the processes see disjoint prompts
        check_disjoint({r: b[begin:begin + steps] for r, b in per_rank.items()}, steps)
        begin += steps
    assert all(len(b) == begin for b in per_rank.values())
    check_streams(os.path.join(straight, stages[-1], "checkpoint-2"), 0)
    return straight


@pytest.fixture(scope="module")
def tlcm_sdxl_fsdp(toy_world, tmp_path_factory):
    """(the FSDP2 run with DMD + GAN extras, the same stages under DDP started from its stage-1 LoRA): split weights
    make stage 1 draw one segment for all processes (it sets the number of teacher steps, a collective), DDP one
    per process, so the later stages are what the two must agree on."""
    out = str(tmp_path_factory.mktemp("tlcm_sdxl_fsdp"))
    straight = split_tlcm_sdxl_run(toy_world, "fsdp", ["--stage", "all", *EXTRAS], UNET_BLOCKS, out)
    ddp = os.path.join(out, "ddp")
    shutil.copytree(os.path.join(straight, "stage1"), os.path.join(ddp, "stage1"))
    output = launch(None, "train_tlcm_sdxl.py", tlcm_sdxl_args(toy_world, ["--stage", "all", *EXTRAS])
                    + ["--output_dir", ddp], os.path.join(out, "batches_ddp"))
    assert "stage 1 already finished" in output
    return straight, ddp


def check_same_training(split: str, ddp: str, stages: list[str]) -> None:
    """Each of `stages` trained (from the stage before) and equal under both engines up to the order of float sums."""
    name = "adapter_model.safetensors"
    start = load_file(os.path.join(ddp, "stage1", "lora", name))
    for stage in stages:
        per_stage = [load_file(os.path.join(run, stage, "lora", name)) for run in (split, ddp)]
        assert max_diff(per_stage[1], start) > 1e-4, stage
        assert max_diff(*per_stage) < 1e-5, stage
        start = per_stage[1]


def check_resume_and_loading(world: str, config: str, extra: list[str], blocks: str | None, straight: str,
                             tmp_path) -> None:
    """A copy resumed from checkpoint 2 of the last stage ends bit-identical; the LoRA loads into the SDXL pipeline."""
    from diffusers import StableDiffusionXLPipeline

    stages = sorted(d for d in os.listdir(straight) if d.startswith("stage"))
    resumed, name = str(tmp_path / "resumed"), "adapter_model.safetensors"
    copies = stages[:-1] + [f"{stages[-1]}/checkpoint-2"]
    resume_from_copy(config, "train_tlcm_sdxl.py", tlcm_sdxl_args(world, extra), straight, resumed, copies,
                     str(tmp_path / "batches_resumed"), blocks)
    assert_equal(load_file(os.path.join(straight, name)), load_file(os.path.join(resumed, name)))
    assert_lora_moves_the_weights(StableDiffusionXLPipeline, os.path.join(world, "models/sdxl"), straight)


@pytest.mark.slow
@pytest.mark.xdist_group("tlcm_sdxl_fsdp")  # the two tests share the module's FSDP2 run
def test_fsdp_tlcm_sdxl_both_stages_and_extras_match_ddp_and_resume_exactly(toy_world, tlcm_sdxl_fsdp, tmp_path):
    straight, ddp = tlcm_sdxl_fsdp
    check_same_training(straight, ddp, ["stage2", "stageextras"])
    check_resume_and_loading(toy_world, "fsdp", ["--stage", "all", *EXTRAS], UNET_BLOCKS, straight, tmp_path)


@pytest.mark.slow
@deepspeed_installed
@pytest.mark.xdist_group("tlcm_sdxl_fsdp")  # the two tests share the module's FSDP2 run
def test_deepspeed_zero3_tlcm_sdxl_both_stages_match_ddp_and_resume_exactly(toy_world, tlcm_sdxl_fsdp, tmp_path):
    """Stages 1 + 2 under ZeRO-3 (a new DeepSpeed engine per stage): stage 1 equal to FSDP2's (both take process 0's
    segment), stage 2 to what DDP trains from FSDP2's stage 1; resumed bit-identical."""
    fsdp, ddp = tlcm_sdxl_fsdp
    straight = split_tlcm_sdxl_run(toy_world, "deepspeed_zero3", [], None, str(tmp_path))
    name = "adapter_model.safetensors"
    stage1 = [load_file(os.path.join(run, "stage1", "lora", name)) for run in (straight, fsdp)]
    assert max_diff(*stage1) < 1e-5
    check_same_training(straight, ddp, ["stage2"])
    check_resume_and_loading(toy_world, "deepspeed_zero3", [], None, straight, tmp_path)
