"""The toy world's captioned shapes: a procedural image generator and its on-disk formats.

Every image is one flat-coloured shape on a flat background, drawn at 4x and downsampled so the
edges are anti-aliased. The caption names everything a prompt can ask for, e.g.
"a large red circle on a white background". Position is random but not captioned.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .. import files

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
    "cyan": (30, 210, 220),
    "magenta": (210, 40, 200),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
SIZES = {"small": (0.26, 0.32), "large": (0.36, 0.44)}  # half-extent as a fraction of the side

COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
SIZE_NAMES = tuple(SIZES)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    cx: float  # centre, as a fraction of the side
    cy: float
    half: float  # half-extent, as a fraction of the side

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background, self.size)

    @property
    def labels(self) -> tuple[int, int]:
        """(shape index, colour index): what the judge predicts."""
        return SHAPES.index(self.shape), COLOUR_NAMES.index(self.colour)


def caption(shape: str, colour: str, background: str, size: str = "large") -> str:
    return f"a {size} {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[int, int] | None:
    """(shape index, colour index) named by a toy caption, or None if it names neither."""
    words = text.lower().replace(",", " ").split()
    shape = next((SHAPES.index(w) for w in words if w in SHAPES), None)
    colour = next((COLOUR_NAMES.index(w) for w in words if w in COLOURS), None)
    if shape is None or colour is None:
        return None
    return shape, colour


def vocabulary() -> list[str]:
    """Every word a toy caption can contain."""
    words = ["a", "on", "background", *SHAPES, *COLOUR_NAMES, *BACKGROUND_NAMES, *SIZE_NAMES]
    return list(dict.fromkeys(words))


def random_scene(rng: np.random.Generator, caption_words: str | None = None) -> Scene:
    """A random scene; caption_words: a caption whose shape, colour, background and size it takes (same draws)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    size = SIZE_NAMES[rng.integers(len(SIZE_NAMES))]
    for word in (caption_words or "").lower().split():
        shape = word if word in SHAPES else shape
        colour = word if word in COLOURS else colour
        background = word if word in BACKGROUNDS else background
        size = word if word in SIZES else size
    half = float(rng.uniform(*SIZES[size]))
    # keep the shape inside the frame, with a small margin
    lo, hi = half + 0.02, 1.0 - half - 0.02
    cx, cy = (float(rng.uniform(lo, hi)) if hi > lo else 0.5 for _ in range(2))
    return Scene(shape, colour, background, size, cx, cy, half)


def render(scene: Scene, resolution: int = 32, supersample: int = 4,
           background_rgb: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw a scene as an RGB image of side `resolution` (background_rgb: this colour instead of the scene's)."""
    side = resolution * supersample
    img = Image.new("RGB", (side, side), background_rgb or BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy, h = scene.cx * side, scene.cy * side, scene.half * side
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif scene.shape == "square":
        s = h * 0.85  # a square of the same half-extent looks much bigger than the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=fill)
    elif scene.shape == "cross":
        w = h * 0.36
        draw.rectangle([cx - h, cy - w, cx + h, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return img.resize((resolution, resolution), Image.LANCZOS)


def sample_batch(n: int, rng: np.random.Generator, resolution: int = 32):
    """n random scenes and their images as a uint8 array (n, H, W, 3)."""
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([np.asarray(render(s, resolution)) for s in scenes])
    return scenes, images


def write_imagefolder(out_dir: str, n: int, seed: int, resolution: int = 32, desc: str = "") -> None:
    """An HF `imagefolder`: PNGs plus metadata.jsonl with `file_name`, `text` and label columns."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    # metadata.jsonl goes in last: its presence means the folder is complete
    with files.atomic_write(os.path.join(out_dir, "metadata.jsonl")) as tmp, open(tmp, "w") as meta:
        for i in tqdm(range(n), desc=desc or f"imagefolder {out_dir}", leave=False):
            scene = random_scene(rng)
            name = f"{i:06d}.png"
            render(scene, resolution).save(os.path.join(out_dir, name))
            row = {"file_name": name, "text": scene.caption, "shape": scene.labels[0], "colour": scene.labels[1]}
            meta.write(json.dumps(row) + "\n")


def write_webdataset(out_dir: str, n: int, seed: int, resolution: int = 32, shard_size: int = 1000) -> None:
    """Webdataset shards `shard-000000.tar`, ...: each sample is `KEY.png` + `KEY.txt` (+ `KEY.json`)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard in tqdm(range((n + shard_size - 1) // shard_size), desc=f"webdataset {out_dir}", leave=False):
        path = os.path.join(out_dir, f"shard-{shard:06d}.tar")
        with files.atomic_write(path) as tmp, tarfile.open(tmp, "w") as tar:
            for i in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
                scene = random_scene(rng)
                buf = io.BytesIO()
                render(scene, resolution).save(buf, format="PNG")
                meta = json.dumps({"shape": scene.labels[0], "colour": scene.labels[1]}).encode()
                for ext, payload in (("png", buf.getvalue()), ("txt", scene.caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
