"""Bad input at every entry point: one line on stderr naming the problem and the flag, exit code 2, no traceback,
and nothing left behind.

The matrix is a table, CASES: (entry point, case, flags changed from a valid command line, text the error
line must hold); TOLERATED lists inputs that must NOT stop a run (some undecodable images, xformers asked
for where it cannot run): exit 0 and a warning naming them. Every row runs its entry point's command line in
this process (helpers.run_command: the script's `__main__` block, as `python ...` runs it, without the 3-6 s
of a new interpreter importing torch and diffusers); test_in_process_runs_match_real_command_lines runs one
row per entry point as a plain `python ...` command too and checks that both end alike (exit code and stderr).
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
from helpers import run_command
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = 4
pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY_POINTS = {
    "sd": ["train_lcm_distill_sd.py"],
    "lora": ["train_lcm_distill_lora_sdxl.py"],
    "tcd": ["train_tcd_lora.py"],
    "tlcm": ["train_tlcm_flux.py"],
    "infer": ["inference.py"],
    "convert": ["convert_lora.py"],
    "eval": ["-m", "utils.evaluate"],
    "merge": ["convert_lora.py"],
    "export": ["convert_lora.py"],
}


def valid_command(entry: str) -> list[str]:
    """A command line of `entry` that works; {W} is the toy world, {T} the assets folder, {OUT} the output."""
    train = ["--train_data_dir", "{W}/data/train", "--output_dir", "{OUT}", "--resolution", "32",
             "--train_batch_size", "2", "--max_train_samples", "8", "--max_train_steps", "1", "--w_min", "2",
             "--w_max", "6", "--validation_steps", "1000", "--report_to", "none"]
    return {
        "sd": ["--pretrained_teacher_model", "{W}/models/sd", *train],
        "lora": ["--pretrained_teacher_model", "{W}/models/sdxl", "--lora_rank", str(RANK), *train],
        "tcd": ["--pretrained_teacher_model", "{W}/models/sdxl", "--lora_rank", str(RANK), *train],
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
        "merge": ["merge", "{T}/sd_lora.safetensors", "--base_model", "{W}/models/sd", "--output_dir", "{OUT}"],
        "export": ["from-checkpoint", "{T}/run/checkpoint-1", "--base_model", "{W}/models/sd", "--output_dir", "{OUT}"],
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
    ("sd", "wrong-architecture", {"--pretrained_teacher_model": "{W}/models/flux"}, "--pretrained_teacher_model"),
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
        ("data-all-corrupt", "{T}/corrupt_data", "could not be decoded"),
        ("data-is-a-file", "{W}/data/train/metadata.jsonl", "is a file, not a folder"),
        ("data-caption-not-utf8", "{T}/latin1_data", "not UTF-8"),
        ("data-image-missing", "{T}/missing_image_data", "missing")]],
    *[(e, case, {"--prompts_file": path}, needle) for e in ("tlcm", "infer", "eval") for case, path, needle in [
        ("prompts-missing", "{T}/no_such_prompts.txt", "--prompts_file"),
        ("prompts-empty", "{T}/empty_prompts.txt", "--prompts_file")]],
    ("tlcm", "prompts-no-caption-column", {"--prompts_file": "{T}/no_caption.jsonl"}, "--caption_column"),
    ("tlcm", "prompts-not-utf8", {"--prompts_file": "{T}/latin1_prompts.txt"}, "not UTF-8"),
    ("eval", "real-images-missing", {"--real_images": "{T}/no_such_images"}, "--real_images"),
    # a resolution the VAE cannot take
    *[(e, "resolution", {"--resolution": "30"}, "--resolution") for e in ("sd", "lora", "tlcm", "infer")],
    ("tlcm", "resolution-flux-patches", {"--resolution": "36"}, "--resolution"),
    # step counts out of range
    ("sd", "steps-0", {"--max_train_steps": "0"}, "--max_train_steps"),
    ("sd", "ddim-timesteps-1001", {"--num_ddim_timesteps": "1001"}, "--num_ddim_timesteps"),
    ("sd", "ddim-timesteps-1", {"--num_ddim_timesteps": "1"}, "--num_ddim_timesteps"),  # LCMScheduler: <= N steps
    ("sd", "max-train-samples-0", {"--max_train_samples": "0"}, "--max_train_samples"),
    ("tlcm", "max-train-samples-0", {"--max_train_samples": "0"}, "--max_train_samples"),
    ("tlcm", "segments-0", {"--num_segments": "0"}, "--num_segments"),
    ("lora", "steps-0", {"--max_train_steps": "0"}, "--max_train_steps"),
    # a bf16 LoRA outside bf16 autocast
    *[(e, "lora-dtype-bf16-without-bf16", {"--lora_dtype": "bf16"}, "--lora_dtype bf16 needs --mixed_precision bf16")
      for e in ("lora", "tlcm")],
    ("tlcm", "steps-0", {"--stage1_steps": "0"}, "--stage1_steps"),
    ("infer", "steps-0", {"--infer-steps": "0"}, "--infer-steps"),
    ("infer", "steps-1001", {"--infer-steps": "1001"}, "--infer-steps"),
    ("eval", "steps-0", {"--steps": "0"}, "--steps"),
    ("eval", "steps-1001", {"--steps": "1001"}, "--steps"),
    ("eval", "metric-not-installable", {"--metrics": "fid,image_reward"}, "timm==0.6.13"),
    # numbers that are not finite or out of their range
    *[(e, f"{name}-{value}", {f"--{name}": value}, f"--{name}") for e, name, value in [
        ("sd", "learning_rate", "nan"), ("lora", "learning_rate", "inf"), ("tlcm", "stage1_learning_rate", "nan"),
        ("tlcm", "stage2_learning_rate", "0"), ("sd", "adam_beta1", "1.5"), ("lora", "adam_beta2", "1"),
        ("sd", "adam_epsilon", "0"), ("sd", "adam_weight_decay", "-0.1"), ("sd", "max_grad_norm", "-1"),
        ("sd", "seed", "-1"), ("tlcm", "seed", "4294967296"), ("sd", "huber_c", "nan"), ("tlcm", "huber_c", "0"),
        ("lora", "lora_dropout", "2"), ("lora", "lora_alpha", "0"), ("sd", "w_max", "inf"),
        ("sd", "timestep_scaling_factor", "0"), ("sd", "unet_time_cond_proj_dim", "2"),
        ("tlcm", "guidance_scale", "nan"), ("sd", "lr_warmup_steps", "-1")]],
    # an output folder that is, contains or lies inside an input (a copy of the teacher: never the toy world's own)
    ("sd", "output-is-teacher", {"--pretrained_teacher_model": "{T}/teacher", "--output_dir": "{T}/teacher"},
     "is the --pretrained_teacher_model input"),
    ("sd", "output-inside-teacher", {"--pretrained_teacher_model": "{T}/teacher", "--output_dir": "{T}/teacher/out"},
     "lies inside the --pretrained_teacher_model input"),
    ("lora", "output-contains-data", {"--train_data_dir": "{T}/outer/data", "--output_dir": "{T}/outer"},
     "contains the --train_data_dir input"),
    ("lora", "output-inside-data", {"--train_data_dir": "{T}/outer/data", "--output_dir": "{T}/outer/data/out"},
     "lies inside the --train_data_dir input"),
    ("tlcm", "output-contains-prompts", {"--prompts_file": "{T}/outer/prompts.txt", "--output_dir": "{T}/outer"},
     "contains the --prompts_file input"),
    ("tlcm", "output-is-init-lora", {"--init_lora": "{T}/outer", "--output_dir": "{T}/outer"},
     "is the --init_lora input"),
    ("sd", "overwrite-and-resume", {"--overwrite_output_dir": "", "--resume_from_checkpoint": "latest"},
     "--overwrite_output_dir"),
    # guidance range upside down
    ("sd", "w-min-above-w-max", {"--w_min": "8", "--w_max": "4"}, "--w_min"),
    ("lora", "w-min-above-w-max", {"--w_min": "8", "--w_max": "4"}, "--w_min"),
    # unknown names
    *[(e, f"unknown-{what}", {flag: "warp"}, flag) for e in ("sd", "lora", "tlcm") for what, flag in [
        ("loss", "--loss_type"), ("lr-scheduler", "--lr_scheduler"), ("precision", "--mixed_precision")]],
    ("infer", "unknown-scheduler", {"--scheduler": "warp"}, "--scheduler"),
    # TCD: its flags, and LCM's c_skip/c_out scaling it has no use for; eta (TCD's gamma) where no sampler takes it
    ("tcd", "wrong-architecture", {"--pretrained_teacher_model": "{W}/models/flux"}, "--pretrained_teacher_model"),
    ("tcd", "unknown-target-timestep", {"--target_timestep": "half"}, "--target_timestep"),
    ("tcd", "validation-eta-2", {"--validation_eta": "2"}, "--validation_eta"),
    ("tcd", "timestep-scaling-factor", {"--timestep_scaling_factor": "5"}, "--timestep_scaling_factor"),
    ("infer", "eta-out-of-range", {"--scheduler": "tcd", "--base_model_path": "{W}/models/sdxl", "--eta": "1.5"},
     "--eta"),
    ("infer", "eta-on-lcm", {"--base_model_path": "{W}/models/sdxl", "--eta": "0.3"}, "--eta applies to"),
    ("eval", "eta-on-the-default-sampler", {"--eta": "0.3"}, "--eta applies to"),
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
    # a flag whose bad value raised inside a library
    ("sd", "report-to-nonsense", {"--report_to": "nonsense"}, "--report_to"),
    ("lora", "report-to-not-installed", {"--report_to": "wandb"}, "--report_to"),
    # truncated teacher weights (the text encoder's file raised a traceback, the UNet's named no flag)
    ("sd", "teacher-text-encoder-truncated", {"--pretrained_teacher_model": "{T}/teacher_te_cut"},
     "--pretrained_teacher_model"),
    ("lora", "teacher-unet-truncated", {"--pretrained_teacher_model": "{T}/teacher_unet_cut"},
     "--pretrained_teacher_model"),
    ("merge", "base-unet-truncated", {"--base_model": "{T}/teacher_unet_cut"}, "--base_model"),
    ("tlcm", "teacher-vae-truncated", {"--pretrained_teacher_model": "{T}/flux_vae_cut"}, "--pretrained_teacher_model"),
    ("sd", "teacher-scheduler-config-truncated", {"--pretrained_teacher_model": "{T}/teacher_scheduler_cut"},
     "--pretrained_teacher_model"),
    # more flags whose bad values failed inside a library
    ("sd", "cache-dir-is-a-file", {"--cache_dir": "{T}/notes.txt"}, "--cache_dir"),
    ("sd", "logging-dir-under-a-file", {"--logging_dir": "{T}/notes.txt/logs"}, "--logging_dir"),
    ("eval", "per_combo-0", {"--per_combo": "0"}, "--per_combo"),
    ("eval", "teacher_steps-0", {"--teacher": "{W}/models/sd", "--teacher_steps": "0"}, "--teacher_steps"),
    # metadata rows without a caption (a missing key, null) trained as empty prompts without a word
    *[(e, "data-caption-null", {"--train_data_dir": "{T}/null_caption_data"}, "--caption_column")
      for e in ("sd", "lora")],
    ("eval", "real-images-empty", {"--real_images": "{T}/empty_data"}, "--real_images"),
    # outputs: never over, into or around an input, even with --overwrite; never a folder of others' files unasked
    ("convert", "output-is-the-lora", {1: "{T}/lora_copy.safetensors", "--output_path": "{T}/lora_copy.safetensors",
                                       "--overwrite": ""}, "is the LORA input"),
    ("merge", "output-is-the-base-model", {"--base_model": "{T}/merge_base", "--output_dir": "{T}/merge_base",
                                           "--overwrite": ""}, "is the --base_model input"),
    ("export", "output-holds-the-checkpoint", {"--output_dir": "{T}/run", "--overwrite": ""},
     "contains the CHECKPOINT input"),
    ("merge", "output-is-a-file", {"--output_dir": "{T}/notes.txt", "--overwrite": ""}, "is a file"),
    ("infer", "output-holds-the-lora", {"--lora_path": "{T}/run/pytorch_lora_weights.safetensors",
                                        "--output_dir": "{T}/run"}, "contains the --lora_path input"),
    ("eval", "output-inside-the-pipeline", {"--pipeline": "{T}/teacher", "--output_dir": "{T}/teacher/eval"},
     "lies inside the --pipeline input"),
    ("sd", "output-is-a-file", {"--output_dir": "{T}/notes.txt"}, "is a file, not a folder"),
    *[(e, "output-holds-user-files", {"--output_dir": "{T}/user_folder"}, "holds files it did not write (README.md)")
      for e in ("sd", "tlcm", "infer", "eval")],
    # numbers convert_lora.py from-checkpoint writes into its outputs
    *[("export", f"{name}-{value}", {f"--{name}": value}, f"--{name}") for name, value in [
        ("lora_alpha", "0"), ("num_ddim_timesteps", "0"), ("timestep_scaling_factor", "0"), ("lora_dropout", "1")]],
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
    """The arguments of `python` for a row: the entry point, then its valid command line with `flags` changed."""
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
    return [*ENTRY_POINTS[entry], *argv]


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

    from utils import lora, lora_files

    torch.manual_seed(0)
    folder = os.path.join(world, "models", name)
    if name == "flux":
        model, targets, prefix = (FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer"),
                                  lora.FLUX_LORA_TARGETS, "lora_transformer")
    else:
        model, targets, prefix = (UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                                  lora.LCM_LORA_TARGETS, "lora_unet")
    lora.add_lora(model, rank, 8.0, targets, init=False)
    kohya = lora_files.to_kohya(lora.lora_state_dict(model), 8.0, prefix)
    save_file({k: v.contiguous() for k, v in kohya.items()}, path)


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
    (root / "latin1_prompts.txt").write_bytes("a red circle\na caf\u00e9 square\n".encode("latin-1"))
    _copy_images(train, os.path.join(t, "latin1_data"), 4, 0)
    with open(os.path.join(t, "latin1_data", "metadata.jsonl"), "ab") as f:  # a caption saved as Latin-1
        f.write('{"file_name": "000000.png", "text": "a caf\u00e9 circle"}\n'.encode("latin-1"))
    _copy_images(train, os.path.join(t, "missing_image_data"), 8, 0)
    os.remove(os.path.join(t, "missing_image_data", "000003.png"))  # named in metadata.jsonl, not there
    shutil.copytree(os.path.join(toy_world, "models/sd"), os.path.join(t, "teacher"))
    _copy_images(train, os.path.join(t, "outer", "data"), 4, 0)
    (root / "outer" / "prompts.txt").write_text("a red circle\n")
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
    for name, part in [("teacher_te_cut", "text_encoder/model.safetensors"),
                       ("teacher_unet_cut", "unet/diffusion_pytorch_model.safetensors"),
                       ("teacher_scheduler_cut", "scheduler/scheduler_config.json"), ("merge_base", None),
                       ("flux_vae_cut", "vae/diffusion_pytorch_model.safetensors")]:
        model = "flux" if name.startswith("flux") else "sd"
        shutil.copytree(os.path.join(toy_world, "models", model), os.path.join(t, name))
        if part:
            data = (root / name / part).read_bytes()
            (root / name / part).write_bytes(data[: len(data) // 2])
    _copy_images(train, os.path.join(t, "null_caption_data"), 4, 0)
    with open(os.path.join(t, "null_caption_data", "metadata.jsonl"), "a") as f:  # a row without, one with null
        f.write('{"file_name": "000000.png"}\n{"file_name": "000001.png", "text": null}\n')
    shutil.copy(os.path.join(t, "sd_lora.safetensors"), os.path.join(t, "lora_copy.safetensors"))
    os.makedirs(os.path.join(t, "run", "checkpoint-1"))  # a LoRA run's folder: its LoRA, a checkpoint
    shutil.copy(os.path.join(t, "sd_lora.safetensors"), os.path.join(t, "run", "pytorch_lora_weights.safetensors"))
    (root / "run" / "checkpoint-1" / "training_state.json").write_text('{"epoch": 0, "batches_in_epoch": 1}')
    (root / "notes.txt").write_text("a user's notes\n")
    (root / "user_folder").mkdir()
    (root / "user_folder" / "README.md").write_text("a user's own read-me\n")
    return t


def _tree(folder: str) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime)} of every file and folder under `folder`: what a failed command must leave as it was."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            info = os.stat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), folder)] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.mark.parametrize("entry, case, flags, needle", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(toy_world, assets, tmp_path, entry, case, flags, needle):
    out = str(tmp_path / "out")
    before = _tree(assets)
    run = run_command(command(entry, flags, assets, toy_world, out))
    code, stderr = run.returncode, run.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr[-3000:]
    assert not os.path.exists(out), os.listdir(out) if os.path.isdir(out) else out  # not even an empty folder
    assert _tree(assets) == before  # no input, no user's file touched (nor a marker left in a folder it refused)


@pytest.mark.parametrize("entry, case, flags, needle", TOLERATED, ids=[f"{c[0]}-{c[1]}" for c in TOLERATED])
def test_tolerated_input_warns_and_runs(toy_world, assets, tmp_path, entry, case, flags, needle):
    out = str(tmp_path / "out")
    run = run_command(command(entry, flags, assets, toy_world, out))
    code, stdout, stderr = run.returncode, run.stdout, run.stderr
    assert code == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "warning" in line.lower() and needle in line]
    assert warnings, (stdout + stderr)[-3000:]  # on stderr, with the errors: stdout may be kept in a log file
    assert "warning" not in stdout.lower(), stdout[-3000:]
    assert os.listdir(out)  # the run wrote its outputs


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch, tmp_path):
    """No GPU here: pretend to be one without bf16; the training flags and the --dtype of inference.py and
    utils.evaluate (utils.eval_sampling.resolve_dtype) both refuse it."""
    from utils import flags
    from utils.eval_sampling import resolve_dtype
    from utils.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    parser = flags.Parser()
    parser.add_training_args()
    args = parser.parse_args(["--output_dir", str(tmp_path / "out"), "--mixed_precision", "bf16"])
    with pytest.raises(SystemExit) as info:
        flags.check_training_args(args)
    assert info.value.code == 2 and not os.path.exists(tmp_path / "out")
    with pytest.raises(UserError, match="bf16"):
        resolve_dtype("bf16", "flux", torch.device("cuda"))


def test_xformers_request_without_cuda_warns_and_keeps_sdpa(caplog, monkeypatch):
    from utils import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    class Model(torch.nn.Module):
        def enable_xformers_memory_efficient_attention(self):
            raise AssertionError("must not be called without CUDA")

    with caplog.at_level("WARNING"):
        models.enable_xformers(Model(), True)
    assert "--enable_xformers_memory_efficient_attention" in caplog.text and "SDPA" in caplog.text


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, capsys):
    """Two good steps, then the loss turns NaN for good: the updates are skipped (the LR schedule does not
    advance), and --max_nan_steps (3) in a row end the run with exit 2 and a line naming the flag; the weights
    and the last checkpoint are those of step 2."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from utils import checkpoint, flags, loop

    parser = flags.Parser()
    parser.add_training_args()
    args = parser.parse_args(["--output_dir", str(tmp_path), "--max_train_steps", "10", "--checkpointing_steps", "1",
                              "--validation_steps", "100", "--max_nan_steps", "3", "--max_grad_norm", "1.0",
                              "--train_batch_size", "1", "--report_to", "none"])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
        params = list(model.parameters())
        batches = [{"captions": ["a red circle"], "num_skipped": 0}] * 10
        calls, weights = 0, {}
        train = loop.TrainLoop(accelerator, batches, args.max_train_steps, args, "nan", schedule)
        with pytest.raises(SystemExit) as info:
            for _batch in train:  # a recipe's loop
                calls += 1
                with accelerator.accumulate(model):
                    loss = model(torch.ones(1, 2)).sum() ** 2 * (1.0 if calls <= 2 else float("nan"))
                    updated = loop.apply_gradients(accelerator, loss, params, optimizer, schedule, args.max_grad_norm)
                if not train.step_done(loss, updated):
                    continue
                weights[calls] = [p.detach().clone() for p in params]
                if train.checkpoint_due:
                    train.save_checkpoint()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("error: 3 consecutive non-finite steps (--max_nan_steps)")
    assert calls == 5 and list(weights) == [1, 2] and train.global_step == 2  # 2 updates, then 3 skipped ones
    assert schedule.scheduler.last_epoch == 2  # the LR schedule stepped on the applied updates only
    assert all(torch.equal(p, w) for p, w in zip(params, weights[2]))
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(str(tmp_path))] == ["checkpoint-1", "checkpoint-2"]


def test_fewer_webdataset_shards_than_processes_is_refused(toy_world):
    """Each process streams whole shards: with fewer shards than processes one would get no data and wait forever."""
    import argparse
    from types import SimpleNamespace

    from utils import loop
    from utils.errors import UserError

    shard = os.path.join(toy_world, "data/shards/shard-000000.tar")
    args = argparse.Namespace(dataset_name=None, train_data_dir=None, train_shards_path_or_url=shard,
                              image_column="image", caption_column="text", max_train_samples=None, cache_dir=None,
                              seed=0, resolution=32, center_crop=False, random_flip=False, train_batch_size=2,
                              dataloader_num_workers=0, max_train_steps=2, num_train_epochs=1,
                              gradient_accumulation_steps=1)
    with pytest.raises(UserError, match=r"\(--train_shards_path_or_url\)"):
        loop.make_train_data(args, SimpleNamespace(num_processes=2))
    assert loop.make_train_data(args, SimpleNamespace(num_processes=1))[1] == 2


# one row per entry point, also run as a plain `python ...` command line: the in-process runs must match them
REAL = ["sd-missing-model", "lora-wrong-architecture", "tlcm-resolution", "infer-lora-truncated",
        "convert-output-not-writable", "eval-steps-1001"]


@pytest.mark.slow
def test_in_process_runs_match_real_command_lines(toy_world, assets, tmp_path):
    rows = {f"{r[0]}-{r[1]}": r for r in CASES}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def real(key):
        entry, case, flags, _ = rows[key]
        out = str(tmp_path / "real" / key)
        proc = subprocess.run([sys.executable, *command(entry, flags, assets, toy_world, out)], capture_output=True,
                              text=True, cwd=ROOT, env=env, timeout=600)
        return proc.returncode, proc.stderr.replace(out, "{OUT}")

    with ThreadPoolExecutor(2) as pool:
        real_runs = pool.map(real, REAL)
        for key in REAL:  # meanwhile, in this process
            entry, case, flags, _ = rows[key]
            out = str(tmp_path / "here" / key)
            here = run_command(command(entry, flags, assets, toy_world, out))
            assert next(real_runs) == (here.returncode, here.stderr.replace(out, "{OUT}")), key
