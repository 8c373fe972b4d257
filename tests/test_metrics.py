"""The field's metrics (utils/metrics.py) and the protocol (python -m utils.evaluate --metrics) on random-weight
models of the real architectures, each checked against an independent computation. Nothing is downloaded."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import save_tiny_clip
from scipy import linalg

PROMPTS = ["a large red circle on a white background", "a small blue square on a black background",
           "a large green cross on a gray background", "a small yellow triangle on a white background"]


# ----------------------------------------------------------------------------- random-weight metric models


def save_inception(path: str) -> str:
    """torchvision inception_v3 with random weights, saved as a state dict (the FID network's architecture)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    for layer in net.modules():  # BatchNorm statistics from one batch, so features still depend on the image
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = 1.0
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 299, 299) * 2 - 1)
    torch.save(net.state_dict(), path)
    return path


def save_open_clip(folder: str) -> str:
    """A small open_clip ViT (pretrained=None: random weights) as a local-dir folder: config + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    torch.manual_seed(0)
    model = open_clip.create_model("local-dir:" + folder, pretrained=None, load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "open_clip_model.safetensors"))
    return folder


def save_alexnet_features(path: str) -> str:
    """Random torchvision alexnet weights, its `features` only (the LPIPS trunk), saved as a state dict."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    torch.save({k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith("features.")}, path)
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("metric_models")


@pytest.fixture(scope="module")
def inception_file(models_dir):
    return save_inception(str(models_dir / "inception_v3.pth"))


@pytest.fixture(scope="module")
def metric_models(models_dir):
    """The small metric models (CLIPs and the LPIPS trunk); the Inception has its own fixture (the slow one)."""
    return {"clip": save_tiny_clip(str(models_dir / "clip")),
            "open_clip": save_open_clip(str(models_dir / "open_clip")),
            "alexnet": save_alexnet_features(str(models_dir / "alexnet_features.pth"))}


def random_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- FID / KID


def frechet_in_span(f1: np.ndarray, f2: np.ndarray) -> float:
    """The closed-form Frechet distance with scipy's sqrtm, in an orthonormal basis of the features' span.

    Rotating into the span changes no distance and no trace, and makes the covariances small enough for sqrtm.
    """
    basis = linalg.orth(np.concatenate([f1 - f1.mean(0), f2 - f2.mean(0), (f1.mean(0) - f2.mean(0))[None]]).T)
    a, b = f1 @ basis, f2 @ basis
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kid_closed_form(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of the kernel (x.y / d + 1)^3 over all samples (KID with one subset of every sample)."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.sum() / m ** 2)


def test_fid_kid_on_inception_features_match_the_closed_forms(inception_file):
    from cleanfid.resize import build_resizer

    from utils.errors import UserError
    from utils.metrics import InceptionFeatures, frechet_distance, kernel_inception_distance

    net = InceptionFeatures(inception_file, resize="clean")
    a, b = net(random_images(3, 0)), net(random_images(3, 1))
    assert a.shape == (3, 2048) and np.isfinite(a).all() and a.std() > 0
    assert abs(frechet_distance(a, a)) < 1e-9 * np.trace(np.cov(a, rowvar=False))
    fid = frechet_distance(a, b)
    assert fid > 0 and fid == pytest.approx(frechet_in_span(a, b), rel=1e-6)
    # every KID subset holds all 3 samples, and the unbiased estimate does not depend on their order
    assert kernel_inception_distance(a, b) == pytest.approx(kid_closed_form(a, b), rel=1e-9)
    net.resizer = build_resizer("legacy_pytorch")  # bilinear without antialias: other features, another FID
    assert not np.allclose(net(random_images(1, 0)), a[:1])
    with pytest.raises(UserError, match="--fid_resize"):
        InceptionFeatures(inception_file, resize="legacy_tensorflow")
    with pytest.raises(UserError, match="--fid_inception"):
        InceptionFeatures("/no/such/inception.pth")


def test_frechet_distance_low_rank_path_equals_clean_fids():
    """Fewer samples than dimensions: the nuclear-norm form; more: clean-fid's sqrtm; both the closed form."""
    from utils.metrics import frechet_distance

    rng = np.random.default_rng(0)
    for n, d in ((5, 40), (60, 8)):
        f1, f2 = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.5 + 0.3
        assert frechet_distance(f1, f2) == pytest.approx(frechet_in_span(f1, f2), rel=1e-6)


# ----------------------------------------------------------------------------- CLIP score, PickScore, LPIPS


@pytest.mark.parametrize("kind", ["open_clip", "clip"])
def test_clip_score_is_100_max_cos_of_the_embeddings(metric_models, kind):
    from utils.metrics import ClipEmbedder, clip_score, pick_score

    model = ClipEmbedder(metric_models[kind])
    assert model.kind == ("open_clip" if kind == "open_clip" else "transformers")
    images = random_images(4, 5)
    img, txt = model.image_features(images), model.text_features(PROMPTS)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    # independently: the library's raw embeddings, normalised here
    from PIL import Image

    from utils.grids import to_uint8

    pil = [Image.fromarray(a) for a in to_uint8(images)]
    with torch.no_grad():
        if kind == "open_clip":
            raw_i = model.model.encode_image(torch.stack([model.preprocess(p) for p in pil]))
            raw_t = model.model.encode_text(model.tokenizer(PROMPTS))
        else:
            raw_i = model.model.get_image_features(**model.processor(images=pil, return_tensors="pt"))
            raw_t = model.model.get_text_features(**model.processor(text=PROMPTS, return_tensors="pt", padding=True))
            raw_i, raw_t = (getattr(x, "pooler_output", x) for x in (raw_i, raw_t))
    cos = (raw_i / raw_i.norm(dim=-1, keepdim=True) * (raw_t / raw_t.norm(dim=-1, keepdim=True))).sum(-1)
    expected = 100 * np.maximum(cos.numpy(), 0)
    assert np.allclose(clip_score(img, txt).numpy(), expected, atol=1e-4)
    assert np.allclose(pick_score(img, txt, model.logit_scale).numpy(),
                       np.exp(model.logit_scale) * cos.numpy(), atol=1e-4)


def test_lpips_is_zero_on_identical_images_and_positive_otherwise(metric_models):
    from utils.errors import UserError
    from utils.metrics import Lpips

    lp = Lpips("alex", metric_models["alexnet"])
    a, b = random_images(3, 7), random_images(3, 8)
    assert torch.all(lp(a, a).abs() < 1e-7)
    d = lp(a, b)
    assert d.shape == (3,) and torch.all(d > 0)
    # the trunk holds the file's weights (so "random" differs), and the distance is symmetric
    assert not torch.allclose(Lpips("alex", "random")(a, b), d)
    assert torch.allclose(lp(b, a), d, atol=1e-6)
    with pytest.raises(UserError, match="--lpips_backbone"):
        Lpips("alex", "/no/such/alexnet.pth")


# ----------------------------------------------------------------------------- the image cache


def test_image_cache_resumes_without_regenerating(tmp_path):
    from utils.eval_protocol import ImageCache

    calls = []

    def generate(start, stop):
        calls.append((start, stop))
        return torch.stack([random_images(1, 100 + i)[0] for i in range(start, stop)])

    settings = {"steps": 4}
    full = ImageCache(str(tmp_path / "full"), settings, batch_size=3)
    assert full.fill(8, generate) == 8 and calls == [(0, 3), (3, 6), (6, 8)]

    calls.clear()
    stopped = ImageCache(str(tmp_path / "stopped"), settings, batch_size=3)

    def stop_after_two(start, stop):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(start, stop)

    with pytest.raises(KeyboardInterrupt):
        stopped.fill(8, stop_after_two)
    os.remove(stopped.path(4))  # a chunk with a file missing counts as not done
    calls.clear()
    resumed = ImageCache(str(tmp_path / "stopped"), settings, batch_size=3)
    assert resumed.fill(8, generate) == 5 and calls == [(3, 6), (6, 8)]
    assert torch.equal(resumed.load(0, 8), full.load(0, 8))
    calls.clear()
    assert ImageCache(str(tmp_path / "stopped"), settings, batch_size=3).fill(8, generate) == 0 and not calls

    from utils.errors import UserError

    with pytest.raises(UserError, match="--image_cache"):
        ImageCache(str(tmp_path / "stopped"), {"steps": 8}, batch_size=3)


# ----------------------------------------------------------------------------- the protocol command


@pytest.mark.slow
def test_protocol_command_on_the_toy_world(toy_world, tmp_path, metric_models, inception_file):
    """python -m utils.evaluate --metrics ... writes the table, the plot and the grid; a rerun samples nothing."""
    from helpers import run_command

    out = tmp_path / "eval"
    argv = ["-m", "utils.evaluate", "--metrics", "fid,kid,clip_score,clip_fd,pick_score,lpips_to_teacher",
            "--pipeline", os.path.join(toy_world, "models/sd"), "--scheduler", "ddim", "--steps", "1", "2",
            "--teacher", os.path.join(toy_world, "models/sd"), "--teacher_steps", "3", "--guidance_scale", "3",
            "--num_samples", "5", "--batch_size", "4", "--real_images", os.path.join(toy_world, "data/test"),
            "--num_real", "4", "--fid_reference", "teacher", "--fid_inception", inception_file, "--clip_model", metric_models["open_clip"],
            "--pick_score_model", metric_models["clip"], "--pick_score_processor", metric_models["clip"],
            "--lpips_backbone", metric_models["alexnet"], "--output_dir", str(out)]
    proc = run_command(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "metrics.json"))
    rows = report["results"]
    assert [(r["label"].split(" ")[0], r["steps"]) for r in rows] == [("teacher", 3), ("sd", 1), ("sd", 2)]
    assert all(0 <= r["clip_score"] <= 100 and r["clip_fd"] > 0 for r in rows)
    # FID to the teacher: ~0 for the teacher's full-step row (its own reference), > 0 for the student
    assert abs(rows[0]["fid"]) < 1e-6 * rows[1]["fid"] and all(r["fid"] > 0 for r in rows[1:])
    assert rows[0]["lpips_to_teacher"] is None and rows[0]["teacher_rmse"] is None  # the reference itself
    assert all(r["lpips_to_teacher"] > 0 and r["teacher_rmse"] > 0 for r in rows[1:])
    assert "biased" in report["settings"]["notes"][0]
    for name in ("metrics.md", "metrics.png", "grid.png"):
        assert (out / name).stat().st_size > 100
    pngs = sorted((out / "images").glob("*/0*.png"))
    assert len(pngs) == 3 * 5
    stamps = [p.stat().st_mtime_ns for p in pngs]

    again = run_command(argv + ["--metrics", "lpips_to_teacher"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in sorted((out / "images").glob("*/0*.png"))] == stamps  # nothing resampled
    rows2 = json.load(open(out / "metrics.json"))["results"]
    assert [r["lpips_to_teacher"] for r in rows2] == [r["lpips_to_teacher"] for r in rows]
    assert "fid" not in rows2[0]
