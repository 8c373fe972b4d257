"""utils.grids: labelled image grids (labels drawn in the picture) and their tensorboard logging."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from utils.grids import PAD, grid_image, log_image_grid, save_grid, wrap


def rows(n: int = 2, per_row: int = 3, side: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(per_row, 3, side, side, generator=gen) * 2 - 1 for _ in range(n)]


def text_alone(text: str, size: tuple[int, int]) -> np.ndarray:
    """The text drawn by PIL itself in its default font at (PAD, PAD) on a white cell of `size` (w, h)."""
    cell = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(cell).text((PAD, PAD), text, font=ImageFont.load_default(), fill=(0, 0, 0))
    return np.asarray(cell)


def test_labels_widen_and_heighten_the_grid():
    bare = grid_image(rows(), scale=2)
    assert bare.size == (3 * (64 + 4), 2 * (64 + 4))  # tiles of 32 px x 2, 2 x 2 px gaps
    labelled = grid_image(rows(), row_labels=["LCM, 4 steps, CFG 1.0", "LCM, 8 steps, CFG 1.0"], scale=2)
    assert labelled.width > bare.width and labelled.height == bare.height
    both = grid_image(rows(), ["LCM, 4 steps", "LCM, 8 steps"], ["a red circle", "a blue square", "a cross"], scale=2)
    assert both.width > bare.width and both.height > bare.height
    # the images themselves are unchanged, only moved right / down by the label margins
    margin, header = both.width - bare.width, both.height - bare.height
    assert np.array_equal(np.asarray(both)[header:, margin:], np.asarray(bare))


def test_row_label_is_the_text_passed_in():
    label, other = "LCM, 4 steps, CFG 1.0", "DDIM, 50 steps, CFG 7.5"
    bare = grid_image(rows(), scale=2)
    grid = np.asarray(grid_image(rows(), row_labels=[label, "LCM, 8 steps, CFG 1.0"], scale=2))
    margin = grid.shape[1] - bare.width
    cell = grid[:64, :margin]  # the first row's label cell: the left margin beside its tiles
    assert (cell < 128).any()  # something is written there
    assert np.array_equal(cell, text_alone(label, (margin, 64)))
    assert not np.array_equal(cell, text_alone(other, (margin, 64)))


def test_column_label_is_the_text_passed_in():
    prompts = ["red", "blue", "green"]
    bare = grid_image(rows(), scale=2)
    grid = np.asarray(grid_image(rows(), column_labels=prompts, scale=2))
    header = grid.shape[0] - bare.height
    second = grid[:header, 68:68 + 64]  # above the second column (64 px tile + 4 px gap to its left)
    assert np.array_equal(second, text_alone("blue", (64, header)))
    assert not np.array_equal(second, text_alone("red", (64, header)))


def test_long_labels_are_wrapped_and_cut():
    font = ImageFont.load_default()
    lines = wrap("a large red circle on a white background " * 4, font, 100, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 100 for line in lines)
    assert wrap("a red circle", font, 100, 3) == ["a red circle"]
    assert all(font.getlength(line) <= 40 for line in wrap("x" * 40, font, 40, 10))  # one word, cut inside


def test_row_labels_must_match_rows():
    with pytest.raises(ValueError, match="2 rows"):
        grid_image(rows(), row_labels=["only one"])


def test_save_and_log_image_grid(tmp_path):
    save_grid(rows(), str(tmp_path / "sub" / "grid.png"), ["a", "b"], ["x", "y", "z"])
    assert Image.open(tmp_path / "sub" / "grid.png").size == grid_image(rows(), ["a", "b"], ["x", "y", "z"]).size

    logged = []
    writer = SimpleNamespace(add_image=lambda *a, **k: logged.append(("image", a)),
                             add_text=lambda *a, **k: logged.append(("text", a)))
    tensorboard = [SimpleNamespace(name="tensorboard", writer=writer)]
    # another process (all sample when the weights are sharded) writes and logs nothing
    other = SimpleNamespace(is_main_process=False, trackers=tensorboard)
    path = log_image_grid(other, rows(), ["1 step", "2 steps"], 250, str(tmp_path))
    assert not os.path.exists(path) and not logged
    accelerator = SimpleNamespace(is_main_process=True, trackers=tensorboard)
    path = log_image_grid(accelerator, rows(), ["1 step", "2 steps"], 250, str(tmp_path))
    assert path == os.path.join(str(tmp_path), "validation", "validation-000250.png") and os.path.isfile(path)
    assert [kind for kind, _ in logged] == ["image", "text"]
    assert logged[0][1][1].shape == np.asarray(Image.open(path)).shape
