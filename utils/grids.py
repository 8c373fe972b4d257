"""Image grids for people: one row of images per sampler/setting, labelled in the picture.

    save_grid([imgs_4_steps, imgs_8_steps], "grid.png", row_labels=["LCM, 4 steps, CFG 1.0", "LCM, 8 steps, CFG 1.0"],
              column_labels=prompts)

Row labels go in a left margin, column labels (e.g. the prompts, wrapped and, past a few lines,
cut with "...") in a band on top; both in PIL's built-in default font, black on white, so a grid
PNG says what it shows without its file name or a separate table. Images are in [-1, 1], (N, 3, H, W)
per row; each tile is enlarged by an integer factor (nearest neighbour) so small images stay crisp.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 4                 # pixels between a label's text and the edge of its cell
MIN_TILE = 128          # tiles are enlarged to at least this many pixels wide (unless `scale` is given)
MAX_ROW_LABEL_WIDTH = 200
MAX_COLUMN_LABEL_LINES = 4
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) uint8 of images (N, 3, H, W) in [-1, 1]: round((x + 1) * 127.5)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in default font (no font file needed)."""
    return ImageFont.load_default()


def line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """Pixels from one text line to the next: the font's tallest ascender-to-descender box, plus 2."""
    return font.getbbox("Hgjy|")[3] + 2


def wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """`text` broken into lines at most `width` pixels wide (at spaces, else inside a word); past
    `max_lines`, the last line kept ends in "..."."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        while len(word) > 1 and font.getlength(word) > width:  # a word wider than the cell: cut it
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) <= max_lines:
        return lines
    last = lines[max_lines - 1]
    while last and font.getlength(last + "...") > width:
        last = last[:-1]
    return lines[:max_lines - 1] + [last.rstrip() + "..."]


def draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: Sequence[str],
               font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    """Each line in INK, the first with its top-left at `xy`, the next ones `line_height` lower."""
    x, y = xy
    for k, line in enumerate(lines):
        draw.text((x, y + k * line_height(font)), line, font=font, fill=INK)


def grid_image(rows: Sequence[torch.Tensor], row_labels: Sequence[str] | None = None,
               column_labels: Sequence[str] | None = None, columns: int = 12, scale: int | None = None) -> Image.Image:
    """The grid as a PIL image: row i holds the first `columns` images of rows[i], enlarged `scale`
    times (default: the smallest factor making a tile MIN_TILE wide), with the labels drawn in."""
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    tiles = [to_uint8(r[:columns]) for r in rows]
    h, w = tiles[0].shape[1:3]
    scale = scale or max(1, -(-MIN_TILE // w))
    th, tw, gap = h * scale, w * scale, 2 * scale
    ncols = max(len(t) for t in tiles)
    font = label_font()
    step = line_height(font)

    margin, row_lines = 0, []
    if row_labels:
        widest = max(font.getlength(label) for label in row_labels)
        text_width = int(min(widest, MAX_ROW_LABEL_WIDTH)) + 1
        fit = max(1, (th - 2 * PAD) // step)
        row_lines = [wrap(label, font, text_width, fit) for label in row_labels]
        margin = text_width + 2 * PAD
    header, column_lines = 0, []
    if column_labels:
        column_lines = [wrap(label, font, tw - 2 * PAD, MAX_COLUMN_LABEL_LINES) for label in column_labels[:ncols]]
        header = max(len(lines) for lines in column_lines) * step + 2 * PAD

    canvas = Image.new("RGB", (margin + ncols * (tw + gap), header + len(tiles) * (th + gap)), BACKGROUND)
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            tile = Image.fromarray(img).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (margin + j * (tw + gap), header + i * (th + gap)))
    draw = ImageDraw.Draw(canvas)
    for i, lines in enumerate(row_lines):
        draw_lines(draw, (PAD, header + i * (th + gap) + PAD), lines, font)
    for j, lines in enumerate(column_lines):
        draw_lines(draw, (margin + j * (tw + gap) + PAD, PAD), lines, font)
    return canvas


def save_grid(rows: Sequence[torch.Tensor], path: str, row_labels: Sequence[str] | None = None,
              column_labels: Sequence[str] | None = None, columns: int = 12, scale: int | None = None) -> None:
    """Write grid_image(rows, row_labels, column_labels, columns, scale) as a PNG (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid_image(rows, row_labels, column_labels, columns, scale).save(path)


def log_image_grid(accelerator, rows: Sequence[torch.Tensor], row_labels: Sequence[str], step: int, output_dir: str,
                   tag: str = "validation", column_labels: Sequence[str] | None = None) -> str:
    """Save the labelled grid as <output_dir>/validation/<tag>-<step:06d>.png and log it to the
    tensorboard trackers; returns the PNG's path. Only the main process writes (with sharded weights every
    process samples)."""
    path = os.path.join(output_dir, "validation", f"{tag}-{step:06d}.png")
    if not accelerator.is_main_process:
        return path
    save_grid(rows, path, row_labels, column_labels, columns=max(r.shape[0] for r in rows))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            grid = np.asarray(Image.open(path).convert("RGB"))
            tracker.writer.add_image(tag, grid, step, dataformats="HWC")
            tracker.writer.add_text(f"{tag}/rows", ", ".join(row_labels), step)
    return path
