"""LoRA adapters and their file formats (diffusers, PEFT folder, kohya/ComfyUI/A1111), shared by the LoRA recipes.

Alpha / scale convention
------------------------
A LoRA layer computes ``W x + (alpha / r) * B A x``. The three file formats store the scale differently:

* PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``): alpha lives in the json. The
  released TLCM/LCM loading snippet (seed 003) does ``get_peft_model(unet, LoraConfig(r=64, ...))`` and
  then ``load_adapter(dir, adapter_name="default")``; because "default" already exists, PEFT keeps the
  in-memory config and IGNORES the saved alpha, so the scale is PEFT's default ``8 / r``. We therefore
  always write PEFT folders with ``lora_alpha = 8`` (``PEFT_DEFAULT_ALPHA``) and, when the adapter in
  memory used another alpha, fold the ratio into ``lora_B`` so the output is unchanged.
* diffusers (``pytorch_lora_weights.safetensors``): we write no alphas, and diffusers then loads with
  ``alpha = rank`` (scale 1) — so we fold each module's scale ``alpha / r`` into ``lora_B``.
* kohya: every module carries an ``.alpha`` scalar; loaders use ``alpha / rank`` where rank is
  ``lora_down``'s first dim. Exported as-is (no folding).

``DEFAULT_LORA_ALPHA = 8`` (regardless of rank) is the default of ``add_lora``, so a freshly trained adapter
needs no folding for the PEFT folder and its weights are bit-identical to what the seed-003 snippet loads.

Converting (``read_lora`` -> ``write_lora``, used by ``convert_lora.py``): kohya keeps each module's alpha, so
any -> kohya is a pure renaming. When a diffusers file or PEFT folder is written from a LoRA whose alphas the
format cannot hold (a kohya file with alpha != rank, say), the scale is folded into ``lora_B`` as above and the
original alphas go into the safetensors metadata (``lora_alphas``, JSON); ``read_lora`` undoes the folding
when it finds them. Folding and unfolding are bit-exact when the factor is a power of two (alpha = rank,
alpha 8 with a power-of-two rank, kohya's alpha 1), so round trips through any format return identical tensors.
"""

from __future__ import annotations

import collections
import json
import os
import re
from contextlib import contextmanager
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from utils.errors import UserError

PEFT_DEFAULT_ALPHA = 8
DEFAULT_LORA_ALPHA = PEFT_DEFAULT_ALPHA

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

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
FORMATS = ("diffusers", "peft", "kohya")
KOHYA_PREFIX = {"unet": "lora_unet", "transformer": "lora_transformer"}
# kohya's text-encoder prefixes: `lora_te` for SD 1.x's one encoder, `lora_te1` / `lora_te2` for SDXL's two
KOHYA_TEXT_ENCODER_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
ALPHAS_METADATA_KEY = "lora_alphas"
_PEFT_PREFIX = "base_model.model."
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_DIFFUSERS_PREFIXES = ("unet.", "transformer.")


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
                       flag: str = "--lora_target_modules") -> Any:
    """add_lora for training: the adapter's weights in fp32 (the frozen base may be fp16/bf16), a bad target
    list as a one-line UserError naming `flag`."""
    try:
        config = add_lora(model, rank, alpha, targets, dropout)
    except ValueError as exc:
        raise UserError(f"{flag}: {str(exc).splitlines()[0]}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return config


def base_model(model: nn.Module) -> nn.Module:
    """The plain diffusers model under a PeftModel wrapper (or the model itself)."""
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with PEFT keys relative to the diffusers model (`<module>.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {_strip(k, _PEFT_PREFIX): v for k, v in sd.items()}


def lora_scalings(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Each LoRA module's scale alpha / r, keyed by module name relative to the diffusers model."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[adapter_name]) for name, m in base_model(model).named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.scaling}


def _strip(key: str, prefix: str) -> str:
    """`key` without `prefix` when it starts with it."""
    return key[len(prefix):] if key.startswith(prefix) else key


def _module_of(key: str) -> str:
    """Module name of a PEFT LoRA key (`a.b.lora_A.weight` -> `a.b`)."""
    return key.rsplit(".lora_", 1)[0]


def _fold_scale(sd: Mapping[str, torch.Tensor], factors: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Multiply each module's lora_B by its factor (factors of exactly 1 leave the tensor untouched)."""
    out = {}
    for key, value in sd.items():
        factor = factors.get(_module_of(key), 1.0)
        out[key] = value * factor if ".lora_B." in key and factor != 1.0 else value
    return out


# ----------------------------------------------------------------------------- saving


def _diffusers_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's PEFT-keyed weights with each module's scale alpha / r folded into lora_B (diffusers' alpha = r)."""
    sd = _fold_scale(lora_state_dict(model, adapter_name), lora_scalings(model, adapter_name))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _text_model_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A CLIP text encoder's LoRA keys (or module names) under `text_model.`: recent transformers flatten CLIPTextModel (no
    `text_model` level), while diffusers, kohya and older transformers name its modules `text_model.encoder...`."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}


def save_diffusers_lora(model: nn.Module, out_dir: str, component: str = "unet", adapter_name: str = "default",
                        text_encoders: Mapping[str, nn.Module] | None = None) -> str:
    """Write `pytorch_lora_weights.safetensors` loadable by the pipeline's `load_lora_weights` (scale folded in).

    text_encoders: {"text_encoder": ..., "text_encoder_2": ...} whose LoRA goes into the same file (UNet only).
    """
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    # Keys stay in PEFT naming (`lora_A`/`lora_B`), as diffusers' current training scripts save them:
    # `convert_state_dict_to_diffusers` renames only attention projections (`lora.down`), and diffusers reads
    # a file mixing both namings as PEFT, silently skipping the renamed modules.
    layers = _diffusers_layers(model, adapter_name)
    encoders = {f"{name}_lora_layers": _text_model_keys(_diffusers_layers(enc, adapter_name))
                for name, enc in (text_encoders or {}).items()}
    if component == "unet":
        pipeline = StableDiffusionXLPipeline if "text_encoder_2_lora_layers" in encoders else StableDiffusionPipeline
        pipeline.save_lora_weights(out_dir, unet_lora_layers=layers, **encoders)
    elif component == "transformer" and not encoders:
        FluxPipeline.save_lora_weights(out_dir, transformer_lora_layers=layers)
    else:
        raise UserError(f"unknown LoRA component {component!r}: use 'unet' or 'transformer'")
    return os.path.join(out_dir, DIFFUSERS_WEIGHTS_NAME)


def save_peft_adapter(model: nn.Module, out_dir: str, adapter_name: str = "default") -> str:
    """Write `adapter_config.json` + `adapter_model.safetensors` with lora_alpha 8 (the seed-003 snippet's scale)."""
    from peft import LoraConfig

    cfg = base_model(model).peft_config[adapter_name]
    ranks = _ranks(lora_state_dict(model, adapter_name))
    factors = {m: s * r / PEFT_DEFAULT_ALPHA for m, s in lora_scalings(model, adapter_name).items()
               for r in [ranks[m]]}
    sd = _fold_scale(lora_state_dict(model, adapter_name), factors)
    targets = sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list)) else cfg.target_modules
    config = LoraConfig(r=cfg.r, lora_alpha=PEFT_DEFAULT_ALPHA, target_modules=targets,
                        rank_pattern=dict(cfg.rank_pattern or {}), lora_dropout=cfg.lora_dropout)
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {_PEFT_PREFIX + k: v.detach().contiguous() for k, v in sd.items()}
    path = os.path.join(out_dir, PEFT_WEIGHTS_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


# ----------------------------------------------------------------------------- kohya / ComfyUI / A1111


def _to_peft_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys (`.lora_A/.lora_B`) from PEFT, PeftModel or diffusers-style keys."""
    out = {}
    for key, value in sd.items():
        for prefix in (_PEFT_PREFIX, *_DIFFUSERS_PREFIXES):
            key = _strip(key, prefix)
        key = re.sub(r"\.lora(?:_linear_layer)?\.down\.", ".lora_A.", key)
        key = re.sub(r"\.lora(?:_linear_layer)?\.up\.", ".lora_B.", key)
        out[key] = value
    return out


def to_kohya(sd: Mapping[str, torch.Tensor], alphas: Mapping[str, float] | float,
             prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """kohya keys `<prefix>_<module_with_underscores>.lora_down/.lora_up.weight` and `.alpha` scalars."""
    out: dict[str, torch.Tensor] = {}
    for key, value in _to_peft_keys(sd).items():
        if key.endswith(".alpha"):
            continue
        module = _module_of(key)
        flat = f"{prefix}_{module.replace('.', '_')}"
        kind = "lora_down" if ".lora_A." in key else "lora_up"
        out[f"{flat}.{kind}.weight"] = value
        alpha = alphas if isinstance(alphas, (int, float)) else alphas[module]
        out[f"{flat}.alpha"] = torch.tensor(float(alpha))
    return out


def from_kohya(sd: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PEFT state dict and per-module alphas from kohya keys, resolved against the model's real module names."""
    lookup = {}
    for name, _ in base_model(model).named_modules():
        if name and ".lora_" not in name and not name.endswith("base_layer"):
            lookup.setdefault(name.replace(".", "_"), name)
    peft_sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, value in sd.items():
        flat, _, kind = key.partition(".")
        stem = next((_strip(flat, p) for p in _KOHYA_PREFIXES if flat.startswith(p)), None)
        if stem is None or stem not in lookup:
            raise UserError(f"LoRA key {key!r} names a module this model does not have (another architecture?)")
        module = lookup[stem]
        if kind == "alpha":
            alphas[module] = float(value.item())
        elif kind in ("lora_down.weight", "lora_up.weight"):
            peft_sd[f"{module}.{'lora_A' if kind.startswith('lora_down') else 'lora_B'}.weight"] = value
        else:
            raise UserError(f"LoRA key {key!r} is not a kohya lora_down/lora_up/alpha key")
    return peft_sd, alphas


# ----------------------------------------------------------------------------- loading any format


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"LoRA file {path} does not exist")
    if not path.endswith(".safetensors"):
        raise UserError(f"LoRA file {path} is not a .safetensors file (convert .bin/.pt/.ckpt first)")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"LoRA file {path} is not a readable safetensors file (truncated or corrupt?): {first}") from None


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """`kohya`, `diffusers` or `peft`, from the key names."""
    keys = list(sd)
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(_DIFFUSERS_PREFIXES) for k in keys):
        return "diffusers"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    raise UserError("file holds no LoRA keys in kohya, diffusers or PEFT format")


def _peft_folder_alphas(path: str, modules: list[str]) -> dict[str, float]:
    """Alphas from an `adapter_config.json` next to a PEFT weights file (PEFT's default 8 without one)."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    alpha, pattern = float(PEFT_DEFAULT_ALPHA), {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        alpha, pattern = float(cfg.get("lora_alpha", alpha)), cfg.get("alpha_pattern") or {}
    return {m: float(next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", m)), alpha)) for m in modules}


def find_lora_file(path: str) -> str:
    """The weights file of a LoRA given as a file or a folder (diffusers, PEFT, or a LoRA recipe's output folder)."""
    if not os.path.exists(path):
        raise UserError(f"LoRA file {path} does not exist")
    if os.path.isfile(path):
        return path
    names = (DIFFUSERS_WEIGHTS_NAME, PEFT_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME)
    for sub in ("", "unet", "transformer"):
        for name in names:
            if os.path.isfile(os.path.join(path, sub, name)):
                return os.path.join(path, sub, name)
    raise UserError(f"LoRA folder {path} holds no {', '.join(names)}")


def _restore_alphas(sd: dict[str, torch.Tensor], alphas: dict[str, float],
                    metadata: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Undo write_lora's folding: the source alphas from the `lora_alphas` metadata, lora_B scaled back."""
    try:
        source = {str(m): float(a) for m, a in json.loads(metadata.get(ALPHAS_METADATA_KEY) or "{}").items()}
    except (ValueError, TypeError, AttributeError):
        return sd, alphas  # not ours: the file's own scale stands
    if not source or set(source) != set(alphas) or not all(0 < abs(a) < float("inf") for a in source.values()):
        return sd, alphas
    return _fold_scale(sd, {m: alphas[m] / source[m] for m in source}), source


def read_lora(path: str, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """PEFT state dict, per-module alphas and format of a LoRA (file or folder, any format), checked against the model."""
    path = find_lora_file(path)
    raw, metadata = _read_safetensors(path)
    encoder_key = next((k for k in raw if k.startswith(("text_encoder", "lora_te"))), None)
    if encoder_key is not None:
        raise UserError(f"LoRA file {path} holds a text-encoder LoRA ({encoder_key!r}); only UNet and "
                        "transformer LoRAs are supported here (load it with diffusers' load_lora_weights)")
    fmt = detect_format(raw)
    if fmt == "kohya":
        sd, alphas = from_kohya(raw, model)
    else:
        sd = {k: v for k, v in _to_peft_keys(raw).items() if not k.endswith(".alpha")}
        ranks = _ranks(sd)
        alphas = ({m: float(r) for m, r in ranks.items()} if fmt == "diffusers"
                  else _peft_folder_alphas(path, list(ranks)))
        alphas.update({_module_of(k): float(v.item()) for k, v in _to_peft_keys(raw).items() if k.endswith(".alpha")})
        sd, alphas = _restore_alphas(sd, alphas, metadata)
    odd = next((k for k in sd if not re.search(r"\.lora_[AB]\.weight$", k)), None)
    if odd is not None:
        raise UserError(f"LoRA key {odd!r} is not a plain LoRA weight (DoRA, LoRA biases and other variants "
                        "are not supported)")
    check_fits(sd, model)
    return sd, alphas, fmt


def read_lora_file(path: str, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PEFT state dict and per-module alphas of a LoRA file in any supported format, checked against the model."""
    sd, alphas, _ = read_lora(path, model)
    return sd, alphas


def _ranks(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Each module's rank (lora_A's first dim)."""
    return {_module_of(k): int(v.shape[0]) for k, v in sd.items() if ".lora_A." in k}


def lora_ranks(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Each LoRA module of a PEFT state dict and its rank."""
    return _ranks(sd)


def check_fits(sd: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise a one-line UserError when a key names a missing module or a shape does not fit its in/out dims."""
    modules = dict(base_model(model).named_modules())
    for key, value in sd.items():
        name = _module_of(key)
        if name not in modules:
            raise UserError(f"LoRA module {name!r} is not in this model (a LoRA for another architecture?)")
        layer = getattr(modules[name], "base_layer", modules[name])
        weight = getattr(layer, "weight", None)
        if weight is None:
            raise UserError(f"LoRA module {name!r} is not a Linear/Conv layer in this model")
        out_dim, in_dim = weight.shape[0], weight.shape[1]
        if value.ndim != weight.ndim:
            raise UserError(f"LoRA {name!r}: {value.ndim}-d {key.rsplit('.', 2)[-2]} {tuple(value.shape)} does not fit "
                            f"the model's {weight.ndim}-d weight {tuple(weight.shape)} (another architecture?)")
        if ".lora_A." in key and (value.shape[1] != in_dim or tuple(value.shape[2:]) != tuple(weight.shape[2:])):
            raise UserError(f"LoRA {name!r}: lora_A shape {tuple(value.shape)} does not fit in-dim "
                            f"{in_dim} of the model (weight {tuple(weight.shape)})")
        if ".lora_B." in key and value.shape[0] != out_dim:
            raise UserError(f"LoRA {name!r}: lora_B shape {tuple(value.shape)} does not fit out-dim "
                            f"{out_dim} of the model (weight {tuple(weight.shape)})")
    down, up = _ranks(sd), {_module_of(k): int(v.shape[1]) for k, v in sd.items() if ".lora_B." in k}
    for name in sorted(set(down) | set(up)):
        if name not in down or name not in up:
            raise UserError(f"LoRA {name!r} has a lora_{'B' if name in up else 'A'} but no "
                            f"lora_{'A' if name in up else 'B'} (an incomplete file?)")
        if down[name] != up[name]:
            raise UserError(f"LoRA {name!r}: lora_A has rank {down[name]} but lora_B rank {up[name]}; they must match")


def _config_for(sd: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> Any:
    """A LoraConfig whose targets are exactly the file's modules, with per-module rank/alpha patterns."""
    from peft import LoraConfig

    ranks = _ranks(sd)
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas[m] for m in ranks).most_common(1)[0][0]
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks),
                      rank_pattern={m: v for m, v in ranks.items() if v != r},
                      alpha_pattern={m: alphas[m] for m in ranks if alphas[m] != alpha})


def load_lora_file(path: str, model: nn.Module, adapter_name: str = "default") -> Any:
    """Add the LoRA in `path` (kohya, diffusers or PEFT .safetensors) to the model as a new adapter; return its config."""
    from peft import set_peft_model_state_dict

    sd, alphas = read_lora_file(path, model)
    target = base_model(model)
    if adapter_name in (getattr(target, "peft_config", None) or {}):
        raise UserError(f"the model already has a LoRA adapter named {adapter_name!r}")
    config = _config_for(sd, alphas)
    target.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(target, dict(sd), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".lora_A.{adapter_name}" in k or f".lora_B.{adapter_name}" in k]
    if missing or result.unexpected_keys:
        raise UserError(f"LoRA file {path} did not load cleanly ({len(missing)} missing, "
                        f"{len(result.unexpected_keys)} unexpected keys)")
    return config


# ----------------------------------------------------------------------------- merging


def merge_lora(model: nn.Module) -> nn.Module:
    """Fuse the active adapter(s) into the base weights and remove every LoRA layer; returns the plain model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    model.fuse_lora()
    model.unload_lora()
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether any parameter of the model belongs to a LoRA layer."""
    return any("lora_" in name for name, _ in model.named_parameters())


def load_into_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Copy a LoRA file (any format) into the model's existing adapter, rescaling B so outputs match the file."""
    from peft import set_peft_model_state_dict

    sd, alphas = read_lora_file(path, model)
    ranks, scalings = _ranks(sd), lora_scalings(model, adapter_name)
    mine = _ranks(lora_state_dict(model, adapter_name))
    if set(ranks) != set(mine):
        raise UserError(f"LoRA {path} targets {len(ranks)} modules, the model's adapter {len(mine)}: "
                        "use the same --lora_target_modules as the run that wrote it")
    if ranks != mine:
        raise UserError(f"LoRA {path} has rank {max(ranks.values())}, the model's adapter "
                        f"{max(mine.values())}: use the same --lora_rank as the run that wrote it")
    factors = {m: (alphas[m] / r) / scalings[m] for m, r in ranks.items()}
    result = set_peft_model_state_dict(base_model(model), _fold_scale(sd, factors), adapter_name=adapter_name)
    if result.unexpected_keys:
        raise UserError(f"LoRA {path} does not fit the model's adapter ({len(result.unexpected_keys)} unexpected keys)")


@contextmanager
def adapters_disabled(model: nn.Module):
    """The teacher of a LoRA recipe: the same model with its LoRA switched off for the duration of the block."""
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


# ----------------------------------------------------------------------------- converting and exporting


def lora_alphas(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Each LoRA module's alpha as the adapter was created with it, keyed by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.lora_alpha[adapter_name]) for name, m in base_model(model).named_modules()
            if isinstance(m, LoraLayer) and adapter_name in m.lora_alpha}


def save_lora_outputs(model: nn.Module, out_dir: str, component: str = "unet", peft_dir: str | None = None,
                      text_encoders: Mapping[str, nn.Module] | None = None) -> None:
    """The LoRA recipes' final files: diffusers and kohya files in out_dir, the PEFT folder in peft_dir.

    peft_dir defaults to `out_dir/<component>` (train_lcm_distill_lora_sdxl.py's layout). text_encoders
    ({"text_encoder": ..., "text_encoder_2": ...}, with their LoRA) join the diffusers and kohya files
    (kohya prefix `lora_te` for one encoder, `lora_te1`/`lora_te2` for two) and get PEFT folders `out_dir/<name>`.
    """
    if component not in KOHYA_PREFIX:
        raise UserError(f"unknown LoRA component {component!r}: use 'unet' or 'transformer'")
    text_encoders = dict(text_encoders or {})
    save_diffusers_lora(model, out_dir, component, text_encoders=text_encoders)
    save_peft_adapter(model, peft_dir or os.path.join(out_dir, component))
    kohya = to_kohya(lora_state_dict(model), lora_alphas(model), KOHYA_PREFIX[component])
    for name, enc in text_encoders.items():
        save_peft_adapter(enc, os.path.join(out_dir, name))
        prefix = "lora_te" if len(text_encoders) == 1 else KOHYA_TEXT_ENCODER_PREFIX[name]
        kohya.update(to_kohya(_text_model_keys(lora_state_dict(enc)), _text_model_keys(lora_alphas(enc)), prefix))
    save_file({k: v.detach().contiguous() for k, v in kohya.items()}, os.path.join(out_dir, KOHYA_WEIGHTS_NAME))


def targeted_modules(model: nn.Module, targets: list[str]) -> set[str]:
    """Names of the Linear/Conv layers that LoraConfig(target_modules=targets) adapts in a model without adapters."""
    return {name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in targets)}


def infer_targets(modules: set[str] | list[str], model: nn.Module) -> list[str]:
    """A target_modules list for a LoRA on exactly these modules: the recipes' preset that adapts them, else the names."""
    for preset in (LCM_LORA_TARGETS, DIFFUSERS_LORA_TARGETS, FLUX_LORA_TARGETS):
        if targeted_modules(model, preset) == set(modules):
            return list(preset)
    return sorted(modules)


def write_lora(sd: Mapping[str, torch.Tensor], alphas: Mapping[str, float], fmt: str, path: str,
               component: str = "unet", targets: list[str] | None = None) -> str:
    """Write a PEFT state dict with per-module alphas as `fmt`; returns the weights file written.

    `path` is the .safetensors file for diffusers and kohya, the adapter folder for PEFT. diffusers (alpha =
    rank) and PEFT (alpha 8) fold alpha / their own alpha into lora_B and, unless that is 1 everywhere, keep the
    given alphas in the metadata so read_lora restores them. `targets` is the PEFT config's target_modules
    (default: the module names).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown LoRA format {fmt!r}: use one of {', '.join(FORMATS)}")
    if component not in KOHYA_PREFIX:
        raise UserError(f"unknown LoRA component {component!r}: use 'unet' or 'transformer'")
    ranks = _ranks(sd)
    metadata: dict[str, str] | None = None
    if fmt == "kohya":
        tensors = to_kohya(sd, alphas, KOHYA_PREFIX[component])
    else:
        own = {m: float(r) if fmt == "diffusers" else float(PEFT_DEFAULT_ALPHA) for m, r in ranks.items()}
        factors = {m: alphas[m] / own[m] for m in ranks}
        metadata = {"format": "pt"}
        if any(f != 1.0 for f in factors.values()):
            metadata[ALPHAS_METADATA_KEY] = json.dumps({m: float(alphas[m]) for m in sorted(ranks)})
        prefix = f"{component}." if fmt == "diffusers" else _PEFT_PREFIX
        tensors = {prefix + k: v for k, v in _fold_scale(sd, factors).items()}
    if fmt == "peft":
        from peft import LoraConfig

        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        config = LoraConfig(r=r, lora_alpha=PEFT_DEFAULT_ALPHA, target_modules=list(targets or sorted(ranks)),
                            rank_pattern={m: v for m, v in ranks.items() if v != r})
        os.makedirs(path, exist_ok=True)
        config.save_pretrained(path)
        path = os.path.join(path, PEFT_WEIGHTS_NAME)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def output_path(path: str, fmt: str) -> str:
    """Where `fmt` goes for an output path: a .safetensors file as given, a folder gets the format's usual file name."""
    if fmt == "peft":
        if path.endswith(".safetensors"):
            raise UserError(f"a PEFT adapter is a folder, not a file: {path}")
        return path
    if path.endswith(".safetensors"):
        return path
    return os.path.join(path, DIFFUSERS_WEIGHTS_NAME if fmt == "diffusers" else KOHYA_WEIGHTS_NAME)


def check_output(path: str, overwrite: bool = False) -> None:
    """UserError when `path` exists (and overwrite is off) or cannot be created."""
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot create {path}: {parent} is a file")


@contextmanager
def staged_output(path: str, overwrite: bool = False):
    """Yield a temporary sibling of `path` to write (a file or a folder); renamed to `path` only when the block succeeds.

    On any error the temporary and the folders created for it are removed, so nothing partial is left behind.
    """
    import shutil

    check_output(path, overwrite)
    path = os.path.abspath(path)
    created = parent = os.path.dirname(path)
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    made = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.partial-{os.getpid()}")
    old = os.path.join(parent, f".{os.path.basename(path)}.old-{os.getpid()}")

    def remove(p: str) -> None:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.remove(p)

    remove(tmp)
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise RuntimeError(f"nothing was written to {tmp}")
        if os.path.exists(path):  # --overwrite: move the old one aside, put the new one in, then delete the old
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        if made:
            shutil.rmtree(created, ignore_errors=True)
        raise


def checkpoint_lora_state(state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA weights (PEFT keys relative to the model) in the full state dict of an adapted model, e.g. a checkpoint's."""
    pattern = re.compile(rf"^(.+)\.(lora_[AB])\.{re.escape(adapter_name)}\.weight$")
    out = {}
    for key, value in state.items():
        match = pattern.match(_strip(key, _PEFT_PREFIX))
        if match:
            out[f"{match.group(1)}.{match.group(2)}.weight"] = value
    return out


def add_lora_from_state(model: nn.Module, sd: Mapping[str, torch.Tensor], alpha: float, targets: list[str],
                        dropout: float = 0.0, adapter_name: str = "default") -> Any:
    """Re-create a trained adapter: add_lora with the recipe's settings, check it adapts exactly sd's modules, load sd."""
    from peft import set_peft_model_state_dict

    check_fits(sd, model)
    ranks = _ranks(sd)
    if not ranks:
        raise UserError("no LoRA weights (lora_A/lora_B) found")
    if len(set(ranks.values())) != 1:
        raise UserError(f"the LoRA has several ranks ({sorted(set(ranks.values()))}); the recipes train one rank")
    try:
        config = add_lora(model, next(iter(ranks.values())), alpha, targets, dropout, adapter_name)
    except ValueError as exc:
        raise UserError(f"target modules {targets}: {str(exc).splitlines()[0]}") from None
    adapted = set(_ranks(lora_state_dict(model, adapter_name)))
    if adapted != set(ranks):
        raise UserError(f"target modules {targets} adapt {len(adapted)} modules, the LoRA has {len(ranks)}: "
                        "give the training run's --lora_target_modules")
    result = set_peft_model_state_dict(base_model(model), dict(sd), adapter_name=adapter_name)
    if result.unexpected_keys:
        raise UserError(f"the LoRA does not fit the model's adapter ({len(result.unexpected_keys)} unexpected keys)")
    return config


def denoiser_skeleton(path: str, flag: str = "--base_model") -> tuple[nn.Module, str]:
    """The pipeline's UNet or FLUX transformer built from its config without weights (names and shapes only),
    and its component name ("unet" or "transformer")."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from utils import models

    component = "transformer" if models.detect_architecture(path, flag=flag) == "flux" else "unet"
    cls = FluxTransformer2DModel if component == "transformer" else UNet2DConditionModel
    config = models._load_config(cls, path, component, None, flag)
    with init_empty_weights():
        return cls.from_config(config), component
