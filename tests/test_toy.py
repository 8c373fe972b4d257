"""The toy world: tokenizers, datasets in both formats, pipelines that load and sample, the judge."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from utils.toy import data as toy_data
from utils.toy.tokenizers import build_clip_tokenizer, build_t5_tokenizer


def test_clip_tokenizer_one_token_per_word():
    tok = build_clip_tokenizer()
    for word in toy_data.vocabulary():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # BOS, the word, EOS
        assert tok.convert_ids_to_tokens(ids[1]) == word + "</w>"
    assert tok("A RED Circle").input_ids == tok("a red circle").input_ids  # CLIP lowercases


def test_t5_tokenizer_one_piece_per_word():
    tok = build_t5_tokenizer()
    for word in toy_data.vocabulary():
        ids = tok(word).input_ids
        assert tok.convert_ids_to_tokens(ids) == ["▁" + word, "</s>"]
    assert tok.pad_token_id == 0


def test_captions_parse_back_to_labels():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = toy_data.random_scene(rng)
        assert toy_data.parse_caption(scene.caption) == scene.labels
    assert toy_data.parse_caption("a photo of a dog") is None


def test_render_draws_the_named_colour_on_the_named_background():
    scene = toy_data.Scene("square", "red", "white", "large", 0.5, 0.5, 0.4)
    img = np.asarray(toy_data.render(scene, 32)).astype(int)
    assert np.abs(img[16, 16] - np.array(toy_data.COLOURS["red"])).max() < 10
    assert np.abs(img[0, 0] - np.array(toy_data.BACKGROUNDS["white"])).max() < 10


def test_imagefolder_and_webdataset_load_with_their_libraries(toy_world):
    import datasets
    import webdataset as wds

    ds = datasets.load_dataset("imagefolder", data_dir=os.path.join(toy_world, "data/train"), split="train")
    assert "text" in ds.column_names and len(ds) > 0
    row = ds[0]
    assert row["image"].size == (32, 32) and toy_data.parse_caption(row["text"]) == (row["shape"], row["colour"])

    shards = sorted(glob.glob(os.path.join(toy_world, "data/shards/*.tar")))
    assert shards
    sample = next(iter(wds.WebDataset(shards, shardshuffle=False).decode("pil")))
    labels = json.loads(sample["json"]) if isinstance(sample["json"], (bytes, str)) else sample["json"]
    assert toy_data.parse_caption(sample["txt"]) == (labels["shape"], labels["colour"])
    # the shards hold the train split again, in the same order
    assert sample["txt"] == ds[0]["text"]


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux", "flux-guidance"])
def test_pipelines_load_from_folder_and_sample(toy_world, name):
    from diffusers import DiffusionPipeline

    from utils.eval_sampling import sample

    pipe = DiffusionPipeline.from_pretrained(os.path.join(toy_world, "models", name))
    pipe.set_progress_bar_config(disable=True)
    expected = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}.get(name, "FluxPipeline")
    assert type(pipe).__name__ == expected
    images, _ = sample(pipe, ["a large red circle on a white background"] * 2, steps=2, guidance_scale=3.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert not torch.equal(images[0], images[1])  # different seeds per image


def test_judge_reads_real_images(toy_world):
    """The quality bar of docs/toy_world.md: >= 98% on held-out real images (both labels right)."""
    from utils.evaluate import load_real_images, read_labels
    from utils.toy.judge import ToyJudge, judge_images, prompt_accuracy

    judge = ToyJudge.from_pretrained(os.path.join(toy_world, "judge"))
    folder = os.path.join(toy_world, "data/test")
    images, labels = load_real_images(folder, limit=300), read_labels(folder)[:300]
    ps, pc, _ = judge_images(judge, images)
    assert prompt_accuracy(ps, pc, labels[:, 0], labels[:, 1]) >= 0.98


def test_frechet_distance_closed_form():
    from utils.toy.judge import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2.0 + 1.0  # mean shift 1 per dim, std 2
    # ||mu||^2 = 3; trace term per dim: 1 + 4 - 2*2 = 1 -> 3: FD = 6
    assert abs(frechet_distance(a, b) - 6.0) < 0.3
    assert frechet_distance(a, a) < 1e-6


def test_build_is_idempotent(toy_world):
    from utils.toy.build import build

    stamp = os.path.join(toy_world, "models/sd/model_index.json")
    before = os.path.getmtime(stamp)
    build(toy_world)
    assert os.path.getmtime(stamp) == before


def test_builds_started_together_take_turns(tmp_path):
    """Parallel test workers build the toy world at once: the second waits until the first has finished."""
    import threading

    from utils.toy.build import one_builder_at_a_time

    events = []

    def second_builder():
        with one_builder_at_a_time(str(tmp_path)):
            events.append("second in")

    with one_builder_at_a_time(str(tmp_path)):
        thread = threading.Thread(target=second_builder)
        thread.start()
        thread.join(0.5)
        events.append("first out")
    thread.join(10)
    assert events == ["first out", "second in"]


def test_evaluate_cli_writes_metrics_and_grid(toy_world, tmp_path):
    from helpers import run_command

    out = tmp_path / "eval"
    argv = ["-m", "utils.evaluate", "--pipeline", os.path.join(toy_world, "models/sd"),
            "--scheduler", "ddim", "--steps", "1", "2", "--guidance_scale", "3", "--teacher",
            os.path.join(toy_world, "models/sd"), "--teacher_steps", "2", "--judge", os.path.join(toy_world, "judge"),
            "--real_images", os.path.join(toy_world, "data/test"), "--output_dir", str(out)]
    proc = run_command(argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.load(open(out / "metrics.json"))
    assert [r["steps"] for r in rows] == [2, 1, 2]
    assert rows[0]["teacher_rmse"] is None and rows[1]["teacher_rmse"] > 0.01
    # the same sampler, steps and seeds as the reference reproduce it exactly: the noise is shared
    assert rows[2]["teacher_rmse"] == 0.0
    assert all(0 <= r["prompt_accuracy"] <= 1 for r in rows)
    assert (out / "grid.png").exists() and (out / "metrics.md").read_text().count("|") > 10

    bad = run_command([*argv[:3], "/nonexistent/pipe", *argv[4:]])
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "--pipeline" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_clip_metrics_on_a_local_clip_model(toy_world, tmp_path):
    """CLIP score / CLIP FD (the real-model metrics) with a small CLIP folder, here a random one."""
    from helpers import run_command, save_tiny_clip

    from utils.evaluate import ClipScorer, load_real_images
    from utils.toy.judge import frechet_distance

    folder = save_tiny_clip(str(tmp_path / "clip"))
    scorer = ClipScorer(folder)
    real = load_real_images(os.path.join(toy_world, "data/test"), limit=64)
    feats = scorer.image_features(real)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(64), atol=1e-5)
    prompts = ["a large red circle on a white background"] * 64
    cos = (feats * scorer.text_features(prompts)).sum(-1)
    assert abs(scorer.score(real, prompts) - 100 * cos.clamp(min=0).mean().item()) < 1e-4
    assert frechet_distance(feats, feats) < 1e-6

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a small blue square on a black background\na large green cross on a gray background\n")
    out = tmp_path / "eval"
    proc = run_command(["-m", "utils.evaluate", "--pipeline", os.path.join(toy_world, "models/sd"), "--steps", "2",
                        "--judge", "none", "--clip_model", folder, "--prompts_file", str(prompts_file),
                        "--real_images", os.path.join(toy_world, "data/test"), "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.load(open(out / "metrics.json"))
    assert row["prompt_accuracy"] is None and 0 <= row["clip_score"] <= 100 and row["clip_fd"] > 0
