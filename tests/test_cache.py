"""--cache_latents / --cache_text_embeddings (utils/cache.py): same values as fresh encodes, reuse, invalidation."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

from utils import cache, data, models

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OneProcess:
    """What the cache functions use of an Accelerator, for a single process."""

    is_main_process = is_local_main_process = True

    def main_process_first(self):
        return nullcontext()


def small_data(world: str, folder: str, n: int = 12, corrupt: int | None = None) -> str:
    """An imagefolder with the first n toy training images (image `corrupt` replaced by garbage bytes)."""
    import json

    os.makedirs(folder)
    src = os.path.join(world, "data/train")
    rows = [json.loads(line) for line in open(os.path.join(src, "metadata.jsonl"))][:n]
    for i, row in enumerate(rows):
        if i == corrupt:
            open(os.path.join(folder, row["file_name"]), "wb").write(b"not a png")
        else:
            shutil.copy(os.path.join(src, row["file_name"]), folder)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def make_args(world: str, data_dir: str, cache_dir: str, **over) -> argparse.Namespace:
    args = dict(pretrained_teacher_model=os.path.join(world, "models/sdxl"), pretrained_vae_model_name_or_path=None,
                revision=None, variant=None, train_data_dir=data_dir, dataset_name=None, image_column="image",
                caption_column="text", max_train_samples=None, seed=0, resolution=32, center_crop=True,
                random_flip=False, feature_cache_dir=cache_dir, vae_encode_batch_size=5, dataloader_num_workers=0)
    args.update(over)
    return argparse.Namespace(**args)


def dataset_of(args) -> data.ImageCaptionDataset:
    transform = data.ImageTransform(args.resolution, args.center_crop, args.random_flip)
    return data.load_image_caption_dataset(None, args.train_data_dir, None, args.image_column, args.caption_column,
                                           args.max_train_samples, None, args.seed, transform)


@pytest.fixture(scope="module")
def vae(toy_world):
    return models.load_vae(os.path.join(toy_world, "models/sdxl")).eval()


def test_cached_posterior_gives_the_latents_a_fresh_encode_gives(toy_world, tmp_path, vae):
    args = make_args(toy_world, small_data(toy_world, str(tmp_path / "d")), str(tmp_path / "c"))
    dataset = dataset_of(args)
    cached = cache.cached_latent_dataset(args, dataset, vae, OneProcess())
    fresh = data.collate_image_caption([dataset[i] for i in range(6)])
    stored = data.collate_image_caption([cached[i] for i in range(6)])
    assert stored["captions"] == fresh["captions"]
    assert stored["original_sizes"] == fresh["original_sizes"] and stored["crop_top_lefts"] == fresh["crop_top_lefts"]
    # the same generator state gives the same z: the cached draw is the one VAE.encode(...).sample() makes
    z_fresh = cache.latents_of_batch(fresh, vae, 6, torch.Generator().manual_seed(3), "cpu")
    z_cached = cache.latents_of_batch(stored, vae, 6, torch.Generator().manual_seed(3), "cpu")
    assert z_cached.shape == z_fresh.shape == (6, 4, 8, 8)
    assert torch.allclose(z_cached, z_fresh, atol=1e-5)
    z_other = cache.latents_of_batch(stored, vae, 6, torch.Generator().manual_seed(4), "cpu")
    assert not torch.allclose(z_other, z_cached, atol=1e-3)  # still a fresh draw per step


def test_cache_is_reused_and_rebuilt_when_an_input_changes(toy_world, tmp_path, vae, monkeypatch):
    data_dir = small_data(toy_world, str(tmp_path / "d"))
    cache_dir = str(tmp_path / "c")
    args = make_args(toy_world, data_dir, cache_dir)
    cache.cached_latent_dataset(args, dataset_of(args), vae, OneProcess())
    assert len(os.listdir(cache_dir)) == 1

    calls = []
    real = cache.encode_posteriors
    monkeypatch.setattr(cache, "encode_posteriors", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache.cached_latent_dataset(args, dataset_of(args), vae, OneProcess())
    assert calls == [] and len(os.listdir(cache_dir)) == 1  # same inputs: read back, nothing encoded

    for change in ({"resolution": 16}, {"random_flip": True}):
        other = make_args(toy_world, data_dir, cache_dir, **change)
        cache.cached_latent_dataset(other, dataset_of(other), vae, OneProcess())
    assert len(calls) == 2 and len(os.listdir(cache_dir)) == 3

    image = os.path.join(data_dir, sorted(f for f in os.listdir(data_dir) if f.endswith(".png"))[0])
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))  # an edited image
    cache.cached_latent_dataset(args, dataset_of(args), vae, OneProcess())
    assert len(calls) == 3 and len(os.listdir(cache_dir)) == 4
    assert not [f for f in os.listdir(cache_dir) if ".tmp" in f]


def test_flip_caches_the_mirror_view_and_corrupt_images_are_dropped_and_counted(toy_world, tmp_path, vae):
    args = make_args(toy_world, small_data(toy_world, str(tmp_path / "d"), corrupt=2), str(tmp_path / "c"),
                     random_flip=True)
    cached = cache.cached_latent_dataset(args, dataset_of(args), vae, OneProcess())
    assert cached.mean.shape[:2] == (12, 2) and cached[2] is None
    pixels = data.collate_image_caption([dataset_of(make_args(toy_world, args.train_data_dir, "", center_crop=True))[0]])
    with torch.no_grad():
        mirrored = vae.encode(pixels["pixel_values"].flip(-1)).latent_dist.mean
    assert torch.allclose(cached.mean[0, 1], mirrored[0], atol=1e-5)
    assert not torch.allclose(cached.mean[0, 1], cached.mean[0, 0], atol=1e-3)
    torch.manual_seed(0)
    views = {bool(torch.equal(cached[0]["latent_mean"], cached.mean[0, 1])) for _ in range(20)}
    assert views == {False, True}  # both orientations are drawn
    batch = data.collate_image_caption([cached[i] for i in range(4)])
    assert batch["num_skipped"] == 1 and batch["latent_mean"].shape[0] == 3


def test_text_cache_returns_what_the_encoders_return(toy_world, tmp_path):
    args = make_args(toy_world, small_data(toy_world, str(tmp_path / "d")), str(tmp_path / "c"))
    tokenizers, encoders = models.load_text_encoders(args.pretrained_teacher_model, "sdxl")

    def encode(captions):
        with torch.no_grad():
            return models.encode_prompt_sdxl(captions, tokenizers, encoders)

    captions = cache.dataset_captions(dataset_of(args))
    text = cache.cached_text_embeddings(args, captions, encode, encoders, OneProcess(), batch_size=5)
    batch = [captions[3], "", captions[0], captions[3]]
    for got, want in zip(text.lookup(batch, "cpu", torch.float32), encode(batch)):
        assert torch.allclose(got, want, atol=1e-5)
    unseen = ["a caption the dataset does not have"]
    assert torch.allclose(text.lookup(unseen, "cpu", torch.float32)[0], encode(unseen)[0])
    other = cache.cached_text_embeddings(args, captions + ["one more caption"], encode, encoders, OneProcess())
    assert "one more caption" in other.row and len(os.listdir(args.feature_cache_dir)) == 2


def test_recipe_with_both_caches_trains_like_the_uncached_recipe(toy_world, tmp_path):
    """Center crop, no flip: the cached run's LoRA equals the uncached one's (up to float rounding)."""
    from helpers import run_recipe
    from safetensors.torch import load_file

    common = ["--pretrained_teacher_model", os.path.join(toy_world, "models/sdxl"), "--train_data_dir",
              os.path.join(toy_world, "data/train"), "--resolution", "32", "--train_batch_size", "4",
              "--max_train_samples", "16", "--lora_rank", "4", "--max_train_steps", "3", "--center_crop",
              "--validation_steps", "1000", "--report_to", "none", "--learning_rate", "1e-3",
              "--adam_epsilon", "1e-3",  # Adam ~ scaled SGD: near-zero gradients cannot flip an update's sign
              "--feature_cache_dir", str(tmp_path / "c")]
    run_recipe("train_lcm_distill_lora_sdxl.py", [*common, "--output_dir", str(tmp_path / "plain")])
    cached_run = run_recipe("train_lcm_distill_lora_sdxl.py", [*common, "--output_dir", str(tmp_path / "cached"),
                                                               "--cache_latents", "--cache_text_embeddings"])
    assert sorted(f.split("-")[0] for f in os.listdir(tmp_path / "c")) == ["latents", "text"]
    # the encoders were freed once cached; the final validation grid, drawn from the cached prompt embeddings, is
    # the uncached run's grid
    assert "text encoders freed" in cached_run.stderr
    grids = [np.asarray(Image.open(tmp_path / run / "validation/validation-000003.png")) for run in ("plain", "cached")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0].astype(int) - grids[1].astype(int)).max() <= 2
    plain = load_file(str(tmp_path / "plain/pytorch_lora_weights.safetensors"))
    cached = load_file(str(tmp_path / "cached/pytorch_lora_weights.safetensors"))
    assert plain.keys() == cached.keys()
    assert max(float(v.abs().max()) for k, v in plain.items() if "lora_B" in k) > 2e-3  # the LoRA trained
    for k in plain:
        assert torch.allclose(plain[k], cached[k], atol=1e-5), (k, (plain[k] - cached[k]).abs().max())


@pytest.mark.parametrize("flag", ["--cache_latents", "--cache_text_embeddings"])
def test_a_stream_cannot_be_cached(toy_world, tmp_path, flag):
    from helpers import run_recipe

    proc = run_recipe("train_lcm_distill_sd.py", [
        "--pretrained_teacher_model", os.path.join(toy_world, "models/sd"), "--train_shards_path_or_url",
        os.path.join(toy_world, "data/shards"), "--output_dir", str(tmp_path / "o"), "--resolution", "32",
        "--max_train_steps", "1", "--feature_cache_dir", str(tmp_path / "c"), flag], check=False)
    assert proc.returncode == 2 and "map-style dataset" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_freed_encoder_cache_refuses_an_uncached_prompt_in_one_line(toy_world, tmp_path):
    """After release_encoders, a caption outside the cache (training captions, --validation_prompts, "") cannot be
    encoded any more and says which flag freed the encoders; validation prompts are cached with the captions."""
    from utils.errors import UserError

    args = make_args(toy_world, small_data(toy_world, str(tmp_path / "d")), str(tmp_path / "c"))
    args.validation_prompts = ["a prompt only validation uses"]
    tokenizers, encoders = models.load_text_encoders(args.pretrained_teacher_model, "sdxl")

    def encode(captions):
        with torch.no_grad():
            return models.encode_prompt_sdxl(captions, tokenizers, encoders)

    text = cache.cached_text_embeddings(args, cache.dataset_captions(dataset_of(args)), encode, encoders, OneProcess())
    text.release_encoders()
    got = text.lookup(["a prompt only validation uses", ""], "cpu", torch.float32)
    want = encode(["a prompt only validation uses", ""])
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want))
    with pytest.raises(UserError, match="--cache_text_embeddings"):
        text.lookup(["a caption nobody cached"], "cpu", torch.float32)
