"""LoRA files in three formats (diffusers, PEFT folder, kohya/ComfyUI/A1111): writing, reading, detecting,
converting, loading into a model's adapter, and exporting a training checkpoint's LoRA. Live adapters are
utils/lora.py.

Alpha / scale convention
------------------------
A LoRA layer computes ``W x + (alpha / r) * B A x``. The three formats store the scale differently:

* PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``): alpha lives in the json. The released
  TLCM/LCM loading snippet does ``get_peft_model(unet, LoraConfig(r=64, ...))`` and then
  ``load_adapter(dir, adapter_name="default")``; since "default" already exists, PEFT keeps the in-memory
  config and IGNORES the saved alpha, so the scale is PEFT's default ``8 / r``. PEFT folders are therefore
  always written with ``lora_alpha = 8`` (``PEFT_DEFAULT_ALPHA``); an adapter trained with another alpha has
  the ratio folded into ``lora_B`` so its output is unchanged.
* diffusers (``pytorch_lora_weights.safetensors``): no alphas are written, and diffusers then loads with
  ``alpha = rank`` (scale 1), so each module's scale ``alpha / r`` is folded into ``lora_B``.
* kohya: every module carries an ``.alpha`` scalar; loaders use ``alpha / rank`` where rank is
  ``lora_down``'s first dim. Written as-is (no folding).

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
import shutil
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from utils import files
from utils.errors import UserError
from utils.lora import (PEFT_DEFAULT_ALPHA, PEFT_PREFIX, add_lora, base_model, is_lora_weight, lora_alphas,
                        lora_scalings, lora_state_dict)
from utils.sharding import whole_parameters

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
FORMATS = ("diffusers", "peft", "kohya")
KOHYA_PREFIX = {"unet": "lora_unet", "transformer": "lora_transformer"}
# kohya's text-encoder prefixes: `lora_te` for SD 1.x's one encoder, `lora_te1` / `lora_te2` for SDXL's two
KOHYA_TEXT_ENCODER_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
ALPHAS_METADATA_KEY = "lora_alphas"
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")  # the keys of a text-encoder LoRA: diffusers', kohya's
_DIFFUSERS_PREFIXES = ("unet.", "transformer.")


# ----------------------------------------------------------------------------- PEFT state dicts


def _module_of(key: str) -> str:
    """Module name of a PEFT LoRA key (`a.b.lora_A.weight` -> `a.b`)."""
    return key.rsplit(".lora_", 1)[0]


def lora_ranks(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Each LoRA module of a PEFT state dict and its rank (lora_A's first dim)."""
    return {_module_of(k): int(v.shape[0]) for k, v in sd.items() if ".lora_A." in k}


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
    """Write `adapter_config.json` + `adapter_model.safetensors` with lora_alpha 8 (the released snippet's scale)."""
    from peft import LoraConfig

    cfg = base_model(model).peft_config[adapter_name]
    ranks = lora_ranks(lora_state_dict(model, adapter_name))
    factors = {m: s * r / PEFT_DEFAULT_ALPHA for m, s in lora_scalings(model, adapter_name).items()
               for r in [ranks[m]]}
    sd = _fold_scale(lora_state_dict(model, adapter_name), factors)
    targets = sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list)) else cfg.target_modules
    config = LoraConfig(r=cfg.r, lora_alpha=PEFT_DEFAULT_ALPHA, target_modules=targets,
                        rank_pattern=dict(cfg.rank_pattern or {}), lora_dropout=cfg.lora_dropout)
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in sd.items()}
    path = os.path.join(out_dir, PEFT_WEIGHTS_NAME)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


# ----------------------------------------------------------------------------- kohya / ComfyUI / A1111


def _to_peft_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys (`.lora_A/.lora_B`) from PEFT, PeftModel or diffusers-style keys."""
    out = {}
    for key, value in sd.items():
        for prefix in (PEFT_PREFIX, *_DIFFUSERS_PREFIXES):
            key = key.removeprefix(prefix)
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
        stem = next((flat.removeprefix(p) for p in _KOHYA_PREFIXES if flat.startswith(p)), None)
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


# ----------------------------------------------------------------------------- reading any format


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def without_text_encoders(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors but a text encoder's (diffusers' `text_encoder*`, kohya's `lora_te*` keys)."""
    return {k: v for k, v in tensors.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}


def read_lora(path: str, model: nn.Module,
              text_encoders: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """PEFT state dict, per-module alphas and format of a LoRA (file or folder, any format), checked against the model.

    A file that also holds a text-encoder LoRA is refused, unless `text_encoders`: then its denoiser part is read
    (the caller loads the whole file with the pipeline's load_lora_weights)."""
    path = find_lora_file(path)
    raw, metadata = read_safetensors(path)
    encoder_key = next((k for k in raw if k.startswith(TEXT_ENCODER_PREFIXES)), None)
    if encoder_key is not None and not text_encoders:
        raise UserError(f"LoRA file {path} holds a text-encoder LoRA ({encoder_key!r}); only UNet and transformer "
                        "LoRAs are supported here (load it with diffusers' load_lora_weights, or inference.py)")
    raw = without_text_encoders(raw)
    fmt = detect_format(raw)
    if fmt == "kohya":
        sd, alphas = from_kohya(raw, model)
    else:
        sd = {k: v for k, v in _to_peft_keys(raw).items() if not k.endswith(".alpha")}
        ranks = lora_ranks(sd)
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
    down, up = lora_ranks(sd), {_module_of(k): int(v.shape[1]) for k, v in sd.items() if ".lora_B." in k}
    for name in sorted(set(down) | set(up)):
        if name not in down or name not in up:
            raise UserError(f"LoRA {name!r} has a lora_{'B' if name in up else 'A'} but no "
                            f"lora_{'A' if name in up else 'B'} (an incomplete file?)")
        if down[name] != up[name]:
            raise UserError(f"LoRA {name!r}: lora_A has rank {down[name]} but lora_B rank {up[name]}; they must match")


# ----------------------------------------------------------------------------- loading into a model


def _config_for(sd: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> Any:
    """A LoraConfig whose targets are exactly the file's modules, with per-module rank/alpha patterns."""
    from peft import LoraConfig

    ranks = lora_ranks(sd)
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas[m] for m in ranks).most_common(1)[0][0]
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks),
                      rank_pattern={m: v for m, v in ranks.items() if v != r},
                      alpha_pattern={m: alphas[m] for m in ranks if alphas[m] != alpha})


def load_lora_file(path: str, model: nn.Module, adapter_name: str = "default") -> Any:
    """Add the LoRA in `path` (kohya, diffusers or PEFT .safetensors) to the model as a new adapter; return its config."""
    from peft import set_peft_model_state_dict

    sd, alphas, _ = read_lora(path, model)
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


def load_into_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Copy a LoRA file (any format) into the model's existing adapter, rescaling B so outputs match the file."""
    from peft import set_peft_model_state_dict

    sd, alphas, _ = read_lora(path, model)
    ranks, scalings = lora_ranks(sd), lora_scalings(model, adapter_name)
    mine = lora_ranks(lora_state_dict(model, adapter_name))
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


def add_lora_from_state(model: nn.Module, sd: Mapping[str, torch.Tensor], alpha: float, targets: list[str],
                        dropout: float = 0.0, adapter_name: str = "default") -> Any:
    """Re-create a trained adapter: add_lora with the recipe's settings, check it adapts exactly sd's modules, load sd."""
    from peft import set_peft_model_state_dict

    check_fits(sd, model)
    ranks = lora_ranks(sd)
    if not ranks:
        raise UserError("no LoRA weights (lora_A/lora_B) found")
    if len(set(ranks.values())) != 1:
        raise UserError(f"the LoRA has several ranks ({sorted(set(ranks.values()))}); the recipes train one rank")
    try:
        config = add_lora(model, next(iter(ranks.values())), alpha, targets, dropout, adapter_name)
    except ValueError as exc:
        raise UserError(f"target modules {targets}: {str(exc).splitlines()[0]}") from None
    adapted = set(lora_ranks(lora_state_dict(model, adapter_name)))
    if adapted != set(ranks):
        raise UserError(f"target modules {targets} adapt {len(adapted)} modules, the LoRA has {len(ranks)}: "
                        "give the training run's --lora_target_modules")
    result = set_peft_model_state_dict(base_model(model), dict(sd), adapter_name=adapter_name)
    if result.unexpected_keys:
        raise UserError(f"the LoRA does not fit the model's adapter ({len(result.unexpected_keys)} unexpected keys)")
    return config


# ----------------------------------------------------------------------------- writing and exporting


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


def save_trained_lora(accelerator: Any, model: nn.Module, out_dir: str, component: str = "unet", staged: bool = False,
                      text_encoders: Mapping[str, nn.Module] | None = None) -> None:
    """Every process: the LoRA of a recipe's `model` (gathered where it is sharded), written by the main process with
    save_lora_outputs, to a temporary folder whose files then replace those of the same names in out_dir (the others,
    e.g. checkpoints, stay). staged: every file, the PEFT folder's included, in out_dir itself."""
    accelerator.wait_for_everyone()
    with whole_parameters(model, is_lora_weight):  # a collective: every process gathers
        if not accelerator.is_main_process:
            return
        # written aside, then moved in file by file: a stop or a full disk leaves nothing half-written
        with staged_output(out_dir, overwrite=True) as partial:
            os.makedirs(partial)
            save_lora_outputs(model, partial, component, peft_dir=partial if staged else None,
                              text_encoders=text_encoders)


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
    ranks = lora_ranks(sd)
    metadata: dict[str, str] | None = None
    if fmt == "kohya":
        tensors = to_kohya(sd, alphas, KOHYA_PREFIX[component])
    else:
        own = {m: float(r) if fmt == "diffusers" else float(PEFT_DEFAULT_ALPHA) for m, r in ranks.items()}
        factors = {m: alphas[m] / own[m] for m in ranks}
        metadata = {"format": "pt"}
        if any(f != 1.0 for f in factors.values()):
            metadata[ALPHAS_METADATA_KEY] = json.dumps({m: float(alphas[m]) for m in sorted(ranks)})
        prefix = f"{component}." if fmt == "diffusers" else PEFT_PREFIX
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
def staged_output(path: str, overwrite: bool = False, program: str | None = None) -> Iterator[str]:
    """Yield a temporary sibling of `path` to write (a file or a folder), installed as `path` once the block succeeds.

    A folder written onto an existing folder replaces only the entries of the names it writes (files.install_into):
    what that folder holds under other names stays. program: mark a folder output as that program's
    (outputs.MARKER). On any error the temporary and the folders created for it are removed, so nothing partial
    is left behind.
    """
    from utils import outputs

    check_output(path, overwrite)
    path = os.path.abspath(path)
    created = parent = os.path.dirname(path)
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    made = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    try:
        with files.atomic_write(path, into=True) as tmp:
            yield tmp
            if program and os.path.isdir(tmp):
                outputs.mark(tmp, program)
    except BaseException:
        if made:
            shutil.rmtree(created, ignore_errors=True)
        raise


def checkpoint_lora_state(state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA weights (PEFT keys relative to the model) in the full state dict of an adapted model, e.g. a checkpoint's."""
    pattern = re.compile(rf"^(.+)\.(lora_[AB])\.{re.escape(adapter_name)}\.weight$")
    out = {}
    for key, value in state.items():
        match = pattern.match(key.removeprefix(PEFT_PREFIX))
        if match:
            out[f"{match.group(1)}.{match.group(2)}.weight"] = value
    return out


def denoiser_skeleton(path: str, flag: str = "--base_model") -> tuple[nn.Module, str]:
    """The pipeline's UNet or FLUX transformer built from its config without weights (names and shapes only),
    and its component name ("unet" or "transformer")."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from utils import models

    component = "transformer" if models.detect_architecture(path, flag=flag) == "flux" else "unet"
    cls = FluxTransformer2DModel if component == "transformer" else UNet2DConditionModel
    config = models.load_config(cls, path, component, None, flag)
    with init_empty_weights():
        return cls.from_config(config), component
