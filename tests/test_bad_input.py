"""Bad input at every entry point: one line on stderr naming the problem and the flag, exit code 2, no traceback,
and nothing left behind.

The matrix is a table, CASES: (entry point, case, flags changed from a valid command line, text the error
line must hold). Every case runs as its own subprocess, exactly as a user would run it; the subprocesses of
the whole table run a few at a time in one module fixture (each needs 3-6 s, mostly importing torch and
diffusers), and one test per row checks its result. TOLERATED lists the inputs that must NOT stop a run
(some undecodable images, xformers asked for where it cannot run): exit 0 and a warning naming them.
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
PARALLEL = 3  # subprocesses at a time: they mostly wait on imports and file reads

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
    rows = [json.loads(line) for line in open(os.path.join(src, "metadata.jsonl"))][:n]
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
        data = open(os.path.join(t, f"{src}.safetensors"), "rb").read()
        (root / f"{dst}.safetensors").write_bytes(data[: len(data) // 2])
    from safetensors.torch import load_file

    sd = load_file(os.path.join(t, "sd_lora.safetensors"))
    key = next(k for k in sd if k.endswith("lora_up.weight") and sd[k].ndim == 2)
    sd[key] = sd[key][:, : RANK - 1].contiguous()  # lora_up of rank 3 against lora_down of rank 4
    save_file(sd, os.path.join(t, "bad_rank.safetensors"))
    return t


@pytest.fixture(scope="module")
def results(toy_world, assets, tmp_path_factory) -> dict:
    """(entry, case) -> (exit code, stdout, stderr, output path) of every row of CASES and TOLERATED, run in parallel."""
    outs = tmp_path_factory.mktemp("bad_input_out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(row):
        entry, case, flags = row[:3]
        out = str(outs / f"{entry}-{case}")
        proc = subprocess.run(command(entry, flags, assets, toy_world, out), capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=600)
        return (entry, case), (proc.returncode, proc.stdout, proc.stderr, out)

    rows = sorted(TOLERATED + CASES, key=lambda r: r in CASES)  # the long runs first
    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(pool.map(run, rows))


@pytest.mark.parametrize("entry, case, flags, needle", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(results, entry, case, flags, needle):
    code, stdout, stderr, out = results[(entry, case)]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr[-3000:]
    leftovers = os.listdir(out) if os.path.isdir(out) else []
    assert not os.path.exists(out) or not leftovers, leftovers


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
