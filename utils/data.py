"""Training data shared by every recipe: image+caption datasets, the image transform, prompt lists.

Three sources of image+caption pairs, exactly one per run:
  --dataset_name              a `datasets` hub id or local dataset folder (map-style);
  --train_data_dir            an HF `imagefolder` (images + metadata.jsonl/csv) (map-style);
  --train_shards_path_or_url  webdataset .tar shards: a path, glob or brace pattern (iterable).
A sample whose image cannot be decoded comes out as None; `collate_image_caption` drops and counts
it, so one bad file never stops a run (`check_not_all_corrupt` catches the case where all are bad).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
import random
import struct
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .errors import UserError

logger = logging.getLogger(__name__)

SOURCE_FLAGS = ("--dataset_name", "--train_data_dir", "--train_shards_path_or_url")
WDS_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
WDS_CAPTION_KEYS = ("txt", "caption")
PROMPT_FILE_TYPES = (".txt", ".jsonl", ".csv")

# Everything PIL (or a truncated/garbage file) can throw while opening, decoding or converting:
# UnidentifiedImageError is an OSError; broken PNG chunks raise SyntaxError; short reads EOFError.
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

Sample = dict[str, Any]


# ----------------------------------------------------------------------------- the transform


class ImageTransform:
    """PIL image -> pixel_values in [-1, 1] of shape (3, R, R), plus SDXL's size/crop conditioning."""

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if int(resolution) < 1:
            raise UserError(f"resolution must be a positive number of pixels, got {resolution} (--resolution)")
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        # None means torch's global RNG: seeded by accelerate's set_seed in the main process and by
        # the DataLoader's generator in its workers, so runs stay reproducible either way.
        self.generator = generator

    def __call__(self, image: Image.Image) -> Sample:
        """Resize the shorter side to R, flip (maybe), crop to R x R, scale to [-1, 1] (torchvision's transforms)."""
        from torchvision.transforms import functional as TF

        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        resized = TF.resize(image, self.resolution, interpolation=TF.InterpolationMode.BILINEAR)
        if self.random_flip and torch.rand((), generator=self.generator).item() < 0.5:
            # flip before cropping so crop_top_left is measured in the image as the model sees it
            resized = TF.hflip(resized)
        top, left = self._crop_origin(resized.height, resized.width)
        r = self.resolution
        return {
            "pixel_values": to_pixel_values(TF.crop(resized, top, left, r, r)),
            "original_size": (height, width),
            "crop_top_left": (top, left),
        }

    def _crop_origin(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the R x R crop inside a (height, width) image, as diffusers' SDXL scripts draw it."""
        r = self.resolution
        if self.center_crop:
            return max(0, int(round((height - r) / 2.0))), max(0, int(round((width - r) / 2.0)))
        # the draws of torchvision's RandomCrop.get_params, from our generator
        top = int(torch.randint(0, height - r + 1, size=(1,), generator=self.generator))
        left = int(torch.randint(0, width - r + 1, size=(1,), generator=self.generator))
        return top, left


def to_pixel_values(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float tensor (3, H, W) in [-1, 1]: ToTensor, then Normalize(0.5, 0.5)."""
    from torchvision.transforms import functional as TF

    return TF.normalize(TF.to_tensor(image), [0.5], [0.5])


# ----------------------------------------------------------------------------- decoding samples


def open_image(value: Any) -> Image.Image:
    """Decode an image given as PIL image, raw bytes, a path, or a `datasets` {bytes, path} dict."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    # phone photos store their orientation in EXIF; the model should see them upright
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)  # forces the full decode, so truncated files fail here


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale (PNG, TIFF), as PIL opens it


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any PIL image; 16-bit grayscale is scaled, v8 = round(v16 / 257), where PIL's own
    conversion clips every value above 255 to white."""
    if image.mode in HIGH_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def caption_text(value: Any) -> str:
    """A caption cell as one string (lists of alternative captions: one picked at random)."""
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        value = value[int(torch.randint(0, len(value), ()))]
    if value is None:
        return ""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def make_sample(image_value: Any, caption: str, transform: Callable[[Image.Image], Sample] | None) -> Sample | None:
    """Decode and transform one pair; None (logged, later counted) if the image is unusable."""
    try:
        image = open_image(image_value)
        sample = transform(image) if transform is not None else {"image": image}
    except IMAGE_ERRORS as exc:
        logger.debug("skipping an undecodable image: %s", exc)
        return None
    sample["caption"] = caption
    return sample


# ----------------------------------------------------------------------------- map-style datasets


class ImageCaptionDataset(Dataset):
    """A `datasets.Dataset` as (image, caption) samples; undecodable images come out as None."""

    def __init__(self, table: Any, image_column: str, caption_column: str,
                 transform: Callable[[Image.Image], Sample] | None = None) -> None:
        self.table = _without_image_decoding(table, image_column)
        self.image_column = image_column
        self.caption_column = caption_column
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Sample | None:
        row = self.table[int(index)]
        return make_sample(row[self.image_column], caption_text(row[self.caption_column]), self.transform)


def _without_image_decoding(table: Any, image_column: str) -> Any:
    """Keep an Image column as raw {bytes, path} so decoding (and its errors) happens in our code."""
    import datasets

    feature = table.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return table.cast_column(image_column, datasets.Image(decode=False))
    return table


def _load_hf(flag: str, value: str, *args: Any, **kwargs: Any) -> Any:
    """`datasets.load_dataset`, with "cannot find/read it" turned into a one-line UserError."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, ValueError, DatasetGenerationError) as exc:  # FileNotFoundError, DatasetNotFoundError, ...
        cause = exc
        while cause.__cause__ is not None:  # a generation error wraps what went wrong (bad text, a bad row)
            cause = cause.__cause__
        message = f"{exc}: {cause}" if cause is not exc else str(exc)
        raise UserError(f"cannot load dataset {value!r} ({flag}): {' '.join(message.split())}") from exc


def decode_utf8(raw: bytes, path: str, flag: str) -> str:
    """The text of a file's bytes; UserError naming the line and the byte if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save it as UTF-8 "
                        f"({flag})") from None


def _check_metadata_text(folder: str) -> None:
    """The imagefolder's metadata files are UTF-8 (else `datasets` fails with a traceback and no file name)."""
    for root, _dirs, names in os.walk(folder):
        for name in names:
            if name in ("metadata.jsonl", "metadata.csv"):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    decode_utf8(f.read(), path, "--train_data_dir")


def _check_image_files(table: Any, image_column: str, train_data_dir: str) -> None:
    """Every image file the metadata names exists (else each would be skipped as if undecodable)."""
    cells = _without_image_decoding(table, image_column)[image_column]
    missing = [c["path"] for c in cells if isinstance(c, dict) and not c.get("bytes") and c.get("path")
               and not os.path.exists(c["path"])]
    if missing:
        raise UserError(f"{len(missing)} image file(s) named in the metadata of {train_data_dir!r} are missing, "
                        f"e.g. {missing[0]} (--train_data_dir)")


def _train_split(loaded: Any, flag: str, value: str) -> Any:
    """The 'train' split of a DatasetDict (or its only split)."""
    if not hasattr(loaded, "keys"):
        return loaded
    splits = list(loaded.keys())
    if "train" in splits:
        return loaded["train"]
    if len(splits) == 1:
        return loaded[splits[0]]
    raise UserError(f"dataset {value!r} has no 'train' split (splits: {', '.join(splits)}) ({flag})")


def _looks_like_path(name: str) -> bool:
    """Whether a --dataset_name is meant as a local folder rather than a hub id."""
    return name.startswith(("/", "./", "../", "~")) or os.path.isabs(name)


def _load_table(dataset_name: str | None, train_data_dir: str | None, cache_dir: str | None) -> tuple[Any, str, str]:
    """The raw train split and the (flag, value) it came from."""
    if dataset_name:
        if _looks_like_path(dataset_name) and not os.path.exists(os.path.expanduser(dataset_name)):
            raise UserError(f"dataset folder {dataset_name!r} does not exist (--dataset_name)")
        # a hub id and a local dataset folder go through the same call, as in production
        loaded = _load_hf("--dataset_name", dataset_name, os.path.expanduser(dataset_name), cache_dir=cache_dir)
        return _train_split(loaded, "--dataset_name", dataset_name), "--dataset_name", dataset_name
    assert train_data_dir is not None
    data_dir = os.path.expanduser(train_data_dir)
    if os.path.isfile(data_dir):
        raise UserError(f"training data folder {train_data_dir!r} is a file, not a folder (--train_data_dir)")
    if not os.path.isdir(data_dir):
        raise UserError(f"training data folder {train_data_dir!r} does not exist (--train_data_dir)")
    _check_metadata_text(data_dir)
    # every file under the folder, as diffusers' example scripts list it; `data_dir=` would instead try each of
    # datasets' split-name patterns against every file (66 globs: seconds at a few thousand images)
    files = os.path.join(glob.escape(data_dir), "**")
    loaded = _load_hf("--train_data_dir", train_data_dir, "imagefolder", data_files={"train": files},
                      cache_dir=cache_dir)
    return _train_split(loaded, "--train_data_dir", train_data_dir), "--train_data_dir", train_data_dir


def _check_captions(table: Any, caption_column: str, value: str) -> None:
    """Every row has a caption: a metadata row without the key, or with null, would train as the empty prompt
    without a word. An intended empty prompt is the empty string."""
    missing = [i for i, cell in enumerate(table[caption_column]) if cell is None]
    if missing:
        raise UserError(f"{len(missing)} row(s) of dataset {value!r} have no caption (no {caption_column!r} or "
                        f"null), e.g. row {missing[0] + 1}: give each a caption, or \"\" for an empty prompt "
                        f"(--caption_column)")


def _check_columns(columns: Sequence[str], image_column: str, caption_column: str, source: str) -> None:
    """Both columns exist, else a UserError listing what does."""
    for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column not in columns:
            raise UserError(f"column {column!r} not in {source} (available: {', '.join(columns)}) ({flag})")


# ----------------------------------------------------------------------------- webdataset shards


def resolve_shards(pattern: str) -> list[str]:
    """Expand a path / glob / brace pattern (or a folder) into existing .tar files; URLs pass as-is."""
    import braceexpand

    expanded = list(braceexpand.braceexpand(pattern))
    if "://" in pattern or pattern.startswith("pipe:"):
        return expanded  # remote shards: existence is only known when streamed
    found: list[str] = []
    missing = 0
    for part in expanded:
        part = os.path.expanduser(part)
        matches = sorted(glob.glob(os.path.join(part, "*.tar") if os.path.isdir(part) else part))
        files = [m for m in matches if os.path.isfile(m)]
        missing += not files
        found.extend(files)
    shards = list(dict.fromkeys(found))
    if not shards:
        raise UserError(f"no webdataset shards match {pattern!r} (--train_shards_path_or_url)")
    if missing:
        logger.warning("%d part(s) of %r match no file; using the %d shard(s) found", missing, pattern, len(shards))
    return shards


def decode_wds_sample(raw: dict[str, Any], caption_column: str,
                      transform: Callable[[Image.Image], Sample] | None) -> Sample | None:
    """One webdataset sample (KEY.png + KEY.txt/.json ...) as a training sample, or None if unusable."""
    image_key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
    caption = _wds_caption(raw, caption_column)
    if image_key is None or caption is None:
        logger.debug("skipping webdataset sample %s: no image or no caption", raw.get("__key__"))
        return None
    return make_sample(raw[image_key], caption, transform)


def _wds_caption(raw: dict[str, Any], caption_column: str) -> str | None:
    """The caption from a txt/caption entry, else from the caption_column of a json entry."""
    for key in WDS_CAPTION_KEYS:
        if key in raw:
            return caption_text(raw[key]).strip()
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(meta, dict) and caption_column in meta:
            return caption_text(meta[caption_column]).strip()
    return None


class WebImageCaptionDataset(IterableDataset):
    """Webdataset shards as (image, caption) samples, split by node and by DataLoader worker.

    There is deliberately no filter on size metadata: the reference scripts drop samples whose json
    lacks original width/height, which silently empties private datasets.
    """

    def __init__(self, shards: Sequence[str], caption_column: str = "text",
                 transform: Callable[[Image.Image], Sample] | None = None, max_samples: int | None = None,
                 shuffle_seed: int | None = None, shuffle_buffer: int = 1000) -> None:
        self.shards = list(shards)
        self.caption_column = caption_column
        self.transform = transform
        self.max_samples = max_samples
        self.shuffle_seed = shuffle_seed  # None: shards and samples in file order
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def shuffled(self, seed: int) -> WebImageCaptionDataset:
        """A copy that shuffles shard order and samples (through a buffer), reseeded each epoch."""
        return WebImageCaptionDataset(self.shards, self.caption_column, self.transform, self.max_samples,
                                      shuffle_seed=seed, shuffle_buffer=self.shuffle_buffer)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Sample | None]:
        import webdataset as wds

        epoch = self.epoch
        # counts up by itself: with persistent workers each worker's copy advances one per epoch
        self.epoch += 1
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        pipeline = wds.DataPipeline(*self._stages(epoch, rank, worker))
        limit = None
        if self.max_samples is not None:
            limit = math.ceil(self.max_samples / (world_size * num_workers))
        for count, raw in enumerate(pipeline):
            if limit is not None and count >= limit:
                break
            yield decode_wds_sample(raw, self.caption_column, self.transform)

    def _stages(self, epoch: int, rank: int, worker: int) -> list[Any]:
        """shard list -> this node's shards -> this worker's shards -> samples (-> shuffle buffer)."""
        import webdataset as wds

        shards = list(self.shards)
        if self.shuffle_seed is not None:
            # the same permutation on every node, so the split by node stays a partition
            random.Random(self.shuffle_seed + epoch).shuffle(shards)
        stages: list[Any] = [
            wds.SimpleShardList(shards),
            wds.split_by_node,
            wds.split_by_worker,
            # an unreadable tar member is reported and skipped, like an undecodable image
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
        ]
        if self.shuffle_seed is not None and self.shuffle_buffer > 1:
            # its own stream per node and worker (they hold different shards), fixed by the seed
            rng = random.Random(f"{self.shuffle_seed}-{epoch}-{rank}-{worker}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        return stages


# ----------------------------------------------------------------------------- the loader entry point


def load_image_caption_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    train_shards_path_or_url: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    transform: Callable[[Image.Image], Sample] | None = None,
) -> Dataset | IterableDataset:
    """The training pairs from exactly one of the three sources; samples are transform(image) + caption."""
    given = [flag for flag, value in zip(SOURCE_FLAGS, (dataset_name, train_data_dir, train_shards_path_or_url))
             if value]
    if len(given) != 1:
        what = "no training data given" if not given else f"{' and '.join(given)} given together"
        raise UserError(f"{what}: pass exactly one of {', '.join(SOURCE_FLAGS)}")
    if max_train_samples is not None and max_train_samples < 1:
        raise UserError(f"max_train_samples must be at least 1, got {max_train_samples} (--max_train_samples)")
    if train_shards_path_or_url:
        shards = resolve_shards(train_shards_path_or_url)
        return WebImageCaptionDataset(shards, caption_column, transform, max_train_samples)

    table, flag, value = _load_table(dataset_name, train_data_dir, cache_dir)
    _check_columns(list(table.column_names), image_column, caption_column, f"dataset {value!r}")
    if len(table) == 0:
        raise UserError(f"dataset {value!r} has no samples ({flag})")
    _check_captions(table, caption_column, value)
    if max_train_samples is not None:
        # the first N of a seeded shuffle: a random but reproducible subset
        table = table.shuffle(seed=seed).select(range(min(max_train_samples, len(table))))
    if flag == "--train_data_dir":
        _check_image_files(table, image_column, value)
    return ImageCaptionDataset(table, image_column, caption_column, transform)


# ----------------------------------------------------------------------------- batching


def collate_image_caption(batch: Sequence[Sample | None]) -> dict[str, Any]:
    """Drop undecodable (None) samples, stack the rest (pixels or cached latents), and count what was dropped."""
    kept = [sample for sample in batch if sample is not None]
    if kept and "latent_mean" in kept[0]:  # cached VAE posteriors (utils/cache.py) instead of pixels
        images = {k: torch.stack([s[k] for s in kept]) for k in ("latent_mean", "latent_std")}
    elif kept and "pixel_values" not in kept[0]:
        raise TypeError("samples have no pixel_values: load the dataset with transform=ImageTransform(...)")
    else:
        images = {"pixel_values": torch.stack([s["pixel_values"] for s in kept]) if kept else torch.empty(0, 3, 0, 0)}
    return {
        **images,
        "captions": [s["caption"] for s in kept],
        "original_sizes": [tuple(s["original_size"]) for s in kept],
        "crop_top_lefts": [tuple(s["crop_top_left"]) for s in kept],
        "num_skipped": len(batch) - len(kept),
    }


def check_not_all_corrupt(num_seen: int, num_skipped: int) -> None:
    """Fail only when every sample seen so far (at least one) was undecodable."""
    if num_seen > 0 and num_skipped >= num_seen:
        raise UserError(
            f"all {num_seen} images of the training data could not be decoded (corrupt or not images); "
            f"check {', '.join(SOURCE_FLAGS)} and --image_column"
        )


def make_train_dataloader(dataset: Dataset | IterableDataset, batch_size: int, num_workers: int = 0,
                          seed: int = 0, shuffle: bool = True) -> DataLoader:
    """A DataLoader over image+caption samples with a seeded, reproducible order and the skipping collate."""
    iterable = isinstance(dataset, IterableDataset)
    size = None if iterable else len(dataset)  # type: ignore[arg-type]
    if size is not None and size < batch_size:  # drop_last would make an empty epoch
        raise UserError(f"the dataset has {size} samples, fewer than one batch of {batch_size} (--train_batch_size)")
    if iterable and shuffle and isinstance(dataset, WebImageCaptionDataset):
        dataset = dataset.shuffled(seed)  # a DataLoader cannot shuffle a stream; the stream shuffles itself
    # the generator fixes the sampler's order (exact resume replays it with skip_first_batches)
    # and the workers' base seed, so random crops/flips in workers are reproducible too
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate_image_caption,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
    )


# ----------------------------------------------------------------------------- prompts only


def load_prompts(prompts_file: str | None = None, dataset_name: str | None = None, caption_column: str = "text",
                 max_samples: int | None = None) -> list[str]:
    """Prompts for data-free distillation from a .txt/.jsonl/.csv file or a dataset's caption column."""
    if bool(prompts_file) == bool(dataset_name):
        what = "no prompts given" if not prompts_file else "--prompts_file and --dataset_name given together"
        raise UserError(f"{what}: pass exactly one of --prompts_file, --dataset_name")
    if prompts_file:
        prompts, flag = _prompts_from_file(prompts_file, caption_column), "--prompts_file"
    else:
        prompts, flag = _prompts_from_dataset(dataset_name or "", caption_column), "--dataset_name"
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise UserError(f"no prompts found in {prompts_file or dataset_name!r} ({flag})")
    return prompts[:max_samples] if max_samples is not None else prompts


def _prompts_from_file(path: str, caption_column: str) -> list[str]:
    """The prompts of a .txt (one per line), .jsonl (one key per row) or .csv (one column) file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in PROMPT_FILE_TYPES:
        raise UserError(f"prompts file {path!r} must end in {', '.join(PROMPT_FILE_TYPES)} (--prompts_file)")
    if not os.path.isfile(os.path.expanduser(path)):
        raise UserError(f"prompts file {path!r} does not exist (--prompts_file)")
    with open(os.path.expanduser(path), "rb") as f:
        text = decode_utf8(f.read(), path, "--prompts_file")
    if ext == ".txt":
        return text.splitlines()
    if ext == ".jsonl":
        return _jsonl_prompts(io.StringIO(text), path, caption_column)
    return _csv_prompts(io.StringIO(text, newline=""), path, caption_column)


def _jsonl_prompts(lines: Iterator[str], path: str, caption_column: str) -> list[str]:
    """The caption_column of every non-blank JSON line."""
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{number}: not valid JSON: {exc} (--prompts_file)") from exc
        if not isinstance(row, dict) or caption_column not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"{path}:{number}: no key {caption_column!r} (has: {keys}) (--caption_column)")
        prompts.append(caption_text(row[caption_column]))
    return prompts


def _csv_prompts(f: Any, path: str, caption_column: str) -> list[str]:
    """The caption_column of a CSV file with a header row."""
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    if caption_column not in columns:
        raise UserError(f"{path}: no column {caption_column!r} (columns: {', '.join(columns)}) (--caption_column)")
    return [row[caption_column] or "" for row in reader]


def _prompts_from_dataset(dataset_name: str, caption_column: str) -> list[str]:
    """Every caption of the train split of a `datasets` dataset (lists of captions flattened)."""
    if _looks_like_path(dataset_name) and not os.path.exists(os.path.expanduser(dataset_name)):
        raise UserError(f"dataset folder {dataset_name!r} does not exist (--dataset_name)")
    table = _train_split(_load_hf("--dataset_name", dataset_name, os.path.expanduser(dataset_name)),
                         "--dataset_name", dataset_name)
    if caption_column not in table.column_names:
        raise UserError(f"column {caption_column!r} not in dataset {dataset_name!r} "
                        f"(available: {', '.join(table.column_names)}) (--caption_column)")
    prompts: list[str] = []
    for value in table[caption_column]:
        values = value if isinstance(value, (list, tuple)) else [value]
        prompts.extend(caption_text(v) for v in values)
    return prompts


class PromptDataset(Dataset):
    """Prompts of a data-free recipe, repeated whole until one batch fits (a short prompts file still trains)."""

    def __init__(self, prompts: Sequence[str], min_len: int = 1) -> None:
        repeats = max(1, -(-min_len // max(1, len(prompts))))
        self.prompts = list(prompts) * repeats

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]


def collate_prompts(batch: Sequence[str]) -> dict[str, Any]:
    """A batch of the data-free recipes: captions only (no image is ever read)."""
    return {"captions": list(batch), "num_skipped": 0}


def make_prompt_dataloader(prompts: Sequence[str], batch_size: int, seed: int = 0) -> DataLoader:
    """A shuffled, seeded DataLoader of prompt batches (same order on resume, like the image loaders)."""
    return DataLoader(PromptDataset(prompts, batch_size), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), collate_fn=collate_prompts, drop_last=True)

