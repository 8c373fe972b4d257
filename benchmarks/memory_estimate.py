"""Training memory by arithmetic: bytes per parameter x parameter counts, plus activations measured once.

    python benchmarks/memory_estimate.py                          # the table of docs/memory.md
    python benchmarks/memory_estimate.py --measured rows.jsonl    # and each estimate beside its measured row

What a recipe holds, by component (P = parameters, counted on the meta device from the published configs that
benchmarks/full_size.py writes; LoRA sizes counted by adding the recipe's LoRA to a meta UNet):
  frozen denoiser (LoRA base, TLCM teacher)      P x 2 bytes (bf16/fp16: loaded straight in that dtype)
  text encoders                                   P x 2, or 0 once --cache_text_embeddings has freed them
  VAE                                             P x 4 (SD-family VAEs keep fp32: force_upcast)
  trained weights (LoRA, or the full student)     P x 4 (fp32 master weights) + 4 (fp32 gradients);
                                                  a LoRA with --lora_dtype bf16: P x 2 + 2
  AdamW moments                                   P x 8 (P x 4 in bf16 with --lora_dtype bf16), or P x 2 with
                                                  --use_8bit_adam
  full LCM: EMA target P x 4 (0 on the GPU with --ema_target_on_cpu), teacher P x 4 (P x 2 with --cast_teacher_unet)
  activations                                     measured: the base row's peak less its weights, scaled with
                                                  pixels x batch (the step's tensors grow with the latent's area)
The `fits` column names the smallest of 12 / 16 / 24 / 40 / 80 GB cards whose 90% holds the estimate (the rest:
the CUDA context, the allocator's fragmentation). Activations on a GPU differ from these CPU measurements
(other attention kernels): benchmarks/gpu.sh measures the real thing when a GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import full_size  # noqa: E402  (also puts the repository root on sys.path)
from common import fail  # noqa: E402

from utils.errors import user_errors  # noqa: E402

GB = 2**30  # GiB, as card sizes count (a "24 GB" card holds 24 GiB)
CARDS = (12, 16, 24, 40, 80)


@dataclass(frozen=True)
class Run:
    """One configuration: recipe kind, model, size and levers (labels match benchmarks' --label)."""

    label: str
    kind: str  # "lora" (LCM-LoRA, TCD, TLCM: a LoRA on a frozen base) or "lcm" (full student)
    model: str  # sd15, sdxl, ssd1b, flux
    resolution: int = 512
    batch: int = 1
    rank: int = 64
    cache: bool = False  # --cache_text_embeddings (encoders freed)
    adam8: bool = False  # --use_8bit_adam
    cast_teacher: bool = False  # full LCM: --cast_teacher_unet
    ema_on_cpu: bool = False  # full LCM: --ema_target_on_cpu
    lora_bf16: bool = False  # LoRA recipes: --lora_dtype bf16 (weights, gradients and AdamW moments in bf16)
    activations_from: str | None = None  # the measured row whose activations this one scales


@lru_cache(maxsize=None)
def lora_parameters(model: str, rank: int) -> int:
    """Parameters of the recipes' default LoRA of `rank` on the model's denoiser (utils.lora's "lcm" targets on a
    UNet, its "flux" targets on the FLUX transformer)."""
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from utils import lora

    flux = model == "flux"
    cls = FluxTransformer2DModel if flux else UNet2DConditionModel
    with torch.device("meta"):
        denoiser = cls.from_config(full_size.configs(model)["transformer" if flux else "unet"])
    lora.add_trainable_lora(denoiser, rank, rank, lora.FLUX_LORA_TARGETS if flux else lora.LCM_LORA_TARGETS, 0.0)
    return sum(p.numel() for p in denoiser.parameters() if p.requires_grad)


def weights_gb(run: Run) -> dict[str, float]:
    """The held bytes of `run` by component, in GB (module docstring)."""
    counts = full_size.param_counts(run.model)
    unet, vae = counts.get("unet", counts.get("transformer")), counts["vae"]
    text = sum(v for k, v in counts.items() if k.startswith("text_encoder"))
    weight = 2 if run.lora_bf16 else 4  # bytes of one trained weight (and of its gradient, and of an fp moment)
    adam = 2 if run.adam8 else 2 * weight
    out = {"text encoders": 0 if run.cache else text * 2 / GB, "VAE": vae * 4 / GB}
    if run.kind == "lora":
        trained = lora_parameters(run.model, run.rank)
        out["frozen denoiser"] = unet * 2 / GB
    else:
        trained = unet
        out["teacher UNet"] = unet * (2 if run.cast_teacher else 4) / GB
        out["EMA target"] = 0 if run.ema_on_cpu else unet * 4 / GB
    out["trained weights + grads"] = trained * 2 * weight / GB
    out["Adam moments"] = trained * adam / GB
    return out


def activations_gb(run: Run, runs: dict[str, Run], measured: dict[str, dict]) -> float | None:
    """The activations of the row `run` scales from (its measured net peak less its weights), scaled by area x batch."""
    source = runs.get(run.activations_from or run.label)
    row = measured.get(source.label) if source else None
    if row is None or "train_peak_net_mb" not in row:
        return None
    base = row["train_peak_net_mb"] / 1024 - sum(weights_gb(source).values())
    scale = (run.resolution / source.resolution) ** 2 * run.batch / source.batch
    return max(base, 0.0) * scale


def fits(total_gb: float) -> str:
    return next((f"{card} GB" for card in CARDS if total_gb <= 0.9 * card), "> 80 GB")


SDXL_BASE = "lora sdxl 512 gc r64"
SDXL_1024 = "lora sdxl 1024 gc r64 +caches +8bit"  # SDXL's activations at 1024 px, measured
RUNS = [
    Run(SDXL_BASE, "lora", "sdxl"),
    Run("lora sdxl 512 gc r64 +caches", "lora", "sdxl", cache=True, activations_from=SDXL_BASE),
    Run("lora sdxl 512 gc r64 +caches +8bit", "lora", "sdxl", cache=True, adam8=True, activations_from=SDXL_BASE),
    Run("lora sdxl 512 gc r16 +caches +8bit", "lora", "sdxl", rank=16, cache=True, adam8=True,
        activations_from=SDXL_BASE),
    Run("lora sdxl 512 gc r64 +caches +8bit batch 2", "lora", "sdxl", batch=2, cache=True, adam8=True,
        activations_from=SDXL_BASE),
    Run("lora sdxl 512 gc r64 bf16 lora", "lora", "sdxl", lora_bf16=True, activations_from=SDXL_BASE),
    Run("lora sdxl 512 gc r64 +caches +8bit bf16 lora", "lora", "sdxl", cache=True, adam8=True, lora_bf16=True,
        activations_from=SDXL_BASE),
    Run("lora sdxl 512 r64 (no gc)", "lora", "sdxl"),
    Run("lora sdxl 1024 gc r64", "lora", "sdxl", resolution=1024, activations_from=SDXL_1024),
    Run(SDXL_1024, "lora", "sdxl", resolution=1024, cache=True, adam8=True, activations_from=SDXL_BASE),
    Run("lora sdxl 1024 gc r16 +caches +8bit", "lora", "sdxl", resolution=1024, rank=16, cache=True, adam8=True,
        activations_from=SDXL_1024),
    Run("lora sdxl 1024 gc r64 +caches +8bit bf16 lora", "lora", "sdxl", resolution=1024, cache=True, adam8=True,
        lora_bf16=True, activations_from=SDXL_1024),
    Run("lora ssd1b 512 gc r64 +caches +8bit", "lora", "ssd1b", cache=True, adam8=True, activations_from=SDXL_BASE),
    Run("tlcm sdxl stage1 512 gc r64", "lora", "sdxl"),
    Run("tlcm sdxl stage1 512 gc r64 +cache +8bit", "lora", "sdxl", cache=True, adam8=True,
        activations_from="tlcm sdxl stage1 512 gc r64"),
    Run("tlcm sdxl stage1 1024 gc r64 +cache +8bit", "lora", "sdxl", resolution=1024, cache=True, adam8=True,
        activations_from="tlcm sdxl stage1 512 gc r64"),
    Run("tlcm flux stage1 1024 gc r64", "lora", "flux", resolution=1024),
    Run("tlcm flux stage1 1024 gc r64 +cache +8bit", "lora", "flux", resolution=1024, cache=True, adam8=True),
    Run("lcm sd15 512 gc +8bit +cast", "lcm", "sd15", adam8=True, cast_teacher=True),
    Run("lcm sd15 512 gc", "lcm", "sd15", activations_from="lcm sd15 512 gc +8bit +cast"),
    # the same UNet's activations as the LoRA's at 1024 px (a full student's backward saves what a LoRA's does)
    Run("lcm sdxl 1024 gc", "lcm", "sdxl", resolution=1024, activations_from=SDXL_1024),
    Run("lcm sdxl 1024 gc +8bit +cast +ema on cpu", "lcm", "sdxl", resolution=1024, adam8=True, cast_teacher=True,
        ema_on_cpu=True, activations_from=SDXL_1024),
]


def table(measured: dict[str, dict]) -> list[str]:
    """Markdown rows: the estimate by component, its total, the card it fits, and the measured row beside it."""
    runs = {r.label: r for r in RUNS}
    lines = ["| configuration | weights, grads, Adam (GB) | activations (GB) | estimate (GB) | fits | measured, net "
             "peak RSS (GB) | estimate / measured |", "|---|---|---|---|---|---|---|"]
    for run in RUNS:
        held = sum(weights_gb(run).values())
        act = activations_gb(run, runs, measured)
        total = held + (act or 0.0)
        row = measured.get(run.label)
        got = row["train_peak_net_mb"] / 1024 if row and "train_peak_net_mb" in row else None
        lines.append(f"| {run.label} | {held:.2f} | {'-' if act is None else f'{act:.2f}'} | {total:.2f} | "
                     f"{fits(total)} | {'-' if got is None else f'{got:.2f}'} | "
                     f"{'-' if got is None else f'{total / got:.2f}'} |")
    return lines


def read_measured(paths: list[str]) -> dict[str, dict]:
    """bench_memory.py JSON lines by label (a later line of the same label wins); reference runs are left out."""
    rows = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if "train_peak_net_mb" in row and not row["label"].endswith("[reference]"):
                        rows[row["label"]] = row
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measured", nargs="*", default=[],
                   help="bench_memory.py .jsonl files: their rows supply the activations and sit beside the estimates")
    args = p.parse_args(argv)
    for path in args.measured:
        if not os.path.isfile(path):
            fail(f"{path} not found (--measured)")
    measured = read_measured(args.measured)
    for run in (RUNS[0], RUNS[2], RUNS[-2], RUNS[-1]):  # where the bytes go, for a few of them
        parts = ", ".join(f"{k} {v:.2f}" for k, v in weights_gb(run).items())
        print(f"{run.label}: {parts} GB")
    print(f"LoRA of rank 64 on the SDXL UNet: {lora_parameters('sdxl', 64) / 1e6:.1f} M parameters\n")
    print("\n".join(table(measured)))


if __name__ == "__main__":
    with user_errors():
        main()
