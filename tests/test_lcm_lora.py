"""train_lcm_distill_lora_sdxl.py on the toy SDXL and SD teachers: outputs load everywhere, teacher = base UNet.

Runs go in-process (helpers.run_recipe); the kill-and-resume test is the one real `python ...` command line.
The loss is checked by direct calls of the recipe's lcm_lora_loss on the toy SDXL teacher.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import import_script, kill_while_saving, listing, run_recipe, unet_output

from utils import lora_distill

SCRIPT = "train_lcm_distill_lora_sdxl.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def arguments(world: str, teacher: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_teacher_model", os.path.join(world, "models", teacher),
            "--train_data_dir", os.path.join(world, "data/train"), "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "4", "--max_train_samples", "32", "--lora_rank", "4", "--w_min", "2",
            "--w_max", "6", "--validation_steps", "1000", "--report_to", "none", *extra]


def run(world: str, teacher: str, out: str, *extra: str, check: bool = True):
    return run_recipe(SCRIPT, arguments(world, teacher, out, *extra), check=check)


@pytest.fixture(scope="module")
def sdxl_run(toy_world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "sdxl")
    run(toy_world, "sdxl", out, "--max_train_steps", "3", "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2", "--learning_rate", "1e-2")
    return out


def test_outputs_load_through_diffusers_peft_and_kohya_with_equal_results(toy_world, sdxl_run):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import PeftModel

    from utils import lora_files

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
    lora_files.load_lora_file(os.path.join(sdxl_run, "lora_kohya.safetensors"), kohya_unet)
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
    from utils import models

    recipe = import_script(SCRIPT)
    args = recipe.parse_args(["--pretrained_teacher_model", "x", "--output_dir", str(tmp_path),
                              "--resolution", "32"])
    tokenizers, encoders = models.load_text_encoders(os.path.join(toy_world, "models/sdxl"), "sdxl")
    batch = {"captions": ["a red circle"], "original_sizes": [(48, 32)], "crop_top_lefts": [(8, 0)]}
    cond = lora_distill.conditioning(args, "sdxl", batch, tokenizers, encoders)
    assert cond.added["time_ids"].tolist() == [[48.0, 32.0, 8.0, 0.0, 32.0, 32.0]]


# ------------------------------------------------------------------------------ the loss, called directly
@pytest.fixture(scope="module")
def sdxl(toy_world, tmp_path_factory):
    """The toy SDXL UNet with a rank-4 LoRA whose lora_B is random (a trained student), the teacher's conditioning
    of a 2-image batch (original size 48 high x 32 wide, cropped at top 8), the recipe's uncond, random latents."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from utils import lora, models
    from utils.consistency import LCMSchedule

    recipe = import_script(SCRIPT)
    path = os.path.join(toy_world, "models/sdxl")
    args = recipe.parse_args(arguments(toy_world, "sdxl", str(tmp_path_factory.mktemp("lcm_lora"))))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False)
    torch.manual_seed(0)  # lora_A's initialisation
    lora.add_trainable_lora(unet, 4, args.lora_alpha, args.lora_targets)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tokenizers, encoders = models.load_text_encoders(path, "sdxl")
    batch = {"captions": ["a red circle", "a blue square"], "original_sizes": [(48, 32)] * 2,
             "crop_top_lefts": [(8, 0)] * 2}
    with torch.no_grad():
        cond = lora_distill.teacher_conditioning(args, "sdxl", batch, tokenizers, encoders, "cpu")
    teacher = models.Teacher("sdxl", {}, None, tokenizers, encoders, None, torch.float32, zeros_for_empty_prompt=True)
    uncond = lora_distill.teacher_uncond(args, teacher)  # --uncond auto, the default: zeros for this SDXL pipeline
    assert not uncond.added["text_embeds"].any() and not uncond.embeds.any()
    noise_schedule = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    schedule = LCMSchedule.of_teacher(noise_schedule.alphas_cumprod, args.num_ddim_timesteps,
                                      noise_schedule.config.prediction_type)
    return dict(recipe=recipe, args=args, unet=unet, cond=cond, uncond=uncond, path=path, schedule=schedule,
                latents=torch.randn(2, 4, 8, 8, generator=g))


def lora_loss(r, seed=0, args=None, unet=None):
    """The recipe's loss on the fixed batch; the same seed draws the same t, w and noise."""
    return r["recipe"].lcm_lora_loss(unet or r["unet"], r["latents"], r["cond"], r["uncond"], r["schedule"],
                                     args or r["args"], torch.Generator().manual_seed(seed))


def test_teacher_pass_of_the_loss_is_the_base_unet_with_h_w_top_left_h_w_time_ids(sdxl, monkeypatch):
    """The loss's first UNet call (cond + uncond, batched) computes the base UNet: the LoRA is off; its time ids
    are (orig h, orig w, crop top, crop left, target h, target w) of each image. The student's call has it on."""
    from diffusers import UNet2DConditionModel

    unet, calls = sdxl["unet"], []
    forward = unet.forward

    def recording(x, t, encoder_hidden_states, added_cond_kwargs=None, **kwargs):
        out = forward(x, t, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kwargs)
        calls.append((x.detach(), t, encoder_hidden_states.detach(), added_cond_kwargs, out.sample.detach()))
        return out
    monkeypatch.setattr(unet, "forward", recording)
    lora_loss(sdxl)
    base = UNet2DConditionModel.from_pretrained(sdxl["path"], subfolder="unet")
    (x, t, embeds, added, teacher_out), *_, (xs, ts, es, added_s, student_out) = calls
    assert len(x) == 2 * len(sdxl["latents"])  # cond and uncond in one pass
    with torch.no_grad():
        assert torch.equal(teacher_out, base(x, t, embeds, added_cond_kwargs=added).sample)
        assert not torch.allclose(student_out, base(xs, ts, es, added_cond_kwargs=added_s).sample, atol=1e-4)
    assert added["time_ids"][:2].tolist() == [[48.0, 32.0, 8.0, 0.0, 32.0, 32.0]] * 2


def test_teacher_uncond_branch_has_the_images_own_time_ids(sdxl, monkeypatch):
    """As diffusers' SDXL pipeline samples CFG (negative time ids default to the image's), and as the loss says."""
    unet, calls = sdxl["unet"], []
    forward = unet.forward

    def recording(*args, added_cond_kwargs=None, **kwargs):
        calls.append(added_cond_kwargs["time_ids"].clone())
        return forward(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)
    monkeypatch.setattr(unet, "forward", recording)
    with torch.no_grad():
        lora_loss(sdxl)
    assert calls[0].tolist() == [[48.0, 32.0, 8.0, 0.0, 32.0, 32.0]] * 4


def test_batched_and_two_pass_teacher_cfg_give_the_same_loss(sdxl):
    two_pass = copy.copy(sdxl["args"])
    two_pass.batched_teacher_cfg = False
    for seed in range(3):
        with torch.no_grad():
            batched, separate = lora_loss(sdxl, seed), lora_loss(sdxl, seed, args=two_pass)
        assert torch.allclose(batched, separate, rtol=1e-5, atol=1e-7), (seed, batched, separate)


def test_lora_loss_decreases_on_a_fixed_batch(sdxl):
    """A few AdamW steps on the LoRA alone (the base UNet frozen) lower the loss of a fixed draw."""
    unet = copy.deepcopy(sdxl["unet"])
    params = [p for p in unet.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in unet.named_parameters() if p.requires_grad)
    frozen = {n: p.clone() for n, p in unet.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(10):
        loss = lora_loss(sdxl, unet=unet)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert all(torch.equal(p, frozen[n]) for n, p in unet.named_parameters() if n in frozen)


def test_same_script_trains_an_sd1_teacher(toy_world, tmp_path):
    out = str(tmp_path / "sd")
    done = run(toy_world, "sd", out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    # rank 4 with the default alpha 8: the scale and what it does to the step size, logged (stderr) as training starts
    assert "LoRA scale = --lora_alpha / --lora_rank = 8 / 4 = 2" in done.stderr, done.stderr[-2000:]
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
    proc = run_recipe(SCRIPT, ["--pretrained_teacher_model", os.path.join(toy_world, "models/flux"),
                               "--train_data_dir", os.path.join(toy_world, "data/train"), "--output_dir",
                               str(tmp_path / "o"), "--max_train_steps", "1", "--report_to", "none"], check=False)
    assert proc.returncode == 2 and "--pretrained_teacher_model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", [SCRIPT, "train_tcd_lora.py"])
def test_killed_run_with_ema_target_resumes_to_the_same_lora(toy_world, tmp_path, monkeypatch, script):
    """SIGKILL (a real process) while writing checkpoint-4 (EMA target on); resume from checkpoint-2; equal to an
    uninterrupted run (the straight and resumed runs in-process: they must also match the real one). The same for
    the TCD recipe, whose loss draws its target times from the same checkpointed stream."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the killed process computes on one thread, as this one does
    from safetensors.torch import load_file

    args = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--ema_decay", "0.9", "--lr_scheduler", "cosine",
            "--lr_warmup_steps", "0", "--learning_rate", "1e-3"]
    straight = str(tmp_path / "straight")
    run_recipe(script, arguments(toy_world, "sd", straight, *args))
    crashed = str(tmp_path / "crashed")
    kill_while_saving(script, arguments(toy_world, "sd", crashed, *args),
                      os.path.join(crashed, "checkpoint-4.partial"))
    assert sorted(d for d in os.listdir(crashed) if d.startswith("checkpoint-") and "." not in d) == ["checkpoint-2"]
    run_recipe(script, arguments(toy_world, "sd", crashed, *args, "--resume_from_checkpoint", "latest"))
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
    from utils import lora_files
    from utils.errors import UserError

    for path in (out, os.path.join(out, "lora_kohya.safetensors")):  # convert_lora.py: UNet LoRAs only, one line
        with pytest.raises(UserError, match="text-encoder LoRA"):
            lora_files.read_lora(path, pipe.unet)


def test_inference_loads_a_text_encoder_lora_into_the_encoders_too(toy_world, sdxl_encoder_run, tmp_path):
    """inference.py on the output of --train_text_encoder_lora: the UNet and both encoders carry the LoRA as diffusers'
    load_lora_weights puts it there, from the diffusers or the kohya file, fused or not; scale 0 is the base model."""
    import inference
    from diffusers import StableDiffusionXLPipeline
    from helpers import run_command, unet_output

    out, base_path = sdxl_encoder_run, os.path.join(toy_world, "models/sdxl")
    names = ["text_encoder", "text_encoder_2"]

    def outputs(pipe):
        return [encoder_output(getattr(pipe, n)) for n in names] + [unet_output(pipe.unet)]

    base = outputs(StableDiffusionXLPipeline.from_pretrained(base_path))
    reference = StableDiffusionXLPipeline.from_pretrained(base_path)
    reference.load_lora_weights(out)
    want = outputs(reference)
    kohya = os.path.join(out, "lora_kohya.safetensors")
    for path, fuse, scale, expected in ((out, True, 1.0, want), (kohya, False, 1.0, want), (out, True, 0.0, base)):
        pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
        lora_file = inference.resolve_lora_file(path)
        inference.check_lora(lora_file, base_path)
        (fmt,) = inference.load_loras(pipe, pipe.unet, [(lora_file, scale)], fuse)
        assert fmt == ("kohya" if path == kohya else "diffusers")
        for got, ref in zip(outputs(pipe), expected):
            assert torch.allclose(got, ref, atol=1e-5), (path, fuse, scale)
    run = run_command(["inference.py", "--base_model_path", base_path, "--lora_path", out, "--infer-steps", "2",
                       "--output_dir", str(tmp_path / "images"), "--quiet"])
    assert run.returncode == 0 and len(listing(tmp_path / "images")) == 1, run.stderr[-2000:]


def test_a_checkpoint_exports_the_text_encoders_lora_too(toy_world, sdxl_encoder_run, tmp_path):
    """convert_lora.py from-checkpoint on the last checkpoint of a --train_text_encoder_lora run writes the recipe's
    final files, the encoders' PEFT folders and the text-encoder keys of the diffusers and kohya files included."""
    import json

    from helpers import run_command

    out = str(tmp_path / "export")
    run = run_command(["convert_lora.py", "from-checkpoint", os.path.join(sdxl_encoder_run, "checkpoint-2"),
                       "--base_model", os.path.join(toy_world, "models/sdxl"), "--output_dir", out])
    assert run.returncode == 0 and "with the LoRA of text_encoder, text_encoder_2" in run.stdout, run.stderr[-2000:]
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors",
                 *(f"{folder}/adapter_model.safetensors" for folder in ("unet", "text_encoder", "text_encoder_2"))):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(sdxl_encoder_run, name), "rb").read()
    for folder in ("text_encoder", "text_encoder_2"):
        got, want = (json.load(open(os.path.join(d, folder, "adapter_config.json"))) for d in (out, sdxl_encoder_run))
        got["target_modules"], want["target_modules"] = set(got["target_modules"]), set(want["target_modules"])
        assert got == want


def test_teacher_conditioning_is_the_base_encoders(toy_world, tmp_path):
    """With encoder LoRAs present the teacher's (and the unconditional) embeddings are exactly the base encoders'."""
    from utils import lora, models

    recipe = import_script(SCRIPT)
    args = recipe.parse_args(["--pretrained_teacher_model", "x", "--output_dir", str(tmp_path), "--resolution", "32",
                              "--train_text_encoder_lora", "--lora_rank", "4"])
    path = os.path.join(toy_world, "models/sdxl")
    tokenizers, encoders = models.load_text_encoders(path, "sdxl")
    batch = {"captions": ["a red circle", ""], "original_sizes": [(32, 32)] * 2, "crop_top_lefts": [(0, 0)] * 2}
    with torch.no_grad():
        want = lora_distill.conditioning(args, "sdxl", batch, tokenizers, encoders)
    lora.add_text_encoder_lora(encoders, True, args.text_encoder_lora_rank, args.lora_alpha)
    for enc in encoders:
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    adapted = lora_distill.conditioning(args, "sdxl", batch, tokenizers, encoders)
    assert adapted.embeds.requires_grad and not torch.allclose(adapted.embeds, want.embeds, atol=1e-4)
    assert not torch.allclose(adapted.added["text_embeds"], want.added["text_embeds"], atol=1e-4)
    teacher = lora_distill.teacher_conditioning(args, "sdxl", batch, tokenizers, encoders, "cpu")
    assert not teacher.embeds.requires_grad and torch.equal(teacher.embeds, want.embeds)
    assert teacher.added.keys() == want.added.keys()
    assert all(torch.equal(teacher.added[k], want.added[k]) for k in want.added)
    args.uncond = "empty"  # the unconditional input: the base encoders' empty prompt too
    uncond = lora_distill.teacher_uncond(args, models.Teacher("sdxl", {}, None, tokenizers, encoders, None, torch.float32))
    assert torch.allclose(uncond.embeds[0], want.embeds[1], atol=1e-5)
    assert torch.allclose(uncond.added["text_embeds"][0], want.added["text_embeds"][1], atol=1e-5)
    again = lora_distill.conditioning(args, "sdxl", batch, tokenizers, encoders)
    assert torch.equal(again.embeds, adapted.embeds)  # the adapters are back on afterwards


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


def test_uncond_auto_is_the_empty_prompt_for_sd_and_zeros_for_sdxl(toy_world, tmp_path):
    from utils import models

    recipe = import_script(SCRIPT)
    for arch in ("sd", "sdxl"):
        path = os.path.join(toy_world, "models", arch)
        args = recipe.parse_args(["--pretrained_teacher_model", path, "--output_dir", str(tmp_path)])
        assert args.uncond == "auto"
        tokenizers, encoders = models.load_text_encoders(path, arch)
        # what load_teacher reads of the toy pipelines: SDXL feeds zeros for an empty negative prompt
        teacher = models.Teacher(arch, {}, None, tokenizers, encoders, None, torch.float32,
                                 zeros_for_empty_prompt=arch == "sdxl")
        uncond = lora_distill.teacher_uncond(args, teacher)
        empty = lora_distill.encode_text(arch, [""], tokenizers, encoders)
        if arch == "sd":  # what SD was trained with as its unconditional input
            assert torch.equal(uncond.embeds, empty[0]) and uncond.embeds.abs().sum() > 0 and uncond.added == {}
        else:  # SDXL pipelines' zeroed negative prompt; the time ids come from each image in the loss
            assert not uncond.embeds.any() and not uncond.added["text_embeds"].any() and set(uncond.added) == {
                "text_embeds"}
        args.uncond = "zeros" if arch == "sd" else "empty"
        other = lora_distill.teacher_uncond(args, teacher)
        assert (not other.embeds.any()) if arch == "sd" else torch.equal(other.embeds, empty[0])


def test_caption_dropout_and_the_training_grid_reach_the_teacher_and_the_saved_scheduler(toy_world, tmp_path,
                                                                                        monkeypatch):
    """--proportion_empty_prompts 1 gives the teacher (and student) only empty prompts; the LoRA folder's
    scheduler is an LCMScheduler on the run's own grid (--num_ddim_timesteps, --timestep_scaling_factor)."""
    from diffusers import LCMScheduler

    seen = []
    original = lora_distill.teacher_conditioning
    monkeypatch.setattr(lora_distill, "teacher_conditioning",
                        lambda args, arch, batch, *a, **k: seen.append(list(batch["captions"])) or original(
                            args, arch, batch, *a, **k))
    out = str(tmp_path / "run")
    run_recipe(SCRIPT, arguments(toy_world, "sdxl", out) + ["--max_train_steps", "2", "--proportion_empty_prompts", "1",
                                                           "--num_ddim_timesteps", "25",
                                                           "--timestep_scaling_factor", "5"])
    assert len(seen) == 2 and all(c == "" for captions in seen for c in captions)
    scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.original_inference_steps == 25 and scheduler.config.timestep_scaling == 5.0
    card = open(os.path.join(out, "README.md")).read()
    assert 'LCMScheduler.from_pretrained("' in card and "original_inference_steps=25" in card
