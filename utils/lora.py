"""Live LoRA adapters on a diffusers model (UNet, FLUX transformer, CLIP text encoder): adding, reading, merging,
switching off. Their files (diffusers, PEFT folder, kohya) are utils/lora_files.py.

A LoRA layer computes ``W x + (alpha / r) * B A x``. ``DEFAULT_LORA_ALPHA = 8`` (regardless of rank) is PEFT's
own default alpha, the scale the released TLCM/LCM loading snippet applies to a PEFT folder, so a freshly
trained adapter is written there without rescaling.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from utils.errors import UserError

logger = logging.getLogger(__name__)

PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default lora_alpha
DEFAULT_LORA_ALPHA = PEFT_DEFAULT_ALPHA
PEFT_PREFIX = "base_model.model."  # a PeftModel's state-dict keys (and PEFT files') start with it

LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]
DIFFUSERS_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention, as diffusers' scripts
FLUX_LORA_TARGETS = [
    "to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "context_embedder", "x_embedder", "linear", "linear_1", "linear_2", "proj_mlp",
    "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj", "ff_context.net.2",
]

# the names --lora_target_modules accepts besides a comma-separated list of module names
TARGET_PRESETS = {"lcm": LCM_LORA_TARGETS, "diffusers": DIFFUSERS_LORA_TARGETS, "flux": FLUX_LORA_TARGETS}


# ----------------------------------------------------------------------------- adding and reading adapters


def add_lora(model: nn.Module, rank: int, alpha: float = DEFAULT_LORA_ALPHA, targets: list[str] | None = None,
             dropout: float = 0.0, adapter_name: str = "default", init: str | bool = "gaussian") -> Any:
    """Add a PEFT LoRA adapter to a diffusers model (UNet or FLUX transformer) and return its LoraConfig."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets or LCM_LORA_TARGETS),
                        lora_dropout=dropout, init_lora_weights=init)
    model.add_adapter(config, adapter_name=adapter_name)
    return config


def resolve_targets(spec: str, presets: tuple[str, ...] = tuple(TARGET_PRESETS)) -> list[str]:
    """The module names of a --lora_target_modules value: one of `presets`, or a comma-separated list."""
    if spec in presets:
        return list(TARGET_PRESETS[spec])
    return [t.strip() for t in spec.split(",") if t.strip()]


def add_trainable_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], dropout: float = 0.0,
                       flag: str = "--lora_target_modules", dtype: torch.dtype = torch.float32) -> Any:
    """add_lora for training: the adapter's weights in `dtype` (fp32 by default; the frozen base may be fp16/bf16),
    a bad target list as a one-line UserError naming `flag`."""
    try:
        config = add_lora(model, rank, alpha, targets, dropout)
    except ValueError as exc:
        raise UserError(f"{flag}: {str(exc).splitlines()[0]}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return config


def lora_scale_note(rank: int, alpha: float) -> str:
    """What a LoRA scale alpha / r other than 1 means for the learning rate, against diffusers' alpha = r."""
    scale = alpha / rank
    return (f"LoRA scale = --lora_alpha / --lora_rank = {alpha:g} / {rank} = {scale:g}: the LoRA's output is "
            f"{scale:g} x B A, so at one --learning_rate AdamW moves it about {scale:g} x as far per step as a LoRA "
            f"with alpha = rank (diffusers' LCM-LoRA script); alpha {PEFT_DEFAULT_ALPHA} is what PEFT's LoraConfig, "
            f"and so the released LCM/TLCM loading snippets, apply (docs/lcm.md, LoRA alpha and the learning rate)")


def add_text_encoder_lora(encoders: list[nn.Module], sdxl: bool, rank: int, alpha: float, dropout: float = 0.0,
                          dtype: torch.dtype = torch.float32) -> None:
    """--train_text_encoder_lora: a trainable LoRA on the CLIP attention projections of every encoder.

    SDXL conditions on encoder 1's penultimate layer, so that encoder's last layer gets none: its LoRA
    would never receive a gradient, which multi-process (DDP) training refuses.
    """
    for i, enc in enumerate(encoders):
        targets = TEXT_ENCODER_LORA_TARGETS
        if sdxl and i == 0:
            last = f".layers.{enc.config.num_hidden_layers - 1}."
            targets = sorted(n for n in targeted_modules(enc, targets) if last not in n)
        add_trainable_lora(enc, rank, alpha, targets, dropout, "--train_text_encoder_lora", dtype)


def base_model(model: nn.Module) -> nn.Module:
    """The plain diffusers model under a PeftModel wrapper (or the model itself)."""
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with PEFT keys relative to the diffusers model (`<module>.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}


def lora_scalings(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Each LoRA module's scale alpha / r, keyed by module name relative to the diffusers model."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[adapter_name]) for name, m in base_model(model).named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.scaling}


def lora_alphas(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Each LoRA module's alpha as the adapter was created with it, keyed by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.lora_alpha[adapter_name]) for name, m in base_model(model).named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_alpha}


def targeted_modules(model: nn.Module, targets: list[str]) -> set[str]:
    """Names of the Linear/Conv layers that LoraConfig(target_modules=targets) adapts in a model without adapters."""
    return {name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in targets)}


def infer_targets(modules: set[str] | list[str], model: nn.Module) -> list[str]:
    """A target_modules list for a LoRA on exactly these modules: the recipes' preset that adapts them, else the names."""
    for preset in (LCM_LORA_TARGETS, DIFFUSERS_LORA_TARGETS, FLUX_LORA_TARGETS, TEXT_ENCODER_LORA_TARGETS):
        if targeted_modules(model, preset) == set(modules):
            return list(preset)
    return sorted(modules)


# ----------------------------------------------------------------------------- switching off and merging


@contextmanager
def adapters_disabled(*models: nn.Module) -> Iterator[None]:
    """The teacher of a LoRA recipe: the same models with their LoRA (where they have one) switched off for the
    duration of the block."""
    with ExitStack() as stack:
        for model in models:
            if has_lora(model):
                stack.enter_context(requires_grad_kept(model))
                model.disable_adapters()
                stack.callback(model.enable_adapters)
        yield


@contextmanager
def requires_grad_kept(model: nn.Module) -> Iterator[None]:
    """The LoRA weights' requires_grad flags as they are at the start, put back on the same tensors at the end.

    PEFT's adapter switches set the flags on the tensors a module holds at that moment, and a split model (FSDP2)
    swaps its sharded and gathered tensors in between (its root module keeps the gathered ones after a forward,
    and copies the sharded one's flag onto them when it gathers again): a switch made on one and undone on the
    other would leave a LoRA weight frozen.
    """
    flags = [(p, p.requires_grad) for name, p in model.named_parameters() if is_lora_weight(name)]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def is_lora_weight(name: str) -> bool:
    """Whether a parameter name is a LoRA layer's (PEFT's lora_A, lora_B, ...)."""
    return "lora_" in name


def has_lora(model: nn.Module) -> bool:
    """Whether any parameter of the model belongs to a LoRA layer."""
    return any(is_lora_weight(name) for name, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fuse the active adapter(s) into the base weights and remove every LoRA layer; returns the plain model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    model.fuse_lora()
    model.unload_lora()
    return model
