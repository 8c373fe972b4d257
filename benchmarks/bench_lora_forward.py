"""Time a LoRA denoiser's forward (no grad) and forward + backward with PEFT's branch vs the merged forward.

    python benchmarks/bench_lora_forward.py --model toy_world/models/sdxl --lora_rank 64 --batch_size 16
    python benchmarks/bench_lora_forward.py --model sdxl_unet_config.json --latent_size 128 --device cuda --dtype bf16

--model is a pipeline folder (its UNet / FLUX transformer, trained weights) or a denoiser's config.json
(random weights built from it: full-size models need no download). The LoRA (zero-initialised A and
B ~ N(0, 0.01), so the branch is not trivially zero) goes on --lora_target_modules; inputs are random,
shaped as the pipeline would send them for latents of side --latent_size. Each pass is timed as the median of --steps
runs after --warmup. `--merged_lora_forward` of the LoRA recipes is the "merged" mode (per layer and
call: the merged weight where it costs fewer FLOPs, else PEFT's branch; utils/merged_lora.py).

One JSON line per pass (forward = no grad, as the LCM target and sampling; train = forward +
backward into the LoRA, as the student): label, model, pass, batch_size, latent_size, rank,
branch_ms, merged_ms, speed_ratio (branch / merged), merged_layers (layers that took the merged
weight in that pass, of lora_layers), device, dtype, torch, threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from utils.errors import fail, user_errors  # noqa: E402
from utils.flags import Parser  # noqa: E402


def parse_args(argv: list[str] | None = None):
    parser = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a pipeline folder (its denoiser's weights) or a UNet / FLUX transformer config.json "
                             "(random weights)")
    parser.add_argument("--lora_rank", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--lora_target_modules", default=None,
                        help="preset (lcm, diffusers, flux) or comma list (default: lcm for a UNet, flux for FLUX)")
    parser.add_argument("--batch_size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--latent_size", type=int, default=None,
                        help="latent side (pixels / the VAE's factor; FLUX packs 2x2 of it into a token) (default: a "
                             "UNet's sample_size; FLUX: its pipeline's VAE sample_size / factor, or 128 = 1024 px "
                             "for a config.json)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per pass and mode (default: 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed runs per pass and mode (default: 10)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="fp32", choices=list(common.DTYPES),
                        help="the frozen base weights' dtype; the LoRA stays fp32, under autocast for fp16/bf16 "
                             "(default: fp32)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--label", default=None, help="free text copied into every JSON line")
    parser.add_argument("--append", default=None, help="also append the JSON lines to this .jsonl file")
    args = parser.parse_args(argv)
    common.check_positive(args, "lora_rank", "batch_size", "steps")
    if args.latent_size is not None and args.latent_size < 2:
        fail(f"--latent_size must be at least 2, got {args.latent_size}")
    if args.warmup < 0:
        fail(f"--warmup must be at least 0, got {args.warmup}")
    if not os.path.exists(args.model):
        fail(f"--model {args.model} does not exist")
    return args


def load_model(path: str):
    """The denoiser: from a pipeline folder, or built from a config.json with random weights."""
    import diffusers

    from utils import models

    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
        if config.get("_class_name") not in models.DENOISERS:
            fail(f"--model {path}: _class_name must be one of {', '.join(models.DENOISERS)}")
        return getattr(diffusers, config["_class_name"]).from_config(config)
    return models.load_denoiser(path)


def is_unet(model) -> bool:
    """A UNet2DConditionModel (SD / SDXL), else a FLUX transformer."""
    from diffusers import UNet2DConditionModel

    return isinstance(model, UNet2DConditionModel)


def default_latent_size(path: str, model) -> int:
    """A UNet's own sample_size; FLUX: the pipeline VAE's sample_size / its factor, else 128 (1024 px)."""
    from utils import models

    if is_unet(model):
        return int(model.config.sample_size)
    vae_config = os.path.join(path, "vae", "config.json")
    if os.path.isdir(path) and os.path.isfile(vae_config):
        with open(vae_config) as f:
            vae = json.load(f)
        return int(vae["sample_size"]) // models.vae_scale_factor(vae)
    return 128


def denoiser_inputs(model, batch: int, side: int, generator) -> dict:
    """Random inputs of the shapes a pipeline sends (UNet: SD or SDXL; FLUX: 2x2 patches of the latent as tokens)."""
    import torch

    from utils import models

    config = model.config
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    if is_unet(model):
        kwargs = {"sample": randn(batch, config.in_channels, side, side),
                  "timestep": torch.randint(0, 1000, (batch,), generator=generator),
                  "encoder_hidden_states": randn(batch, 77, config.cross_attention_dim)}
        if config.addition_embed_type == "text_time":
            pooled = model.add_embedding.linear_1.in_features - 6 * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled),
                                           "time_ids": models.sdxl_time_ids((1024, 1024), (0, 0), (1024, 1024), batch)}
        if config.time_cond_proj_dim is not None:
            kwargs["timestep_cond"] = randn(batch, config.time_cond_proj_dim)
        return kwargs
    tokens, text = (side // 2) ** 2, 16
    kwargs = {"hidden_states": randn(batch, tokens, config.in_channels),
              "encoder_hidden_states": randn(batch, text, config.joint_attention_dim),
              "pooled_projections": randn(batch, config.pooled_projection_dim),
              "timestep": torch.rand(batch, generator=generator),
              "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3)}
    if config.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return kwargs


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    from utils import lora, merged_lora

    common.quiet_libraries()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, common.DTYPES[args.dtype])
    with user_errors():
        model = load_model(args.model).requires_grad_(False).to(args.device, dtype)
        targets = lora.resolve_targets(args.lora_target_modules or ("lcm" if is_unet(model) else "flux"))
        torch.manual_seed(args.seed)
        lora.add_trainable_lora(model, args.lora_rank, lora.DEFAULT_LORA_ALPHA, targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    side = args.latent_size or default_latent_size(args.model, model)
    inputs = denoiser_inputs(model, args.batch_size, side, torch.Generator().manual_seed(args.seed))
    inputs = {k: ({kk: vv.to(args.device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(args.device))
              for k, v in inputs.items()}
    layers = [m for m in model.modules() if merged_lora.supported(m)]
    autocast = torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype != torch.float32)

    def run(train: bool) -> None:
        with autocast, torch.set_grad_enabled(train):
            out = model(**inputs, return_dict=False)[0]
        if train:
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    def time_pass(train: bool) -> float:
        times = []
        for i in range(args.warmup + args.steps):
            start = common.now()
            run(train)
            if i >= args.warmup:
                times.append(common.now() - start)
        return 1000 * common.median(times)

    def merged_count(train: bool) -> int:
        branch_ran = set()
        hooks = [m.lora_A[a].register_forward_hook(lambda *_, i=i: branch_ran.add(i))
                 for i, m in enumerate(layers) for a in m.lora_A]
        run(train)
        for h in hooks:
            h.remove()
        return len(layers) - len(branch_ran)  # a layer whose lora_A module did not run took the merged weight

    records = []
    for name, train in (("forward", False), ("train", True)):
        merged_lora.disable(model)
        branch = time_pass(train)
        merged_lora.enable(model)
        merged = time_pass(train)
        record = {"label": args.label, "model": args.model, "pass": name, "batch_size": args.batch_size,
                  "latent_size": side, "rank": args.lora_rank, "branch_ms": branch, "merged_ms": merged,
                  "speed_ratio": branch / merged, "merged_layers": merged_count(train), "lora_layers": len(layers),
                  "device": common.device_name() if args.device.startswith("cuda") else "cpu", "dtype": args.dtype,
                  **common.environment()}
        records.append(record)
        common.emit(record, args.append)
    return records


if __name__ == "__main__":
    with user_errors():
        main()
