"""The evaluation protocol of `python -m utils.evaluate --metrics ...`: the field's metrics over step counts.

A student (`--pipeline`, `--lora`, `--scheduler`) at every `--steps` and a teacher (`--teacher`) at every
`--teacher_steps` sample `--num_samples` images of the captions (image i: caption i mod the number of
captions, noise from seed + i) into a resumable cache of PNGs; the chosen metrics (utils/metrics.py)
are then read off the cache in chunks, so 30k images never sit in memory. The teacher at its largest
step count is the reference of LPIPS / RMSE to the teacher and, with `--fid_reference teacher`, of FID.
Writes metrics.json, metrics.md, metrics.png (each metric against steps, a line per model, the
teacher's full-step value drawn across) and grid.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import metrics as M
from .errors import UserError, fail, user_errors
from .files import atomic_write
from .grids import save_grid, to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PLOTTED = ("fid", "kid", "clip_score", "clip_fd", "pick_score", "lpips_to_teacher", "teacher_rmse")
TITLES = {"fid": "FID", "kid": "KID", "clip_score": "CLIP score", "clip_fd": "CLIP FD", "pick_score": "PickScore",
          "lpips_to_teacher": "LPIPS to teacher", "teacher_rmse": "RMSE to teacher"}


def add_protocol_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the metrics protocol (used with --metrics)."""
    g = parser.add_argument_group("metrics protocol (with --metrics)")
    g.add_argument("--metrics", default=None,
                   help=f"comma-separated metrics: {', '.join(M.METRICS)} (hps and image_reward: see "
                        "docs/evaluation.md). Switches to the protocol: cached images, metrics.png")
    g.add_argument("--num_samples", type=int, default=None,
                   help="images per model and step count (default: one per caption); captions repeat when fewer")
    g.add_argument("--batch_size", type=int, default=16, help="images per pipeline call (default: %(default)s)")
    g.add_argument("--image_cache", default=None,
                   help="folder of generated PNGs, reused and resumed across runs (default: <output_dir>/images)")
    g.add_argument("--fid_inception", default="clean-fid",
                   help="FID/KID network: a folder with clean-fid's inception-2015-12-05.pt or that file (the "
                        "TensorFlow FID Inception papers use), a torchvision inception_v3 state dict, or "
                        "clean-fid (downloaded once by clean-fid) (default: %(default)s)")
    g.add_argument("--fid_resize", default="clean", choices=M.FID_RESIZE_MODES,
                   help="clean-fid's resize to 299 px (default: %(default)s)")
    g.add_argument("--fid_reference", default="real", choices=["real", "teacher"],
                   help="FID/KID against --real_images, or against the teacher at its largest --teacher_steps "
                        "(default: %(default)s)")
    g.add_argument("--num_real", type=int, default=None, help="real images used for FID (default: all)")
    g.add_argument("--pick_score_model", default="yuvalkirstain/PickScore_v1",
                   help="PickScore: a transformers CLIP folder or hub id (default: %(default)s)")
    g.add_argument("--pick_score_processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                   help="its processor, folder or hub id (default: %(default)s)")
    g.add_argument("--lpips_net", default="alex", choices=["alex", "vgg"], help="LPIPS trunk (default: %(default)s)")
    g.add_argument("--lpips_backbone", default="torchvision",
                   help="LPIPS trunk weights: a torchvision alexnet/vgg16 state dict, or torchvision (its ImageNet "
                        "weights from torch's cache, downloaded once) (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="pipeline dtype; auto: fp32 on CPU, bf16 for FLUX and fp16 otherwise on CUDA")


def parse_metrics(value: str) -> list[str]:
    """The --metrics list, checked: known names only; hps / image_reward refused with the reason."""
    names = [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        fail("--metrics is empty: name at least one of " + ", ".join(M.METRICS))
    for name in names:
        if name in M.NOT_INSTALLABLE:
            fail(f"--metrics {name}: {M.NOT_INSTALLABLE[name]}")
        if name not in M.METRICS:
            fail(f"--metrics: unknown metric {name!r} (known: {', '.join(M.METRICS)})")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- the image cache


def settings_hash(settings: dict[str, Any]) -> str:
    """A short stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class ImageCache:
    """PNGs of one model, step count and sampling settings, generated chunk by chunk and kept across runs.

    Chunks are aligned to the batch size, so a resumed run samples exactly the batches an uninterrupted
    one would (same seeds, same batch composition) and its images are identical. A chunk is written
    only once all its images are made (one file at a time, each by rename), and a chunk counts as done
    only when all its files exist.
    """

    def __init__(self, folder: str, settings: dict[str, Any], batch_size: int) -> None:
        self.folder, self.batch_size = folder, batch_size
        os.makedirs(folder, exist_ok=True)
        self.info_path = os.path.join(folder, "cache.json")
        info = {"settings": settings, "seconds": 0.0, "sampled": 0}
        if os.path.exists(self.info_path):
            with open(self.info_path) as f:
                info = json.load(f)
            if info.get("settings") != settings:
                raise UserError(f"{folder} holds images of other settings; remove it or choose another --image_cache")
        self.info = info

    def path(self, index: int) -> str:
        return os.path.join(self.folder, f"{index:06d}.png")

    def missing_chunks(self, count: int) -> list[tuple[int, int]]:
        """(start, stop) of every batch-aligned chunk of the first `count` images with a file missing."""
        chunks = [(s, min(s + self.batch_size, count)) for s in range(0, count, self.batch_size)]
        return [(a, b) for a, b in chunks if not all(os.path.exists(self.path(i)) for i in range(a, b))]

    def fill(self, count: int, generate: Callable[[int, int], torch.Tensor], desc: str = "sampling") -> int:
        """Generate the missing chunks with generate(start, stop) (images in [-1, 1]); returns images made."""
        made = 0
        for start, stop in tqdm(self.missing_chunks(count), desc=desc, unit="batch", leave=False):
            t0 = time.perf_counter()
            images = generate(start, stop)
            self.info["seconds"] += time.perf_counter() - t0
            for i, array in zip(range(start, stop), to_uint8(images)):
                with atomic_write(self.path(i)) as tmp:
                    Image.fromarray(array).save(tmp, format="PNG")
            made += stop - start
            self.info["sampled"] += stop - start
            with atomic_write(self.info_path) as tmp, open(tmp, "w") as f:
                json.dump(self.info, f, indent=1)
        return made

    def load(self, start: int, stop: int) -> torch.Tensor:
        """Images start..stop-1 as a float tensor (N, 3, H, W) in [-1, 1]."""
        arrays = np.stack([np.asarray(Image.open(self.path(i)).convert("RGB")) for i in range(start, stop)])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1

    @property
    def seconds_per_image(self) -> float | None:
        return self.info["seconds"] / self.info["sampled"] if self.info["sampled"] else None


# ----------------------------------------------------------------------------- real images


def list_images(folder: str) -> list[str]:
    """Image files of a folder: in metadata.jsonl order for an imagefolder, else sorted (recursively)."""
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        with open(meta) as f:
            return [os.path.join(folder, json.loads(line)["file_name"]) for line in f if line.strip()]
    return sorted(os.path.join(root, n) for root, _, names in os.walk(folder) for n in names
                  if n.lower().endswith(IMAGE_SUFFIXES))


def real_images(files: list[str], resolution: int) -> torch.Tensor:
    """Real images centre-cropped and resized to the samples' resolution, in [-1, 1] (N, 3, R, R)."""
    from .data import ImageTransform, open_image

    transform = ImageTransform(resolution, center_crop=True)
    return torch.stack([transform(open_image(p))["pixel_values"] for p in files])


# ----------------------------------------------------------------------------- the metric models


@dataclass
class Scorers:
    """The metric models the chosen metrics need (None where not needed)."""

    inception: M.InceptionFeatures | None = None
    clip: M.ClipEmbedder | None = None
    pick: M.ClipEmbedder | None = None
    lpips: M.Lpips | None = None

    @classmethod
    def build(cls, names: list[str], args: argparse.Namespace, device: str) -> "Scorers":
        s = cls()
        with user_errors():
            if {"fid", "kid"} & set(names):
                s.inception = M.InceptionFeatures(args.fid_inception, args.fid_resize, device)
            if {"clip_score", "clip_fd"} & set(names):
                s.clip = M.ClipEmbedder(args.clip_model, device=device)
            if "pick_score" in names:
                s.pick = M.ClipEmbedder(args.pick_score_model, args.pick_score_processor, device, "--pick_score_model")
            if "lpips_to_teacher" in names:
                s.lpips = M.Lpips(args.lpips_net, args.lpips_backbone, device)
        return s


@dataclass
class Accumulator:
    """Per-image values and features of one model and step count, gathered chunk by chunk."""

    inception: list[np.ndarray] = field(default_factory=list)
    clip_image: list[torch.Tensor] = field(default_factory=list)
    values: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.values.setdefault(name, []).append(value.flatten().float())

    def mean(self, name: str) -> float | None:
        return torch.cat(self.values[name]).mean().item() if name in self.values else None


def measure(cache: ImageCache, count: int, prompts: list[str], scorers: Scorers, batch: int,
            reference: ImageCache | None, desc: str) -> Accumulator:
    """Read the cached images in chunks and gather every metric's per-image values and features."""
    acc = Accumulator()
    text_cache: dict[str, dict[str, torch.Tensor]] = {}
    for start in tqdm(range(0, count, batch), desc=desc, unit="batch", leave=False):
        stop = min(start + batch, count)
        images = cache.load(start, stop)
        texts = [prompts[i % len(prompts)] for i in range(start, stop)]
        if scorers.inception is not None:
            acc.inception.append(scorers.inception(images))
        for name, model in (("clip", scorers.clip), ("pick", scorers.pick)):
            if model is None:
                continue
            emb = model.image_features(images)
            txt = _text_features(model, texts, text_cache.setdefault(name, {}))
            if name == "clip":
                acc.clip_image.append(emb)
                acc.add("clip_score", M.clip_score(emb, txt))
            else:
                acc.add("pick_score", M.pick_score(emb, txt, model.logit_scale))
        if reference is not None:
            ref = reference.load(start, stop)
            acc.add("teacher_rmse", (images - ref).pow(2).mean(dim=(1, 2, 3)).sqrt())
            if scorers.lpips is not None:
                acc.add("lpips_to_teacher", scorers.lpips(images, ref))
    return acc


def _text_features(model: M.ClipEmbedder, texts: list[str], memo: dict[str, torch.Tensor]) -> torch.Tensor:
    """Text embeddings of the texts, each distinct caption embedded once."""
    new = [t for t in dict.fromkeys(texts) if t not in memo]
    if new:
        memo.update(zip(new, model.text_features(new)))
    return torch.stack([memo[t] for t in texts])


# ----------------------------------------------------------------------------- the protocol


def check_protocol_args(args: argparse.Namespace, names: list[str]) -> None:
    """One-line errors for flags the chosen metrics need, before anything is loaded."""
    for flag, value in (("--num_samples", args.num_samples), ("--batch_size", args.batch_size),
                        ("--num_real", args.num_real)):
        if value is not None and value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    if ("lpips_to_teacher" in names or args.fid_reference == "teacher" and {"fid", "kid"} & set(names)) \
            and not args.teacher:
        fail("--teacher is needed for lpips_to_teacher and --fid_reference teacher (--metrics)")
    if {"clip_score", "clip_fd"} & set(names) and not args.clip_model:
        fail("--clip_model is needed for clip_score and clip_fd (an open_clip or transformers CLIP) (--metrics)")
    needs_real = "clip_fd" in names or (args.fid_reference == "real" and {"fid", "kid"} & set(names))
    if needs_real and not os.path.isdir(args.real_images):
        fail(f"--real_images {args.real_images} does not exist (needed by FID/KID against real images and clip_fd)")


@dataclass
class Run:
    """One model at one step count: what to sample and where its images are cached."""

    label: str
    steps: int
    guidance_scale: float
    cache: ImageCache
    is_teacher: bool = False


def run_protocol(args: argparse.Namespace, prompts: list[str]) -> None:
    """Sample (or reuse) every model x step count, measure the chosen metrics, write the report and plot."""
    from diffusers import DiffusionPipeline

    from .eval_sampling import default_resolution, resolve_device, resolve_dtype, sample
    from .models import detect_architecture
    from .samplers import set_sampler

    names = parse_metrics(args.metrics)
    check_protocol_args(args, names)
    count = args.num_samples or len(prompts)
    device = resolve_device(args.device)
    scorers = Scorers.build(names, args, str(device))
    cache_root = args.image_cache or os.path.join(args.output_dir, "images")
    prompts_sha = settings_hash({"prompts": prompts})

    def load(path: str, lora: str | None, scheduler: str, flag: str) -> tuple[Any, str]:
        with user_errors():
            arch = detect_architecture(path, flag=flag)
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=resolve_dtype(args.dtype, arch, device))
        pipe.set_progress_bar_config(disable=True)
        if lora:
            try:
                pipe.load_lora_weights(lora)
            except (OSError, ValueError) as exc:
                fail(f"--lora {lora} could not be loaded: {str(exc).strip().splitlines()[0]}")
        return pipe.to(device), set_sampler(pipe, scheduler)

    def runs_of(pipe: Any, label: str, model: dict, steps_list: list[int], g: float, teacher: bool) -> list[Run]:
        out = []
        for steps in steps_list:
            settings = dict(model, steps=steps, guidance_scale=g, seed=args.seed, batch_size=args.batch_size,
                            resolution=default_resolution(pipe), dtype=str(pipe.dtype), device=device.type,
                            prompts=prompts_sha)
            folder = os.path.join(cache_root, f"{_slug(label)}-{steps}steps-{settings_hash(settings)}")
            with user_errors():
                cache = ImageCache(folder, settings, args.batch_size)
            cache.fill(count, lambda a, b, s=steps: sample(pipe, [prompts[i % len(prompts)] for i in range(a, b)],
                                                          s, g, seed=args.seed + a, batch_size=b - a)[0],
                       desc=f"{label}, {steps} steps")
            out.append(Run(label, steps, g, cache, teacher))
        return out

    runs: list[Run] = []
    if args.teacher:
        g = args.guidance_scale if args.teacher_guidance_scale is None else args.teacher_guidance_scale
        teacher, sampler = load(args.teacher, None, "default", "--teacher")
        model = dict(pipeline=model_identity(args.teacher), lora=None, scheduler=sampler)
        runs += runs_of(teacher, f"teacher ({sampler})", model, sorted(set(args.teacher_steps)), g, True)
        del teacher
    pipe, sampler = load(args.pipeline, args.lora, args.scheduler, "--pipeline")
    name = os.path.basename(os.path.normpath(args.lora or args.pipeline))
    model = dict(pipeline=model_identity(args.pipeline), lora=model_identity(args.lora), scheduler=sampler)
    runs += runs_of(pipe, f"{name} ({sampler})", model, args.steps, args.guidance_scale, False)
    resolution = default_resolution(pipe)
    del pipe

    reference = runs[len(set(args.teacher_steps)) - 1] if args.teacher else None  # the teacher at its most steps
    accs = [measure(r.cache, count, prompts, scorers, args.batch_size,
                    None if reference is None or r is reference else reference.cache,
                    desc=f"measuring {r.label}, {r.steps} steps") for r in runs]
    real_feats = _reference_features(args, names, scorers, resolution, cache_root, reference, accs, runs)
    rows = [_row(r, a, count, names, real_feats) for r, a in zip(runs, accs)]
    notes = [w for w in [M.small_count_warning(count) if {"fid", "kid"} & set(names) else None] if w]
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    _write_outputs(args, names, rows, runs, prompts, count, notes)


def model_identity(path: str | None) -> dict[str, Any] | None:
    """A local model folder or file by absolute path and newest file time (a retrained LoRA gets a new cache);
    a hub id as given."""
    if not path or not os.path.exists(path):
        return None if not path else {"id": path}
    files = [path] if os.path.isfile(path) else [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]
    return {"path": os.path.abspath(path), "newest": max((os.path.getmtime(f) for f in files), default=0.0)}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:40]


def _reference_features(args: argparse.Namespace, names: list[str], scorers: Scorers, resolution: int,
                        cache_root: str, reference: Run | None, accs: list[Accumulator],
                        runs: list[Run]) -> dict[str, np.ndarray]:
    """Inception (and CLIP) features of the FID reference: real images (cached on disk) or the teacher's samples."""
    feats: dict[str, np.ndarray] = {}
    wants_fid = bool({"fid", "kid"} & set(names))
    if wants_fid and args.fid_reference == "teacher" and reference is not None:
        feats["inception"] = np.concatenate(accs[runs.index(reference)].inception)
    need_real = (wants_fid and args.fid_reference == "real") or "clip_fd" in names
    if not need_real:
        return feats
    files = list_images(args.real_images)[:args.num_real]
    if len(files) < 2:
        fail(f"--real_images {args.real_images} holds {len(files)} image(s); FID needs at least 2")
    key = settings_hash(dict(files=[os.path.abspath(f) for f in files], mtimes=[os.path.getmtime(f) for f in files],
                             resolution=resolution, inception=args.fid_inception, resize=args.fid_resize,
                             clip=args.clip_model, parts=[wants_fid and args.fid_reference == "real",
                                                          "clip_fd" in names]))
    path = os.path.join(cache_root, f"real-features-{key}.npz")
    if os.path.exists(path):
        with np.load(path) as stored:
            return {**{k: stored[k] for k in stored.files}, **feats}
    real: dict[str, list[np.ndarray]] = {"inception": [], "clip": []}
    for start in tqdm(range(0, len(files), args.batch_size), desc="real images", unit="batch", leave=False):
        images = real_images(files[start:start + args.batch_size], resolution)
        if wants_fid and args.fid_reference == "real":
            real["inception"].append(scorers.inception(images))
        if "clip_fd" in names:
            real["clip"].append(scorers.clip.image_features(images).double().numpy())
    computed = {k: np.concatenate(v) for k, v in real.items() if v}
    os.makedirs(cache_root, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **computed)
    return {**computed, **feats}


def _row(run: Run, acc: Accumulator, count: int, names: list[str], ref: dict[str, np.ndarray]) -> dict[str, Any]:
    """One results row: settings, the metrics asked for, RMSE to the teacher and sampling time."""
    row: dict[str, Any] = dict(label=run.label, steps=run.steps, guidance_scale=run.guidance_scale,
                               num_samples=count, seconds_per_image=run.cache.seconds_per_image)
    if acc.inception and "inception" in ref:
        feats = np.concatenate(acc.inception)
        if "fid" in names:
            row["fid"] = M.frechet_distance(feats, ref["inception"])
        if "kid" in names:
            row["kid"] = M.kernel_inception_distance(feats, ref["inception"])
    for name in ("clip_score", "pick_score", "lpips_to_teacher"):
        if name in names:
            row[name] = acc.mean(name)
    if "clip_fd" in names:
        row["clip_fd"] = M.frechet_distance(torch.cat(acc.clip_image).double().numpy(), ref["clip"])
    row["teacher_rmse"] = acc.mean("teacher_rmse")
    return row


def markdown(rows: list[dict[str, Any]], names: list[str]) -> str:
    """The results as a Markdown table, one row per model and step count."""
    cols = [n for n in PLOTTED if n in names or n == "teacher_rmse"]
    head = "| model / sampler | steps | CFG | " + " | ".join(TITLES[c] for c in cols) + " | s / image |"
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        cells = ["-" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]
        sec = "-" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.3g}"
        lines.append(f"| {r['label']} | {r['steps']} | {r['guidance_scale']:g} | " + " | ".join(cells) + f" | {sec} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], names: list[str], path: str) -> None:
    """Each metric against steps: a line per model, the teacher's largest-step value drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cols = [n for n in PLOTTED if (n in names or n == "teacher_rmse") and any(r.get(n) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.4), squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    teacher = [r for r in rows if r["label"].startswith("teacher")]
    for ax, col in zip(axes[0], cols):
        for label in labels:
            pts = [(r["steps"], r[col]) for r in rows if r["label"] == label and r.get(col) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        full = max(teacher, key=lambda r: r["steps"]) if teacher else None
        if full is not None and full.get(col) is not None:
            ax.axhline(full[col], color="gray", linestyle="--", label=f"teacher, {full['steps']} steps")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["steps"] for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 1 2 4 8, not 2^0 2^1 ...
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("steps")
        ax.set_title(TITLES[col])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _write_outputs(args: argparse.Namespace, names: list[str], rows: list[dict[str, Any]], runs: list[Run],
                   prompts: list[str], count: int, notes: list[str]) -> None:
    """metrics.json (rows and the settings that move the numbers), metrics.md, metrics.png, grid.png."""
    from .eval_sampling import Result, row_labels

    os.makedirs(args.output_dir, exist_ok=True)
    settings = dict(metrics=names, num_samples=count, fid_inception=args.fid_inception, fid_resize=args.fid_resize,
                    fid_reference=args.fid_reference, real_images=args.real_images, num_real=args.num_real,
                    clip_model=args.clip_model, pick_score_model=args.pick_score_model,
                    lpips_net=args.lpips_net, lpips_backbone=args.lpips_backbone, seed=args.seed, notes=notes)
    with atomic_write(os.path.join(args.output_dir, "metrics.json")) as tmp, open(tmp, "w") as f:
        json.dump({"settings": settings, "results": rows}, f, indent=2)
    table = markdown(rows, names)
    with atomic_write(os.path.join(args.output_dir, "metrics.md")) as tmp, open(tmp, "w") as f:
        f.write(table + "\n" + "".join(f"\n{n}\n" for n in notes))
    plot(rows, names, os.path.join(args.output_dir, "metrics.png"))
    shown = min(count, 12)
    labels = row_labels([Result(r.label, r.steps, None, None, 0.0, guidance_scale=r.guidance_scale) for r in runs])
    save_grid([r.cache.load(0, shown) for r in runs], os.path.join(args.output_dir, "grid.png"), labels,
              [prompts[i % len(prompts)] for i in range(shown)])
    print(table)
    print(f"metrics.json, metrics.md, metrics.png and grid.png written to {args.output_dir}/")
