"""Bad input at every entry point: one line on stderr naming the problem and the flag, exit code 2, no traceback,
and nothing left behind.

The matrix is a table, CASES: (entry point, case, flags changed from a valid command line, text the error
line must hold); TOLERATED lists inputs that must NOT stop a run (some undecodable images, xformers asked
for where it cannot run): exit 0 and a warning naming them. Every row is its own process running the entry
point's command line. Started plainly, each would spend 3-6 s importing torch and diffusers, so the rows run
as children forked (a few at a time) from one process that has imported them once (`run_forked`);
test_forked_runs_match_real_command_lines runs one row per entry point as a plain `python ...` command
and checks that it ends exactly like its forked run (exit code and stderr).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = 4
PARALLEL = 3  # forked rows at a time

ENTRY_POINTS = {
    "sd": ["train_lcm_distill_sd.py"],
    "lora": ["train_lcm_distill_lora_sdxl.py"],
    "tlcm": ["train_tlcm_flux.py"],
    "infer": ["inference.py"],
    "convert": ["convert_lora.py"],
    "eval": ["-m", "utils.evaluate"],
}


def valid_command(entry: str) -> list[str]:
    """A command line of `entry` that works; {W} is the toy world, {T} the assets folder, {OUT} the output."""
    train = ["--train_data_dir", "{W}/data/train", "--output_dir", "{OUT}", "--resolution", "32",
             "--train_batch_size", "2", "--max_train_samples", "8", "--max_train_steps", "1", "--w_min", "2",
             "--w_max", "6", "--validation_steps", "1000", "--report_to", "none"]
    return {
        "sd": ["--pretrained_teacher_model", "{W}/models/sd", *train],
        "lora": ["--pretrained_teacher_model", "{W}/models/sdxl", "--lora_rank", str(RANK), *train],
        "tlcm": ["--pretrained_teacher_model", "{W}/models/flux", "--prompts_file", "{W}/data/train/metadata.jsonl",
                 "--max_train_samples", "8", "--output_dir", "{OUT}", "--resolution", "32", "--lora_rank", str(RANK),
                 "--train_batch_size", "2", "--stage1_steps", "1", "--stage2_steps", "1", "--validation_steps",
                 "1000", "--report_to", "none"],
        "infer": ["--base_model_path", "{W}/models/sd", "--output_dir", "{OUT}", "--infer-steps", "2", "--quiet",
                  "--device", "cpu"],
        "convert": ["convert", "{T}/sd_lora.safetensors", "--to", "kohya", "--base_model", "{W}/models/sd",
                    "--output_path", "{OUT}/lora.safetensors"],
        "eval": ["--pipeline", "{W}/models/sd", "--steps", "1", "--judge", "{W}/judge", "--real_images",
                 "{W}/data/test", "--output_dir", "{OUT}"],
    }[entry]


# (entry, case, {flag: new value (None: drop the flag; a positional's index: replace it)}, needle)
LORA_FILES = [("not-safetensors", "{T}/lora.bin", "not a .safetensors file"),
              ("truncated", "{T}/truncated.safetensors", "truncated or corrupt"),
              ("rank-mismatch", "{T}/bad_rank.safetensors", "rank"),
              ("architecture-mismatch", "{T}/sdxl_lora.safetensors", "another architecture")]
CASES = [
    # a model path that does not exist, or holds another kind of model
    *[(e, "missing-model", {flag: "{T}/no_such_model"}, flag) for e, flag in [
        ("sd", "--pretrained_teacher_model"), ("lora", "--pretrained_teacher_model"),
        ("tlcm", "--pretrained_teacher_model"), ("infer", "--base_model_path"), ("convert", "--base_model"),
        ("eval", "--pipeline")]],
    ("sd", "wrong-architecture", {"--pretrained_teacher_model": "{W}/models/sdxl"}, "--pretrained_teacher_model"),
    ("lora", "wrong-architecture", {"--pretrained_teacher_model": "{W}/models/flux"}, "--pretrained_teacher_model"),
    ("tlcm", "wrong-architecture", {"--pretrained_teacher_model": "{W}/models/sd"}, "--pretrained_teacher_model"),
    ("infer", "wrong-architecture", {"--base_model_path": "{W}/models/sd/unet"}, "--base_model_path"),
    ("convert", "wrong-architecture", {"--base_model": "{W}/models/flux"}, "another architecture"),
    ("eval", "wrong-architecture", {"--pipeline": "{W}/judge"}, "--pipeline"),
    # training data: missing, empty, no caption column, every image corrupt
    *[(e, case, {"--train_data_dir": path}, needle) for e in ("sd", "lora") for case, path, needle in [
        ("data-missing", "{T}/no_such_data", "--train_data_dir"),
        ("data-empty", "{T}/empty_data", "--train_data_dir"),
        ("data-no-caption-column", "{T}/no_caption_data", "--caption_column"),
        ("data-all-corrupt", "{T}/corrupt_data", "could not be decoded")]],
    *[(e, case, {"--prompts_file": path}, needle) for e in ("tlcm", "infer", "eval") for case, path, needle in [
        ("prompts-missing", "{T}/no_such_prompts.txt", "--prompts_file"),
        ("prompts-empty", "{T}/empty_prompts.txt", "--prompts_file")]],
    ("tlcm", "prompts-no-caption-column", {"--prompts_file": "{T}/no_caption.jsonl"}, "--caption_column"),
    ("eval", "real-images-missing", {"--real_images": "{T}/no_such_images"}, "--real_images"),
    # a resolution the VAE cannot take
    *[(e, "resolution", {"--resolution": "30"}, "--resolution") for e in ("sd", "lora", "tlcm", "infer")],
    ("tlcm", "resolution-flux-patches", {"--resolution": "36"}, "--resolution"),
    # step counts out of range
    ("sd", "steps-0", {"--max_train_steps": "0"}, "--max_train_steps"),
    ("sd", "ddim-timesteps-1001", {"--num_ddim_timesteps": "1001"}, "--num_ddim_timesteps"),
    ("lora", "steps-0", {"--max_train_steps": "0"}, "--max_train_steps"),
    ("tlcm", "steps-0", {"--stage1_steps": "0"}, "--stage1_steps"),
    ("infer", "steps-0", {"--infer-steps": "0"}, "--infer-steps"),
    ("infer", "steps-1001", {"--infer-steps": "1001"}, "--infer-steps"),
    ("eval", "steps-0", {"--steps": "0"}, "--steps"),
    ("eval", "steps-1001", {"--steps": "1001"}, "--steps"),
    # guidance range upside down
    ("sd", "w-min-above-w-max", {"--w_min": "8", "--w_max": "4"}, "--w_min"),
    ("lora", "w-min-above-w-max", {"--w_min": "8", "--w_max": "4"}, "--w_min"),
    # unknown names
    *[(e, f"unknown-{what}", {flag: "warp"}, flag) for e in ("sd", "lora", "tlcm") for what, flag in [
        ("loss", "--loss_type"), ("lr-scheduler", "--lr_scheduler"), ("precision", "--mixed_precision")]],
    ("infer", "unknown-scheduler", {"--scheduler": "warp"}, "--scheduler"),
    ("infer", "unknown-precision", {"--dtype": "fp64"}, "--dtype"),
    ("eval", "unknown-scheduler", {"--scheduler": "warp"}, "--scheduler"),
    ("convert", "unknown-format", {"--to": "ckpt"}, "--to"),
    # a precision this device cannot run (the machine has no GPU: fp16; bf16 on a GPU without it: see below)
    *[(e, "fp16-on-cpu", {"--mixed_precision": "fp16"}, "--mixed_precision") for e in ("sd", "lora", "tlcm")],
    ("infer", "fp16-on-cpu", {"--dtype": "fp16"}, "--dtype"),
    # LoRA files: not safetensors, truncated, ranks that do not fit, another architecture
    *[("infer", f"lora-{case}", {"--lora_path": path}, needle) for case, path, needle in LORA_FILES],
    *[("convert", f"lora-{case}", {1: path}, needle) for case, path, needle in LORA_FILES],
    *[("eval", f"lora-{case}", {"--lora": path}, needle) for case, path, needle in LORA_FILES],
    ("infer", "lora-missing", {"--lora_path": "{T}/no_such_lora"}, "--lora_path"),
    ("eval", "lora-missing", {"--lora": "{T}/no_such_lora"}, "--lora"),
    ("tlcm", "init-lora-not-safetensors", {"--init_lora": "{T}/lora.bin"}, "--init_lora"),
    ("tlcm", "init-lora-truncated", {"--init_lora": "{T}/truncated_flux.safetensors"}, "--init_lora"),
    ("tlcm", "init-lora-rank-mismatch", {"--init_lora": "{T}/flux_rank8.safetensors"}, "--init_lora"),
    ("tlcm", "init-lora-architecture-mismatch", {"--init_lora": "{T}/sd_lora.safetensors"}, "--init_lora"),
    # an output folder that cannot be created (a path under a regular file: root ignores permissions)
    *[(e, "output-not-writable", {flag: "{T}/a_file.txt/out"}, flag) for e, flag in [
        ("sd", "--output_dir"), ("lora", "--output_dir"), ("tlcm", "--output_dir"), ("infer", "--output_dir"),
        ("convert", "--output_path"), ("eval", "--output_dir")]],
    # resuming from a checkpoint that does not exist
    *[(e, "resume-missing", {"--resume_from_checkpoint": "checkpoint-77"}, "--resume_from_checkpoint")
      for e in ("sd", "lora", "tlcm")],
]

# inputs that must not stop the run: (entry, case, flags, text that must appear in the output)
TOLERATED = [
    ("sd", "some-images-corrupt", {"--train_data_dir": "{T}/some_corrupt_data", "--max_train_samples": None,
                                   "--max_train_steps": None}, "undecodable image(s) were skipped"),
    ("sd", "xformers-without-cuda", {"--enable_xformers_memory_efficient_attention": ""},
     "--enable_xformers_memory_efficient_attention"),
    ("infer", "xformers-without-cuda", {"--enable_xformers_memory_efficient_attention": ""},
     "--enable_xformers_memory_efficient_attention"),
]


def command(entry: str, flags: dict, assets: str, world: str, out: str) -> list[str]:
    argv = valid_command(entry)
    for flag, value in flags.items():
        if isinstance(flag, int):  # a positional argument
            argv[flag] = value
        elif flag in argv:
            i = argv.index(flag)
            if value is None:
                del argv[i:i + 2]
            else:
                argv[i + 1] = value
        elif value == "":  # a switch
            argv.append(flag)
        else:
            argv += [flag, value]
    argv = [a.replace("{W}", world).replace("{T}", assets).replace("{OUT}", out) for a in argv]
    return [sys.executable, *ENTRY_POINTS[entry], *argv]


# ----------------------------------------------------------------------------- assets


def _copy_images(src: str, dst: str, n: int, corrupt: int, caption_key: str = "text") -> None:
    """An imagefolder of n toy images (the last `corrupt` of them garbage bytes with a .png name)."""
    os.makedirs(dst)
    with open(os.path.join(src, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f][:n]
    with open(os.path.join(dst, "metadata.jsonl"), "w") as f:
        for i, row in enumerate(rows):
            if i >= n - corrupt:
                with open(os.path.join(dst, row["file_name"]), "wb") as img:
                    img.write(b"\x89PNG\r\n\x1a\n this is not an image")
            else:
                shutil.copy(os.path.join(src, row["file_name"]), os.path.join(dst, row["file_name"]))
            f.write(json.dumps({"file_name": row["file_name"], caption_key: row["text"]}) + "\n")


def _lora_file(world: str, name: str, path: str, rank: int = RANK) -> None:
    """A random rank-`rank` LoRA of a toy denoiser as a kohya file."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from utils import lora

    torch.manual_seed(0)
    folder = os.path.join(world, "models", name)
    if name == "flux":
        model, targets, prefix = (FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer"),
                                  lora.FLUX_LORA_TARGETS, "lora_transformer")
    else:
        model, targets, prefix = (UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                                  lora.LCM_LORA_TARGETS, "lora_unet")
    lora.add_lora(model, rank, 8.0, targets, init=False)
    save_file({k: v.contiguous() for k, v in lora.to_kohya(lora.lora_state_dict(model), 8.0, prefix).items()}, path)


@pytest.fixture(scope="module")
def assets(toy_world, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("bad_input_assets")
    t = str(root)
    train = os.path.join(toy_world, "data/train")
    (root / "a_file.txt").write_text("a regular file, so nothing can be created under it\n")
    (root / "empty_data").mkdir()
    _copy_images(train, os.path.join(t, "no_caption_data"), 4, 0, caption_key="prompt")
    _copy_images(train, os.path.join(t, "corrupt_data"), 4, 4)
    _copy_images(train, os.path.join(t, "some_corrupt_data"), 8, 2)
    (root / "empty_prompts.txt").write_text("\n  \n")
    (root / "no_caption.jsonl").write_text('{"prompt": "a red circle"}\n')
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(RANK, 8)}, str(root / "lora.bin"))  # a pickle
    _lora_file(toy_world, "sd", os.path.join(t, "sd_lora.safetensors"))
    _lora_file(toy_world, "sdxl", os.path.join(t, "sdxl_lora.safetensors"))
    _lora_file(toy_world, "flux", os.path.join(t, "flux_rank8.safetensors"), rank=8)
    for src, dst in [("sd_lora", "truncated"), ("flux_rank8", "truncated_flux")]:
        data = (root / f"{src}.safetensors").read_bytes()
        (root / f"{dst}.safetensors").write_bytes(data[: len(data) // 2])
    from safetensors.torch import load_file

    sd = load_file(os.path.join(t, "sd_lora.safetensors"))
    key = next(k for k in sd if k.endswith("lora_up.weight") and sd[k].ndim == 2)
    sd[key] = sd[key][:, : RANK - 1].contiguous()  # lora_up of rank 3 against lora_down of rank 4
    save_file(sd, os.path.join(t, "bad_rank.safetensors"))
    return t


def run_forked(jobs: list[dict], parallel: int = PARALLEL) -> dict:
    """Run `python ARGV` for every job, `parallel` at a time, as children forked from one process that has
    imported torch, diffusers and the toolkit once (most of a 3-6 s start); returns {key: exit code} and writes
    each job's stdout and stderr to its files. A child runs the entry point exactly as the interpreter would
    (runpy as __main__, SystemExit -> exit code, an uncaught exception -> traceback and 1, atexit handlers)."""
    import atexit
    import runpy
    import traceback

    def child(job: dict) -> None:
        code = 1
        try:
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.chdir(ROOT)
            argv = job["argv"]
            here = os.path.dirname(os.path.abspath(__file__))  # the driver's own folder is no entry point's
            sys.path[:] = [ROOT] + [p for p in sys.path if p not in (ROOT, here, "")]
            try:
                if argv[0] == "-m":
                    sys.argv = [argv[1], *argv[2:]]
                    sys.modules.pop(argv[1], None)  # `python -m` runs a module not imported before
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = list(argv)
                    runpy.run_path(argv[0], run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    codes, running, queue = {}, {}, list(jobs)
    while queue or running:
        while queue and len(running) < parallel:
            job = queue.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(job)
            running[pid] = job["key"]
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return codes


def serve(jobs_file: str) -> None:
    """`python tests/test_bad_input.py JOBS.json`: import what the entry points import, then run_forked.

    What the imports print on stderr is reported: a real command line would print it too."""
    import importlib

    with open(jobs_file) as f:
        jobs = json.load(f)
    sys.path.insert(0, ROOT)
    saved = os.dup(2)
    with open(jobs_file + ".preload-stderr", "w") as err:
        os.dup2(err.fileno(), 2)
        try:
            for name in ("utils", "utils.training", "utils.models", "utils.data", "utils.lora", "utils.checkpoint",
                         "utils.evaluate", "utils.tlcm", "utils.ema", "utils.losses", "paras", "accelerate",
                         "datasets", "peft"):
                importlib.import_module(name)  # what the entry points import at their top, nothing lazy
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
    with open(jobs_file + ".codes", "w") as f:
        json.dump(run_forked(jobs), f)


@pytest.fixture(scope="module")
def results(toy_world, assets, tmp_path_factory) -> dict:
    """(entry, case) -> (exit code, stdout, stderr, output path) of every row of CASES and TOLERATED."""
    outs = tmp_path_factory.mktemp("bad_input_out")
    jobs = []
    for entry, case, flags, _ in sorted(TOLERATED + CASES, key=lambda r: r in CASES):  # the long runs first
        key = f"{entry}-{case}"
        jobs.append({"key": key, "argv": command(entry, flags, assets, toy_world, str(outs / key))[1:],
                     "stdout": str(outs / f"{key}.stdout"), "stderr": str(outs / f"{key}.stderr")})
    jobs_file = str(outs / "jobs.json")
    with open(jobs_file, "w") as f:
        json.dump(jobs, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), jobs_file], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def read(path: str) -> str:
        with open(path) as f:
            return f.read()

    preload = read(jobs_file + ".preload-stderr")
    assert not preload.strip(), f"importing the libraries prints on stderr: {preload[-2000:]}"
    codes = json.loads(read(jobs_file + ".codes"))
    return {tuple(job["key"].split("-", 1)): (codes[job["key"]], read(job["stdout"]), read(job["stderr"]),
                                              str(outs / job["key"])) for job in jobs}


@pytest.mark.parametrize("entry, case, flags, needle", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(results, entry, case, flags, needle):
    code, _, stderr, out = results[(entry, case)]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr[-3000:]
    assert not os.path.exists(out), os.listdir(out) if os.path.isdir(out) else out  # not even an empty folder


@pytest.mark.parametrize("entry, case, flags, needle", TOLERATED, ids=[f"{c[0]}-{c[1]}" for c in TOLERATED])
def test_tolerated_input_warns_and_runs(results, entry, case, flags, needle):
    code, stdout, stderr, out = results[(entry, case)]
    assert code == 0, stderr[-3000:]
    warnings = [line for line in (stdout + stderr).splitlines() if "warning" in line.lower() and needle in line]
    assert warnings, (stdout + stderr)[-3000:]
    assert os.listdir(out)  # the run wrote its outputs


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch, tmp_path):
    """No GPU here: pretend to be one without bf16; the training flags and inference's --dtype both refuse it."""
    import inference
    from utils import training
    from utils.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    parser = training.Parser()
    training.add_training_args(parser)
    args = parser.parse_args(["--output_dir", str(tmp_path / "out"), "--mixed_precision", "bf16"])
    with pytest.raises(SystemExit) as info:
        training.check_training_args(args)
    assert info.value.code == 2 and not os.path.exists(tmp_path / "out")
    with pytest.raises(UserError, match="bf16"):
        inference.resolve_dtype("bf16", "flux", torch.device("cuda"))


def test_xformers_request_without_cuda_warns_and_keeps_sdpa(caplog, monkeypatch):
    from utils import training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class Model(torch.nn.Module):
        def enable_xformers_memory_efficient_attention(self):
            raise AssertionError("must not be called without CUDA")

    with caplog.at_level("WARNING"):
        training.enable_xformers(Model(), True)
    assert "--enable_xformers_memory_efficient_attention" in caplog.text and "SDPA" in caplog.text


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, capsys):
    """Two good steps, then the loss turns NaN for good: the updates are skipped, and --max_nan_steps (3) in a
    row end the run with exit 2; the weights and the last checkpoint are those of step 2."""
    import argparse

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from utils import checkpoint, training

    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
        params = list(model.parameters())
        calls, weights = [], {}

        def loss_fn(batch):
            calls.append(1)
            loss = model(torch.ones(1, 2)).sum() ** 2
            return loss if len(calls) <= 2 else loss * float("nan")

        def after_step():
            weights[len(calls)] = [p.detach().clone() for p in params]

        args = argparse.Namespace(output_dir=str(tmp_path), resume_from_checkpoint=None, max_train_steps=10,
                                  checkpointing_steps=1, checkpoints_total_limit=None, validation_steps=100,
                                  max_nan_steps=3, validation_prompts=None, max_grad_norm=1.0, train_batch_size=1)
        batches = [{"captions": ["a red circle"], "num_skipped": 0}] * 10
        with pytest.raises(SystemExit) as info:
            training.run_training(accelerator, args, batches, model, params, optimizer, schedule, loss_fn,
                                  after_step=after_step)
    finally:
        AcceleratorState._reset_state(True)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("error: 3 consecutive non-finite steps (--max_nan_steps)")
    assert len(calls) == 5 and list(weights) == [1, 2]  # 2 updates, then 3 skipped ones
    assert all(torch.equal(p, w) for p, w in zip(params, weights[2]))
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(str(tmp_path))] == ["checkpoint-1", "checkpoint-2"]


def test_fewer_webdataset_shards_than_processes_is_refused(toy_world, capsys):
    """Each process streams whole shards: with fewer shards than processes one would get no data and wait forever."""
    import argparse
    from types import SimpleNamespace

    from utils import training

    shard = os.path.join(toy_world, "data/shards/shard-000000.tar")
    args = argparse.Namespace(dataset_name=None, train_data_dir=None, train_shards_path_or_url=shard,
                              image_column="image", caption_column="text", max_train_samples=None, cache_dir=None,
                              seed=0, resolution=32, center_crop=False, random_flip=False, train_batch_size=2,
                              dataloader_num_workers=0, max_train_steps=2, gradient_accumulation_steps=1)
    with pytest.raises(SystemExit) as info:
        training.make_train_data(args, SimpleNamespace(num_processes=2))
    assert info.value.code == 2 and "(--train_shards_path_or_url)" in capsys.readouterr().err
    assert training.make_train_data(args, SimpleNamespace(num_processes=1)) is not None


# one row per entry point, also run as a plain `python ...` command line: the forked runs must match them
REAL = ["sd-missing-model", "lora-wrong-architecture", "tlcm-resolution", "infer-lora-truncated",
        "convert-output-not-writable", "eval-steps-1001"]


def test_forked_runs_match_real_command_lines(results, toy_world, assets, tmp_path):
    rows = {f"{r[0]}-{r[1]}": r for r in CASES}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(key):
        entry, case, flags, _ = rows[key]
        out = str(tmp_path / key)
        forked = results[(entry, case)]
        proc = subprocess.run(command(entry, flags, assets, toy_world, out), capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=600)
        return key, (proc.returncode, proc.stderr.replace(out, forked[3])), forked[:3:2]

    with ThreadPoolExecutor(2) as pool:
        for key, real, forked in pool.map(run, REAL):
            assert real == forked, key


if __name__ == "__main__":
    serve(sys.argv[1])
