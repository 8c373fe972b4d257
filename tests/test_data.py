"""utils.data on the toy world: the three image+caption sources, the transform, skipping, prompts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import (
    ImageTransform,
    check_not_all_corrupt,
    collate_image_caption,
    load_image_caption_dataset,
    load_prompts,
    make_train_dataloader,
)
from utils.errors import UserError

RES = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A private `datasets` cache, so the tests neither read nor pollute the user's."""
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def train_captions(toy_world: str) -> list[str]:
    """The captions of the toy train split, in file order, straight from metadata.jsonl."""
    with open(os.path.join(toy_world, "data", "train", "metadata.jsonl")) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def imagefolder(toy_world: str, cache_dir: str):
    """The toy train split loaded through --train_data_dir."""
    path = os.path.join(toy_world, "data", "train")
    return load_image_caption_dataset(train_data_dir=path, cache_dir=cache_dir, transform=ImageTransform(RES))


def write_folder(path, good: int, garbage: int) -> str:
    """An imagefolder with `good` real PNGs and `garbage` files of random bytes named .png."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(good + garbage):
        name = f"{i:03d}.png"
        if i < good:
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(os.path.join(path, name))
        else:
            with open(os.path.join(path, name), "wb") as f:
                f.write(rng.bytes(300))
        rows.append({"file_name": name, "text": f"caption {i}"})
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def epoch_counts(loader) -> tuple[int, int, list[str]]:
    """(samples seen, samples skipped, captions kept) over one epoch."""
    seen = skipped = 0
    captions: list[str] = []
    for batch in loader:
        seen += len(batch["captions"]) + batch["num_skipped"]
        skipped += batch["num_skipped"]
        captions += batch["captions"]
    return seen, skipped, captions


# ----------------------------------------------------------------------------- sources


def test_train_data_dir_captions_match_metadata(imagefolder, train_captions):
    assert len(imagefolder) == len(train_captions)
    for i in (0, 1, 7, len(train_captions) - 1):
        sample = imagefolder[i]
        assert sample["caption"] == train_captions[i]
        assert sample["pixel_values"].shape == (3, RES, RES)
        assert sample["original_size"] == (32, 32)


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory) -> str:
    """A dataset folder as the toy world's data/ is laid out (train/ and test/ imagefolders), but small."""
    root = tmp_path_factory.mktemp("dataset")
    write_folder(root / "train", 6, 0)
    write_folder(root / "test", 3, 0)
    return str(root)


def test_dataset_name_local_folder(dataset_folder, cache_dir):
    ds = load_image_caption_dataset(dataset_name=dataset_folder, cache_dir=cache_dir, transform=ImageTransform(RES))
    assert len(ds) == 6  # the train split, not test
    assert [ds[i]["caption"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]


def test_max_train_samples_is_a_seeded_subset(tmp_path, cache_dir):
    path = write_folder(tmp_path / "folder", 24, 0)  # small: each load lists every file of the folder
    pick = lambda seed: [s["caption"] for s in load_image_caption_dataset(  # noqa: E731
        train_data_dir=path, cache_dir=cache_dir, max_train_samples=8, seed=seed, transform=ImageTransform(RES))]
    first = pick(0)
    assert len(first) == 8 and set(first) <= {f"caption {i}" for i in range(24)}
    assert pick(0) == first
    assert pick(1) != first


@pytest.mark.parametrize("pattern", ["shard-*.tar", "shard-{000000..000003}.tar"])
def test_shards_glob_and_brace(toy_world, train_captions, pattern):
    ds = load_image_caption_dataset(train_shards_path_or_url=os.path.join(toy_world, "data", "shards", pattern),
                                    transform=ImageTransform(RES))
    assert isinstance(ds, torch.utils.data.IterableDataset)
    first = next(iter(ds))
    assert first["caption"] == train_captions[0]
    assert first["pixel_values"].shape == (3, RES, RES)


def test_shards_split_by_node_and_worker(toy_world, train_captions, monkeypatch):
    shards = os.path.join(toy_world, "data", "shards", "shard-*.tar")  # 4 shards of 500
    ds = load_image_caption_dataset(train_shards_path_or_url=shards, transform=ImageTransform(RES))
    # two DataLoader workers take alternate shards, and batches alternate between workers
    loader = make_train_dataloader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = [b["captions"] for b, _ in zip(loader, range(2))]
    assert batches == [train_captions[0:2], train_captions[500:502]]
    del loader
    # the second of two processes (accelerate sets RANK/WORLD_SIZE) starts at the second shard
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert next(iter(ds))["caption"] == train_captions[500]


def test_shards_dataloader_and_json_caption(toy_world, tmp_path):
    # the toy json holds labels, not captions: a caption_column that is there must be read from it
    shards = os.path.join(toy_world, "data", "shards", "shard-000000.tar")
    ds = load_image_caption_dataset(train_shards_path_or_url=shards, max_train_samples=8,
                                    transform=ImageTransform(RES))
    batches = list(make_train_dataloader(ds, batch_size=4, seed=0))
    assert len(batches) == 2 and batches[0]["pixel_values"].shape == (4, 3, RES, RES)
    from utils.data import decode_wds_sample

    raw = {"__key__": "k", "png": open(os.path.join(toy_world, "data", "train", "000000.png"), "rb").read(),
           "json": json.dumps({"prompt": "from json"}).encode()}
    assert decode_wds_sample(raw, "prompt", ImageTransform(RES))["caption"] == "from json"
    assert decode_wds_sample(raw, "text", ImageTransform(RES)) is None  # no caption anywhere


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("column,flag", [("image_column", "--image_column"), ("caption_column", "--caption_column")])
def test_missing_column(tmp_path, cache_dir, column, flag):
    with pytest.raises(UserError, match=flag) as info:
        load_image_caption_dataset(train_data_dir=write_folder(tmp_path, 2, 0), cache_dir=cache_dir,
                                   **{column: "nope"})
    assert "image, text" in str(info.value)  # lists the columns that do exist


@pytest.mark.parametrize("kwargs,flag", [
    (dict(train_data_dir="/nonexistent/dir"), "--train_data_dir"),
    (dict(dataset_name="/nonexistent/dir"), "--dataset_name"),
    (dict(train_shards_path_or_url="/nonexistent/shard-{000000..000003}.tar"), "--train_shards_path_or_url"),
    (dict(train_shards_path_or_url="/nonexistent/*.tar"), "--train_shards_path_or_url"),
    (dict(), "--train_shards_path_or_url"),
    (dict(dataset_name="x", train_data_dir="y"), "--train_data_dir"),
])
def test_bad_sources(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        load_image_caption_dataset(**kwargs)


def test_empty_folder_and_too_few_samples(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--train_data_dir"):
        load_image_caption_dataset(train_data_dir=str(tmp_path / "empty"), cache_dir=cache_dir)
    ds = load_image_caption_dataset(train_data_dir=write_folder(tmp_path / "two", 2, 0), cache_dir=cache_dir,
                                    transform=ImageTransform(RES))
    with pytest.raises(UserError, match="--train_batch_size"):
        make_train_dataloader(ds, batch_size=4)


# ----------------------------------------------------------------------------- corrupt images


def test_corrupt_images_are_skipped_and_counted(tmp_path, cache_dir):
    ds = load_image_caption_dataset(train_data_dir=write_folder(tmp_path / "mixed", 3, 2), cache_dir=cache_dir,
                                    transform=ImageTransform(RES))
    assert len(ds) == 5
    loader = make_train_dataloader(ds, batch_size=5, seed=0)
    seen, skipped, captions = epoch_counts(loader)
    assert (seen, skipped) == (5, 2)
    assert sorted(captions) == ["caption 0", "caption 1", "caption 2"]
    check_not_all_corrupt(seen, skipped)  # some survived: not fatal


def test_all_corrupt_is_fatal(tmp_path, cache_dir):
    ds = load_image_caption_dataset(train_data_dir=write_folder(tmp_path / "bad", 0, 2), cache_dir=cache_dir,
                                    transform=ImageTransform(RES))
    seen, skipped, _ = epoch_counts(make_train_dataloader(ds, batch_size=2))
    assert (seen, skipped) == (2, 2)
    with pytest.raises(UserError, match="all 2 images"):
        check_not_all_corrupt(seen, skipped)


def test_collate_of_only_nones():
    batch = collate_image_caption([None, None])
    assert batch["num_skipped"] == 2 and batch["captions"] == [] and batch["pixel_values"].shape[0] == 0


# ----------------------------------------------------------------------------- transform


def test_transform_non_square_center_crop():
    # 48 wide x 32 high: a horizontal ramp, so the crop position shows in the pixel values
    ramp = np.tile(np.linspace(0, 255, 48).astype(np.uint8)[None, :, None], (32, 1, 3))
    out = ImageTransform(RES, center_crop=True)(Image.fromarray(ramp))
    assert out["original_size"] == (32, 48)  # (h, w), before resizing
    assert out["crop_top_left"] == (0, 4)  # resized to 24x16, centre crop cuts 4 px on the left
    px = out["pixel_values"]
    assert px.shape == (3, RES, RES) and px.dtype == torch.float32
    assert px.min() >= -1.0 and px.max() <= 1.0
    assert px[0, 0, 0] > -0.9 and px[0, 0, -1] < 0.9  # both ends of the ramp were cropped away
    assert torch.all(px[:, :, 1:] >= px[:, :, :-1])  # still increasing left to right


def test_transform_random_crop_reproducible_and_in_range():
    image = Image.new("RGB", (48, 32), (255, 255, 255))
    draws = lambda: [ImageTransform(RES, generator=g)(image)["crop_top_left"]  # noqa: E731
                     for g in [torch.Generator().manual_seed(3)] for _ in range(10)]
    first = draws()
    assert first == draws()
    assert all(top == 0 and 0 <= left <= 8 for top, left in first) and len(set(first)) > 1
    full = ImageTransform(RES)(image)["pixel_values"]
    assert torch.allclose(full, torch.ones_like(full))  # white is exactly 1


def diffusers_script_transform(image: Image.Image, resolution: int, center_crop: bool, flip: bool):
    """The image transform of diffusers' SDXL example scripts (train_text_to_image_sdxl.py and the LCM/wds
    scripts), written out here: resize, flip, centre crop or RandomCrop.get_params on torch's global RNG."""
    from torchvision import transforms
    from torchvision.transforms.functional import crop

    image = transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR)(image)
    if flip:
        image = transforms.RandomHorizontalFlip(p=1.0)(image)
    if center_crop:
        y1 = max(0, int(round((image.height - resolution) / 2.0)))
        x1 = max(0, int(round((image.width - resolution) / 2.0)))
        image = transforms.CenterCrop(resolution)(image)
    else:
        y1, x1, h, w = transforms.RandomCrop(resolution).get_params(image, (resolution, resolution))
        image = crop(image, y1, x1, h, w)
    pixels = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])(image)
    return pixels, (y1, x1)


@pytest.mark.parametrize("size", [(46, 30), (30, 47), (37, 37)])
def test_transform_gives_the_pixels_of_diffusers_scripts(size):
    """The same dataset image and seed give the same pixel tensor (and crop origin) as diffusers' scripts."""
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for center_crop in (True, False):
        for seed in range(3):
            torch.manual_seed(seed)
            expected, origin = diffusers_script_transform(image, RES, center_crop, flip=False)
            torch.manual_seed(seed)  # ours draws the crop from torch's global RNG when given no generator
            out = ImageTransform(RES, center_crop=center_crop)(image)
            assert torch.equal(out["pixel_values"], expected) and out["crop_top_left"] == origin
    flips = set()
    for seed in range(8):  # with --random_flip: the flip where ours draws one (its own generator decides)
        flip = bool(torch.rand((), generator=torch.Generator().manual_seed(seed)) < 0.5)
        out = ImageTransform(RES, center_crop=True, random_flip=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out(image)["pixel_values"], diffusers_script_transform(image, RES, True, flip)[0])
        flips.add(flip)
    assert flips == {True, False}


def test_random_flip_really_flips():
    half = np.zeros((RES, RES, 3), dtype=np.uint8)
    half[:, RES // 2:] = 255
    image = Image.fromarray(half)
    plain = ImageTransform(RES, center_crop=True)(image)["pixel_values"]
    mirrored = torch.flip(plain, dims=[2])
    assert not torch.equal(plain, mirrored)
    flip = ImageTransform(RES, center_crop=True, random_flip=True, generator=torch.Generator().manual_seed(0))
    outs = [flip(image)["pixel_values"] for _ in range(16)]
    flipped = [torch.equal(o, mirrored) for o in outs]
    assert all(f or torch.equal(o, plain) for f, o in zip(flipped, outs))
    assert any(flipped) and not all(flipped)


# ----------------------------------------------------------------------------- loader order


def test_dataloader_order_is_seeded(imagefolder):
    def order(seed: int) -> list[str]:
        loader = make_train_dataloader(imagefolder, batch_size=4, seed=seed)
        captions: list[str] = []
        for batch, _ in zip(loader, range(3)):
            captions += batch["captions"]
        return captions

    assert order(0) == order(0)
    assert order(0) != order(1)


# ----------------------------------------------------------------------------- prompts


def test_load_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \n")
    (tmp_path / "p.jsonl").write_text('{"text": "a red circle"}\n\n{"text": "a blue square", "x": 1}\n')
    (tmp_path / "p.csv").write_text('id,text\n1,a red circle\n2,"a blue square"\n')
    for name in ("p.txt", "p.jsonl", "p.csv"):
        assert load_prompts(str(tmp_path / name)) == ["a red circle", "a blue square"]
    assert load_prompts(str(tmp_path / "p.txt"), max_samples=1) == ["a red circle"]
    (tmp_path / "q.jsonl").write_text('{"prompt": "a cross"}\n')
    assert load_prompts(str(tmp_path / "q.jsonl"), caption_column="prompt") == ["a cross"]


def test_load_prompts_from_dataset(dataset_folder):
    assert load_prompts(dataset_name=dataset_folder, max_samples=5) == [f"caption {i}" for i in range(5)]


def test_load_prompts_errors(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "p.json").write_text("[]")
    cases = [
        (dict(prompts_file=str(tmp_path / "missing.txt")), "--prompts_file"),
        (dict(prompts_file=str(tmp_path / "p.json")), "--prompts_file"),
        (dict(prompts_file=str(tmp_path / "p.jsonl")), "--caption_column"),
        (dict(prompts_file=str(tmp_path / "p.csv")), "--caption_column"),
        (dict(prompts_file=str(tmp_path / "blank.txt")), "--prompts_file"),
        (dict(), "--prompts_file"),
        (dict(dataset_name="/nonexistent/dir"), "--dataset_name"),
    ]
    for kwargs, flag in cases:
        with pytest.raises(UserError, match=flag):
            load_prompts(**kwargs)
