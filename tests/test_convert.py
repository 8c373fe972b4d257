"""convert_lora.py on the toy world: exact format round trips, equal samples, merging, checkpoint export, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_lora
from utils import lora, lora_files

RANK = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(toy_world: str, name: str = "sd"):
    """A fresh toy denoiser (UNet, or FLUX transformer) in eval mode."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    folder = os.path.join(toy_world, "models", name)
    if name.startswith("flux"):
        return FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


@torch.no_grad()
def _out(model) -> torch.Tensor:
    """The denoiser's output on a fixed input."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    if hasattr(cfg, "joint_attention_dim"):  # FLUX
        return model(hidden_states=torch.randn(1, 4, cfg.in_channels, generator=g),
                     encoder_hidden_states=torch.randn(1, 3, cfg.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                     timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3),
                     return_dict=False)[0]
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    return model(torch.randn(1, cfg.in_channels, 8, 8, generator=g), torch.tensor([500]),
                 torch.randn(1, 5, cfg.cross_attention_dim, generator=g), return_dict=False, **kwargs)[0]


def _adapted(toy_world: str, name: str = "sd", alpha: float = 8.0, rank: int = RANK, seed: int = 0):
    """A toy denoiser with a random (non-zero) LoRA on the recipes' target list."""
    torch.manual_seed(seed)
    model = _model(toy_world, name)
    targets = lora.FLUX_LORA_TARGETS if name.startswith("flux") else lora.LCM_LORA_TARGETS
    lora.add_lora(model, rank, alpha, targets, init=False)
    return model


@pytest.fixture(scope="module")
def sources(toy_world, tmp_path_factory):
    """One LoRA of the toy SD UNet in the three formats as the recipe writes them (alpha 8), plus a kohya-style
    LoRA with alpha 1 (kohya's usual, so diffusers / PEFT must fold the scale)."""
    root = tmp_path_factory.mktemp("sources")
    lora_files.save_lora_outputs(_adapted(toy_world), str(root / "recipe"), "unet")
    one = _adapted(toy_world, alpha=1.0, seed=1)
    save_file(lora_files.to_kohya(lora.lora_state_dict(one), 1.0), str(root / "alpha1.safetensors"))
    return {"diffusers": str(root / "recipe" / lora_files.DIFFUSERS_WEIGHTS_NAME), "peft": str(root / "recipe" / "unet"),
            "kohya": str(root / "recipe" / lora_files.KOHYA_WEIGHTS_NAME), "alpha1": str(root / "alpha1.safetensors")}


def cli(*argv: str) -> None:
    convert_lora.main([str(a) for a in argv])


def convert(src: str, fmt: str, out: str, base: str) -> str:
    cli("convert", src, "--to", fmt, "--base_model", base, "--output_path", out)
    return out


def tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file, or of a PEFT folder's weights file."""
    return load_file(os.path.join(path, lora_files.PEFT_WEIGHTS_NAME) if os.path.isdir(path) else path)


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:3]


def out_name(fmt: str, tmp, tag: str) -> str:
    return str(tmp / (tag if fmt == "peft" else f"{tag}.safetensors"))


# ----------------------------------------------------------------------------- convert


@pytest.mark.parametrize("src, via", [("diffusers", "kohya"), ("peft", "kohya"), ("kohya", "diffusers"),
                                      ("kohya", "peft"), ("diffusers", "peft"), ("peft", "diffusers"),
                                      ("alpha1", "diffusers"), ("alpha1", "peft")])
def test_round_trips_give_identical_tensors(toy_world, sources, tmp_path, src, via):
    base = os.path.join(toy_world, "models/sd")
    back_fmt = "kohya" if src == "alpha1" else src
    mid = convert(sources[src], via, out_name(via, tmp_path, "mid"), base)
    back = convert(mid, back_fmt, out_name(back_fmt, tmp_path, "back"), base)
    assert_identical(tensors(back), tensors(sources[src]))
    if back_fmt == "peft":
        got, want = (json.load(open(os.path.join(p, "adapter_config.json"))) for p in (back, sources[src]))
        assert (got["r"], got["lora_alpha"], got["rank_pattern"]) == (want["r"], want["lora_alpha"], want["rank_pattern"])
        assert set(got["target_modules"]) == set(want["target_modules"]) == set(lora.LCM_LORA_TARGETS)
    if src == "alpha1":  # the folded copy says where its scale went, and the diffusers file itself is plain
        with safe_open(mid if via != "peft" else os.path.join(mid, lora_files.PEFT_WEIGHTS_NAME), "pt") as f:
            assert lora_files.ALPHAS_METADATA_KEY in f.metadata()


def _sample(toy_world: str, path: str, loader: str = "ours") -> torch.Tensor:
    """A 2-step LCM sample of the toy SD pipeline with the LoRA loaded (fixed seed)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(toy_world, "models/sd"))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if loader == "diffusers":
        pipe.load_lora_weights(path)
    else:
        lora_files.load_lora_file(path, pipe.unet)
    return pipe("a large red circle on a white background", num_inference_steps=2, guidance_scale=1.0,
                height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(3)).images


def test_converted_loras_sample_exactly_like_the_original(toy_world, sources, tmp_path):
    base = os.path.join(toy_world, "models/sd")
    want = _sample(toy_world, sources["alpha1"])
    for fmt in ("diffusers", "peft"):
        got = _sample(toy_world, convert(sources["alpha1"], fmt, out_name(fmt, tmp_path, fmt), base))
        assert torch.equal(got, want), fmt
    # what other tools see: diffusers' own loader on the folded file (scale 1), equal up to float rounding
    folder = convert(sources["alpha1"], "diffusers", str(tmp_path / "folder"), base)
    assert os.path.basename(lora_files.find_lora_file(folder)) == lora_files.DIFFUSERS_WEIGHTS_NAME
    assert torch.allclose(_sample(toy_world, folder, loader="diffusers"), want, atol=1e-5)
    recipe = _sample(toy_world, sources["diffusers"])
    assert torch.equal(_sample(toy_world, convert(sources["diffusers"], "kohya", str(tmp_path / "k"), base)), recipe)
    assert not torch.allclose(recipe, want, atol=1e-3)  # the two source LoRAs really differ


def test_flux_lora_uses_lora_transformer_keys_and_round_trips(toy_world, tmp_path):
    base = os.path.join(toy_world, "models/flux")
    model = _adapted(toy_world, "flux")
    lora_files.save_diffusers_lora(model, str(tmp_path / "src"), component="transformer")
    src = str(tmp_path / "src" / lora_files.DIFFUSERS_WEIGHTS_NAME)
    kohya = convert(src, "kohya", str(tmp_path / "k.safetensors"), base)
    assert all(k.startswith("lora_transformer_") for k in tensors(kohya))
    assert_identical(tensors(convert(kohya, "diffusers", str(tmp_path / "d.safetensors"), base)), tensors(src))
    peft = convert(kohya, "peft", str(tmp_path / "p"), base)
    assert set(json.load(open(os.path.join(peft, "adapter_config.json")))["target_modules"]) == set(lora.FLUX_LORA_TARGETS)
    fresh = _model(toy_world, "flux")
    lora_files.load_lora_file(peft, fresh)
    assert torch.equal(_out(fresh), _out(model))

    # merge --denoiser_only: the transformer folder alone
    cli("merge", kohya, "--base_model", base, "--output_dir", tmp_path / "merged", "--denoiser_only")
    from diffusers import FluxTransformer2DModel

    merged = FluxTransformer2DModel.from_pretrained(str(tmp_path / "merged")).eval()
    assert torch.allclose(_out(merged), _out(model), atol=1e-5)


# ----------------------------------------------------------------------------- merge


def test_merged_pipeline_equals_base_plus_adapter(toy_world, sources, tmp_path):
    from diffusers import DiffusionPipeline

    base = os.path.join(toy_world, "models/sd")
    out = tmp_path / "merged"
    cli("merge", sources["alpha1"], "--base_model", base, "--output_dir", out)
    pipe = DiffusionPipeline.from_pretrained(str(out))
    adapted = _model(toy_world)
    lora_files.load_lora_file(sources["alpha1"], adapted)
    want = _out(adapted)
    assert not lora.has_lora(pipe.unet) and torch.allclose(_out(pipe.unet.eval()), want, atol=1e-5)
    assert not torch.allclose(_out(_model(toy_world)), want, atol=1e-3)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left


# ----------------------------------------------------------------------------- from-checkpoint


def _train(recipe: str, teacher: str, out: str, *extra: str) -> None:
    """A 2-step run of a recipe (in this process) on the toy world, a checkpoint at every step, no validation grid."""
    run_recipe(recipe, ["--pretrained_teacher_model", teacher, "--train_data_dir",
                        os.path.join(os.path.dirname(os.path.dirname(teacher)), "data/train"), "--output_dir", out,
                        "--resolution", "32", "--train_batch_size", "2", "--max_train_samples", "8", "--w_min", "2",
                        "--w_max", "6", "--validation_steps", "1000", "--validation_prompts", "--report_to", "none",
                        "--max_train_steps", "2", "--checkpointing_steps", "1", "--lr_warmup_steps", "0", *extra])


def test_lora_checkpoint_exports_exactly_the_recipes_final_files(toy_world, tmp_path):
    teacher = os.path.join(toy_world, "models/sdxl")
    run = str(tmp_path / "run")
    _train("train_lcm_distill_lora_sdxl.py", teacher, run, "--lora_rank", "2", "--learning_rate", "1e-2")
    out = str(tmp_path / "export")
    cli("from-checkpoint", os.path.join(run, "checkpoint-2"), "--base_model", teacher, "--output_dir", out)
    for name in (lora_files.DIFFUSERS_WEIGHTS_NAME, lora_files.KOHYA_WEIGHTS_NAME,
                 os.path.join("unet", lora_files.PEFT_WEIGHTS_NAME), os.path.join("scheduler", "scheduler_config.json")):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(run, name), "rb").read(), name
    got, want = (json.load(open(os.path.join(d, "unet", "adapter_config.json"))) for d in (out, run))
    got["target_modules"], want["target_modules"] = set(got["target_modules"]), set(want["target_modules"])
    assert got == want
    # an earlier checkpoint exports too, and holds other weights
    cli("from-checkpoint", os.path.join(run, "checkpoint-1"), "--base_model", teacher, "--output_dir", tmp_path / "e1")
    first = tensors(str(tmp_path / "e1" / lora_files.KOHYA_WEIGHTS_NAME))
    assert any(not torch.equal(v, tensors(os.path.join(out, lora_files.KOHYA_WEIGHTS_NAME))[k]) for k, v in first.items())


def test_full_checkpoint_exports_the_recipes_student_pipeline(toy_world, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    teacher = os.path.join(toy_world, "models/sd")
    run = str(tmp_path / "run")
    _train("train_lcm_distill_sd.py", teacher, run, "--learning_rate", "1e-3")
    ckpt = os.path.join(run, "checkpoint-2")
    cli("from-checkpoint", ckpt, "--base_model", teacher, "--output_dir", tmp_path / "pipe")
    want = UNet2DConditionModel.from_pretrained(run, subfolder="unet").state_dict()
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert_identical(pipe.unet.state_dict(), want)
    assert dict(pipe.scheduler.config) == dict(DiffusionPipeline.from_pretrained(run).scheduler.config)

    cli("from-checkpoint", ckpt, "--base_model", teacher, "--output_dir", tmp_path / "unet", "--denoiser_only")
    assert_identical(UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).state_dict(), want)
    cli("from-checkpoint", ckpt, "--base_model", teacher, "--output_dir", tmp_path / "ema", "--denoiser_only", "--ema")
    ema = UNet2DConditionModel.from_pretrained(str(tmp_path / "ema")).state_dict()
    target = torch.load(os.path.join(ckpt, "custom_checkpoint_0.pkl"), weights_only=True)
    assert_identical(ema, dict(target))
    assert any(not torch.equal(ema[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(toy_world, sources, tmp):
    """(argv, stderr needle) pairs that must each end as one line, exit 2, nothing written."""
    sd = os.path.join(toy_world, "models/sd")
    (tmp / "lora.bin").write_bytes(b"not safetensors")
    data = open(sources["diffusers"], "rb").read()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    sdxl = _adapted(toy_world, "sdxl")
    save_file(lora_files.to_kohya(lora.lora_state_dict(sdxl), 8.0), str(tmp / "sdxl.safetensors"))
    sd_ = tensors(sources["kohya"])
    key = next(k for k in sd_ if k.endswith("lora_up.weight") and sd_[k].ndim == 2)
    sd_[key] = sd_[key][:, : RANK - 1].contiguous()
    save_file(sd_, str(tmp / "rank.safetensors"))
    (tmp / "taken").mkdir()
    out = str(tmp / "out.safetensors")
    conv = ["convert", "--base_model", sd, "--output_path", out, "--to", "kohya"]
    return [
        (conv + [str(tmp / "lora.bin")], "not a .safetensors"),
        (conv + [str(tmp / "cut.safetensors")], "truncated or corrupt"),
        (conv + [str(tmp / "sdxl.safetensors")], "another architecture"),
        (conv + [str(tmp / "rank.safetensors")], "rank"),
        (conv + [str(tmp / "missing.safetensors")], "does not exist"),
        (["convert", sources["kohya"], "--base_model", str(tmp / "nobase"), "--output_path", out, "--to", "kohya"],
         "--base_model"),
        (["convert", sources["kohya"], "--base_model", sd, "--output_path", out, "--to", "ckpt"], "invalid choice"),
        (["convert", sources["kohya"], "--base_model", sd, "--output_path", str(tmp / "taken"), "--to", "peft"],
         "already exists"),
        (["merge", str(tmp / "sdxl.safetensors"), "--base_model", sd, "--output_dir", str(tmp / "m")],
         "another architecture"),
        (["from-checkpoint", str(tmp / "taken"), "--base_model", sd, "--output_dir", str(tmp / "c")], "checkpoint"),
    ]


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(toy_world, sources, tmp_path, capfd):
    """In this process: an exception other than SystemExit(2) would fail the test, so there is no traceback;
    capfd sees whatever the libraries print too."""
    cases = _bad_inputs(toy_world, sources, tmp_path)
    before = sorted(os.listdir(tmp_path))
    for argv, needle in cases:
        capfd.readouterr()
        with pytest.raises(SystemExit) as info:
            cli(*argv)
        err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (argv, err)
        assert sorted(os.listdir(tmp_path)) == before, argv


def test_help_explains_every_subcommand(capsys):
    for command, flags in [("convert", ["--to", "--output_path", "--base_model"]),
                           ("merge", ["--denoiser_only", "--save_dtype", "--output_dir"]),
                           ("from-checkpoint", ["--lora_alpha", "--lora_target_modules", "--ema"])]:
        with pytest.raises(SystemExit) as info:
            cli(command, "--help")
        text = capsys.readouterr().out
        assert info.value.code == 0 and all(flag in text for flag in flags), command
