"""The README.md a recipe writes next to its output: what it is, how to load it, how it was trained."""

from __future__ import annotations

import argparse
import json
import os

from .flags import public_vars


def write_model_card(output_dir: str, title: str, args: argparse.Namespace, body: str = "") -> None:
    """Write <output_dir>/README.md: title, body (loading snippet, sampler settings), every training argument
    but the secret ones (flags.public_vars)."""
    lines = [f"# {title}", "", body.strip(), "", "## Training arguments", "", "```json",
             json.dumps(public_vars(args), indent=2, default=str), "```", ""]
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))
