"""Training of the toy world's VAEs, teachers and judge (run once; the weights are committed).

    python -m utils.toy.train vae_sd          # 4-channel VAE (SD, SDXL)
    python -m utils.toy.train vae_flux        # 16-channel VAE (FLUX)
    python -m utils.toy.train judge           # shape/colour classifier (needs vae_sd)
    python -m utils.toy.train sd              # SD-style eps teacher + its CLIP encoder (needs vae_sd)
    python -m utils.toy.train sdxl            # SDXL-style teacher + two CLIP encoders (needs vae_sd)
    python -m utils.toy.train flux            # FLUX-style flow-matching teacher + T5 + CLIP (needs vae_flux)
    python -m utils.toy.train flux_guidance   # guidance-distilled FLUX variant (needs flux)
    python -m utils.toy.train latent_lpips_sd     # latent LPIPS on 4-channel latents (needs vae_sd, judge)
    python -m utils.toy.train latent_lpips_flux   # latent LPIPS on 16-channel latents (needs vae_flux, judge)

Images are drawn on the fly (an endless stream, so nothing overfits a fixed set; the latent LPIPS
nets draw 2000 reference images once). Every component is saved in fp16 under
`utils/toy/weights/NAME/` as an ordinary diffusers/transformers folder (latent LPIPS: its own
config.json + model.safetensors); `python -m utils.toy build` assembles the pipeline folders from
them. Each run is seeded: the same command reproduces the same weights on the same software stack
(CPU, one thread).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import files
from . import configs
from .data import sample_batch

WEIGHTS = os.environ.get("TOY_WEIGHTS_DIR", os.path.join(os.path.dirname(__file__), "weights"))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_fp16(model, name: str) -> None:
    """Save a diffusers/transformers model in fp16 under weights/NAME (a tmp dir renamed when complete)."""
    with files.atomic_write(os.path.join(WEIGHTS, name)) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
    model.to(torch.float32)


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def optimize(opt: torch.optim.Optimizer, loss: torch.Tensor, params, step: int, bar, clip: float | None = 1.0,
             shown: torch.Tensor | None = None) -> None:
    """One optimizer step (gradient norm clipped to `clip`); every 20 steps show `shown` (or the loss)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    if step % 20 == 0:
        bar.set_postfix(loss=f"{(loss if shown is None else shown).item():.4f}")


# ----------------------------------------------------------------------------------------- VAE
def train_vae(name: str, steps: int, batch: int, lr: float, seed: int, kl_weight: float = 1e-5) -> None:
    from diffusers import AutoencoderKL

    cfg = configs.VAE_FLUX if name == "vae_flux" else configs.VAE_SD
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(**cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        set_lr(opt, cosine_lr(step, steps, lr))
        x = to_tensor(sample_batch(batch, rng)[1])
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + kl_weight * dist.kl().mean()
        optimize(opt, loss, vae.parameters(), step, bar, shown=rec)
    vae.eval()
    # latent statistics set the config's scaling (and for FLUX, shift) so latents are ~N(0, 1)
    with torch.no_grad():
        z = torch.cat([vae.encode(to_tensor(sample_batch(256, rng)[1])).latent_dist.sample() for _ in range(4)])
    if name == "vae_flux":
        shift = z.mean().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / (z - shift).std().item())
    else:
        vae.register_to_config(scaling_factor=1.0 / z.std().item())
    with torch.no_grad():
        x = to_tensor(sample_batch(256, rng)[1])
        err = (vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean().item()
    print(f"{name}: held-out L1 reconstruction error {err:.4f} (pixels in [-1, 1]); config {dict(vae.config)}")
    save_fp16(vae, name)


# ----------------------------------------------------------------------------- text encoders
def tokenizers_dir(name: str) -> str:
    """Build (once) and return the saved toy tokenizer folder: "clip_tokenizer" or "t5_tokenizer"."""
    from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

    path = os.path.join(WEIGHTS, name)
    if not os.path.isdir(path):
        (build_clip_tokenizer() if name == "clip_tokenizer" else build_t5_tokenizer()).save_pretrained(path)
    return path


def new_clip_text_encoder(cfg: dict, tokenizer, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def new_t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      **configs.T5_TEXT)
    return T5EncoderModel(config)


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=configs.MAX_TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def weights_dir(name: str) -> str:
    """The committed folder of one trained component; a clear exit if it was never trained."""
    path = os.path.join(WEIGHTS, name)
    if not os.path.isdir(path):
        raise SystemExit(f"error: toy weights {path} are missing: train them (python -m utils.toy.train --help)")
    return path


def load_weights(cls, name: str):
    return cls.from_pretrained(weights_dir(name), torch_dtype=torch.float32)


# ------------------------------------------------------------------------------------ teachers
@torch.no_grad()
def latent_bank(vae, n: int, seed: int, batch: int = 250):
    """n random scenes encoded once: captions, latent means and stds (the VAE is frozen)."""
    rng = np.random.default_rng(seed)
    captions, means, stds = [], [], []
    for _ in tqdm(range(n // batch), desc="encoding latents", leave=False):
        scenes, images = sample_batch(batch, rng)
        dist = vae.encode(to_tensor(images)).latent_dist
        captions += [s.caption for s in scenes]
        means.append(dist.mean)
        stds.append(dist.std)
    return captions, torch.cat(means), torch.cat(stds)


def ddpm_scheduler():
    """The SD-family training schedule: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)


def train_unet_teacher(name: str, steps: int, batch: int, lr: float, seed: int, bank_size: int = 20000,
                       p_uncond: float = 0.1) -> None:
    """SD-style ("sd") or SDXL-style ("sdxl") eps-prediction teacher, text encoders trained jointly.

    Caption dropout makes classifier-free guidance work: for SD the dropped caption is the empty
    prompt; for SDXL half of the dropped captions are the empty prompt and half are all-zero
    embeddings, so both unconditional conventions (diffusers' SDXL pipeline zeroes them by
    default) are valid for this teacher.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = load_weights(AutoencoderKL, "vae_sd")
    tok = CLIPTokenizer.from_pretrained(tokenizers_dir("clip_tokenizer"))
    sdxl = name == "sdxl"
    if sdxl:
        encoders = [new_clip_text_encoder(configs.CLIP_TEXT_SDXL_1, tok),
                    new_clip_text_encoder(configs.CLIP_TEXT_SDXL_2, tok, with_projection=True)]
        unet = UNet2DConditionModel(**configs.UNET_SDXL)
    else:
        encoders = [new_clip_text_encoder(configs.CLIP_TEXT, tok)]
        unet = UNet2DConditionModel(**configs.UNET_SD)
    scheduler = ddpm_scheduler()
    captions, means, stds = latent_bank(vae, bank_size, seed + 1000)
    ids, empty = token_ids(tok, captions), token_ids(tok, [""])
    scale = vae.config.scaling_factor
    res = configs.RESOLUTION
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)  # (orig h, w, crop top, left, h, w)
    params = list(unet.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        set_lr(opt, cosine_lr(step, steps, lr))
        idx = torch.from_numpy(rng.integers(0, len(captions), batch))
        z0 = (means[idx] + stds[idx] * torch.randn_like(means[idx])) * scale
        drop = torch.from_numpy(rng.random(batch) < p_uncond)
        batch_ids = torch.where(drop[:, None], empty, ids[idx])
        noise = torch.randn_like(z0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        x_t = scheduler.add_noise(z0, noise, t)
        if sdxl:
            h1 = encoders[0](batch_ids, output_hidden_states=True).hidden_states[-2]
            out2 = encoders[1](batch_ids, output_hidden_states=True)
            emb, pooled = torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds
            zero = (drop & torch.from_numpy(rng.random(batch) < 0.5)).float()
            emb, pooled = emb * (1 - zero)[:, None, None], pooled * (1 - zero)[:, None]
            cond = dict(added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(batch, -1)})
        else:
            emb, cond = encoders[0](batch_ids)[0], {}
        pred = unet(x_t, t, emb, **cond).sample
        loss = F.mse_loss(pred, noise)
        optimize(opt, loss, params, step, bar)
    save_fp16(unet, f"{name}_unet")
    for i, enc in enumerate(encoders):
        save_fp16(enc, f"{name}_text_encoder" + (f"_{i + 1}" if sdxl and i else ""))


def flux_ids(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's image-token and text-token position ids for latents shaped like the cached posteriors' means."""
    from diffusers import FluxPipeline

    _, h, w = means.shape[1:]
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    return img_ids, torch.zeros(configs.MAX_TOKENS, 3)


def flux_latents(means: torch.Tensor, stds: torch.Tensor, idx: torch.Tensor, vae_config) -> torch.Tensor:
    """Packed FLUX latents (z - shift) * scale, z drawn from the cached VAE posteriors of the images idx."""
    from diffusers import FluxPipeline

    z0 = ((means[idx] + stds[idx] * torch.randn_like(means[idx])) - vae_config.shift_factor) * vae_config.scaling_factor
    return FluxPipeline._pack_latents(z0, len(idx), *means.shape[1:])


def train_flux_teacher(steps: int, batch: int, lr: float, seed: int, bank_size: int = 20000,
                       p_uncond: float = 0.1) -> None:
    """FLUX-style flow-matching teacher (velocity v = eps - x0), T5 and CLIP encoders trained jointly."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5TokenizerFast

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = load_weights(AutoencoderKL, "vae_flux")
    clip_tok = CLIPTokenizer.from_pretrained(tokenizers_dir("clip_tokenizer"))
    t5_tok = T5TokenizerFast.from_pretrained(tokenizers_dir("t5_tokenizer"))
    clip, t5 = new_clip_text_encoder(configs.CLIP_TEXT, clip_tok), new_t5_encoder(t5_tok)
    transformer = FluxTransformer2DModel(**configs.FLUX_TRANSFORMER)
    captions, means, stds = latent_bank(vae, bank_size, seed + 1000)
    clip_ids, clip_empty = token_ids(clip_tok, captions), token_ids(clip_tok, [""])
    t5_ids, t5_empty = token_ids(t5_tok, captions), token_ids(t5_tok, [""])
    img_ids, txt_ids = flux_ids(means)
    params = list(transformer.parameters()) + list(clip.parameters()) + list(t5.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    bar = tqdm(range(steps), desc="flux")
    for step in bar:
        set_lr(opt, cosine_lr(step, steps, lr))
        idx = torch.from_numpy(rng.integers(0, len(captions), batch))
        x0 = flux_latents(means, stds, idx, vae.config)
        drop = torch.from_numpy(rng.random(batch) < p_uncond)[:, None]
        pooled = clip(torch.where(drop, clip_empty, clip_ids[idx])).pooler_output
        text = t5(torch.where(drop, t5_empty, t5_ids[idx])).last_hidden_state
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(batch))  # logit-normal times, as in SD3/FLUX training
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        v = transformer(hidden_states=x_t, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=text,
                        txt_ids=txt_ids, img_ids=img_ids).sample
        loss = F.mse_loss(v, noise - x0)
        optimize(opt, loss, params, step, bar)
    save_fp16(transformer, "flux_transformer")
    save_fp16(clip, "flux_text_encoder")
    save_fp16(t5, "flux_text_encoder_2")


def train_flux_guidance(steps: int, batch: int, lr: float, seed: int, bank_size: int = 10000,
                        g_range: tuple[float, float] = (1.0, 7.0)) -> None:
    """Guidance distillation: a FLUX.1-dev-like variant that takes the CFG scale as an input.

    Starts from the CFG teacher with a zero-initialised guidance embedder (so it starts equal to
    the unguided teacher) and learns v(x, g) = v_u + g (v_c - v_u) of the teacher in one pass.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = load_weights(AutoencoderKL, "vae_flux")
    teacher = load_weights(FluxTransformer2DModel, "flux_transformer").requires_grad_(False)
    clip = load_weights(CLIPTextModel, "flux_text_encoder").requires_grad_(False)
    t5 = load_weights(T5EncoderModel, "flux_text_encoder_2").requires_grad_(False)
    clip_tok = CLIPTokenizer.from_pretrained(tokenizers_dir("clip_tokenizer"))
    t5_tok = T5TokenizerFast.from_pretrained(tokenizers_dir("t5_tokenizer"))
    student = FluxTransformer2DModel(**dict(teacher.config, guidance_embeds=True))
    missing = student.load_state_dict(teacher.state_dict(), strict=False).missing_keys
    assert all(k.startswith("time_text_embed.guidance_embedder") for k in missing), missing
    torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.weight)
    torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.bias)
    captions, means, stds = latent_bank(vae, bank_size, seed + 2000)
    with torch.no_grad():
        pooled_all = clip(token_ids(clip_tok, captions)).pooler_output
        text_all = t5(token_ids(t5_tok, captions)).last_hidden_state
        pooled_u = clip(token_ids(clip_tok, [""])).pooler_output
        text_u = t5(token_ids(t5_tok, [""])).last_hidden_state
    img_ids, txt_ids = flux_ids(means)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="flux_guidance")
    for step in bar:
        set_lr(opt, cosine_lr(step, steps, lr))
        idx = torch.from_numpy(rng.integers(0, len(captions), batch))
        x0 = flux_latents(means, stds, idx, vae.config)
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(batch))
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        g = torch.empty(batch).uniform_(*g_range)
        with torch.no_grad():
            v = teacher(hidden_states=torch.cat([x_t, x_t]), timestep=torch.cat([sigma, sigma]),
                        pooled_projections=torch.cat([pooled_all[idx], pooled_u.expand(batch, -1)]),
                        encoder_hidden_states=torch.cat([text_all[idx], text_u.expand(batch, -1, -1)]),
                        txt_ids=txt_ids, img_ids=img_ids).sample
            v_c, v_u = v.chunk(2)
            target = v_u + g[:, None, None] * (v_c - v_u)
        pred = student(hidden_states=x_t, timestep=sigma, guidance=g, pooled_projections=pooled_all[idx],
                       encoder_hidden_states=text_all[idx], txt_ids=txt_ids, img_ids=img_ids).sample
        loss = F.mse_loss(pred, target)
        optimize(opt, loss, student.parameters(), step, bar)
    save_fp16(student, "flux_guidance_transformer")


# --------------------------------------------------------------------------------------- judge
def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise, contrast/brightness jitter and small shifts: what imperfect samples look like."""
    b = x.shape[0]
    r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    # random box blur of strength 0..1 (mix with a 3x3 average)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    a = r(b, 1, 1, 1)
    x = (1 - a) * x + a * blurred
    x = x * (1 + 0.2 * (r(b, 1, 1, 1) - 0.5)) + 0.2 * (r(b, 3, 1, 1) - 0.5)
    x = x + 0.15 * r(b, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    shifts = (torch.randint(-2, 3, (2,), generator=gen)).tolist()
    return torch.roll(x, shifts=shifts, dims=(2, 3)).clamp(-1.2, 1.2)


def train_judge(steps: int, batch: int, lr: float, seed: int) -> None:
    """Shape/colour classifier on real images, their VAE reconstructions, and augmented copies."""
    from diffusers import AutoencoderKL

    from .judge import ToyJudge

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    vaes = [load_weights(AutoencoderKL, "vae_sd"), load_weights(AutoencoderKL, "vae_flux")]
    judge = ToyJudge(**configs.JUDGE)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    bar = tqdm(range(steps), desc="judge")
    for step in bar:
        set_lr(opt, cosine_lr(step, steps, lr))
        scenes, images = sample_batch(batch, rng)
        x = to_tensor(images)
        half = batch // 2
        with torch.no_grad():  # half of each batch goes through a VAE round trip
            vae = vaes[step % 2]
            x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.sample()).sample.clamp(-1, 1)
        x = augment(x, gen) if step % 4 else x
        shape = torch.tensor([s.labels[0] for s in scenes])
        colour = torch.tensor([s.labels[1] for s in scenes])
        s_logits, c_logits, _ = judge(x)
        loss = F.cross_entropy(s_logits, shape) + F.cross_entropy(c_logits, colour)
        optimize(opt, loss, judge.parameters(), step, bar, clip=None)
    save_fp16(judge, "judge")


# -------------------------------------------------------------------------------- latent LPIPS
def train_latent_lpips(name: str, steps: int, batch: int, lr: float, seed: int, references: int) -> None:
    """A latent LPIPS for one toy VAE from synthetic 2AFC judgments (see utils/toy/latent_lpips_train.py).

    Reference images are drawn like every other component's (the seed-0 stream, i.e. the scenes
    of the train split); the held-out agreement is measured on scenes from another seed.
    """
    from diffusers import AutoencoderKL

    from .judge import ToyJudge
    from .latent_lpips_train import train_latent_lpips as fit_latent_lpips

    vae = load_weights(AutoencoderKL, "vae_flux" if name == "latent_lpips_flux" else "vae_sd")
    judge = load_weights(ToyJudge, "judge")
    train_images = to_tensor(sample_batch(2000, np.random.default_rng(seed))[1])
    val_images = to_tensor(sample_batch(500, np.random.default_rng(seed + 7919))[1])
    net, report = fit_latent_lpips(vae, judge, train_images, val_images, steps=steps, batch_size=batch, lr=lr,
                                   num_references=references, seed=seed)
    print(f"{name}: {report}")
    net.metadata = dict(report, vae=name.replace("latent_lpips", "vae"))
    save_fp16(net, name)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train one component of the toy world.")
    parser.add_argument("component", choices=["vae_sd", "vae_flux", "judge", "sd", "sdxl", "flux", "flux_guidance",
                                              "latent_lpips_sd", "latent_lpips_flux"])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per component)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bank", type=int, default=None,
                        help="scenes encoded once for teacher training (default 20000; latent LPIPS: reference images,"
                             " default 2000)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps runs reproducible)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    c = args.component
    if c in ("vae_sd", "vae_flux"):
        train_vae(c, args.steps or 2500, args.batch, args.lr or 1e-3, args.seed)
    elif c in ("sd", "sdxl"):
        train_unet_teacher(c, args.steps or 4000, args.batch, args.lr or 1e-3, args.seed, args.bank or 20000)
    elif c == "flux":
        train_flux_teacher(args.steps or 6000, args.batch, args.lr or 1e-3, args.seed, args.bank or 20000)
    elif c == "flux_guidance":
        train_flux_guidance(args.steps or 2000, args.batch, args.lr or 3e-4, args.seed, (args.bank or 20000) // 2)
    elif c == "judge":
        train_judge(args.steps or 1500, args.batch, args.lr or 2e-3, args.seed)
    elif c in ("latent_lpips_sd", "latent_lpips_flux"):
        train_latent_lpips(c, args.steps or 2000, args.batch, args.lr or 1e-2, args.seed, args.bank or 2000)
    print(f"{c}: done in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
