"""Step time and peak memory of a distillation training step under the engine of the launch config; one JSON line.

Launch it as a recipe, under the engine to measure (configs/accelerate/; DDP: `--multi_gpu`):

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 \\
        benchmarks/bench_sharded.py --model sdxl --kind full --train_batch_size 4 --mixed_precision bf16
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 8 \\
        benchmarks/bench_sharded.py --model flux --kind lora --lora_rank 64 --train_batch_size 1

--model: "sdxl" (SDXL's UNet, 2.6 B parameters), "flux" (FLUX.1-dev's transformer, 11.9 B) or "sd15"
(SD 1.5's UNet, 0.86 B), built with random weights from the config in this file (no download), or a
pipeline folder / denoiser config.json as for bench_lora_forward.py. --kind full is the memory of the
full-UNet recipe: a trained student (fp32 weights, gradients, Adam state), a frozen teacher in the
weight dtype and a whole fp32 EMA target; --kind lora that of the LoRA recipes: one model, frozen
base + a rank --lora_rank LoRA with a whole EMA shadow. A step is the recipes' order: teacher forward
(no grad; lora: adapters off), EMA target forward (no grad; lora: EMA swapped in), student forward +
backward, loop.apply_gradients, EMA update; inputs are random, shaped as the pipeline sends them.
The engine setup is the recipes' own (utils/loop.make_accelerator), so are the sharding helpers.

One JSON line from the main process: label, model, kind, engine, processes, batch_size (per process),
latent_size, mixed_precision, params_b and trained_params_b (billions), median_step_s (median of
--steps after --warmup), peak_mem_mb (the largest over processes), peak_mem_kind (CUDA max allocated
during the steps, or peak RSS on CPU, which also counts the whole model every process builds before
prepare() splits it), step_rss_mb (the largest resident size at the end of a timed step: on CPU what a
process holds once split), device, torch, threads. On CPU FSDP needs tests/fsdp_on_cpu.py in front of the
script (accelerate selects FSDP on GPUs only): `accelerate launch ... tests/fsdp_on_cpu.py benchmarks/...`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lora_forward  # noqa: E402
import common  # noqa: E402
from utils import flags  # noqa: E402
from utils.errors import fail, user_errors  # noqa: E402

# the published configs of the full-size denoisers (random weights are built from them)
FULL_SIZE = {
    "sd15": {"_class_name": "UNet2DConditionModel", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "sample_size": 64},
    "sdxl": {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time",
             "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
             "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "projection_class_embeddings_input_dim": 2816,
             "sample_size": 128, "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True},
    "flux": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
             "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
             "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    b = parser.add_argument_group("benchmark")
    b.add_argument("--model", default="sdxl",
                   help=f"{', '.join(FULL_SIZE)} (random full-size weights), a pipeline folder or a denoiser "
                        "config.json (default: %(default)s)")
    b.add_argument("--kind", default="lora", choices=["full", "lora"],
                   help="full: student + frozen teacher + EMA target; lora: frozen base + LoRA + EMA shadow "
                        "(default: %(default)s)")
    b.add_argument("--lora_rank", type=int, default=64, help="(default: %(default)s)")
    b.add_argument("--latent_size", type=int, default=None,
                   help="latent side (default: a UNet's sample_size, FLUX 128 = 1024 px)")
    b.add_argument("--ema_decay", type=float, default=0.95, help="(default: %(default)s)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps (default: %(default)s)")
    b.add_argument("--steps", type=int, default=5, help="timed steps (default: %(default)s)")
    b.add_argument("--label", default=None, help="free text copied into the JSON line")
    b.add_argument("--append", default=None, help="also append the JSON line to this .jsonl file")
    t = parser.add_argument_group("the recipes' flags that change the step")
    t.add_argument("--train_batch_size", type=int, default=1, help="batch size per process (default: %(default)s)")
    t.add_argument("--mixed_precision", default=None, choices=flags.PRECISIONS,
                   help="autocast; the frozen weights are stored in it (default: accelerate's config)")
    t.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in the backward")
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="(default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = parser.parse_args(argv)
    # every other loop flag at the recipes' default (AdamW, no accumulation); no tracker, no kept output
    loop_parser = flags.Parser()
    loop_parser.add_training_args(image_recipe=False)
    defaults = vars(loop_parser.parse_args([]))
    defaults.update(learning_rate=1e-5, lr_scheduler="constant", lr_warmup_steps=0, report_to="none",
                    overwrite_output_dir=True, output_dir=os.path.join(tempfile.gettempdir(), "bench_sharded"))
    args = argparse.Namespace(**{**defaults, **vars(args)})
    common.check_positive(args, "lora_rank", "steps", "train_batch_size")
    if args.warmup < 0:
        fail(f"--warmup must be at least 0, got {args.warmup}")
    if args.model not in FULL_SIZE and not os.path.exists(args.model):
        fail(f"--model {args.model}: not one of {', '.join(FULL_SIZE)} and no such file or folder")
    return args


def build_model(name: str):
    """The denoiser: random weights from a built-in or given config, or a pipeline folder's trained one."""
    import diffusers

    if name not in FULL_SIZE:
        return bench_lora_forward.load_model(name)
    config = FULL_SIZE[name]
    return getattr(diffusers, config["_class_name"]).from_config(config)


def resident_mb() -> float:
    """This process's resident memory now, in MiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    import torch

    from utils import lora, loop, sharding
    from utils.ema import EMAParams, ema_update

    accelerator = loop.make_accelerator(args)
    common.quiet_libraries()
    device = accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    torch.manual_seed(args.seed)  # the same weights on every process, as the recipes load them
    with user_errors():
        model = build_model(args.model)
    side = args.latent_size or (int(model.config.sample_size) if bench_lora_forward.is_unet(model) else 128)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)  # each process its own batch
    inputs = bench_lora_forward.denoiser_inputs(model, args.train_batch_size, side, generator)
    inputs = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
              for k, v in inputs.items()}

    if args.kind == "full":  # the full-UNet recipe: student (fp32, trained), frozen teacher, whole EMA target
        teacher = copy.deepcopy(model).requires_grad_(False).to(device, dtype)
        target = copy.deepcopy(model).requires_grad_(False).to(device)
        trained = model.train()
    else:  # the LoRA recipes: one model, frozen base in the weight dtype, fp32 LoRA
        trained = model.requires_grad_(False).to(sharding.staging_device(accelerator), dtype)  # as the recipes
        targets = lora.resolve_targets("lcm" if bench_lora_forward.is_unet(model) else "flux")
        lora.add_trainable_lora(trained, args.lora_rank, lora.DEFAULT_LORA_ALPHA, targets)
    if args.gradient_checkpointing:
        trained.enable_gradient_checkpointing()
    total = sum(p.numel() for p in trained.parameters())
    optimizer, lr_scheduler = loop.make_optimizer(trained.parameters(), args, args.warmup + args.steps,
                                                  accelerator.num_processes)
    trained_count = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    student, optimizer, lr_scheduler = accelerator.prepare(trained, optimizer, lr_scheduler)
    params = [p for p in student.parameters() if p.requires_grad]
    base = accelerator.unwrap_model(student)
    ema = EMAParams(params, args.ema_decay, base) if args.kind == "lora" else None

    def forward(net, grad: bool):
        with accelerator.autocast(), torch.set_grad_enabled(grad):
            return net(**inputs, return_dict=False)[0].float()

    def step() -> None:
        if ema is None:
            reference = forward(teacher, False) + forward(target, False)
        else:
            with lora.adapters_disabled(base):
                reference = forward(student, False)
            with ema.swapped():
                reference = reference + forward(student, False)
        loss = (forward(student, True) - reference / 2).square().mean()
        loop.apply_gradients(accelerator, loss, params, optimizer, lr_scheduler, args.max_grad_norm)
        if ema is None:
            ema_update(target, base, args.ema_decay)
        else:
            ema.update()

    common.reset_peak_memory()
    times, held = [], 0.0
    for i in range(args.warmup + args.steps):
        common.synchronize()
        start = common.now()
        step()
        common.synchronize()
        if i >= args.warmup:
            times.append(common.now() - start)
            held = max(held, resident_mb())
    peak, kind = common.peak_memory()
    peak, held = (float(accelerator.gather(torch.tensor([value], device=device)).max()) for value in (peak, held))
    record = {"label": args.label, "model": args.model, "kind": args.kind, "engine": sharding.engine(accelerator),
              "processes": accelerator.num_processes, "batch_size": args.train_batch_size, "latent_size": side,
              "mixed_precision": accelerator.mixed_precision, "params_b": total / 1e9,
              "trained_params_b": trained_count / 1e9, "median_step_s": common.median(times), "peak_mem_mb": peak,
              "peak_mem_kind": kind, "step_rss_mb": held, "device": common.device_name() if device.type == "cuda" else "cpu",
              **common.environment()}
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        common.emit(record, args.append)
        return record
    return None


if __name__ == "__main__":
    with user_errors():
        main()
