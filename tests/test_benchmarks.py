"""benchmarks/: the training-step timer (in-process and external), evaluation counting, checkpoint -> student."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager

import pytest
import torch
from helpers import run_recipe, unet_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
TINY = ["--resolution", "32", "--train_batch_size", "2", "--max_train_samples", "16", "--report_to", "none"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def recipe_in_this_process():
    """A benchmark that runs a recipe in this process itself: the logging set-up and accelerate's process-wide
    state are put back afterwards."""
    from accelerate.state import AcceleratorState

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        AcceleratorState._reset_state(reset_partial_state=True)


def test_train_step_in_process_prints_one_json_line(toy_world, capsys):
    bench = load("bench_train_step")
    with recipe_in_this_process():
        record = bench.main(["--recipe", "train_lcm_distill_lora_sdxl.py", "--warmup", "2", "--steps", "2",
                             "--label", "tiny", "--", "--pretrained_teacher_model", os.path.join(toy_world, "models/sdxl"),
                             "--train_data_dir", os.path.join(toy_world, "data/train"), "--lora_rank", "4", *TINY])
    lines = capsys.readouterr().out.strip().splitlines()  # the recipe's own logs went to stderr
    assert len(lines) == 1 and json.loads(lines[0]) == record
    assert record["mode"] == "median" and record["label"] == "tiny" and record["batch_size"] == 2
    assert record["median_step_s"] > 0 and len(record["step_times_s"]) == 2
    assert record["samples_per_s"] == pytest.approx(2 / record["median_step_s"])
    assert record["peak_mem_mb"] > 0 and record["dtype"] == "fp32" and record["steps"] == 2


def test_train_step_external_mode_and_errors(tmp_path, capsys):
    bench = load("bench_train_step")
    sleeper = "python -c 'import sys, time; time.sleep(0.05 * int(sys.argv[1]))' {steps}"
    out = tmp_path / "results.jsonl"
    record = bench.main(["--command", sleeper, "--warmup", "1", "--steps", "4", "--batch_size", "8",
                         "--append", str(out)])
    assert record["mode"] == "mean by difference" and record["batch_size"] == 8
    assert 0.0 < record["median_step_s"] < 0.5  # 0.05 s a step plus run-to-run noise
    assert json.loads(capsys.readouterr().out.strip()) == record == json.loads(out.read_text())
    for argv, message in ((["--command", "python x.py"], "{steps}"),
                          (["--command", "python -c 'raise SystemExit(3)' {steps}"], "status 3"),
                          (["--recipe", "train_lcm_distill_sd.py", "--", "--max_train_steps", "5"], "--max_train_steps"),
                          (["--recipe", "train_lcm_distill_sd.py", "--warmup", "0"], "--warmup")):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("teacher, teacher_steps, teacher_evals, scheduler", [
    ("sd", 25, 50, "lcm"),  # batched cond + uncond: 2 rows per call
    ("flux", 3, 6, "tlcm"),  # true CFG: two calls of one row each
    ("flux-guidance", 3, 3, "tlcm"),  # the guidance is an input: one evaluation per step
])
def test_inference_counts_network_evaluations(toy_world, capsys, teacher, teacher_steps, teacher_evals, scheduler):
    bench = load("bench_inference")
    path = os.path.join(toy_world, "models", teacher)
    records = bench.main(["--pipeline", path, "--student", path, "--scheduler", scheduler, "--num_prompts", "2",
                          "--teacher_steps", str(teacher_steps), "--student_steps", "4", "--guidance_scale", "5",
                          "--warmup", "0", "--repeats", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert lines == records and [r["role"] for r in records] == ["teacher", "student"]
    t, s = records
    assert t["evals_per_image"] == teacher_evals and t["images"] == 2
    assert s["evals_per_image"] == 4 and s["denoiser_calls"] == 4
    (versus,) = s["vs_teacher"]
    assert versus["eval_ratio"] == teacher_evals / 4
    assert versus["speed_ratio"] == pytest.approx(t["ms_per_image"] / s["ms_per_image"])
    for r in records:  # the denoising loop is timed inside the call: text encoding and decoding are outside it
        assert 0 < r["loop_ms_per_image"] < r["ms_per_image"]
        assert r["outside_loop_ms_per_image"] == pytest.approx(r["ms_per_image"] - r["loop_ms_per_image"])
    assert versus["loop_speed_ratio"] == pytest.approx(t["loop_ms_per_image"] / s["loop_ms_per_image"])
    assert versus["loop_fraction_of_ideal"] == pytest.approx(versus["loop_speed_ratio"] / versus["eval_ratio"])


def test_inference_student_batch_can_match_the_teacher_rows(toy_world, capsys):
    bench = load("bench_inference")
    path = os.path.join(toy_world, "models", "sd")
    t, s = bench.main(["--pipeline", path, "--student", path, "--scheduler", "lcm", "--num_prompts", "4",
                       "--batch_size", "2", "--student_batch_size", "match", "--teacher_steps", "2",
                       "--student_steps", "2", "--guidance_scale", "5", "--warmup", "0", "--repeats", "1"])
    assert (t["batch_size"], t["rows_per_call"], t["denoiser_calls"]) == (2, 4, 4)  # 2 calls a step, cond + uncond
    assert (s["batch_size"], s["rows_per_call"], s["denoiser_calls"]) == (4, 4, 2)  # all 4 images in one call
    with pytest.raises(SystemExit):
        bench.main(["--pipeline", path, "--student", path, "--student_batch_size", "0"])


@pytest.mark.parametrize("recipe, teacher, kind", [("train_lcm_distill_lora_sdxl.py", "sdxl", "lora"),
                                                   ("train_lcm_distill_sd.py", "sd", "lcm")])
def test_last_checkpoint_as_student_equals_the_final_output(toy_world, tmp_path, recipe, teacher, kind):
    """The last checkpoint of a run, turned into a student pipeline, computes what the run's saved output computes."""
    from diffusers import DiffusionPipeline

    from utils.checkpoint import read_model_state

    bench = load("bench_quality_vs_time")
    module = bench.common.import_recipe(recipe)
    assert bench.common.recipe_kind(module) == kind
    teacher = os.path.join(toy_world, "models", teacher)
    out = str(tmp_path / "run")
    flags = ["--pretrained_teacher_model", teacher, "--train_data_dir", os.path.join(toy_world, "data/train"),
             "--output_dir", out, "--learning_rate", "1e-2", "--lr_warmup_steps", "0", *TINY]
    flags += ["--lora_rank", "4"] if kind == "lora" else []
    run_recipe(recipe, flags + ["--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "1000",
                                "--validation_prompts"])
    rargs = module.parse_args(flags)
    found = bench.checkpoints(kind, rargs)
    assert [c["step"] for c in found] == [1, 2] and found[0]["written"] <= found[1]["written"]

    student = bench.student_pipeline(module, kind, rargs, read_model_state(found[-1]["path"]))
    start = bench.student_pipeline(module, kind, rargs, None)  # step 0: the untrained student
    if kind == "lora":
        final = DiffusionPipeline.from_pretrained(teacher)
        final.load_lora_weights(out)
    else:
        final = DiffusionPipeline.from_pretrained(out)  # the recipe's saved LCM pipeline
    assert type(student.scheduler).__name__ == "LCMScheduler"
    if kind == "lcm":  # the same sampler as the saved pipeline's
        public = [{k: v for k, v in p.scheduler.config.items() if not k.startswith("_")} for p in (student, final)]
        assert public[0] == public[1]
    assert torch.allclose(unet_output(student.unet), unet_output(final.unet), atol=1e-5)
    assert not torch.allclose(unet_output(start.unet), unet_output(final.unet), atol=1e-4)  # training changed it
    assert torch.allclose(unet_output(start.unet), unet_output(DiffusionPipeline.from_pretrained(teacher).unet,
                                                               zero_cond=True), atol=1e-6)


def transformer_output(transformer, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    kw = dict(hidden_states=torch.randn(2, 16, c.in_channels, generator=g), timestep=torch.tensor([0.9, 0.3]),
              encoder_hidden_states=torch.randn(2, 8, c.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
              txt_ids=torch.zeros(8, 3), img_ids=torch.zeros(16, 3), return_dict=False)
    with torch.no_grad():
        return transformer(**kw)[0]


def test_tlcm_checkpoints_of_both_stages_and_the_last_as_student(toy_world, tmp_path):
    from diffusers import DiffusionPipeline

    from utils.checkpoint import read_model_state

    bench = load("bench_quality_vs_time")
    module = bench.common.import_recipe("train_tlcm_flux.py")
    assert bench.common.recipe_kind(module) == "tlcm"
    teacher = os.path.join(toy_world, "models/flux")
    out = str(tmp_path / "run")
    flags = ["--pretrained_teacher_model", teacher, "--prompts_file", os.path.join(toy_world, "data/train/metadata.jsonl"),
             "--output_dir", out, "--lora_rank", "4", "--stage1_steps", "2", "--stage2_steps", "1",
             "--stage1_learning_rate", "1e-2", "--stage2_learning_rate", "1e-2", "--lr_warmup_steps", "0",
             "--resolution", "32", "--train_batch_size", "2", "--max_train_samples", "16", "--report_to", "none"]
    run_recipe("train_tlcm_flux.py", flags + ["--checkpointing_steps", "1", "--validation_steps", "1000",
                                              "--validation_prompts"])
    rargs = module.parse_args(flags)
    found = bench.checkpoints("tlcm", rargs)
    assert [(c["stage"], c["step"]) for c in found] == [("1", 1), ("1", 2), ("2", 3)]
    student = bench.student_pipeline(module, "tlcm", rargs, read_model_state(found[-1]["path"]))
    assert type(student.scheduler).__name__ == "FlowMatchEulerTLCMScheduler"
    assert bench.default_guidance("tlcm", rargs, student) == 1.0  # no guidance embedding: the student runs without CFG
    final = DiffusionPipeline.from_pretrained(teacher)
    base = transformer_output(final.transformer)
    final.load_lora_weights(out)
    assert not torch.allclose(transformer_output(final.transformer), base, atol=1e-4)
    assert torch.allclose(transformer_output(student.transformer), transformer_output(final.transformer), atol=1e-5)


@pytest.mark.parametrize("model", ["models/sdxl", "models/flux/transformer/config.json"])
def test_lora_forward_bench_times_both_modes(toy_world, capsys, model):
    bench = load("bench_lora_forward")
    records = bench.main(["--model", os.path.join(toy_world, model), "--lora_rank", "8", "--batch_size", "2",
                          "--warmup", "0", "--steps", "1", *(["--latent_size", "8"] if "json" in model else [])])
    assert [r["pass"] for r in records] == ["forward", "train"]
    assert {r["latent_size"] for r in records} == {8}  # the toy SDXL UNet's sample_size; given for the config
    assert [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()] == records
    for r in records:
        assert r["branch_ms"] > 0 and r["merged_ms"] > 0
        assert r["speed_ratio"] == pytest.approx(r["branch_ms"] / r["merged_ms"])
        assert 0 <= r["merged_layers"] <= r["lora_layers"] and r["lora_layers"] > 10
    assert records[0]["merged_layers"] >= records[1]["merged_layers"]  # a gradient makes merging dearer
