"""On-disk caches of what a training step would otherwise recompute every epoch: VAE latents, prompt embeddings.

--cache_latents: every image is encoded ONCE and the VAE posterior q(z|x) = N(mean, std^2) is kept
(not a sample of it), so each step still draws a fresh z = mean + std * eps (then scaled) from the
run's generator, exactly as the uncached step does. Images are center-cropped once (a random crop would
need a fresh encode every epoch); with --random_flip both orientations are cached and one is picked per
sample.

--cache_text_embeddings: the frozen text encoders' output for every distinct caption of the dataset
(and the empty prompt), looked up by caption string.

Both are stored as safetensors under --feature_cache_dir, in a file named by a hash of everything the
content depends on (the model files' names, sizes and modification times, dtype, resolution, crop/flip,
the dataset's files or fingerprint, the caption set): a later run with the same inputs reuses the file,
and a change to any of them makes a new one. Files are written under a temporary name and renamed, so
an interrupted build never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from . import files
from .errors import UserError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored layout changes: old files are then simply not found


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/fewstep_distill (default ~/.cache/fewstep_distill)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fewstep_distill")


def files_fingerprint(path: str) -> list:
    """[(relative path, size, mtime_ns)] of every file under a local folder (or of one file); a hub id as is."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
    if not os.path.isdir(path):
        return [path]  # a hub id: its revision goes into the key separately
    entries = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            st = os.stat(full)
            entries.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
    return entries


def cache_file(cache_dir: str | None, kind: str, key: dict) -> str:
    """<cache_dir (default: default_cache_dir())>/<kind>-<sha256 of the key>.safetensors."""
    cache_dir = cache_dir or default_cache_dir()
    blob = json.dumps({"version": CACHE_VERSION, "kind": kind, **key}, sort_keys=True, default=str)
    return os.path.join(os.path.expanduser(cache_dir), f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.safetensors")


def _save_atomic(tensors: dict[str, Tensor], metadata: dict, path: str) -> None:
    """safetensors through a temporary name: readers see the whole file or none."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with files.atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"json": json.dumps(metadata)})


def _load(path: str) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        metadata = json.loads(f.metadata()["json"])
    return load_file(path), metadata


def _writable_dir(cache_dir: str | None, flag: str) -> None:
    cache_dir = cache_dir or default_cache_dir()
    try:
        os.makedirs(os.path.expanduser(cache_dir), exist_ok=True)
    except OSError as exc:
        raise UserError(f"cache folder {cache_dir} cannot be created ({exc.strerror}) (--feature_cache_dir)") from exc
    if not os.access(os.path.expanduser(cache_dir), os.W_OK):
        raise UserError(f"cache folder {cache_dir} is not writable (--feature_cache_dir, needed by {flag})")


# ----------------------------------------------------------------------------- latents


class CachedLatentDataset(Dataset):
    """Samples of a latent cache: {latent_mean, latent_std, caption, original_size, crop_top_left} or None."""

    def __init__(self, tensors: dict[str, Tensor], metadata: dict, captions: Callable[[int], str]) -> None:
        self.mean, self.std = tensors["mean"], tensors["std"]  # (N, V, C, h, w); V = 2 with flips
        self.valid = tensors["valid"].bool()
        self.original_sizes = metadata["original_sizes"]
        self.crop_top_lefts = metadata["crop_top_lefts"]
        self.captions = captions

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, index: int) -> dict | None:
        if not self.valid[index]:
            return None  # an undecodable image: dropped and counted by the collate, as uncached
        # the flip draw comes from torch's global RNG, as ImageTransform's does (seeded per worker)
        view = int(torch.randint(0, self.mean.shape[1], ())) if self.mean.shape[1] > 1 else 0
        return {"latent_mean": self.mean[index, view], "latent_std": self.std[index, view],
                "caption": self.captions(index), "original_size": tuple(self.original_sizes[index]),
                "crop_top_left": tuple(self.crop_top_lefts[index][view])}


@torch.no_grad()
def encode_posteriors(vae: Any, dataset: Dataset, batch_size: int, num_workers: int, flip: bool,
                      progress: bool = True) -> tuple[dict[str, Tensor], dict]:
    """mean/std of q(z|x) of every sample (and of its mirror image when flip), plus sizes, crops, validity."""
    from tqdm.auto import tqdm

    from .data import collate_image_caption

    def collate(batch):  # keep each sample's position, including the undecodable ones
        return [i for i, s in enumerate(batch) if s is not None], collate_image_caption(batch)

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    n, means, stds = len(dataset), [], []  # type: ignore[arg-type]
    valid = torch.zeros(n, dtype=torch.uint8)
    sizes: list = [[0, 0]] * n
    crops: list = [[[0, 0]] * (2 if flip else 1)] * n
    device = vae.device
    start = 0
    for kept, batch in tqdm(loader, desc="caching latents", disable=not progress):
        pixels = batch["pixel_values"].to(device, vae.dtype)
        views = [pixels, pixels.flip(-1)] if flip else [pixels]
        if len(kept):
            dists = [vae.encode(v).latent_dist for v in views]
            means.append(torch.stack([d.mean.float().cpu() for d in dists], 1))
            stds.append(torch.stack([d.std.float().cpu() for d in dists], 1))
        for j, i in enumerate(kept):
            valid[start + i] = 1
            sizes[start + i] = list(batch["original_sizes"][j])
            # the mirror view is the mirror of the center crop: same (top, left) as SDXL sees it
            crops[start + i] = [list(batch["crop_top_lefts"][j])] * len(views)
        start += len(batch["captions"]) + batch["num_skipped"]
    if not means:
        raise UserError("no image of the training data could be decoded (--cache_latents)")
    mean, std = torch.cat(means), torch.cat(stds)
    full_mean = torch.zeros((n, *mean.shape[1:]), dtype=mean.dtype)
    full_std = torch.zeros_like(full_mean)
    full_mean[valid.bool()], full_std[valid.bool()] = mean, std
    return ({"mean": full_mean, "std": full_std, "valid": valid},
            {"original_sizes": sizes, "crop_top_lefts": crops})


def dataset_identity(args: Any, dataset: Any) -> dict:
    """What the training samples depend on: the data files (local) or the dataset's fingerprint, and the subset."""
    source = args.train_data_dir or args.dataset_name
    table = getattr(dataset, "table", None)
    return {"source": source, "files": files_fingerprint(source),
            "fingerprint": getattr(table, "_fingerprint", None) if not os.path.exists(os.path.expanduser(source)) else None,
            "image_column": args.image_column, "caption_column": args.caption_column,
            "max_train_samples": args.max_train_samples,
            "subset_seed": args.seed if args.max_train_samples is not None else None}


def model_identity(path: str, subfolders: Sequence[str], revision: str | None, variant: str | None) -> dict:
    """The files of the named subfolders of a local model (or the hub id, revision and variant)."""
    local = os.path.isdir(os.path.expanduser(path))
    return {"path": path, "revision": revision, "variant": variant,
            "files": {s: files_fingerprint(os.path.join(path, s)) for s in subfolders} if local else None}


def cached_latent_dataset(args: Any, dataset: Any, vae: Any, accelerator: Any) -> CachedLatentDataset:
    """--cache_latents: the dataset's VAE posteriors, read from the cache or encoded now (main process first)."""
    from .data import ImageCaptionDataset, ImageTransform, caption_text

    if not isinstance(dataset, ImageCaptionDataset):
        raise UserError("--cache_latents needs a map-style dataset (--dataset_name or --train_data_dir), "
                        "not a webdataset stream (--train_shards_path_or_url)")
    if not args.center_crop:
        logger.warning("--cache_latents: images are center-cropped once (a random crop needs a fresh encode)")
    vae_source = args.pretrained_vae_model_name_or_path
    key = {"vae": model_identity(vae_source, [""], None, None) if vae_source else
           model_identity(args.pretrained_teacher_model, ["vae"], args.revision, args.variant),
           "dtype": str(vae.dtype), "resolution": args.resolution, "flip": bool(args.random_flip),
           "data": dataset_identity(args, dataset)}
    path = cache_file(args.feature_cache_dir, "latents", key)
    captions = dataset.table.select_columns([dataset.caption_column])

    def caption(i: int) -> str:
        return caption_text(captions[int(i)][dataset.caption_column])

    with accelerator.main_process_first():  # one process encodes; the others then read its file
        if not os.path.exists(path):
            _writable_dir(args.feature_cache_dir, "--cache_latents")
            logger.info(f"encoding {len(dataset)} images once into {path}")
            source = ImageCaptionDataset(dataset.table, dataset.image_column, dataset.caption_column,
                                         ImageTransform(args.resolution, center_crop=True, random_flip=False))
            # no more images per VAE call than a training step encodes on the fly: filling the cache never needs more
            # memory than training without it (32 images at 1024 px in an fp32 VAE would need ~20 GB)
            chunk = min(args.vae_encode_batch_size, getattr(args, "train_batch_size", args.vae_encode_batch_size))
            tensors, metadata = encode_posteriors(vae, source, chunk,
                                                  args.dataloader_num_workers, args.random_flip,
                                                  progress=accelerator.is_local_main_process)
            if accelerator.is_main_process:
                _save_atomic(tensors, metadata, path)
        else:
            logger.info(f"latents from the cache {path}")
    tensors, metadata = _load(path)
    return CachedLatentDataset(tensors, metadata, caption)


def latents_of_batch(batch: dict, vae: Any, batch_size: int, generator: torch.Generator | None,
                     device: torch.device | str) -> Tensor:
    """z for a batch: a draw from the cached posterior (--cache_latents) or a fresh VAE encode, both scaled."""
    from .models import encode_latents, scale_latents

    if "latent_mean" in batch:
        mean = batch["latent_mean"].to(device)
        std = batch["latent_std"].to(device)
        eps = torch.randn(mean.shape, generator=generator, device=device)  # the draw the VAE's sample() makes
        return scale_latents(vae, mean + std * eps)
    return encode_latents(vae, batch["pixel_values"].to(device, vae.dtype), batch_size, generator).float()


# ----------------------------------------------------------------------------- prompt embeddings


class TextEmbeddingCache:
    """Frozen text-encoder outputs by caption: lookup(captions) -> the tuple encode(captions) would give."""

    def __init__(self, tensors: dict[str, Tensor], captions: list[str], encode: Callable[[list[str]], tuple]) -> None:
        self.tensors = [tensors[f"out{i}"] for i in range(len(tensors))]
        self.row = {c: i for i, c in enumerate(captions)}
        self.encode = encode

    def release_encoders(self) -> None:
        """The text encoders are gone: a caption the cache lacks can no longer be encoded, and says so."""
        def refuse(captions: list[str]) -> tuple:
            missing = next(c for c in captions if c not in self.row)
            raise UserError(f"prompt {missing!r} is not among those --cache_text_embeddings cached (the training "
                            "captions, --validation_prompts and the empty prompt), and the text encoders were freed")
        self.encode = refuse

    def lookup(self, captions: Sequence[str], device: torch.device | str, dtype: torch.dtype) -> tuple[Tensor, ...]:
        missing = [c for c in captions if c not in self.row]
        if missing:  # a caption the dataset did not list (e.g. a user-changed collate): encode it
            return tuple(t.to(device, dtype) for t in self.encode(list(captions)))
        rows = torch.tensor([self.row[c] for c in captions])
        return tuple(t[rows].to(device, dtype) for t in self.tensors)


@torch.no_grad()
def cached_text_embeddings(args: Any, captions: Sequence[str], encode: Callable[[list[str]], tuple],
                           encoders: Sequence[Any], accelerator: Any, extra_key: dict | None = None,
                           batch_size: int = 64) -> TextEmbeddingCache:
    """--cache_text_embeddings: encode(captions) for every distinct caption, --validation_prompts and "", from the
    cache or now (so the text encoders can be freed afterwards)."""
    from tqdm.auto import tqdm

    unique = sorted(set(captions) | set(getattr(args, "validation_prompts", None) or []) | {""})
    names = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
    key = {"model": model_identity(args.pretrained_teacher_model, names, args.revision, args.variant),
           "dtype": [str(e.dtype) for e in encoders], "captions": hashlib.sha256("\n".join(unique).encode()).hexdigest(),
           **(extra_key or {})}
    path = cache_file(args.feature_cache_dir, "text", key)
    with accelerator.main_process_first():
        if not os.path.exists(path):
            _writable_dir(args.feature_cache_dir, "--cache_text_embeddings")
            outputs: list[list[Tensor]] = []
            for start in tqdm(range(0, len(unique), batch_size), desc="caching prompt embeddings",
                              disable=not accelerator.is_local_main_process):
                out = encode(unique[start:start + batch_size])
                outputs.append([t.float().cpu() for t in out])
            tensors = {f"out{i}": torch.cat(parts) for i, parts in enumerate(zip(*outputs))}
            if accelerator.is_main_process:
                _save_atomic(tensors, {"captions": unique}, path)
        else:
            logger.info(f"prompt embeddings from the cache {path}")
    tensors, metadata = _load(path)
    return TextEmbeddingCache(tensors, metadata["captions"], encode)


def dataset_captions(dataset: Any) -> list[str]:
    """Every caption string of a map-style image+caption dataset (all alternatives of list-valued cells)."""
    from .data import ImageCaptionDataset

    if not isinstance(dataset, ImageCaptionDataset):
        raise UserError("--cache_text_embeddings needs a map-style dataset (--dataset_name or --train_data_dir), "
                        "not a webdataset stream (--train_shards_path_or_url)")
    out = []
    for cell in dataset.table[dataset.caption_column]:
        cells = cell if isinstance(cell, (list, tuple)) else [cell]
        out.extend(c.decode("utf-8") if isinstance(c, bytes) else ("" if c is None else str(c)) for c in cells)
    return out
